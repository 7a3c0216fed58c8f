"""The evaluation package and deeplab-evaluate as the accuracy tool: VOC-format datasets and their faults, the metrics,
parity of several models, the CRF search; and CRF parameter files in deeplab-segment and the Segmenter."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from conftest import ROOT, SAMPLES
from crf import CRFParams
from evaluation.accuracy import evaluate
from evaluation.contenders import open_model, open_pytorch
from evaluation.voc import DatasetError, Sample, VOCDataset, read_label_png
from runtime.contract import load_image
from runtime.palette import voc_palette, write_indexed_png
from scenes import make_scene
from tools.evaluate import main

ONNX = ROOT / "models" / "deeplab_shapes.onnx"
SIZES = ((65, 97), (81, 73), (97, 89), (73, 65))


def make_voc(root, n=4, split="val"):
    """A VOC-format dataset of n generated scenes (65-97 px): JPEG images, palettised label PNGs."""
    ids = [f"2007_{i:06d}" for i in range(n)]
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(ids):
        image, labels = make_scene(500 + i, *SIZES[i % len(SIZES)])
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), image)
        write_indexed_png(root / "SegmentationClass" / f"{name}.png", labels, voc_palette(256))
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return ids


class InMemory:
    """A dataset of Samples already in memory (what evaluate() reads: len, load, description)."""

    description = "in memory"

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        return self.samples[i]


@pytest.fixture(scope="module")
def onnx_model():
    return open_model(ONNX)


def run_main(args, capsys):
    """deeplab-evaluate (tools/evaluate.py) in this process: (exit status, stdout, stderr)."""
    try:
        status = main([*map(str, args), "--quiet"])
    except SystemExit as e:  # argparse errors
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_label_pngs_are_read_as_class_indices(tmp_path):
    labels = np.array([[0, 1, 2, 3], [4, 255, 20, 0]], np.uint8)
    write_indexed_png(tmp_path / "voc.png", labels, voc_palette(256))
    assert (read_label_png(tmp_path / "voc.png") == labels).all()
    # A palette padded with black after its five colours: black is index 0, the first of its repeats.
    padded = np.zeros((256, 3), np.uint8)
    padded[:5] = voc_palette(5)
    write_indexed_png(tmp_path / "padded.png", labels.clip(0, 4), padded)
    assert (read_label_png(tmp_path / "padded.png") == labels.clip(0, 4)).all()
    cv2.imwrite(str(tmp_path / "grey.png"), labels)  # greyscale label maps (as SegmentationClassAug)
    assert (read_label_png(tmp_path / "grey.png") == labels).all()
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([labels] * 3))
    with pytest.raises(DatasetError, match="colour type 2 .*label PNGs hold class ids"):
        read_label_png(tmp_path / "rgb.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "voc.png").read_bytes()[:40])
    with pytest.raises(DatasetError, match="cannot decode the label PNG"):
        read_label_png(tmp_path / "cut.png")


def test_label_pngs_written_by_pillow(tmp_path):
    """Another writer's palettised PNG (its own filters and compression): the same indices as Pillow reads."""
    Image = pytest.importorskip("PIL.Image")
    labels = make_scene(7, 97, 81)[1]
    labels[::7, ::5] = 255
    im = Image.fromarray(labels, mode="P")
    im.putpalette(voc_palette(256).ravel().tolist())
    im.save(tmp_path / "p.png", optimize=True)
    assert (np.array(Image.open(tmp_path / "p.png")) == labels).all()
    assert (read_label_png(tmp_path / "p.png") == labels).all()


def test_dataset_scores_equal_the_same_images_in_memory(tmp_path, onnx_model):
    ids = make_voc(tmp_path)
    data = evaluate([onnx_model], VOCDataset(tmp_path), CRFParams(), progress=False)
    # The same images (JPEG-decoded) and the generator's own label arrays, never written to PNG.
    same = [Sample(i, load_image(tmp_path / "JPEGImages" / f"{i}.jpg"), make_scene(500 + k, *SIZES[k])[1])
            for k, i in enumerate(ids)]
    ref = evaluate([onnx_model], InMemory(same), CRFParams(), progress=False)
    assert data["images"] == ref["images"] == 4
    for mode in ("no CRF", "CRF"):
        a, b = data["contenders"][0][mode], ref["contenders"][0][mode]
        assert a["confusion"] == b["confusion"] and a["mean_iou"] == b["mean_iou"]
        assert sum(map(sum, a["confusion"])) == sum(h * w for h, w in SIZES)
        conf = np.array(a["confusion"])
        assert a["pixel_accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
        iou = [v for v in a["per_class_iou"].values() if v is not None]
        assert a["mean_iou"] == pytest.approx(np.mean(iou))
    assert 0.3 < data["contenders"][0]["CRF"]["mean_iou"] <= 1
    assert data["skipped"] == [] and data["ignored_pixels"] == 0 and data["out_of_range"]["pixels"] == 0
    # --images takes the first N ids.
    two = evaluate([onnx_model], VOCDataset(tmp_path, limit=2), CRFParams(), progress=False)
    assert two["images"] == 2 and "2 of 4 images" in two["dataset"]


def test_pixels_labelled_255_are_not_scored(tmp_path, onnx_model):
    ids = make_voc(tmp_path)
    before = evaluate([onnx_model], VOCDataset(tmp_path), CRFParams(), progress=False)
    path = tmp_path / "SegmentationClass" / f"{ids[1]}.png"
    truth = read_label_png(path)
    truth[10:30, 5:60] = 255  # a band across object and background
    write_indexed_png(path, truth, voc_palette(256))
    after = evaluate([onnx_model], VOCDataset(tmp_path), CRFParams(), progress=False)
    assert after["ignored_pixels"] == 20 * 55
    for mode in ("no CRF", "CRF"):
        total = [sum(map(sum, r["contenders"][0][mode]["confusion"])) for r in (before, after)]
        assert total[0] - total[1] == 20 * 55


def test_missing_dataset_parts_are_named(tmp_path, capsys):
    ids = make_voc(tmp_path, n=8)
    with pytest.raises(DatasetError, match=r"split file ImageSets/Segmentation/test\.txt not found \(splits there: val\)"):
        VOCDataset(tmp_path, "test")
    for name in ids[1:]:
        (tmp_path / "JPEGImages" / f"{name}.jpg").unlink()
    (tmp_path / "SegmentationClass" / f"{ids[0]}.png").unlink()
    with pytest.raises(DatasetError) as e:
        VOCDataset(tmp_path)
    assert ("7 of 8 ids have no JPEGImages/<id>.jpg: 2007_000001, 2007_000002, 2007_000003, 2007_000004, "
            "2007_000005, ... (7 in all)") in str(e.value)
    assert "1 of 8 ids have no SegmentationClass/<id>.png: 2007_000000" in str(e.value)
    with pytest.raises(DatasetError, match="1 of 1 ids have no SegmentationClass"):
        VOCDataset(tmp_path, limit=1)
    shutil.rmtree(tmp_path / "SegmentationClass")
    with pytest.raises(DatasetError, match=r"folder SegmentationClass/ not found"):
        VOCDataset(tmp_path)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("\n  \n")
    status, _, err = run_main(["--model", ONNX, "--dataset", tmp_path], capsys)
    assert status == 2 and "val.txt: the split lists no images" in err
    status, _, err = run_main(["--model", ONNX, "--dataset", tmp_path / "absent"], capsys)
    assert status == 2 and f"dataset folder not found: {tmp_path / 'absent'}" in err


def test_label_values_outside_the_classes_are_reported_not_scored(tmp_path, onnx_model, capsys):
    ids = make_voc(tmp_path)
    for name, value, rows in ((ids[0], 9, slice(0, 3)), (ids[2], 17, slice(5, 7))):
        path = tmp_path / "SegmentationClass" / f"{name}.png"
        truth = read_label_png(path)
        truth[rows] = value
        write_indexed_png(path, truth, voc_palette(256))
    expected = 3 * SIZES[0][1] + 2 * SIZES[2][1]
    data = evaluate([onnx_model], VOCDataset(tmp_path), CRFParams(), progress=False)
    assert data["out_of_range"] == {"pixels": expected, "images": 2, "ids": [ids[0], ids[2]], "values": [9, 17]}
    assert sum(map(sum, data["contenders"][0]["CRF"]["confusion"])) == sum(h * w for h, w in SIZES) - expected
    status, out, _ = run_main(["--model", ONNX, "--dataset", tmp_path, "--json", tmp_path / "e.json"], capsys)
    assert status == 0
    assert (f"label values outside 0..4 (and not 255): {expected} pixels in 2 image(s) ({ids[0]}, {ids[2]}), "
            "values 9, 17; not scored") in out
    assert json.loads((tmp_path / "e.json").read_text())["out_of_range"]["pixels"] == expected


def worse_model(path):
    """The bundled export with fc8's background bias lowered by 4: objects swallow the background."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(ONNX))
    bias = next(t for t in model.graph.initializer if t.name == "net.fc8.bias")
    values = numpy_helper.to_array(bias).copy()
    values[0] -= 4.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(path))
    return path


def test_parity_of_exports_pytorch_and_a_plan(tmp_path, capsys):
    from export.precision import convert_precision

    make_voc(tmp_path / "voc")
    shutil.copy(ONNX, tmp_path / "copy.onnx")
    convert_precision(ONNX, tmp_path / "fp16.onnx", "fp16")
    (tmp_path / "m.engine").write_bytes(b"plan")
    status, out, _ = run_main(["--parity", "--dataset", tmp_path / "voc", "--model", ONNX, "--model", tmp_path / "copy.onnx",
                               "--model", tmp_path / "fp16.onnx", "--model", tmp_path / "m.engine",
                               "--pytorch", ROOT / "models" / "deeplab_shapes.safetensors",
                               "--json", tmp_path / "p.json"], capsys)
    assert status == 0, out
    rows = {r["name"]: r for r in json.loads((tmp_path / "p.json").read_text())["contenders"]}
    for name in ("deeplab_shapes.onnx", "copy.onnx"):
        assert rows[name]["delta"] == {"no CRF": 0.0, "CRF": 0.0}
        assert rows[name]["labels_equal_pct"] == {"no CRF": 100.0, "CRF": 100.0} and not rows[name]["flagged"]
    assert rows["fp16.onnx"]["precision"] == "fp16" and rows["copy.onnx"]["precision"] == "fp32"
    for name in ("fp16.onnx", "deeplab_shapes.safetensors"):
        assert rows[name]["labels_equal_pct"]["no CRF"] > 99.5 and abs(rows[name]["delta"]["CRF"]) < 1.0
    assert rows["deeplab_shapes.safetensors"]["kind"] == "pytorch"
    assert rows["m.engine"]["kind"] == "tensorrt" and "TensorRT" in rows["m.engine"]["skipped"]
    assert "m.engine" in out and "skipped: " in out and "FLAGGED" not in out


def test_parity_flags_a_worse_model(tmp_path, capsys):
    make_voc(tmp_path / "voc")
    worse = worse_model(tmp_path / "worse.onnx")
    status, out, _ = run_main(["--parity", "--dataset", tmp_path / "voc", "--model", ONNX, "--model", worse,
                               "--json", tmp_path / "p.json"], capsys)
    data = json.loads((tmp_path / "p.json").read_text())
    ref, bad = data["contenders"]
    assert status == 1 and bad["flagged"] and not ref["flagged"] and data["tolerance"] == 1.0
    assert bad["delta"]["no CRF"] < -1.0 and bad["labels_equal_pct"]["no CRF"] < 100
    assert "FLAGGED" in out and "FAILED: worse.onnx more than 1 mIoU points below the reference" in out
    # A tolerance wider than the loss passes it.
    loss = -min(bad["delta"].values())
    status, out, _ = run_main(["--parity", "--dataset", tmp_path / "voc", "--model", ONNX, "--model", worse,
                               "--tolerance", f"{loss + 0.5}"], capsys)
    assert status == 0 and "FLAGGED" not in out


def test_pytorch_contender_without_torch_is_skipped(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    c = open_pytorch(ROOT / "models" / "deeplab_shapes.safetensors")
    assert c.segmenter is None and c.skipped == "PyTorch is not importable: No module named 'torch'"


def test_crf_search_writes_params_the_runtime_loads(tmp_path, capsys):
    from runtime import Segmenter

    make_voc(tmp_path / "voc")
    out = tmp_path / "crf.json"
    status, text, err = run_main(["--model", ONNX, "--dataset", tmp_path / "voc", "--search-crf", out,
                                  "--search-images", "3", "--search-w1", "5", "--search-xy", "50,80",
                                  "--search-rgb", "3,10", "--crf-params", _params(tmp_path, iterations=5)], capsys)
    assert status == 0, err
    data = json.loads(out.read_text())
    assert data["images"] == 3
    coarse = [g for g in data["grid"] if g["stage"] == "coarse"]
    fine = [g for g in data["grid"] if g["stage"] == "fine"]
    assert len(coarse) == 4 and 0 < len(fine) <= 8  # 3 x 3 around the best, less the point already tried
    assert {g["bi_w"] for g in data["grid"]} == {5.0}  # one value: the axis stays fixed
    best = max(data["grid"], key=lambda g: g["mean_iou"])
    assert data["mean_iou"] == best["mean_iou"] >= data["default_mean_iou"]  # the start (5, 50, 10) is on the grid
    assert data["default_mean_iou"] == next(g["mean_iou"] for g in coarse if (g["bi_xy_std"], g["bi_rgb_std"]) == (50, 10))
    params = CRFParams.load(out)
    assert (params.bi_xy_std, params.bi_rgb_std) == (best["bi_xy_std"], best["bi_rgb_std"])
    assert params.iterations == 5  # the fields not searched come from --crf-params
    assert Segmenter(ONNX, crf=out).crf_params == params
    assert Segmenter(ONNX, crf=str(out)).crf_params == params
    assert "best mIoU" in text and "starting CRF: mIoU" in text


def _params(folder, **values):
    """A CRF parameter file, named after its values."""
    path = folder / ("crf_" + "_".join(f"{k}{v}" for k, v in values.items()) + ".json")
    path.write_text(json.dumps(values))
    return path


def test_evaluate_arguments_are_refused_with_the_reason(tmp_path, capsys):
    cases = (
        (["--model", ONNX, "--model", ONNX], "several models: add --parity to compare them"),
        ([], "give a model: --model FILE"),
        (["--model", ONNX, "--search-crf", tmp_path / "s.json", "--search-xy", "50,x"],
         "argument --search-xy: expected comma-separated numbers, got '50,x'"),
        (["--model", ONNX, "--search-crf", tmp_path / "s.json", "--search-rgb", "0,3"],
         "argument --search-rgb: values must be finite and > 0"),
        (["--model", ONNX, "--crf-params", _params(tmp_path, bi_weight=4)], "unknown CRF parameter(s) bi_weight"),
        (["--model", ONNX, "--parity", "--search-crf", tmp_path / "s.json"], "not allowed with argument"),
        (["--model", ONNX, "--search-crf", tmp_path], f"--search-crf {tmp_path}: {tmp_path} is a folder"),
        (["--model", ONNX, "--dataset", tmp_path, "--first-scene", "3"], "--first-scene applies to the generated"),
        (["--model", ONNX, "--first-scene", "-1"], "--first-scene"),
    )
    for args, message in cases:
        status, _, err = run_main(args, capsys)
        assert status == 2 and message in err, (args, err)


def test_segment_with_a_crf_params_file(tmp_path, capsys):
    from tools.segment import main as segment_main

    sample = SAMPLES / "scene_0.png"
    # Zero mean-field iterations: the CRF returns the network's softmax, so the labels are the network's.
    assert segment_main([str(sample), "--model", str(ONNX), "--out", str(tmp_path / "a"),
                         "--crf-params", str(_params(tmp_path, iterations=0))]) == 0
    assert segment_main([str(sample), "--model", str(ONNX), "--out", str(tmp_path / "b"), "--no-crf"]) == 0
    assert segment_main([str(sample), "--model", str(ONNX), "--out", str(tmp_path / "c")]) == 0
    masks = [read_label_png(tmp_path / d / "scene_0_mask.png") for d in "abc"]
    assert (masks[0] == masks[1]).all() and (masks[0] != masks[2]).any()
    capsys.readouterr()
    (tmp_path / "broken.json").write_text("{bi_w: 4")
    for extra, message in ((["--crf-params", str(_params(tmp_path, bi_w=-1))], "CRFParams.bi_w must be a finite number > 0"),
                           (["--crf-params", str(tmp_path / "broken.json")], "not JSON"),
                           (["--crf-params", str(tmp_path / "absent.json")], "cannot read"),
                           (["--crf-params", str(_params(tmp_path, bi_w=4)), "--no-crf"], "not allowed with argument")):
        with pytest.raises(SystemExit) as e:
            segment_main([str(sample), "--model", str(ONNX), "--out", str(tmp_path / "d"), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "argument --" in err, err


def test_segmenter_refuses_a_bad_crf_file(tmp_path):
    from runtime import Segmenter

    with pytest.raises(ValueError, match="unknown CRF parameter"):
        Segmenter(ONNX, crf=_params(tmp_path, sigma=3))


def test_scenes_from_a_given_number_on():
    """--first-scene: a CRF search on scenes the default evaluation does not score."""
    from evaluation.accuracy import GeneratedScenes
    from scenes import held_out_scene

    later = GeneratedScenes(2, first=100)
    image, truth = held_out_scene(101)
    sample = later.load(1)
    assert len(later) == 2 and sample.name == "scene 101" and "from number 100 on" in later.description
    assert np.array_equal(sample.image, image) and np.array_equal(sample.truth, truth)
    assert not np.array_equal(GeneratedScenes(2).load(1).truth, truth) or \
        not np.array_equal(GeneratedScenes(2).load(1).image, image)
