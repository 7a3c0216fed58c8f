#!/usr/bin/env python3
"""Segment images (files, folders, globs) into VOC-palette PNG masks and overlays.

    python tools/segment.py samples/ --model out/deeplab_shapes.onnx --out out/segmented

Writes <name>_mask.png (8-bit palettised PNG, the PASCAL VOC label format) and
<name>_overlay.jpg per image (with --side-by-side also <name>_side_by_side.jpg: the input, the
network's labels alone and the labels after the CRF, colours blended as in the overlay), and prints
per-stage timings. <name> is the file name without its
extension (under a glob's folders, its path from there: "photos/**/*.jpg" -> 2024/x); inputs whose
names coincide take their paths from the folder they share (a/x.png, b/x.png -> a/x, b/x), then
their extensions (x.png, x.jpg -> x_png, x_jpg), so no result overwrites another; every result
lands inside --out. An image that cannot be segmented, for whatever reason, is reported on one line,
none of its files is written, and the others go on; the run ends with a summary and exit status 1.
Images above --max-pixels are refused before they are decoded (a decompression-bomb guard).
Temporary files a killed run left in the output folders are removed at the start.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crf.params import MAX_ITERATIONS  # noqa: E402
from runtime.contract import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES  # noqa: E402
from runtime.memory import DEFAULT_MEMORY_BUDGET  # noqa: E402

if __package__:  # imported: tools.segment from a checkout, deeplab_tools.segment when installed
    from .cli import crf_params_file, int_at_least, int_in, plain_warnings, reason_of  # noqa: E402
else:  # run as a script: python tools/segment.py
    from tools.cli import crf_params_file, int_at_least, int_in, plain_warnings, reason_of  # noqa: E402


def expand(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(file, the folder its output name is relative to) for the files named, in folders (not
    recursive) or matched by globs (relative to the glob's fixed leading folders); each file once."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [(f, p) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        elif any(ch in item for ch in "*?["):
            fixed = next((i for i, part in enumerate(p.parts) if any(ch in part for ch in "*?[")), 0)
            base = Path(*p.parts[:fixed]) if fixed else Path(".")
            found += [(Path(f), base) for f in sorted(glob.glob(item, recursive=True)) if Path(f).is_file()]
        else:
            found.append((p, p.parent))  # missing files are reported by the Segmenter with a clear message
    seen: set[str] = set()
    unique = []
    for f, base in found:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append((f, base))
    return unique


def output_names(found: list[tuple[Path, Path]]) -> list[str]:
    """One distinct output name (a relative path without extension) per (file, base) of expand():
    the file's path relative to its base; inputs whose names coincide take their paths relative
    to the folder they share (a/x.png, b/x.png -> a/x, b/x), then their extensions (x_png, x_jpg);
    any name still taken is numbered. Compared case-insensitively (macOS, Windows file systems)."""
    absolute = [os.path.abspath(f) for f, _ in found]
    names = [os.path.splitext(os.path.relpath(a, os.path.abspath(b)))[0] for a, (_, b) in zip(absolute, found)]

    def groups() -> dict[str, list[int]]:
        by_name: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            by_name.setdefault(n.casefold(), []).append(i)
        return {k: v for k, v in by_name.items() if len(v) > 1}

    for idx in groups().values():
        shared = os.path.commonpath([os.path.dirname(absolute[i]) for i in idx])
        for i in idx:
            names[i] = os.path.splitext(os.path.relpath(absolute[i], shared))[0]
    for idx in groups().values():
        for i in idx:
            ext = os.path.splitext(absolute[i])[1].lstrip(".")
            names[i] = f"{names[i]}_{ext}" if ext else names[i]
    # A name that climbs out of its base (a pattern like "a/*/../../b/*.png") would put its results
    # outside --out: it keeps only its file name (numbered below where that is taken).
    names = [n if _stays_inside(n) else os.path.basename(n) for n in names]
    taken = {n.casefold() for n in names}
    used: set[str] = set()
    unique = []
    for n in names:
        u, k = n, 2
        while u.casefold() in used or (u != n and u.casefold() in taken):
            u, k = f"{n}_{k}", k + 1
        used.add(u.casefold())
        unique.append(u)
    return unique


def _stays_inside(name: str) -> bool:
    """Whether a relative output name stays inside the folder it is joined to."""
    norm = os.path.normpath(name)
    return not (os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep))


def inside(folder: Path, target: Path) -> bool:
    """Whether target resolves inside folder (symbolic links followed)."""
    root = os.path.realpath(folder)
    return os.path.commonpath([root, os.path.realpath(target)]) == root


def unit_interval(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


NEXT_STEP = {"preprocess": "network", "network": "crf", "crf": "write"}


def side_by_side(panels: list[tuple[str, "np.ndarray"]]) -> "np.ndarray":
    """Equal-sized BGR images side by side, each captioned (top left, white on a dark band)."""
    import cv2
    import numpy as np

    h, w = panels[0][1].shape[:2]
    scale = max(0.4, min(w, h) / 500)  # legible on small images, not huge on large ones
    thick = max(1, round(scale * 2))
    out = []
    for caption, img in panels:
        img = img.copy()
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        pad = max(2, th // 3)
        band = img[: th + base + 2 * pad, : tw + 2 * pad]
        band[:] = (band * 0.4).astype(np.uint8)  # darkened, so white text reads on any image
        cv2.putText(img, caption, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
        out.append(img)
    return np.hstack(out)


def main(argv=None) -> int:
    plain_warnings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    ap.add_argument("--model", required=True, help="ONNX model exported by tools/export.py")
    ap.add_argument("--out", default="out/segmented", help="output folder")
    crf_choice = ap.add_mutually_exclusive_group()
    crf_choice.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    crf_choice.add_argument("--crf-params", type=crf_params_file, metavar="FILE",
                            help="CRF parameters, JSON (CRFParams fields, or what tools/evaluate.py --search-crf writes)")
    ap.add_argument("--crf-iterations", type=int_in(0, MAX_ITERATIONS),
                    help=f"mean-field iterations, 0..{MAX_ITERATIONS} (default: 10, or the file's)")
    ap.add_argument("--max-pixels", type=int_at_least(1), default=DEFAULT_MAX_PIXELS,
                    help="largest image taken, in pixels (default: %(default)s); larger ones are refused "
                         "from their header, before decoding")
    ap.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET / 1e9, metavar="GB",
                    help="bound of one image's modelled peak memory, GB (default: %(default)s); an image over "
                         "it is refused before it is decoded")
    ap.add_argument("--alpha", type=unit_interval, default=0.5, help="overlay opacity, 0..1")
    ap.add_argument("--side-by-side", action="store_true",
                    help="also write <name>_side_by_side.jpg: input | network alone | with CRF")
    args = ap.parse_args(argv)
    if not args.memory_budget > 0:
        ap.error(f"--memory-budget must be > 0 GB, got {args.memory_budget}")

    from runtime.output_files import output_folder_problem, remove_stale_temporaries

    out = Path(args.out)
    problem = output_folder_problem(out)
    if problem:
        ap.error(f"--out {out}: {problem}")
    if not Path(args.model).is_file():
        ap.error(f"--model: model file not found: {args.model}")
    found = expand(args.inputs)
    if not found:
        ap.error("no images found in " + " ".join(args.inputs))
    files = [f for f, _ in found]
    names = output_names(found)
    targets = [(out / f"{n}_mask.png", out / f"{n}_overlay.jpg")
               + ((out / f"{n}_side_by_side.jpg",) if args.side_by_side else ()) for n in names]
    inputs = {os.path.abspath(f) for f in files}
    clash = next((t for pair in targets for t in pair if os.path.abspath(t) in inputs), None)
    if clash is not None:
        ap.error(f"--out {out}: a result would overwrite the input {clash}")
    outside = next((t for pair in targets for t in pair if not inside(out, t)), None)
    if outside is not None:  # names never climb out; a symbolic link inside --out still can
        ap.error(f"--out {out}: a result would be written outside it, at {outside}")
    for folder in sorted({t.parent for pair in targets for t in pair}):
        for stale in remove_stale_temporaries(folder):
            print(f"removed {stale}, left by an interrupted run", file=sys.stderr)

    import cv2
    import numpy as np
    from tqdm import tqdm

    from crf import CRFParams
    from runtime import ModelFormatError, Segmenter
    from runtime.output_files import write_files_together
    from runtime.palette import blend, indexed_png_bytes

    try:
        crf = args.crf_params or CRFParams()
        if args.crf_iterations is not None:
            crf = dataclasses.replace(crf, iterations=args.crf_iterations)
        seg = Segmenter(args.model, crf=None if args.no_crf else crf, max_pixels=args.max_pixels,
                        memory_budget=args.memory_budget * 1e9)
    except (ModelFormatError, ValueError, OSError, RuntimeError, ImportError) as e:
        # a model that cannot be opened here (not ours, broken, a TensorRT plan without TensorRT)
        print(f"error: {args.model}: {' '.join(str(e).split())}" if args.model not in str(e) else
              f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"network: {seg.backend}; CRF: {seg.crf_backend or 'off'}")
    failed_files: list[str] = []
    stages = ("preprocess", "network", "crf", "postprocess", "total")
    seen: dict[str, list[float]] = {st: [] for st in stages}
    print(f"{'image':32s} " + " ".join(f"{s:>11s}" for s in stages) + "   (ms)")
    # Four steps per image (load, network, CRF, write): the bar moves while a large image is in the CRF.
    bar = tqdm(total=4 * len(files), desc="segment", unit="step", file=sys.stderr)
    for k, (f, (mask_path, overlay_path, *side_path)) in enumerate(zip(files, targets)):
        bar.n = 4 * k
        bar.set_postfix_str(f"{Path(f).name}: load", refresh=True)

        def tick(stage: str) -> None:  # the stage just done: show the one now running
            bar.set_postfix_str(f"{Path(f).name}: {NEXT_STEP[stage]}", refresh=False)
            bar.update(1)

        try:
            # The scores are kept for the side-by-side: the network's own labels are their argmax,
            # so the network runs once for both panels.
            r = seg(f, progress=tick, return_scores=args.side_by_side)
            overlay = seg.overlay(r, args.alpha)
            ok, jpg = cv2.imencode(".jpg", overlay)
            if not ok:
                raise ValueError("cannot encode the overlay")
            if side_path:
                network_labels = np.argmax(r.scores, axis=0).astype(np.uint8)
                panels = [("input", r.image), ("network", blend(r.image, network_labels, seg.palette, args.alpha)),
                          ("with CRF" if seg.crf_backend else "CRF off", overlay)]
                ok, side_jpg = cv2.imencode(".jpg", side_by_side(panels))
                if not ok:
                    raise ValueError("cannot encode the side-by-side image")
            written = {mask_path: indexed_png_bytes(r.labels, seg.palette), overlay_path: jpg.tobytes()}
            if side_path:
                written[side_path[0]] = side_jpg.tobytes()
            write_files_together(written)  # all of this image's files, or none
        except Exception as e:  # noqa: BLE001 (one image's failure, of any kind, must not stop the others)
            # One line per image: its path and the reason (messages from loading already name it).
            reason = reason_of(e, expected=(ValueError, OSError))
            tqdm.write("failed: " + (reason if str(f) in reason else f"{f}: {reason}"), file=sys.stderr)
            failed_files.append(str(f))
            continue
        bar.update(1)
        tqdm.write(f"{str(f)[-32:]:32s} " + " ".join(f"{r.timings[s]:11.1f}" for s in stages))
        for st in stages:
            seen[st].append(r.timings[st])
    bar.n = bar.total
    bar.close()
    if len(seen["total"]) > 1:
        for name, q in (("median", 50), ("p90", 90), ("p99", 99)):
            print(f"{name:32s} " + " ".join(f"{np.percentile(seen[st], q):11.1f}" for st in stages))
    failed = len(failed_files)
    print(f"wrote {len(files) - failed} masks and overlays to {out}"
          + (f"; {failed} failed: {', '.join(failed_files[:5])}"
             + (", ..." if failed > 5 else "") if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
