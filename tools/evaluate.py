#!/usr/bin/env python3
"""Accuracy of a model, with and without the dense CRF: mean IoU, per-class IoU, pixel accuracy.

    python tools/evaluate.py --model out/deeplab_shapes.onnx --images 100
    python tools/evaluate.py --model m.onnx --dataset VOCdevkit/VOC2012 --split val --crf-params crf.json
    python tools/evaluate.py --parity --model fp32.onnx --model fp16.onnx --model int8.onnx --pytorch m.safetensors
    python tools/evaluate.py --model m.onnx --dataset VOCdevkit/VOC2012 --split train --search-crf crf.json

Images: the held-out generated scenes (the first --images), or a VOC-format dataset (--dataset:
JPEGImages/<id>.jpg, SegmentationClass/<id>.png palettised, ImageSets/Segmentation/<split>.txt;
label 255 is not scored; --images takes the first N ids). Each network runs once per image; the CRF
(--crf-params, default DeepLab-LargeFOV's) refines the same scores. --parity compares several
models on the same images against the first (exit status 1 when one loses more than --tolerance
mIoU points); --search-crf searches the CRF's appearance kernel (docs/evaluation.md).

An image that cannot be scored (unreadable, a label file that is not a class-id PNG, a label map of
another size, a failure in the network or the CRF) is skipped with its reason, the others are
scored, the JSON lists it under "skipped" ({"id", "file", "reason"}), and the exit status is 1.

Held-out scenes use seeds 1,000,000 + i (training uses seeds below 10,000,000 * 1 + iterations *
batch, starting at 0, so the sets are disjoint for any realistic run) and sizes drawn from the seed
between 193 and 385 pixels per side, so most are not of the form 8k+1 and none is square by design.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __package__:  # imported: tools.evaluate from a checkout, deeplab_tools.evaluate when installed
    from .cli import crf_params_file, int_at_least, plain_warnings, refuse_unwritable, write_output  # noqa: E402
    from .metrics import confusion, mean_iou, scores  # noqa: E402,F401  (confusion, mean_iou: re-exported)
    from .voc import IGNORE_LABEL, DatasetError, Sample, SkipImage, VOCDataset, listed, reason_of  # noqa: E402
else:  # run as a script: python tools/evaluate.py
    from tools.cli import crf_params_file, int_at_least, plain_warnings, refuse_unwritable, write_output  # noqa: E402
    from tools.metrics import confusion, mean_iou, scores  # noqa: E402,F401
    from tools.voc import IGNORE_LABEL, DatasetError, Sample, SkipImage, VOCDataset, listed, reason_of  # noqa: E402

HELD_OUT_SEED = 1_000_000
DEFAULT_SCENES = 100
MODES = ("no CRF", "CRF")


def held_out_scene(i: int):
    if __package__:  # imported: tools.evaluate from a checkout, deeplab_tools.evaluate when installed
        from .scenes import scene_for_seed
    else:  # run as a script: python tools/evaluate.py
        from tools.scenes import scene_for_seed

    return scene_for_seed(HELD_OUT_SEED + i)


class GeneratedScenes:
    """``count`` held-out generated scenes from number ``first`` on, as a dataset (len, load(i) -> Sample).
    A CRF search on scenes from ``first`` = 100 on does not tune on the 100 scenes scored by default."""

    def __init__(self, count: int = DEFAULT_SCENES, first: int = 0):
        self.count, self.first = count, first
        self.description = f"{count} held-out generated scenes" + (f" from number {first} on" if first else "")

    def __len__(self) -> int:
        return self.count

    def load(self, i: int) -> Sample:
        return Sample(f"scene {self.first + i}", *held_out_scene(self.first + i))


def open_source(dataset: str | None, split: str = "val", images: int | None = None, first_scene: int = 0):
    """A VOCDataset (its first ``images`` ids) or, without ``dataset``, the held-out scenes."""
    if dataset:
        return VOCDataset(dataset, split, images)
    return GeneratedScenes(images or DEFAULT_SCENES, first_scene)


@dataclass
class DataReport:
    """What the data held besides scorable pixels: images skipped ({"id", "file", "reason"}: unreadable,
    no usable label map, or failing in the network or the CRF), pixels marked 255, and label values
    outside the model's classes (not scored either). Counts are over the images scored."""

    total: int = 0
    skipped: list = field(default_factory=list)
    ignored_pixels: int = 0
    out_of_range_pixels: int = 0
    out_of_range_images: list = field(default_factory=list)
    out_of_range_values: set = field(default_factory=set)

    def skip(self, name: str, file, reason: str) -> None:
        """Record an image that is not scored and say so on stderr, one line, as it happens."""
        from tqdm import tqdm

        self.skipped.append({"id": name, "file": file, "reason": reason})
        tqdm.write(f"skipped {name}: {reason}", file=sys.stderr)

    def count(self, sample: Sample, num_classes: int) -> None:
        """Add a scored image's ignored and out-of-range label pixels."""
        truth = sample.truth
        self.ignored_pixels += int((truth == IGNORE_LABEL).sum())
        outside = (truth >= num_classes) & (truth != IGNORE_LABEL)
        if outside.any():
            self.out_of_range_pixels += int(outside.sum())
            self.out_of_range_images.append(sample.name)
            self.out_of_range_values.update(int(v) for v in np.unique(truth[outside]))

    def to_dict(self) -> dict:
        return {"skipped": self.skipped, "ignored_pixels": self.ignored_pixels,
                "out_of_range": {"pixels": self.out_of_range_pixels, "images": len(self.out_of_range_images),
                                 "ids": self.out_of_range_images, "values": sorted(self.out_of_range_values)}}

    def lines(self, num_classes: int) -> list[str]:
        out = []
        if self.out_of_range_pixels:
            out.append(f"label values outside 0..{num_classes - 1} (and not {IGNORE_LABEL}): "
                       f"{self.out_of_range_pixels} pixels in {len(self.out_of_range_images)} image(s) "
                       f"({listed(self.out_of_range_images)}), values {listed(sorted(self.out_of_range_values))}; "
                       "not scored")
        return out

    def summary(self) -> str:
        """The run's last line: how many images were scored, and which were skipped."""
        done = f"scored {self.total - len(self.skipped)} of {self.total} images"
        if not self.skipped:
            return done
        return f"{done}; skipped {len(self.skipped)}: " + listed([s["id"] for s in self.skipped])


def checked_samples(source, report: DataReport, progress: bool = True, desc: str = "evaluate"):
    """The source's samples in order, with a progress bar. An image that cannot be loaded, for any
    reason, is recorded in ``report`` as skipped (and said on stderr) instead of stopping the run."""
    from tqdm import tqdm

    report.total = len(source)
    for i in tqdm(range(len(source)), desc=desc, unit="img", file=sys.stderr, disable=not progress):
        try:
            yield source.load(i)
        except SkipImage as e:
            report.skip(e.name, e.file, e.reason)
        except Exception as e:  # any other fault of this one image: the others are still scored
            report.skip(f"image {i}", None, reason_of(e))


def evaluate(contenders: list, source, crf_params, progress: bool = True) -> dict:
    """Score every contender that can run (tools.contenders) on the same images, without and with
    the CRF (one network pass per image; the CRF refines its scores). The reference is the first
    contender that runs: each row gets its mIoU difference to it (points) and the % of pixels whose
    label equals its label. An image that fails (loading, any contender's network or CRF) is skipped
    for all contenders, so that they are still compared on the same images; with none left, the
    scores are None. Returns a JSON-ready dict."""
    from crf import refine

    active = [c for c in contenders if c.segmenter is not None]
    if not active:
        raise ValueError("nothing to evaluate: " + "; ".join(f"{c.name}: {c.skipped}" for c in contenders))
    ref = active[0].segmenter
    n = ref.num_classes
    for c in active[1:]:
        if c.segmenter.num_classes != n:
            raise ValueError(f"{c.name} has {c.segmenter.num_classes} classes, {active[0].name} {n}: not comparable")
    conf = {id(c): {m: np.zeros((n, n), np.int64) for m in MODES} for c in active}
    equal = {id(c): {m: 0 for m in MODES} for c in active}
    report, pixels, images = DataReport(), 0, 0
    for sample in checked_samples(source, report, progress):
        try:
            labels = {}
            for c in active:
                r = c.segmenter(sample.image, return_scores=True)
                labels[id(c)] = {"no CRF": r.labels,
                                 "CRF": refine(r.scores, r.image, crf_params).argmax(0).astype(np.uint8)}
        except Exception as e:  # this image only; added to no contender's counts, so all skip it
            report.skip(sample.name, sample.file, reason_of(e))
            continue
        ref_labels = labels[id(active[0])]
        for c in active:
            for m in MODES:
                conf[id(c)][m] += confusion(labels[id(c)][m], sample.truth, n)
                equal[id(c)][m] += int((labels[id(c)][m] == ref_labels[m]).sum())
        report.count(sample, n)
        pixels += sample.truth.size
        images += 1
    if images and not conf[id(active[0])]["no CRF"].sum():
        raise DatasetError(f"no labelled pixels in {source.description}: every label is {IGNORE_LABEL} "
                           f"or outside 0..{n - 1}")
    rows = []
    for c in contenders:
        row = {"name": c.name, "path": c.path, "kind": c.kind, "precision": c.precision, "skipped": c.skipped}
        if c.segmenter is not None:
            row.update({m: scores(conf[id(c)][m], ref.class_names) if images else None for m in MODES})
            row["labels_equal_pct"] = {m: 100 * equal[id(c)][m] / pixels for m in MODES} if images else None
        rows.append(row)
    reference = next(r for r in rows if not r["skipped"])
    for row in rows:
        if not row["skipped"]:
            row["delta"] = ({m: 100 * (row[m]["mean_iou"] - reference[m]["mean_iou"]) for m in MODES}
                            if images else None)
    return {"dataset": source.description, "images": images, "class_names": list(ref.class_names),
            "crf": crf_params.to_dict(), **report.to_dict(), "notes": report.lines(n),
            "summary": report.summary(), "contenders": rows}


def flag_regressions(result: dict, tolerance: float) -> list[str]:
    """Mark (row["flagged"]) and name the contenders whose mIoU, without or with the CRF, is more
    than ``tolerance`` points below the reference's."""
    flagged = []
    for row in result["contenders"]:
        row["flagged"] = bool(row["skipped"] is None and row["delta"] and min(row["delta"].values()) < -tolerance)
        if row["flagged"]:
            flagged.append(row["name"])
    result["tolerance"] = tolerance
    return flagged


def print_scores(result: dict) -> None:
    row = next(r for r in result["contenders"] if not r["skipped"])
    print(f"{'':8s} {'mIoU':>7s} {'pix acc':>7s} " + " ".join(f"{c[:9]:>9s}" for c in result["class_names"]))
    for m in MODES:
        s = row[m]
        print(f"{m:8s} {100 * s['mean_iou']:7.2f} {100 * s['pixel_accuracy']:7.2f} "
              + " ".join(f"{'-':>9s}" if v is None else f"{100 * v:9.2f}" for v in s["per_class_iou"].values()))
    print(f"CRF gain: {100 * (row['CRF']['mean_iou'] - row['no CRF']['mean_iou']):+.2f} mIoU points")


def print_parity(result: dict) -> None:
    width = max([28] + [len(row["name"]) for row in result["contenders"]])
    print(f"{'contender':{width}s} {'kind':9s} {'precision':9s} {'mIoU':>7s} {'delta':>7s} {'labels=':>8s} "
          f"{'CRF mIoU':>8s} {'delta':>7s} {'labels=':>8s}")
    for row in result["contenders"]:
        head = f"{row['name']:{width}s} {row['kind']:9s} {row['precision']:9s}"
        if row["skipped"]:
            print(f"{head} skipped: {row['skipped']}")
            continue
        cells = " ".join(f"{100 * row[m]['mean_iou']:{7 if m == 'no CRF' else 8}.2f} {row['delta'][m]:+7.2f} "
                         f"{row['labels_equal_pct'][m]:7.3f}%" for m in MODES)
        print(f"{head} {cells}" + ("  FLAGGED" if row.get("flagged") else ""))
    print(f"delta: mIoU points vs the first row; labels=: % of pixels labelled as the first row; "
          f"flagged: more than {result['tolerance']:g} points below it")


def search(contender, source, crf_params, grid: dict, progress: bool = True) -> dict:
    """The CRF search (tools/crf_search.py) on the source's images: the network runs once per image
    and its scores are kept in memory (C x H x W float32 each) while the CRF runs per grid point.
    An image that fails to load or in the network, or whose scores the CRF refuses (NaN, inf), is
    skipped before the search, so that every grid point is scored on the same images; with none
    left, the search is not run and the results are None."""
    from crf import check_inputs

    if __package__:
        from .crf_search import search_crf
    else:
        from tools.crf_search import search_crf

    if contender.skipped:
        raise ValueError(f"{contender.name}: {contender.skipped}")
    seg, report = contender.segmenter, DataReport()
    cached = []
    for sample in checked_samples(source, report, progress, "network"):
        try:
            r = seg(sample.image, return_scores=True)
            check_inputs(r.scores, r.image)
        except Exception as e:  # this image only
            report.skip(sample.name, sample.file, reason_of(e))
            continue
        report.count(sample, seg.num_classes)
        cached.append((r.scores, r.image, sample.truth))
    found = search_crf(cached, seg.num_classes, crf_params, grid, progress) if cached else {
        "crf": None, "mean_iou": None, "default_mean_iou": None, "no_crf_mean_iou": None, "grid": [], "images": 0}
    return {**found, "dataset": source.description, **report.to_dict(), "notes": report.lines(seg.num_classes),
            "summary": report.summary()}


def float_list(text: str) -> tuple:
    """An argparse type: comma-separated positive numbers."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(v > 0 and np.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"values must be finite and > 0, got {text!r}")
    return values


def main(argv=None) -> int:
    plain_warnings()
    if __package__:
        from .contenders import open_model, open_pytorch
        from .crf_search import GRIDS
    else:
        from tools.contenders import open_model, open_pytorch
        from tools.crf_search import GRIDS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[],
                    help="ONNX model exported by tools/export.py, or a TensorRT plan (several with --parity)")
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
    for flag, axis in (("--search-w1", "bi_w"), ("--search-xy", "bi_xy_std"), ("--search-rgb", "bi_rgb_std")):
        ap.add_argument(flag, type=float_list, metavar="V,V,...", help=f"--search-crf: the coarse {axis} values")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    from crf import CRFParams
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
            grid = {**GRIDS[args.search_grid], **{a: v for a, v in (("bi_w", args.search_w1), (
                "bi_xy_std", args.search_xy), ("bi_rgb_std", args.search_rgb)) if v}}
            result = search(contenders[0], source, crf_params, grid, progress)
            print("\n".join([source.description] + result["notes"]))
            if result["images"]:
                best = CRFParams.from_dict(result["crf"])
                print(f"{len(result['grid'])} grid points on {result['images']} images: best mIoU "
                      f"{100 * result['mean_iou']:.2f} with {best}")
                print(f"starting CRF: mIoU {100 * result['default_mean_iou']:.2f} ({crf_params}); "
                      f"no CRF: {100 * result['no_crf_mean_iou']:.2f}")
            else:
                print("no image could be scored: nothing searched (\"crf\": null)")
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
                print_parity(result)
                status = 1 if flagged else 0
                if flagged:
                    print(f"FAILED: {', '.join(flagged)} more than {args.tolerance:g} mIoU points below the reference")
            else:
                print_scores(result)
            if not args.parity:
                row = result.pop("contenders")[0]
                result.update({"model": row["path"], "precision": row["precision"],
                               "no CRF": row["no CRF"], "CRF": row["CRF"]})
        if args.json and not write_output("--json", args.json, json.dumps(result, indent=2, allow_nan=False).encode()):
            return 1
    except ValueError as e:  # DatasetError, ModelFormatError: their messages name the file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["summary"])
    return 1 if result["skipped"] else status


if __name__ == "__main__":
    sys.exit(main())
