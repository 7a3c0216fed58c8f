"""Read (and, for tests, write) Caffe ``.caffemodel`` files without Caffe or protoc.

A ``.caffemodel`` is a protobuf ``NetParameter``. The released DeepLab v1 files use the old
repeated field ``layers`` (field 2, ``V1LayerParameter``: name 4, blobs 6); newer Caffe writes
``layer`` (field 100, ``LayerParameter``: name 1, blobs 7). Both are read. Only the fields we need
are declared (a minimal caffe.proto, built at import time with descriptor_pb2); protobuf skips the
rest. Dilation is taken from our architecture, never from the file (old ``hole`` and new
``dilation`` share field numbers differently across caffe.proto versions). Layers are matched by
name and shape-checked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from .model import DeepLabV1, ModelConfig


class CaffeModelError(ValueError):
    """A file that is not a DeepLab caffemodel, or does not fit the requested model."""


def _build_messages():
    fdp = descriptor_pb2.FileDescriptorProto(name="deeplab_min_caffe.proto", package="caffe_min", syntax="proto2")
    F = descriptor_pb2.FieldDescriptorProto

    def msg(name, *fields):
        m = fdp.message_type.add(name=name)
        for fname, num, ftype, label, type_name, packed in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if type_name:
                f.type_name = f".caffe_min.{type_name}"
            if packed:
                f.options.packed = True
        return m

    OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("BlobShape", ("dim", 1, F.TYPE_INT64, REP, None, True))
    msg("BlobProto",
        ("num", 1, F.TYPE_INT32, OPT, None, False), ("channels", 2, F.TYPE_INT32, OPT, None, False),
        ("height", 3, F.TYPE_INT32, OPT, None, False), ("width", 4, F.TYPE_INT32, OPT, None, False),
        ("data", 5, F.TYPE_FLOAT, REP, None, True), ("shape", 7, F.TYPE_MESSAGE, OPT, "BlobShape", False),
        ("double_data", 8, F.TYPE_DOUBLE, REP, None, True))
    msg("LayerParameter",
        ("name", 1, F.TYPE_STRING, OPT, None, False), ("type", 2, F.TYPE_STRING, OPT, None, False),
        ("blobs", 7, F.TYPE_MESSAGE, REP, "BlobProto", False))
    # V1 'type' is an enum in caffe.proto; an int32 has the same wire format and needs no enum table.
    msg("V1LayerParameter",
        ("name", 4, F.TYPE_STRING, OPT, None, False), ("type", 5, F.TYPE_INT32, OPT, None, False),
        ("blobs", 6, F.TYPE_MESSAGE, REP, "BlobProto", False))
    msg("NetParameter",
        ("name", 1, F.TYPE_STRING, OPT, None, False),
        ("layers", 2, F.TYPE_MESSAGE, REP, "V1LayerParameter", False),
        ("layer", 100, F.TYPE_MESSAGE, REP, "LayerParameter", False))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    return get(pool.FindMessageTypeByName("caffe_min.NetParameter")), get(pool.FindMessageTypeByName("caffe_min.BlobProto"))


NetParameter, BlobProto = _build_messages()
V1_CONVOLUTION = 4  # V1LayerParameter.LayerType.CONVOLUTION


def _blob_array(blob) -> np.ndarray:
    data = np.asarray(blob.double_data if len(blob.double_data) else blob.data, dtype=np.float32)
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    if int(np.prod(shape)) != data.size:
        raise CaffeModelError(f"blob with shape {shape} holds {data.size} values")
    return data.reshape(shape)


def read_blobs(path: str | Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> list of parameter arrays, for every layer that has parameters."""
    p = Path(path)
    if not p.is_file():
        raise CaffeModelError(f"caffemodel not found: {p}")
    net = NetParameter()
    try:
        net.ParseFromString(p.read_bytes())
    except Exception as e:
        raise CaffeModelError(f"{p} is not a Caffe NetParameter protobuf: {e}") from e
    layers = list(net.layers) + list(net.layer)
    out = {l.name: [_blob_array(b) for b in l.blobs] for l in layers if len(l.blobs)}
    if not out:
        raise CaffeModelError(f"{p} has no layers with weights: not a trained Caffe model")
    return out


def read_caffemodel(path: str | Path, config: ModelConfig = ModelConfig()) -> dict[str, torch.Tensor]:
    """Read a DeepLab caffemodel (train2_iter_8000, vgg16_20M, ...) as a state dict for ``config``.

    Legacy 4-D blob shapes (biases stored as 1 x 1 x 1 x N, fc weights as 1 x 1 x O x I) are
    reshaped to the model's shape when the element count matches. ``fc8_*`` (any dataset suffix)
    maps to fc8. A file without fc8 (an ImageNet init such as vgg16_20M) gets a fresh fc8
    (Gaussian std 0.01, bias 0), as DeepLab's training prototxt initialises it.
    """
    blobs = read_blobs(path)
    expected = DeepLabV1(config).state_dict()
    layer_names = sorted({k.split(".")[0] for k in expected})
    by_name = {}
    for name, arrays in blobs.items():
        key = "fc8" if name.startswith("fc8") else name
        by_name[key] = (name, arrays)
    deeplab_layers = [n for n in layer_names if n in by_name]
    if "conv1_1" not in by_name or "fc6" not in by_name:
        raise CaffeModelError(
            f"{path} is not a DeepLab/VGG caffemodel: no conv1_1/fc6 among its layers "
            f"({', '.join(sorted(blobs)[:8])}{', ...' if len(blobs) > 8 else ''})")
    state: dict[str, torch.Tensor] = {}
    problems = []
    for layer in layer_names:
        if layer not in by_name:
            continue
        src, arrays = by_name[layer]
        for param, arr in zip(("weight", "bias"), arrays):
            want = tuple(expected[f"{layer}.{param}"].shape)
            if arr.size != int(np.prod(want)):
                problems.append(f"{src}.{param}: file {arr.shape} vs model {want}")
                continue
            state[f"{layer}.{param}"] = torch.from_numpy(np.ascontiguousarray(arr.reshape(want)))
    missing = [n for n in layer_names if n not in deeplab_layers and n != "fc8"]
    if missing:
        problems.append("missing layers: " + ", ".join(missing))
    if problems:
        raise CaffeModelError(f"{path} does not fit DeepLab {config}: " + "; ".join(problems))
    if "fc8" not in by_name:
        g = torch.Generator().manual_seed(0)
        state["fc8.weight"] = torch.randn(tuple(expected["fc8.weight"].shape), generator=g) * 0.01
        state["fc8.bias"] = torch.zeros(tuple(expected["fc8.bias"].shape))
    return state


def write_caffemodel(state: dict[str, torch.Tensor], path: str | Path, legacy: bool = True,
                     fc8_name: str = "fc8_voc12") -> None:
    """Write a state dict as a caffemodel with the released layer names (for tests and interop).

    legacy=True writes the old ``layers`` field with 4-D num/channels/height/width blobs, as the
    DeepLab v1 files are; legacy=False writes ``layer`` with BlobShape.
    """
    net = NetParameter(name="DeepLab-LargeFOV")
    layers: dict[str, list[np.ndarray]] = {}
    for k, v in state.items():
        layer, param = k.split(".")
        layers.setdefault(layer, [None, None])[0 if param == "weight" else 1] = v.detach().numpy()
    for layer, (w, b) in layers.items():
        name = fc8_name if layer == "fc8" else layer
        l = net.layers.add(name=name, type=V1_CONVOLUTION) if legacy else net.layer.add(name=name, type="Convolution")
        for arr, is_bias in ((w, False), (b, True)):
            blob = l.blobs.add()
            if legacy:
                shape = (1, 1, 1, arr.size) if is_bias else arr.shape
                blob.num, blob.channels, blob.height, blob.width = (int(s) for s in shape)
            else:
                blob.shape.dim.extend(int(s) for s in arr.shape)
            blob.data.extend(arr.astype(np.float32).ravel().tolist())
    Path(path).write_bytes(net.SerializeToString())
