#!/usr/bin/env python3
"""Peak memory of one Segmenter call, measured against the model in runtime/memory.py.

    python benchmarks/memory_bench.py --json benchmarks/results/memory_cpu.json
    python benchmarks/memory_bench.py --classes 21        # a 21-class model (exported here; needs torch)

For each size (default 1, 5, 12 and 24 MP, 4:3), a fresh process loads the model, segments a small
image once (libraries, kernels and pools warmed), then segments one image of that size with the CRF;
it reports the process's peak RSS before the call (the baseline: Python, the libraries, the model,
the input image) and after it, and the model's prediction of what the call adds (everything but the
already decoded image). The network runtime's own activations at the network's size (at most
max_size, 1025, per side) are measured but not modelled: the "unmodelled" column is the difference.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES_MP = (1, 5, 12, 24)

CHILD = r"""
import json, resource, sys, time
import cv2, numpy as np
from runtime import Segmenter, SizeLimits
model, h, w, crf_max = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
probs = sys.argv[5] == "1"
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
seg = Segmenter(model, limits=SizeLimits(crf_max_pixels=None if crf_max == "default" else int(crf_max)))
scene = cv2.imread(sys.argv[6])
seg(cv2.resize(scene, (64, 48), interpolation=cv2.INTER_AREA))
image = cv2.resize(scene, (w, h), interpolation=cv2.INTER_LINEAR)
base = peak()
t = time.perf_counter()
r = seg(image, return_probabilities=probs)
seconds = time.perf_counter() - t
after = peak()
m = seg.memory_model(h, w, return_probabilities=probs)
print(json.dumps({"height": h, "width": w, "pixels": h * w, "classes": seg.num_classes, "baseline_rss": base,
                  "peak_rss": after, "call_measured": after - base, "call_modelled": m.total - m.image,
                  "model": {k: getattr(m, k) for k in ("image", "network", "crf", "full_size", "outputs")},
                  "model_total": m.total, "memory_budget": seg.limits.memory_budget, "crf_scale": r.crf_scale,
                  "crf_max_pixels": seg.limits.crf_pixels(seg.num_classes), "seconds": round(seconds, 2)}))
"""


def measure(model: Path, h: int, w: int, crf_max_pixels: int | None = None, return_probabilities: bool = False,
            image: Path = ROOT / "samples" / "scene_0.png", timeout: float = 600) -> dict:
    """One Segmenter call on ``image`` resized to h x w, in a fresh process: peak RSS before and
    after, and the model."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(h), str(w),
                          "default" if crf_max_pixels is None else str(crf_max_pixels),
                          "1" if return_probabilities else "0", str(image)], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def size_of(mp: float) -> tuple:
    """(height, width) of about mp megapixels at 4:3."""
    w = round((mp * 1e6 * 4 / 3) ** 0.5)
    return round(w * 3 / 4), w


def model_with_classes(classes: int, folder: Path) -> Path:
    """A randomly initialised width-1/8 LargeFOV with ``classes`` classes, exported to ONNX (needs torch)."""
    import torch

    from export.model import DeepLabV1, ModelConfig
    from export.onnx_export import export_onnx

    torch.manual_seed(0)
    net = DeepLabV1(ModelConfig(num_classes=classes, width=0.125)).eval()
    return export_onnx(net, folder / f"random_{classes}.onnx")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "deeplab_shapes.onnx")
    ap.add_argument("--classes", type=int, help="export and measure a random model with this many classes instead")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES_MP)), help="megapixels, comma-separated")
    ap.add_argument("--image", default=str(ROOT / "samples" / "scene_0.png"),
                    help="image file resized to each size, or a scikit-image photograph by name (astronaut, "
                         "coffee, chelsea: needs scikit-image)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = model_with_classes(args.classes, Path(tmp)) if args.classes else args.model
        image = Path(args.image)
        if not image.is_file():  # a photograph by name
            import cv2

            from benchmarking.inputs import photo

            image = Path(tmp) / f"{args.image}.png"
            cv2.imwrite(str(image), photo(args.image, 1024))
        rows = []
        print(f"{'size':>12s} {'MP':>5s} {'baseline MB':>11s} {'peak MB':>8s} {'call MB':>8s} {'model MB':>8s} "
              f"{'unmodelled':>10s} {'crf scale':>9s} {'s':>6s}")
        for mp in sizes:
            h, w = size_of(mp)
            r = measure(model, h, w, image=image)
            rows.append(r)
            print(f"{w:>5d}x{h:<6d} {h * w / 1e6:5.1f} {r['baseline_rss'] / 1e6:11.0f} {r['peak_rss'] / 1e6:8.0f} "
                  f"{r['call_measured'] / 1e6:8.0f} {r['call_modelled'] / 1e6:8.0f} "
                  f"{(r['call_measured'] - r['call_modelled']) / 1e6:10.0f} {r['crf_scale']:9.3f} {r['seconds']:6.1f}",
                  flush=True)
    if args.json:
        from runtime.output_files import write_bytes_atomically

        doc = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "model": (f"random, {args.classes} classes, width 1/8" if args.classes else
                         str(args.model.resolve().relative_to(ROOT) if args.model.resolve().is_relative_to(ROOT)
                             else args.model)),
               "image": args.image, "command": "python benchmarks/memory_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "results": rows}
        write_bytes_atomically(args.json, (json.dumps(doc, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
