"""ONNX export: graph contract (TensorRT-parsable, one align-corners Resize, dilations kept) and
ONNX Runtime == PyTorch on LargeFOV logits."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import realistic_init
from export.model import DeepLabPipeline, DeepLabV1, ModelConfig
from export.onnx_export import GraphCheckError, check_graph, export_onnx


@pytest.fixture(scope="module")
def largefov(tmp_path_factory):
    net = realistic_init(DeepLabV1(), seed=1)
    path = export_onnx(net, tmp_path_factory.mktemp("onnx") / "largefov.onnx", class_names=None)
    return net, path


def test_graph_contract(largefov):
    _, path = largefov
    summary = check_graph(path)
    assert summary["opset"] == 17
    assert summary["conv_dilations"].count(2) == 3 and summary["conv_dilations"].count(12) == 1
    m = onnx.load(str(path))
    (inp,) = m.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "height", "width", 3]
    pools = {n.op_type: {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT}
             for n in m.graph.node if n.op_type in ("MaxPool", "AveragePool")}
    assert pools["MaxPool"]["ceil_mode"] == 1 and pools["AveragePool"]["count_include_pad"] == 1
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["deeplab_config"]) == ModelConfig().to_dict()


@pytest.mark.parametrize("hw", [(321, 321), (513, 513), (300, 420)])
def test_onnxruntime_matches_pytorch(largefov, hw):
    import onnxruntime as ort

    net, path = largefov
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(hw[0])
    x = rng.integers(0, 256, (1, *hw, 3), dtype=np.uint8)
    got = sess.run(None, {"image": x})[0]
    with torch.no_grad():
        ref = DeepLabPipeline(net).eval()(torch.from_numpy(x)).numpy()
    assert got.shape == (1, 21, *hw)
    assert ref.std() > 1.0, "logits must have a realistic spread for the comparison to mean anything"
    diff = np.abs(got - ref).max()
    print(f"{hw}: max |ORT - PyTorch| = {diff:.2e} (logit std {ref.std():.2f})")
    assert diff <= 1e-4


def _tiny_graph(path, nodes, inputs, outputs, value_info=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return path


def test_check_graph_rejects_unsupported_ops(tmp_path):
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 8, 8])
    p = _tiny_graph(tmp_path / "a.onnx", [helper.make_node("Einsum", ["image"], ["scores"], equation="ij->ij")], [x], [y])
    with pytest.raises(GraphCheckError, match="Einsum"):
        check_graph(p)


def test_check_graph_rejects_uint8_intermediates(tmp_path):
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 8, 8, 3])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 8, 8])
    nodes = [helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2]),  # uint8 transposed
             helper.make_node("Cast", ["t"], ["scores"], to=TensorProto.FLOAT)]
    p = _tiny_graph(tmp_path / "b.onnx", nodes, [x], [y])
    with pytest.raises(GraphCheckError, match="uint8 intermediate"):
        check_graph(p)


def test_check_graph_rejects_half_pixel_resize(tmp_path):
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 16, 16])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [helper.make_node("Resize", ["image", "", "scales"], ["scores"], mode="linear",
                              coordinate_transformation_mode="half_pixel")]
    g = helper.make_graph(nodes, "g", [x], [y], initializer=[scales])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "c.onnx"))
    with pytest.raises(GraphCheckError, match="align_corners"):
        check_graph(tmp_path / "c.onnx")


def test_export_rejects_wrong_number_of_class_names(tmp_path):
    net = DeepLabV1(ModelConfig(num_classes=3, width=0.0625))
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        export_onnx(net, tmp_path / "m.onnx", class_names=["a", "b"])


def test_export_checks_labels_and_weights_before_writing(tmp_path):
    from export.weights import WeightsError

    net = DeepLabV1(ModelConfig(num_classes=3, width=0.0625)).eval()
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        export_onnx(net, out, class_names=["a", "b"])
    with pytest.raises(ValueError, match="class names must be non-empty strings"):
        export_onnx(net, out, class_names=["a", "", "c"])
    with pytest.raises(ValueError, match=r"palette must be \(>= 3\) x 3 RGB"):
        export_onnx(net, out, palette=[[0, 0, 0]])
    with torch.no_grad():
        net.fc7.bias[2] = float("inf")
        net.fc8.weight[0, 0] = float("nan")
    with pytest.raises(WeightsError, match=r"the model has NaN/inf weights: fc7.bias \(1 of 64\), fc8.weight \(1 of 192\)"):
        export_onnx(net, out)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_leaves_the_previous_export(tmp_path, monkeypatch):
    import export.onnx_export as onnx_export

    net = DeepLabV1(ModelConfig(num_classes=3, width=0.0625)).eval()
    out = export_onnx(net, tmp_path / "m.onnx", class_names=["a", "b", "c"])
    before = out.read_bytes()

    def failing_check(path):
        raise GraphCheckError(f"refused {path}")

    monkeypatch.setattr(onnx_export, "check_graph", failing_check)
    with pytest.raises(GraphCheckError, match="refused"):
        export_onnx(net, out, class_names=["x", "y", "z"])
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
