"""ONNX export of the whole DeepLab v1 pipeline, and the checks that make it deployable.

Graph contract (also written into the model's metadata):
- input  ``image``:  uint8, N x H x W x 3, BGR, 0..255 (an OpenCV image with a batch axis);
  H and W are dynamic. Mean subtraction happens inside the graph.
- output ``scores``: float32, N x C x H x W, class scores upsampled to the input size with one
  ``Resize`` (linear, align_corners), as Caffe's Interp layer did.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .model import DeepLabPipeline, DeepLabV1
from .weights import check_finite

INPUT_NAME = "image"
OUTPUT_NAME = "scores"
OPSET = 17  # the highest opset TensorRT 8.5 (JetPack 5) parses
PRODUCER = "deeplab-v1-toolkit"

# Ops the graph may use: each is marked supported in the TensorRT ONNX parser's operator matrix
# for TensorRT 8.5 (onnx-tensorrt docs/operators.md), the oldest version we target. The Q/DQ pair
# is the INT8 export's (export/precision.py).
TRT_SUPPORTED_OPS = frozenset("""
    Add ArgMax AveragePool Cast Ceil Clip Concat Constant ConstantOfShape Conv DequantizeLinear Div
    Dropout Equal Exp Expand Flatten Floor Gather Identity Log MaxPool Mul Pad QuantizeLinear Range
    ReduceMax Relu Reshape Resize Shape Slice Softmax Squeeze Sub TopK Transpose Unsqueeze Where
""".split())


class GraphCheckError(ValueError):
    """An ONNX graph that breaks the deployment contract."""


class LabelError(ValueError):
    """Class names or a palette that do not fit the model; ``field`` says which ("class_names" or
    "palette"), so that a caller can name where the bad ones came from."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def export_onnx(net: DeepLabV1, path: str | Path, class_names: Sequence[str] | None = None,
                palette: Sequence[Sequence[int]] | None = None, sample_size: int = 321) -> Path:
    """Export ``net`` wrapped in :class:`DeepLabPipeline` to ``path`` (opset 17), then check it.

    Class names, palette and weights are checked first; the file appears under ``path`` only
    once it is complete and has passed :func:`check_graph` (written beside it, then renamed)."""
    import onnx

    from runtime.output_files import replacing

    check_labels(class_names, palette, net.config.num_classes)
    check_finite(net.state_dict(), "the model")
    path = Path(path)
    pipe = DeepLabPipeline(net).eval()
    sample = torch.full((1, sample_size, sample_size, 3), 128, dtype=torch.uint8)
    with replacing(path) as tmp:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of torch.export, but it is the one that
            # emits a single Resize with dynamic H/W for F.interpolate(size=...), which we need.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                pipe, (sample,), str(tmp), opset_version=OPSET, dynamo=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch", 1: "height", 2: "width"},
                              OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
                do_constant_folding=True,
            )
        model = onnx.load(str(tmp))
        meta = {
            "deeplab_config": json.dumps(net.config.to_dict()),
            "input_layout": "NHWC uint8 BGR 0..255, mean subtracted in-graph",
            "output_layout": "NCHW float32 class scores at input resolution",
        }
        if class_names is not None:
            meta["class_names"] = json.dumps(list(class_names))
        if palette is not None:
            meta["palette"] = json.dumps([list(map(int, c)) for c in palette])
        del model.metadata_props[:]
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        model.producer_name = PRODUCER
        onnx.save(model, str(tmp))
        check_graph(tmp)
    return path


def check_labels(class_names: Sequence[str] | None, palette: Sequence[Sequence[int]] | None,
                 num_classes: int) -> None:
    """Refuse class names or a palette (RGB rows) that do not fit ``num_classes`` classes (LabelError)."""
    from runtime.palette import check_palette

    if class_names is not None:
        if len(class_names) != num_classes:
            raise LabelError("class_names", f"{len(class_names)} class names for {num_classes} classes")
        if not all(isinstance(c, str) and c.strip() for c in class_names):
            raise LabelError("class_names", f"class names must be non-empty strings, got {list(class_names)}")
    if palette is not None:
        try:
            check_palette(palette, num_classes)
        except ValueError as e:
            raise LabelError("palette", str(e)) from e


def check_graph(path: str | Path) -> dict:
    """Check an exported graph: onnx.checker, TensorRT-parsable ops, no uint8 intermediates,
    exactly one align-corners linear Resize, dilated convolutions kept as Conv. Returns a summary."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    ops = [n.op_type for n in g.node]
    unsupported = sorted(set(ops) - TRT_SUPPORTED_OPS)
    if unsupported:
        raise GraphCheckError(f"ops not on the TensorRT 8.5 ONNX parser's list: {unsupported}")
    io_names = {v.name for v in list(g.input) + list(g.output)}
    uint8 = onnx.TensorProto.UINT8
    inter = [v.name for v in g.value_info if v.type.tensor_type.elem_type == uint8 and v.name not in io_names]
    # Node outputs without inferred types would escape the value_info scan: Cast is the only op
    # that can create a new dtype, so check its targets too.
    for n in g.node:
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            if to == uint8 and not set(n.output) <= {o.name for o in g.output}:
                inter.extend(n.output)
    if inter:
        raise GraphCheckError(f"uint8 intermediate tensors (TensorRT allows uint8 only at I/O): {inter}")
    resizes = [n for n in g.node if n.op_type == "Resize"]
    if len(resizes) != 1:
        raise GraphCheckError(f"expected exactly one Resize, found {len(resizes)}")
    attrs = {a.name: (a.s.decode() if a.type == onnx.AttributeProto.STRING else a.i) for a in resizes[0].attribute}
    if attrs.get("mode") != "linear" or attrs.get("coordinate_transformation_mode") != "align_corners":
        raise GraphCheckError(f"Resize must be linear/align_corners, got {attrs}")
    dilations = []
    for n in g.node:
        if n.op_type == "Conv":
            d = next((list(a.ints) for a in n.attribute if a.name == "dilations"), [1, 1])
            dilations.append(max(d))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"ops": sorted(set(ops)), "conv_dilations": dilations, "opset": opset}
