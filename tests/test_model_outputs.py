"""Scores the runtime cannot segment: non-finite values (CRF on and off, float64 overflowing
float32) and graphs whose output does not fit the image or the class count, built with the onnx
helper API."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, save

from crf import CRFInputError, CRFParams, refine
from runtime import ModelFormatError, NetworkOutputError, Segmenter
from benchmarking.inputs import smooth_logits


def graph_model(path, nodes, initializers=(), out_type=TensorProto.FLOAT, channels="C", metadata=None):
    """uint8 image N x H x W x 3 -> ``nodes`` -> 'scores' N x C x H' x W' (``channels`` static or not)."""
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3])
    y = helper.make_tensor_value_info("scores", out_type, ["N", channels, "Ho", "Wo"])
    g = helper.make_graph(nodes, "g", [x], [y], initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in (metadata or {}).items():
        m.metadata_props.add(key=k, value=v)
    save(m, str(path))
    return path


def to_nchw(src, dst, to=TensorProto.FLOAT):
    return [helper.make_node("Cast", [src], ["f"], to=to), helper.make_node("Transpose", ["f"], [dst], perm=[0, 3, 1, 2])]


def scalar(name, value, dtype=TensorProto.FLOAT):
    return helper.make_tensor(name, dtype, [], [value])


def test_float64_beyond_float32_is_refused_by_the_crf():
    img = np.full((12, 14, 3), 90, np.uint8)
    s = smooth_logits(12, 14, 3).astype(np.float64)
    s[1, 2, 3] = 1e39  # finite in float64, inf in float32
    with pytest.raises(CRFInputError, match=r"1 values beyond float32's range \(\|x\| > 3.4e38\)"):
        refine(s, img, CRFParams(iterations=1))
    s[1, 2, 3] = np.nan
    with pytest.raises(CRFInputError, match="1 NaN/inf values"):
        refine(s, img, CRFParams(iterations=1))
    s[1, 2, 3] = 3e38  # still fits float32
    assert np.isfinite(refine(s, img, CRFParams(iterations=1))).all()


@pytest.fixture(scope="module")
def nan_on_dark(tmp_path_factory):
    """scores = log(image - 50): NaN where a channel is below 50, finite on the load-time probe."""
    path = tmp_path_factory.mktemp("m") / "log.onnx"
    return graph_model(path, to_nchw("image", "t") + [helper.make_node("Sub", ["t", "k"], ["d"]),
                                                      helper.make_node("Log", ["d"], ["scores"])],
                       [scalar("k", 50.0)], channels=3)


@pytest.mark.parametrize("crf", [None, CRFParams(iterations=2)])
def test_nan_scores_are_an_error_naming_the_image(nan_on_dark, tmp_path, crf):
    import cv2

    seg = Segmenter(nan_on_dark, crf=crf)
    bright = np.full((20, 30, 3), 200, np.uint8)
    bright[:, :10, 0] = 250
    assert (seg(bright).labels[:, :10] == 0).all()  # finite scores segment as usual
    dark = bright.copy()
    dark[5:8, 5:9] = 10
    with pytest.raises(NetworkOutputError, match=r"the image: the network's scores contain 36 NaN/inf values \(of 1800\)"):
        seg(dark)
    with pytest.raises(NetworkOutputError, match="image 1 of the batch: .* 36 NaN/inf"):
        seg([bright, dark])
    cv2.imwrite(str(tmp_path / "dark.png"), dark)
    with pytest.raises(NetworkOutputError, match="dark.png: the network's scores contain 36 NaN/inf"):
        seg(tmp_path / "dark.png")


def test_float64_output_overflowing_float32_is_an_error(tmp_path):
    """scores = 1e39 / (image + 1) in float64: finite there, inf in float32 where the image is dark."""
    path = graph_model(tmp_path / "f64.onnx", to_nchw("image", "t", TensorProto.DOUBLE) + [
        helper.make_node("Add", ["t", "one"], ["d"]), helper.make_node("Div", ["big", "d"], ["scores"])],
        [scalar("one", 1.0, TensorProto.DOUBLE), scalar("big", 1e39, TensorProto.DOUBLE)],
        out_type=TensorProto.DOUBLE, channels=3)
    seg = Segmenter(path, crf=None)
    assert seg(np.full((9, 9, 3), 200, np.uint8)).labels.shape == (9, 9)
    dark = np.full((9, 9, 3), 200, np.uint8)
    dark[0, 0, 1] = 0
    with pytest.raises(NetworkOutputError, match="1 NaN/inf values"):
        seg(dark)


def test_half_size_output_is_refused_at_load(tmp_path):
    path = graph_model(tmp_path / "half.onnx", to_nchw("image", "t") + [
        helper.make_node("MaxPool", ["t"], ["scores"], kernel_shape=[2, 2], strides=[2, 2])], channels=3)
    with pytest.raises(ModelFormatError, match=r"half.onnx: 8x8 scores for a 17x17 input \(the graph must upsample"):
        Segmenter(path, crf=None)


def test_class_count_disagreeing_with_metadata_is_refused_at_load(tmp_path):
    nodes = to_nchw("image", "scores")  # 3 channels
    names = json.dumps(["a", "b", "c", "d", "e"])
    path = graph_model(tmp_path / "names.onnx", nodes, channels=3, metadata={"class_names": names})
    with pytest.raises(ModelFormatError, match="names.onnx: its metadata lists 5 class names for 3 class channels"):
        Segmenter(path, crf=None)
    config = json.dumps({"num_classes": 5})
    path = graph_model(tmp_path / "cfg.onnx", nodes, channels=3, metadata={"deeplab_config": config})
    with pytest.raises(ModelFormatError, match="its metadata's config says 5 classes, its output shape 3"):
        Segmenter(path, crf=None)
    # Reshape to its own runtime shape: the graph's output shape no longer says C, the config does.
    dynamic = to_nchw("image", "t") + [helper.make_node("Shape", ["t"], ["s"]),
                                       helper.make_node("Reshape", ["t", "s"], ["scores"])]
    path = graph_model(tmp_path / "dyn.onnx", dynamic, metadata={"deeplab_config": config})
    with pytest.raises(ModelFormatError, match="dyn.onnx: 3 class channels for a 5-class model"):
        Segmenter(path, crf=None)
    path = graph_model(tmp_path / "ok.onnx", dynamic, metadata={"deeplab_config": json.dumps({"num_classes": 3})})
    assert Segmenter(path, crf=None).num_classes == 3
