"""Latency report of runtime.Segmenter configurations, stage by stage (trtexec style).

    deeplab-benchmark --model models/deeplab_shapes.onnx --size 513x513 --runs 20
    deeplab-benchmark --model models/deeplab_shapes.onnx --size 257x257 \\
        --config crf=on --config crf=off --config batch=4,threads=1 \\
        --json out/bench.json --markdown out/bench.md --chart out/bench.png

(or python -m tools.benchmark ... from a checkout). A configuration is a model, a network backend,
the CRF on or off, an image size HxW, a batch (N variants of the image per call, passed to the
Segmenter as a list) and a thread count; the model's precision is read from its metadata. --config
KEY=VALUE,... (keys: model, backend, crf, size, batch, threads, label) may be repeated; each one
takes the plain options (--model, --backend, ...) for the keys it leaves out, and the first is the
baseline the others are compared with. Configurations run in alternating blocks of --block calls
(A B A B ...: the machine's speed drifts), after --warmup calls each. Per stage (preprocess,
upload, network, crf, download, postprocess, total, and the call's wall time): min, mean, p50,
p90, p99, max in ms per call, and the throughput in images/s. A configuration that cannot run here
is reported as skipped, with the reason. docs/benchmark.md says what each stage includes; the
measurement is benchmarking/latency.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

from runtime.backend_choice import BACKENDS

from .cli import int_at_least, plain_warnings, refuse_unwritable, seconds, write_output

CONFIG_KEYS = ("model", "backend", "crf", "size", "batch", "threads", "label")
MAX_THREADS = 256  # the CPU CRF's thread pool limit


def parse_size(s: str) -> Tuple[int, int]:
    """An argparse type: 'HxW' (e.g. 513x513) -> (H, W), both >= 1."""
    parts = s.lower().split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 513x513, got {s!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"height and width must be >= 1, got {s!r}")
    return h, w


def parse_on_off(s: str) -> bool:
    v = s.strip().lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {s!r}")


def parse_backend(s: str) -> str:
    if s not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {s!r}: choose one of {', '.join(BACKENDS)}")
    return s


def parse_threads(s: str) -> int:
    n = int_at_least(1)(s)
    if n > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_THREADS}, got {n}")
    return n


_CONFIG_VALUES = {"model": str, "backend": parse_backend, "crf": parse_on_off, "size": parse_size,
                  "batch": int_at_least(1), "threads": parse_threads, "label": str}


def parse_config(s: str) -> Dict[str, Any]:
    """An argparse type: 'KEY=VALUE,KEY=VALUE' -> {key: parsed value} (keys: CONFIG_KEYS)."""
    out: Dict[str, Any] = {}
    for item in (p.strip() for p in s.split(",")):
        if not item:
            continue
        key, sep, value = (p.strip() for p in item.partition("="))
        if not sep or key not in _CONFIG_VALUES:
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(CONFIG_KEYS)}")
        if key in out:
            raise argparse.ArgumentTypeError(f"{key} given twice in {s!r}")
        try:
            out[key] = _CONFIG_VALUES[key](value)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{key}: {e}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"empty configuration {s!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="ONNX model (deeplab-export) or TensorRT plan")
    ap.add_argument("--backend", type=parse_backend, default="auto", help=f"one of {', '.join(BACKENDS)}")
    ap.add_argument("--crf", type=parse_on_off, default=True, help="on (default) or off")
    ap.add_argument("--size", type=parse_size, default=(513, 513), help="image size HxW (default 513x513)")
    ap.add_argument("--batch", type=int_at_least(1), default=1, help="images per call (default 1)")
    ap.add_argument("--threads", type=parse_threads, help="ONNX Runtime and CPU CRF threads (default: theirs)")
    ap.add_argument("--config", action="append", type=parse_config, default=[], metavar="KEY=VALUE,...",
                    help=f"a configuration to compare (keys: {', '.join(CONFIG_KEYS)}); repeat it; the first "
                         "is the baseline")
    ap.add_argument("--image", help="image file, resized to each size (default: a generated scene)")
    ap.add_argument("--warmup", type=int_at_least(0), default=3, help="calls before measuring (default 3)")
    how_long = ap.add_mutually_exclusive_group()
    how_long.add_argument("--runs", type=int_at_least(1), help="measured calls per configuration (default 20)")
    how_long.add_argument("--duration", type=seconds(), help="seconds of calls per configuration instead")
    ap.add_argument("--block", type=int_at_least(1), default=5,
                    help="calls of one configuration before the next one's (default 5)")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--markdown", help="write a Markdown table here")
    ap.add_argument("--chart", help="write a PNG chart of median stage times here")
    ap.add_argument("--chart-width", type=int_at_least(400), default=960, help="pixels (default 960)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    plain_warnings()
    ap = build_parser()
    args = ap.parse_args(argv)
    from benchmarking.latency import chart_png, format_console, format_markdown, make_config, run_benchmark
    from runtime.contract import load_image
    from runtime.errors import ImageError

    base = {"model": args.model, "backend": args.backend, "crf": args.crf, "size": args.size, "batch": args.batch,
            "threads": args.threads}
    overrides = args.config or [{}]
    for k, o in enumerate(overrides, 1):
        if o.get("model", args.model) is None:
            ap.error(f"--config {k}: no model: give model=PATH or --model" if args.config else "--model is required")
    refuse_unwritable(ap, {"--json": args.json, "--markdown": args.markdown, "--chart": args.chart})
    if args.chart and Path(args.chart).suffix.lower() != ".png":
        ap.error(f"--chart {args.chart}: the chart is a PNG: give a path ending in .png")
    image = None
    if args.image:
        try:
            image = load_image(args.image)
        except ImageError as e:
            ap.error(f"--image: {e}")
    configs = [make_config(base, o) for o in overrides]
    report = run_benchmark(configs, image, args.warmup, args.runs or 20, args.duration, args.block,
                           progress=not args.no_progress)
    print(format_console(report))
    written = [write_output(flag, path, make()) for flag, path, make in (
        ("--json", args.json, lambda: json.dumps(report, indent=2, allow_nan=False).encode()),
        ("--markdown", args.markdown, lambda: format_markdown(report).encode()),
        ("--chart", args.chart, lambda: chart_png(report, args.chart_width))) if path]
    if all(r["skipped"] is not None for r in report["configurations"]):
        print("error: no configuration could run here", file=sys.stderr)
        return 1
    return 0 if all(written) else 1


if __name__ == "__main__":
    sys.exit(main())
