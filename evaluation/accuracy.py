"""Accuracy of a model, with and without the dense CRF: mean IoU, per-class IoU, pixel accuracy.

Images: held-out generated scenes (``GeneratedScenes``: seeds 1,000,000 + i, sides 193..385 drawn
from the seed, so most are not of the form 8k+1 and none is square by design) or a VOC-format
dataset (evaluation/voc.py). ``evaluate()`` runs each contender's network once per image and the
CRF on its scores; ``search()`` keeps the scores of one contender and searches the CRF on them.
An image that cannot be scored (unreadable, a label file that is not a class-id PNG, a label map
of another size, a failure in the network or the CRF) is skipped with its reason and the others
are scored; the result lists it under "skipped" ({"id", "file", "reason"}).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from .failures import reason_of
from .metrics import confusion, scores
from .voc import IGNORE_LABEL, DatasetError, Sample, SkipImage, VOCDataset, listed

DEFAULT_SCENES = 100
MODES = ("no CRF", "CRF")


class GeneratedScenes:
    """``count`` held-out generated scenes from number ``first`` on, as a dataset (len, load(i) -> Sample).
    A CRF search on scenes from ``first`` = 100 on does not tune on the 100 scenes scored by default."""

    def __init__(self, count: int = DEFAULT_SCENES, first: int = 0):
        self.count, self.first = count, first
        self.description = f"{count} held-out generated scenes" + (f" from number {first} on" if first else "")

    def __len__(self) -> int:
        return self.count

    def load(self, i: int) -> Sample:
        from scenes import held_out_scene

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
    """Score every contender that can run (evaluation.contenders) on the same images, without and with
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


def format_scores(result: dict) -> str:
    """The reference's table: mIoU, pixel accuracy and per-class IoU without and with the CRF (%),
    and the CRF's gain."""
    row = next(r for r in result["contenders"] if not r["skipped"])
    lines = [f"{'':8s} {'mIoU':>7s} {'pix acc':>7s} " + " ".join(f"{c[:9]:>9s}" for c in result["class_names"])]
    for m in MODES:
        s = row[m]
        lines.append(f"{m:8s} {100 * s['mean_iou']:7.2f} {100 * s['pixel_accuracy']:7.2f} "
                     + " ".join(f"{'-':>9s}" if v is None else f"{100 * v:9.2f}" for v in s["per_class_iou"].values()))
    lines.append(f"CRF gain: {100 * (row['CRF']['mean_iou'] - row['no CRF']['mean_iou']):+.2f} mIoU points")
    return "\n".join(lines)


def format_parity(result: dict) -> str:
    """One row per contender: mIoU, its delta to the first and % of equal labels, without and with
    the CRF; FLAGGED where flag_regressions marked it."""
    width = max([28] + [len(row["name"]) for row in result["contenders"]])
    lines = [f"{'contender':{width}s} {'kind':9s} {'precision':9s} {'mIoU':>7s} {'delta':>7s} {'labels=':>8s} "
             f"{'CRF mIoU':>8s} {'delta':>7s} {'labels=':>8s}"]
    for row in result["contenders"]:
        head = f"{row['name']:{width}s} {row['kind']:9s} {row['precision']:9s}"
        if row["skipped"]:
            lines.append(f"{head} skipped: {row['skipped']}")
            continue
        cells = " ".join(f"{100 * row[m]['mean_iou']:{7 if m == 'no CRF' else 8}.2f} {row['delta'][m]:+7.2f} "
                         f"{row['labels_equal_pct'][m]:7.3f}%" for m in MODES)
        lines.append(f"{head} {cells}" + ("  FLAGGED" if row.get("flagged") else ""))
    lines.append(f"delta: mIoU points vs the first row; labels=: % of pixels labelled as the first row; "
                 f"flagged: more than {result['tolerance']:g} points below it")
    return "\n".join(lines)


def search(contender, source, crf_params, grid: dict, progress: bool = True) -> dict:
    """The CRF search (evaluation/crf_search.py) on the source's images: the network runs once per image
    and its scores are kept in memory (C x H x W float32 each) while the CRF runs per grid point.
    An image that fails to load or in the network, or whose scores the CRF refuses (NaN, inf), is
    skipped before the search, so that every grid point is scored on the same images; with none
    left, the search is not run and the results are None."""
    from crf import check_inputs

    from .crf_search import search_crf

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


def format_search(result: dict, start) -> str:
    """What search() found, against the CRF it started from (``start``, CRFParams) and no CRF."""
    from crf import CRFParams

    lines = [result["dataset"]] + result["notes"]
    if not result["images"]:
        return "\n".join(lines + ["no image could be scored: nothing searched (\"crf\": null)"])
    best = CRFParams.from_dict(result["crf"])
    lines.append(f"{len(result['grid'])} grid points on {result['images']} images: best mIoU "
                 f"{100 * result['mean_iou']:.2f} with {best}")
    lines.append(f"starting CRF: mIoU {100 * result['default_mean_iou']:.2f} ({start}); "
                 f"no CRF: {100 * result['no_crf_mean_iou']:.2f}")
    return "\n".join(lines)


def single_model_result(result: dict) -> dict:
    """evaluate()'s result for one model, as the command writes it without --parity: the
    contender's row lifted to the top ("model", "precision", "no CRF", "CRF")."""
    out = dict(result)
    row = out.pop("contenders")[0]
    out.update({"model": row["path"], "precision": row["precision"], "no CRF": row["no CRF"], "CRF": row["CRF"]})
    return out
