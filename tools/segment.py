#!/usr/bin/env python3
"""Segment images (files, folders, globs) into VOC-palette PNG masks and overlays.

    python tools/segment.py samples/ --model out/deeplab_shapes.onnx --out out/segmented

Writes <name>_mask.png (8-bit palettised PNG, the PASCAL VOC label format) and
<name>_overlay.jpg per image, and prints per-stage timings.
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def expand(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            files += sorted(Path(f) for f in glob.glob(item, recursive=True))
        else:
            files.append(p)  # missing files are reported by the Segmenter with a clear message
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    ap.add_argument("--model", required=True, help="ONNX model exported by tools/export.py")
    ap.add_argument("--out", default="out/segmented", help="output folder")
    ap.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    ap.add_argument("--crf-iterations", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    args = ap.parse_args(argv)

    import cv2
    from tqdm import tqdm

    from crf import CRFParams
    from runtime import ImageError, ModelFormatError, Segmenter
    from runtime.palette import write_indexed_png

    files = expand(args.inputs)
    if not files:
        print("error: no images found in " + " ".join(args.inputs), file=sys.stderr)
        return 2
    try:
        seg = Segmenter(args.model, crf=None if args.no_crf else CRFParams(iterations=args.crf_iterations))
    except (ModelFormatError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"network: {seg.backend}; CRF: {seg.crf_backend or 'off'}")
    failed = 0
    stages = ("preprocess", "network", "crf", "postprocess", "total")
    seen: dict[str, list[float]] = {st: [] for st in stages}
    print(f"{'image':32s} " + " ".join(f"{s:>11s}" for s in stages) + "   (ms)")
    for f in tqdm(files, desc="segment", unit="img", file=sys.stderr):
        try:
            r = seg(f)
        except ImageError as e:
            tqdm.write(f"skipped: {e}", file=sys.stderr)
            failed += 1
            continue
        write_indexed_png(out / f"{f.stem}_mask.png", r.labels, seg.palette)
        cv2.imwrite(str(out / f"{f.stem}_overlay.jpg"), seg.overlay(r, args.alpha))
        tqdm.write(f"{f.name[:32]:32s} " + " ".join(f"{r.timings[s]:11.1f}" for s in stages))
        for st in stages:
            seen[st].append(r.timings[st])
    if len(seen["total"]) > 1:
        import numpy as np

        for name, q in (("median", 50), ("p90", 90), ("p99", 99)):
            print(f"{name:32s} " + " ".join(f"{np.percentile(seen[st], q):11.1f}" for st in stages))
    print(f"wrote {len(files) - failed} masks and overlays to {out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
