"""Malformed model metadata: an ONNX's metadata_props, a TensorRT plan's sidecar and a checkpoint's
safetensors metadata that are not JSON, or JSON of the wrong type, raise the toolkit's typed error
naming the file and the key (ModelFormatError, a ValueError; WeightsError for weights), never a bare
AttributeError, TypeError or JSONDecodeError."""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict

import numpy as np
import pytest
from onnx import helper

from runtime import ModelFormatError, Segmenter
from runtime import engine_meta
from runtime.engine_meta import EngineMeta
from runtime.errors import BackendUnavailable, SidecarError
from runtime.onnx_backend import read_model_metadata
from runtime.palette import check_palette
from runtime.model_check import check_network_output
from test_model_outputs import graph_model, to_nchw

GOOD = {"deeplab_config": json.dumps({"num_classes": 3}), "class_names": json.dumps(["a", "b", "c"]),
        "palette": json.dumps([[0, 0, 0], [128, 0, 0], [0, 128, 0]])}

# (key, value): every one is refused, whatever else the metadata holds.
BAD_ENTRIES = [
    ("class_names", "not json"), ("class_names", '{"a": 1}'), ("class_names", "5"), ("class_names", "[1, 2, 3]"),
    ("class_names", '["a", null, "c"]'), ("class_names", '"abc"'),
    ("palette", "not json"), ("palette", '"x"'), ("palette", '{"r": 1}'), ("palette", "[[1, 2], [3, 4], [5, 6]]"),
    ("palette", '[[0, 0, 0], [1, 1, 1], [2, 2, "x"]]'), ("palette", "[[0, 0, 0], [1, 1, 1], [2, 2, 300]]"),
    ("palette", "[[0, 0, 0], [1, 1, 1], [2, 2, -1]]"), ("palette", "[[true, 0, 0], [1, 1, 1], [2, 2, 2]]"),
    ("palette", "[[0, 0, 0], [1, 1, 1], [2.5, 2, 2]]"), ("palette", "[1, 2, 3]"),
    ("deeplab_config", "[]"), ("deeplab_config", '"x"'), ("deeplab_config", "not json"), ("deeplab_config", "5"),
    ("deeplab_config", '{"num_classes": "3"}'), ("deeplab_config", '{"num_classes": 0}'),
    ("deeplab_config", '{"num_classes": true}'), ("deeplab_config", '{"num_classes": 3.0}'),
]


def static_model(path, metadata):
    """scores = the image as float, N x 3 x H x W: a 3-class graph whose class axis is static."""
    return graph_model(path, to_nchw("image", "scores"), channels=3, metadata=metadata)


def dynamic_model(path, metadata):
    """The same scores through a Reshape to their own shape: the class axis is dynamic, so ONNX
    Runtime's network takes the class count from deeplab_config."""
    nodes = to_nchw("image", "t") + [helper.make_node("Shape", ["t"], ["s"]), helper.make_node("Reshape", ["t", "s"], ["scores"])]
    return graph_model(path, nodes, metadata=metadata)


def assert_names(err: BaseException, path, key: str) -> None:
    text = str(err)
    assert str(path) in text and f"'{key}'" in text, text


@pytest.mark.parametrize("key, value", BAD_ENTRIES)
@pytest.mark.parametrize("make", [static_model, dynamic_model], ids=["static", "dynamic"])
def test_bad_onnx_metadata_is_a_model_format_error_naming_the_file_and_the_key(tmp_path, make, key, value):
    path = make(tmp_path / "m.onnx", {**GOOD, key: value})
    for load in (lambda: Segmenter(path, crf=None), lambda: read_model_metadata(path)):
        with pytest.raises(ModelFormatError) as info:
            load()
        assert isinstance(info.value, ValueError)
        assert_names(info.value, path, key)


def test_good_metadata_loads(tmp_path):
    from runtime.onnx_backend import parse_metadata

    for make in (static_model, dynamic_model):
        seg = Segmenter(make(tmp_path / f"{make.__name__}.onnx", GOOD), crf=None)
        assert seg.num_classes == 3 and seg.class_names == ("a", "b", "c")
        assert seg.palette.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    parsed = parse_metadata(GOOD, "m.onnx")
    assert parsed.num_classes == 3 and parsed.class_names == ["a", "b", "c"] and parsed.palette.dtype == np.uint8
    assert parse_metadata({}, "m.onnx") == (None, None, None)  # nothing said: the defaults apply


def test_a_palette_with_too_few_colours_names_the_file_and_the_key(tmp_path):
    path = static_model(tmp_path / "few.onnx", {**GOOD, "palette": "[[0, 0, 0]]"})
    with pytest.raises(ModelFormatError) as info:
        Segmenter(path, crf=None)
    assert str(path) in str(info.value) and "palette" in str(info.value) and "1 colours for 3 classes" in str(info.value)


class FixedNetwork:
    """A network backend (runtime/network.py) that answers zeros: any class count, any metadata."""

    name = "fixed"
    fixed_input_dims = (None, None, None)
    size_bounds = None
    kernels = None

    def __init__(self, num_classes, metadata):
        self.num_classes, self.metadata = num_classes, metadata

    def __call__(self, batch):
        n, h, w = batch.shape[:3]
        return np.zeros((n, self.num_classes, h, w), np.float32)


@pytest.mark.parametrize("key, value", BAD_ENTRIES)
def test_any_network_s_metadata_is_checked_at_load(key, value):
    """A network given to the Segmenter (network=...) gets the same checks as an ONNX file."""
    with pytest.raises(ModelFormatError) as info:
        check_network_output(FixedNetwork(3, {**GOOD, key: value}), "net.bin")
    assert_names(info.value, "net.bin", key)
    with pytest.raises(ModelFormatError) as info:
        Segmenter("net.bin", crf=None, network=FixedNetwork(3, {**GOOD, key: value}))
    assert_names(info.value, "net.bin", key)


def test_metadata_that_is_not_a_string_is_named():
    from runtime.onnx_backend import parse_metadata

    with pytest.raises(ModelFormatError) as info:
        parse_metadata({"class_names": ["a", "b"]}, "net.bin")  # a list, not its JSON text
    assert_names(info.value, "net.bin", "class_names")


def test_check_palette_refuses_what_numpy_would_take(tmp_path):
    """A palette given to the Segmenter (or the Triton writer) is a ValueError whatever is wrong with it."""
    for bad in ([[0, 0, 0], [1, 1]], [["a", "b", "c"]] * 3, [[True, False, True]] * 3, [[np.nan, 0, 0]] * 3,
                [[0, 0, 256]] * 3, [[{}, 0, 0]] * 3, "abc", 5):
        with pytest.raises(ValueError, match="palette"):
            check_palette(bad, 3)
    assert check_palette([[0.0, 1.0, 255.0]] * 3, 3).dtype == np.uint8


# --- the TensorRT plan's sidecar ---------------------------------------------------------------------

OUR_IO = [{"name": "image", "mode": "input", "dtype": "uint8", "shape": [-1, -1, -1, 3]},
          {"name": "scores", "mode": "output", "dtype": "float32", "shape": [-1, 3, -1, -1]}]


@pytest.fixture()
def sidecar(tmp_path):
    """A plan (its bytes are never read here) and a valid sidecar; returns (plan, sidecar dict)."""
    plan = tmp_path / "m.engine"
    plan.write_bytes(b"not read")
    meta = EngineMeta(tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7", precision="fp32",
                      profile={"min": [1, 65, 65, 3], "opt": [1, 257, 257, 3], "max": [1, 513, 513, 3]},
                      hardware_compatible=False, version_compatible=False, dla_core=None, onnx_sha256="0" * 64,
                      plan_sha256="1" * 64, io=OUR_IO, class_names=["a", "b", "c"],
                      palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]], onnx_path="m.onnx", weights_path=None,
                      engine_path=str(plan))
    engine_meta.write_sidecar(plan, meta)
    assert engine_meta.read_sidecar(plan) == meta
    return plan, asdict(meta)


@pytest.mark.parametrize("key, value", [
    ("class_names", [1, 2, 3]), ("class_names", ["a", None, "c"]), ("class_names", "abc"), ("class_names", {"a": 1}),
    ("palette", [[1, 2], [3, 4], [5, 6]]), ("palette", [[0, 0, 0], [1, 1, 1], [2, 2, 300]]),
    ("palette", [[0, 0, 0], [1, 1, 1], [2, 2, "x"]]), ("palette", [[True, 0, 0]]), ("palette", "x"),
    ("profile", []), ("profile", {"min": "x", "opt": [1, 2, 3, 3], "max": [1, 2, 3, 3]}),
    ("io", "x"), ("io", ["x"]), ("io", [{**OUR_IO[0], "shape": 5}, OUR_IO[1]]),
    ("io", [{**OUR_IO[0], "shape": ["a", 1, 1, 3]}, OUR_IO[1]]), ("io", [{**OUR_IO[0], "name": 5}, OUR_IO[1]]),
    ("dla_core", True), ("schema", "1"), ("tensorrt_version", 10),
])
def test_a_sidecar_of_the_wrong_types_is_a_model_format_error_naming_the_file_and_the_key(sidecar, key, value):
    plan, data = sidecar
    engine_meta.sidecar_path(plan).write_text(json.dumps({**data, key: value}))
    with pytest.raises(SidecarError) as info:
        engine_meta.read_sidecar(plan)
    assert isinstance(info.value, ModelFormatError) and isinstance(info.value, ValueError)
    assert str(engine_meta.sidecar_path(plan)) in str(info.value) and key in str(info.value), str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[]", "5", "", "\xff"])
def test_a_sidecar_that_is_not_a_json_object_names_the_file(sidecar, text):
    plan, _ = sidecar
    engine_meta.sidecar_path(plan).write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelFormatError) as info:
        engine_meta.read_sidecar(plan)
    assert str(engine_meta.sidecar_path(plan)) in str(info.value)


# --- the engine build's reading of an ONNX -------------------------------------------------------

def test_the_engine_build_refuses_bad_metadata_before_tensorrt(tmp_path, monkeypatch):
    """Read first: with the onnx package and without it (ONNX Runtime reads then), TensorRT or not."""
    from export.tensorrt_build import EngineBuildError, build_engine, check_onnx, onnx_precision

    path = static_model(tmp_path / "m.onnx", {**GOOD, "palette": '"x"'})
    for block_onnx in (False, True):
        if block_onnx:
            monkeypatch.setitem(sys.modules, "onnx", None)
        for call in (lambda: check_onnx(path), lambda: build_engine(path, tmp_path / "m.engine")):
            with pytest.raises(EngineBuildError) as info:
                call()
            assert_names(info.value, path, "palette")
    with pytest.raises(EngineBuildError) as info:
        onnx_precision({"precision": "int8", "quantization": "[]"}, "q.onnx")
    assert_names(info.value, "q.onnx", "quantization")
    assert onnx_precision({"precision": "int8", "quantization": '{"activations": "int8 symmetric"}'}, "q.onnx") == "int8"


# --- a checkpoint's metadata -------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("safetensors") is None,
                    reason="checkpoints need torch and safetensors")
@pytest.mark.parametrize("key, value", [
    ("deeplab_config", "not json"), ("deeplab_config", "[]"), ("deeplab_config", '{"num_classes": "3"}'),
    ("deeplab_config", '{"num_classes": 3, "variant": "nope", "width": 0.0625}'),
    ("deeplab_config", '{"num_classes": 3, "colour": "red"}'), ("deeplab_config", '{"num_classes": 3, "width": "x"}'),
    ("class_names", "[1, 2, 3]"), ("class_names", "not json"), ("palette", '"x"'), ("palette", "[[1, 2]]"),
])
def test_checkpoint_metadata_of_the_wrong_type_names_the_file_and_the_key(tmp_path, key, value):
    import torch
    from safetensors.torch import save_file

    from export.model import DeepLabV1, ModelConfig
    from export.weights import WeightsError, load_model

    net = DeepLabV1(ModelConfig(num_classes=3, width=0.0625))
    meta = {"deeplab_config": json.dumps(net.config.to_dict()), **{key: value}}
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(WeightsError) as info:
        load_model(path)
    assert_names(info.value, path, key)
    try:
        decoded = json.loads(value)
    except ValueError:
        return  # a .pt checkpoint holds Python values, not JSON text
    # the same metadata in a .pt checkpoint ({"state_dict": ..., key: ...})
    pt = tmp_path / "m.pt"
    torch.save({"state_dict": net.state_dict(), **{k: json.loads(v) for k, v in meta.items()}, key: decoded}, pt)
    with pytest.raises(WeightsError) as info:
        load_model(pt)
    assert_names(info.value, pt, key)
    torch.save({"state_dict": net.state_dict(), key: torch.zeros(3)}, pt)  # no JSON value at all
    with pytest.raises(WeightsError) as info:
        load_model(pt)
    assert_names(info.value, pt, key)


# --- a plan where TensorRT is absent -----------------------------------------------------------------

def test_a_plan_without_tensorrt_is_a_backend_unavailable_naming_the_plan(tmp_path):
    from runtime.errors import TensorRTUnavailable
    from runtime.trt_compat import load_tensorrt

    try:
        load_tensorrt()
        pytest.skip("TensorRT is installed here")
    except TensorRTUnavailable:
        pass
    plan = tmp_path / "m.engine"
    plan.write_bytes(b"\x00not a plan")
    with pytest.raises(BackendUnavailable) as info:  # what a forced backend that cannot run raises
        Segmenter(plan)
    assert isinstance(info.value, TensorRTUnavailable) and str(plan) in str(info.value)
