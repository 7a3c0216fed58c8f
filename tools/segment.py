"""Segment images (files, folders, globs) into VOC-palette PNG masks and overlays.

    deeplab-segment samples/ --model models/deeplab_shapes.onnx --out out/segmented
    deeplab-segment samples/scene_0.png --model models/deeplab_shapes.onnx --out out/segmented --side-by-side

(or python -m tools.segment ... from a checkout). Writes <name>_mask.png (8-bit palettised PNG, the
PASCAL VOC label format) and <name>_overlay.jpg per image (with --side-by-side also
<name>_side_by_side.jpg: the input, the network's labels alone and the labels after the CRF,
colours blended as in the overlay), and prints per-stage timings. <name> is the file name without
its extension (under a glob's folders, its path from there: "photos/**/*.jpg" -> 2024/x); inputs
whose names coincide take their paths from the folder they share (a/x.png, b/x.png -> a/x, b/x),
then their extensions (x.png, x.jpg -> x_png, x_jpg), so no result overwrites another; every
result lands inside --out (runtime/batch_files.py). An image that cannot be segmented, for whatever
reason, is reported on one line, none of its files is written, and the others go on; the run ends
with a summary and exit status 1. Images above --max-pixels are refused before they are decoded (a
decompression-bomb guard). Temporary files a killed run left in the output folders are removed at
the start.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from crf.params import MAX_ITERATIONS
from evaluation.failures import reason_of
from runtime.batch_files import expand, inside, output_names
from runtime.contract import DEFAULT_MAX_PIXELS
from runtime.memory import DEFAULT_MEMORY_BUDGET

from .cli import crf_params_file, int_at_least, int_in, plain_warnings


def unit_interval(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


NEXT_STEP = {"preprocess": "network", "network": "crf", "crf": "write"}


def main(argv=None) -> int:
    plain_warnings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    ap.add_argument("--model", required=True, help="ONNX model (deeplab-export) or TensorRT plan")
    ap.add_argument("--out", default="out/segmented", help="output folder")
    crf_choice = ap.add_mutually_exclusive_group()
    crf_choice.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    crf_choice.add_argument("--crf-params", type=crf_params_file, metavar="FILE",
                            help="CRF parameters, JSON (CRFParams fields, or what deeplab-evaluate --search-crf writes)")
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
    from runtime import ModelFormatError, Segmenter, SizeLimits
    from runtime.output_files import write_files_together
    from runtime.palette import blend, indexed_png_bytes, side_by_side

    try:
        crf = args.crf_params or CRFParams()
        if args.crf_iterations is not None:
            crf = dataclasses.replace(crf, iterations=args.crf_iterations)
        seg = Segmenter(args.model, crf=None if args.no_crf else crf,
                        limits=SizeLimits(max_pixels=args.max_pixels, memory_budget=args.memory_budget * 1e9))
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
