"""Accuracy of a model, with and without the dense CRF: mean IoU, per-class IoU, pixel accuracy.

    deeplab-evaluate --model models/deeplab_shapes.onnx --images 100 --json out/miou.json
    deeplab-evaluate --parity --model models/deeplab_shapes.onnx --pytorch models/deeplab_shapes.safetensors
    deeplab-evaluate --model models/deeplab_shapes.onnx --search-crf out/crf.json --first-scene 100
    deeplab-evaluate --model models/deeplab_shapes.onnx --crf-params out/crf.json --images 100

(or python -m tools.evaluate ... from a checkout). Images: the held-out generated scenes (the first
--images), or a VOC-format dataset (--dataset ROOT, e.g. VOCdevkit/VOC2012, --split val:
JPEGImages/<id>.jpg, SegmentationClass/<id>.png palettised, ImageSets/Segmentation/<split>.txt;
label 255 is not scored; --images takes the first N ids). Each network runs once per image; the CRF (--crf-params, default DeepLab-LargeFOV's) refines
the same scores. --parity compares several models on the same images against the first (exit
status 1 when one loses more than --tolerance mIoU points); --search-crf searches the CRF's
appearance kernel (docs/evaluation.md).

An image that cannot be scored (unreadable, a label file that is not a class-id PNG, a label map of
another size, a failure in the network or the CRF) is skipped with its reason, the others are
scored, the JSON lists it under "skipped" ({"id", "file", "reason"}), and the exit status is 1.

Held-out scenes use seeds 1,000,000 + i (training uses seeds below 10,000,000 * 1 + iterations *
batch, starting at 0, so the sets are disjoint for any realistic run) and sizes drawn from the seed
between 193 and 385 pixels per side, so most are not of the form 8k+1 and none is square by design.
The logic is the evaluation package (evaluation/accuracy.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from evaluation.accuracy import DEFAULT_SCENES
from evaluation.crf_search import AXES, GRIDS

from .cli import crf_params_file, int_at_least, plain_warnings, refuse_unwritable, write_output

#: The options that replace a coarse grid axis of --search-crf, per CRFParams field.
SEARCH_AXIS_FLAGS = {"bi_w": "--search-w1", "bi_xy_std": "--search-xy", "bi_rgb_std": "--search-rgb"}


def float_list(text: str) -> tuple:
    """An argparse type: comma-separated positive numbers."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"values must be finite and > 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[],
                    help="ONNX model exported by deeplab-export, or a TensorRT plan (several with --parity)")
    ap.add_argument("--pytorch", metavar="CHECKPOINT", help="a checkpoint run in PyTorch (needs torch)")
    ap.add_argument("--dataset", metavar="ROOT", help="a VOC-format dataset (default: generated held-out scenes)")
    ap.add_argument("--split", default="val", help="ImageSets/Segmentation/<split>.txt (default: val)")
    ap.add_argument("--images", type=int_at_least(1),
                    help=f"the first N images (default: {DEFAULT_SCENES} scenes, or the whole split)")
    ap.add_argument("--crf-params", type=crf_params_file, metavar="FILE",
                    help="CRF parameters, JSON (CRFParams fields, or a --search-crf output)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--parity", action="store_true", help="compare the models on the same images")
    mode.add_argument("--search-crf", metavar="OUT.json", help="search the CRF parameters, write the best here")
    ap.add_argument("--tolerance", type=float, default=1.0,
                    help="--parity: mIoU points a model may lose against the first (default 1.0)")
    ap.add_argument("--first-scene", type=int_at_least(0), default=0,
                    help="generated scenes: start at this scene number (e.g. 100 to search the CRF on scenes "
                         "the default evaluation does not score)")
    ap.add_argument("--search-images", type=int_at_least(1), default=20, help="--search-crf: images (default 20)")
    ap.add_argument("--search-grid", choices=sorted(GRIDS), default="coarse",
                    help="--search-crf: coarse (the paper's ranges) or tiny (their ends)")
    for axis in AXES:
        ap.add_argument(SEARCH_AXIS_FLAGS[axis], dest=axis, type=float_list, metavar="V,V,...",
                        help=f"--search-crf: the coarse {axis} values")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv=None) -> int:
    plain_warnings()
    ap = build_parser()
    args = ap.parse_args(argv)

    from crf import CRFParams
    from evaluation.accuracy import (evaluate, flag_regressions, format_parity, format_scores, format_search,
                                     open_source, search, single_model_result)
    from evaluation.contenders import open_model, open_pytorch
    from evaluation.voc import DatasetError

    if args.first_scene and args.dataset:
        ap.error("--first-scene applies to the generated scenes, not to --dataset (choose a --split)")
    if not args.model and not args.pytorch:
        ap.error("give a model: --model FILE (or --pytorch CHECKPOINT)")
    if len(args.model) + bool(args.pytorch) > 1 and not args.parity:
        ap.error("several models: add --parity to compare them")
    for path in args.model + ([args.pytorch] if args.pytorch else []):
        if not Path(path).is_file():
            ap.error(f"model file not found: {path}")
    refuse_unwritable(ap, {"--json": args.json, "--search-crf": args.search_crf})
    try:
        source = open_source(args.dataset, args.split, args.search_images if args.search_crf else args.images,
                             args.first_scene)
    except DatasetError as e:
        ap.error(f"--dataset: {e}")
    crf_params = args.crf_params or CRFParams()
    progress = not args.quiet
    try:
        contenders = [open_model(p) for p in args.model] + ([open_pytorch(args.pytorch)] if args.pytorch else [])
        if args.search_crf:
            grid = {**GRIDS[args.search_grid], **{axis: getattr(args, axis) for axis in AXES if getattr(args, axis)}}
            result = search(contenders[0], source, crf_params, grid, progress)
            print(format_search(result, crf_params))
            # Written even when images were skipped, or all were: the file says which and why.
            if not write_output("--search-crf", args.search_crf,
                                json.dumps(result, indent=2, allow_nan=False).encode()):
                return 1
            print(f"wrote {args.search_crf}")
            status = 0
        else:
            result = evaluate(contenders, source, crf_params, progress)
            print(f"{result['images']} images: {source.description}; CRF {crf_params}")
            for line in result["notes"]:
                print(line)
            status = 0
            if not result["images"]:
                print("no image could be scored: no scores")
            elif args.parity:
                flagged = flag_regressions(result, args.tolerance)
                print(format_parity(result))
                status = 1 if flagged else 0
                if flagged:
                    print(f"FAILED: {', '.join(flagged)} more than {args.tolerance:g} mIoU points below the reference")
            else:
                print(format_scores(result))
            if not args.parity:
                result = single_model_result(result)
        if args.json and not write_output("--json", args.json, json.dumps(result, indent=2, allow_nan=False).encode()):
            return 1
    except ValueError as e:  # DatasetError, ModelFormatError: their messages name the file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["summary"])
    return 1 if result["skipped"] else status


if __name__ == "__main__":
    sys.exit(main())
