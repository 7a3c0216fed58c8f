"""FP16 and INT8 exports (export/precision.py, deeplab-export --precision): they load and segment
like the FP32 export, keep the graph's uint8 input and float32 output, and say what they are."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from conftest import BUNDLED, SAMPLES
from tools.export import main as export_main

SAMPLE_FILES = sorted(SAMPLES.glob("*.png"))


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "m.onnx"
    assert export_main([str(BUNDLED), "--out", str(out), "--precision", "fp16"]) == 0
    return out


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory):
    """Calibrated on the three sample scenes: the hash of that set is known from the files."""
    out = tmp_path_factory.mktemp("int8") / "m.onnx"
    assert export_main([str(BUNDLED), "--out", str(out), "--precision", "int8", "--calibration", str(SAMPLES)]) == 0
    return out


def labels_equal(reference, other) -> list[float]:
    """Per sample, the fraction of pixels where the two models' labels (no CRF) agree."""
    from runtime import Segmenter

    a, b = Segmenter(reference, crf=None), Segmenter(other, crf=None)
    return [float((a(f).labels == b(f).labels).mean()) for f in SAMPLE_FILES]


def test_fp16_export_segments_like_fp32(bundled_onnx, fp16_onnx):
    from runtime import Segmenter

    assert len(SAMPLE_FILES) == 3
    equal = labels_equal(bundled_onnx, fp16_onnx)
    assert min(equal) >= 0.999, equal  # measured 99.998-99.999 %
    a = Segmenter(bundled_onnx, crf=None)(SAMPLE_FILES[0], return_scores=True).scores
    b = Segmenter(fp16_onnx, crf=None)(SAMPLE_FILES[0], return_scores=True).scores
    assert b.dtype == np.float32 and np.abs(a - b).max() < 0.05  # logits of std ~5; measured 0.012

    model = onnx.load(str(fp16_onnx))
    half = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(half) == 32  # the 16 convolutions' weights and biases
    # the input stage and the Resize stay float32: one cast into float16 and one out, before the Resize
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    to = [next(a.i for a in n.attribute if a.name == "to") for n in casts]
    assert to.count(onnx.TensorProto.FLOAT16) == 1
    producers = {o: n for n in model.graph.node for o in n.output}
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert producers[resize.input[0]].op_type == "Cast"
    assert metadata(fp16_onnx)["precision"] == "fp16"


def test_int8_export_segments_like_fp32(bundled_onnx, int8_onnx):
    equal = labels_equal(bundled_onnx, int8_onnx)
    assert min(equal) >= 0.98, equal  # measured 99.1-99.8 % calibrated on 100 generated scenes

    model = onnx.load(str(int8_onnx))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 15 and ops.count("DequantizeLinear") >= 30
    inits = {t.name: t for t in model.graph.initializer}
    # TensorRT takes only symmetric int8 with zero-point 0, and no int32 DequantizeLinear (biases)
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = onnx.numpy_helper.to_array(inits[n.input[2]])
            assert zp.dtype == np.int8 and not zp.any(), n.name
            if n.input[0] in inits:
                assert inits[n.input[0]].data_type == onnx.TensorProto.INT8, n.name
    # the logits are not quantised: fc8 reads float weights and feeds the Resize directly
    producers = {o: n for n in model.graph.node for o in n.output}
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    fc8 = producers[resize.input[0]]
    assert fc8.op_type == "Conv" and fc8.input[1] in inits
    assert inits[fc8.input[1]].data_type == onnx.TensorProto.FLOAT


def test_int8_asymmetric_activations_for_onnx_runtime(bundled_onnx, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_main([str(BUNDLED), "--out", str(out), "--precision", "int8", "--calibration", str(SAMPLES),
                        "--int8-activations", "asymmetric"]) == 0
    equal = labels_equal(bundled_onnx, out)
    assert min(equal) >= 0.98, equal  # measured 99.6-99.9 % calibrated on 100 generated scenes
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    zero_points = [onnx.numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
                   if n.op_type == "QuantizeLinear"]
    # after a ReLU the range starts at 0: the zero-point sits at the bottom of int8
    assert zero_points and all(zp.dtype == np.int8 for zp in zero_points)
    assert sum(int(zp) == -128 for zp in zero_points) >= 10
    assert json.loads(metadata(out)["quantization"])["activations"] == "int8 asymmetric"
    # TensorRT takes symmetric Q/DQ only: the engine build refuses it, TensorRT installed or not
    assert export_main([str(out), "--engine", str(tmp_path / "m.engine")]) == 1
    err = capsys.readouterr().err
    assert "asymmetric INT8 activations (non-zero zero points), which TensorRT does not take" in err
    assert not (tmp_path / "m.engine").exists()


def test_exports_keep_the_graph_contract_for_every_backend_path(fp16_onnx, int8_onnx):
    from crf.cpu_kernels import CPUKernels
    from runtime.onnx_backend import OnnxRuntimeNetwork

    for path in (fp16_onnx, int8_onnx):
        net = OnnxRuntimeNetwork(path, kernels=CPUKernels())  # the device pipeline's check: float32 scores
        assert net.session.get_inputs()[0].type == "tensor(uint8)"
        assert net.session.get_outputs()[0].type == "tensor(float)"
        batch = np.full((1, 65, 97, 3), 128, np.uint8)
        buf, shape = net.run_into(batch)
        assert shape == (1, 5, 65, 97)
        assert np.allclose(net.kernels.download(buf, shape, np.float32), net(batch))


def test_int8_metadata_names_precision_and_calibration_set(int8_onnx, tmp_path):
    meta = metadata(int8_onnx)
    assert meta["precision"] == "int8" and meta["calibration_images"] == "3"
    # sha256 over the sorted names, each with its byte count, and the file bytes
    h = hashlib.sha256()
    for f in SAMPLE_FILES:
        data = f.read_bytes()
        h.update(f.name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    assert meta["calibration_sha256"] == h.hexdigest()
    assert json.loads(meta["quantization"])["activations"] == "int8 symmetric"
    assert json.loads(meta["class_names"])[0] == "background"  # the FP32 export's metadata is kept

    from export.precision import calibration_from_folder

    # the hash follows the images used: the first N by name, any byte changed
    assert calibration_from_folder(SAMPLES, 2).sha256 != meta["calibration_sha256"]
    for f in SAMPLE_FILES:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert calibration_from_folder(tmp_path).sha256 == meta["calibration_sha256"]
    import cv2

    img = cv2.imread(str(SAMPLE_FILES[1]))
    img[0, 0, 0] ^= 1  # one pixel one level off
    cv2.imwrite(str(tmp_path / SAMPLE_FILES[1].name), img)
    assert calibration_from_folder(tmp_path).sha256 != meta["calibration_sha256"]


def test_generated_calibration_scenes_are_reproducible():
    from export.precision import calibration_set

    a, b = calibration_set("scenes:3", 100), calibration_set("scenes:3", 100)
    assert len(a) == 3 and a.sha256 == b.sha256
    assert calibration_set("scenes:4", 100).sha256 != a.sha256
    assert all(193 <= img.shape[0] <= 385 for img in a.images)


def test_int8_without_calibration_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_main([str(BUNDLED), "--out", str(tmp_path / "m.onnx"), "--precision", "int8"])
    assert e.value.code == 2
    assert "--precision int8 needs --calibration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(BUNDLED), "--out", str(tmp_path / "m.onnx"), "--calibration", str(SAMPLES)])
    assert "--calibration applies to --precision int8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(BUNDLED), "--out", str(tmp_path / "m.onnx"), "--int8-activations", "asymmetric"])
    assert "--int8-activations applies to --precision int8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(BUNDLED), "--out", str(tmp_path / "m.onnx"), "--precision", "int8", "--calibration",
                     str(SAMPLES), "--int8-activations", "asymmetric", "--engine", str(tmp_path / "m.engine")])
    assert "TensorRT takes symmetric int8 only" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("case", ["empty", "missing", "corrupt", "scenes:0"])
def test_bad_calibration_sets_are_named(tmp_path, capsys, case):
    folder = tmp_path / "calib"
    if case == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("not an image")
        expected = f"no images in the calibration folder {folder}"
    elif case == "missing":
        expected = f"calibration folder not found: {folder}"
    elif case == "corrupt":
        folder.mkdir()
        (folder / "a.png").write_bytes(SAMPLE_FILES[0].read_bytes()[:500])
        expected = "truncated PNG"
    else:
        folder, expected = "scenes:0", "must be >= 1"
    with pytest.raises(SystemExit) as e:
        export_main([str(BUNDLED), "--out", str(tmp_path / "m.onnx"), "--precision", "int8",
                     "--calibration", str(folder)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and f"--calibration {folder}" in err
    assert not (tmp_path / "m.onnx").exists()


def test_arrays_for_calibration_are_checked():
    from export.precision import CalibrationError, calibration_from_arrays

    img = np.zeros((9, 9, 3), np.uint8)
    with pytest.raises(CalibrationError, match="no calibration images from here"):
        calibration_from_arrays([], "here")
    with pytest.raises(CalibrationError, match="names repeat"):
        calibration_from_arrays([("a", img), ("a", img)], "here")
    with pytest.raises(CalibrationError, match="b: expected H x W x 3 uint8"):
        calibration_from_arrays([("a", img), ("b", img.astype(np.float32))], "here")


def test_fp16_refuses_weights_beyond_its_range(bundled_onnx):
    from export.precision import convert_fp16

    model = onnx.load(str(bundled_onnx))
    t = next(t for t in model.graph.initializer if t.name.endswith("fc7.weight"))
    w = onnx.numpy_helper.to_array(t).copy()
    w.flat[0] = 1e5
    t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    with pytest.raises(ValueError, match="fc7.weight has values beyond float16's range"):
        convert_fp16(model)


def test_evaluate_runs_each_precision(tmp_path, fp16_onnx, int8_onnx):
    from tools.evaluate import main as evaluate_main

    for path in (fp16_onnx, int8_onnx):
        assert evaluate_main(["--model", str(path), "--images", "2", "--json", str(tmp_path / "e.json")]) == 0
        data = json.loads((tmp_path / "e.json").read_text())
        assert data["no CRF"]["mean_iou"] > 0.5 and data["CRF"]["mean_iou"] > 0.5


def test_an_unreadable_calibration_image_is_skipped_with_a_warning(tmp_path):
    import shutil

    from export.precision import CalibrationError, calibration_from_folder

    shutil.copy(SAMPLES / "scene_0.png", tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    shutil.copy(SAMPLES / "scene_1.png", tmp_path / "c.png")
    with pytest.warns(RuntimeWarning, match="b.png"):
        cal = calibration_from_folder(tmp_path, 2)
    assert cal.names == ("a.png", "c.png")  # the next readable file takes its place
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"x")
    with pytest.warns(RuntimeWarning), pytest.raises(CalibrationError, match="none of the 3"):
        calibration_from_folder(tmp_path)
