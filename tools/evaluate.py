#!/usr/bin/env python3
"""Mean IoU of a model on the held-out generated scenes, with and without the dense CRF.

    python tools/evaluate.py --model out/deeplab_shapes.onnx --images 100

Held-out scenes use seeds 1,000,000 + i (training uses seeds below 10,000,000 * 1 + iterations *
batch, starting at 0, so the sets are disjoint for any realistic run) and sizes drawn from the seed
between 193 and 385 pixels per side, so most are not of the form 8k+1 and none is square by design.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __package__:  # imported: tools.evaluate from a checkout, deeplab_tools.evaluate when installed
    from .cli import int_at_least  # noqa: E402
else:  # run as a script: python tools/evaluate.py
    from tools.cli import int_at_least  # noqa: E402

HELD_OUT_SEED = 1_000_000


def held_out_scene(i: int):
    if __package__:  # imported: tools.evaluate from a checkout, deeplab_tools.evaluate when installed
        from .scenes import scene_for_seed
    else:  # run as a script: python tools/evaluate.py
        from tools.scenes import scene_for_seed

    return scene_for_seed(HELD_OUT_SEED + i)


def confusion(labels: np.ndarray, truth: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(truth.astype(np.int64).ravel() * n + labels.ravel(), minlength=n * n).reshape(n, n)


def mean_iou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    return float(np.nanmean(iou)), iou


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="ONNX model exported by tools/export.py")
    ap.add_argument("--images", type=int_at_least(1), default=100)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from runtime.output_files import output_file_problem, write_bytes_atomically

    if not Path(args.model).is_file():
        ap.error(f"--model: model file not found: {args.model}")
    problem = output_file_problem(args.json) if args.json else None
    if problem:
        ap.error(f"--json {args.json}: {problem}")

    from tqdm import tqdm

    from crf import CRFParams, refine
    from runtime import Segmenter

    # One network pass per scene: the labels without the CRF, and the same logits refined by the
    # CRF exactly as Segmenter(crf=CRFParams()) would (labels = argmax of crf.refine's marginals).
    plain = Segmenter(args.model, crf=None)
    n = plain.num_classes
    conf = {"no CRF": np.zeros((n, n), np.int64), "CRF": np.zeros((n, n), np.int64)}
    for i in tqdm(range(args.images), desc="evaluate", unit="img", file=sys.stderr):
        image, truth = held_out_scene(i)
        result = plain(image, return_scores=True)
        conf["no CRF"] += confusion(result.labels, truth, n)
        conf["CRF"] += confusion(refine(result.scores, result.image, CRFParams()).argmax(0).astype(np.uint8), truth, n)
    results = {}
    print(f"{args.images} held-out scenes, CRF {CRFParams()}")
    print(f"{'':8s} {'mIoU':>7s} " + " ".join(f"{c[:9]:>9s}" for c in plain.class_names))
    for name, c in conf.items():
        miou, iou = mean_iou(c)
        # A class absent from both truth and labels has no IoU: null in the JSON (NaN is not JSON).
        per_class = [None if np.isnan(v) else v for v in iou.tolist()]
        results[name] = {"mean_iou": miou, "per_class_iou": dict(zip(plain.class_names, per_class)),
                         "pixel_accuracy": float(np.trace(c) / c.sum())}
        print(f"{name:8s} {100 * miou:7.2f} " + " ".join(f"{100 * v:9.2f}" for v in iou))
    gain = 100 * (results["CRF"]["mean_iou"] - results["no CRF"]["mean_iou"])
    print(f"CRF gain: {gain:+.2f} mIoU points")
    if args.json:
        text = json.dumps({"images": args.images, "crf": CRFParams().__dict__, **results}, indent=2,
                          allow_nan=False)
        write_bytes_atomically(args.json, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
