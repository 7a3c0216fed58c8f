"""FP16 and INT8 copies of an exported FP32 DeepLab graph, for TensorRT 11 (which takes precision
from the ONNX itself) and ONNX Runtime.

Both keep the graph's contract: input ``image`` uint8 N x H x W x 3, output ``scores`` float32.

- FP16: the trunk (convolutions, ReLUs, pools) and its weights in float16, between one Cast in
  and one Cast out. The input stage (uint8 -> float Cast, Transpose, mean subtraction) and the
  Resize stay float32, so the mean is subtracted exactly and the upsampled scores the CRF reads
  are float32. (onnxconverter-common's converter, tried first in the copy onnxruntime ships, casts
  the Resize's output through float16 when the Resize is blocked and appends its casts out of
  topological order.) ONNX Runtime runs it on the CPU: where it has no float16 kernel for an op,
  it computes that op in float32 between casts it inserts.
- INT8: explicit QuantizeLinear/DequantizeLinear pairs (onnxruntime.quantization.quantize_static,
  QDQ format) on the convolutions, ReLUs and pools, calibrated (MinMax: the only method of its
  calibrators that takes images of different sizes) on images padded exactly as the runtime pads
  them. Weights symmetric, per output channel, biases left float. Activations are symmetric int8
  with zero-point 0 by default, the only form TensorRT takes (it rejects non-zero zero-points and
  int32 DequantizeLinear inputs); ``int8_activations="asymmetric"`` (``--int8-activations
  asymmetric``) is for ONNX Runtime alone: more accurate (the range after a ReLU starts at 0, so
  no code is spent on negatives) and faster on its CPU (a ReLU before an asymmetric Q is dropped;
  with zero-point 0 it has to run in float between a DequantizeLinear and a QuantizeLinear). The
  last convolution (fc8, the logits) and the Resize stay float: the scores are not quantised.

The model's metadata gains ``precision`` and, for INT8, ``calibration_sha256`` (over the sorted
image names and their bytes), ``calibration_images`` and ``quantization`` (the settings, JSON).
An FP32 export carries no ``precision`` entry.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from runtime.contract import DEFAULT_MAX_SIZE, IMAGE_SUFFIXES, load_image, pad_image
from runtime.errors import ImageError
from runtime.network import network_image, network_size

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_CALIBRATION_IMAGES = 100

# FP16: the network trunk, from the first convolution to the logits; the input stage (uint8 -> float
# Cast, NHWC -> NCHW Transpose, mean Sub), the shape arithmetic and the Resize stay float32.
FP16_OPS = frozenset({"Conv", "Relu", "MaxPool", "AveragePool"})
# INT8: op types given Q/DQ pairs. With the ReLUs and pools quantised too, no float tensor is left
# between the convolutions (ONNX Runtime runs the pools on int8 and, with asymmetric activations,
# drops the ReLUs; TensorRT fuses them).
INT8_OP_TYPES = ("Conv", "Relu", "MaxPool", "AveragePool")
INT8_ACTIVATIONS = ("symmetric", "asymmetric")


class CalibrationError(ValueError):
    """Calibration images that cannot be used, with the reason."""


@dataclass(frozen=True)
class CalibrationSet:
    """Images to calibrate INT8 ranges on (H x W x 3 uint8 BGR, as runtime.contract.load_image
    returns them), their names and the sha256 that identifies the set."""

    names: tuple
    images: tuple
    sha256: str
    source: str

    def __len__(self) -> int:
        return len(self.images)


def calibration_digest(items: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (name, bytes) pairs sorted by name: each name (UTF-8), a NUL, the byte count and
    the bytes, so that no two different sets hash alike by shifting bytes between names."""
    h = hashlib.sha256()
    for name, data in sorted(items, key=lambda item: item[0]):
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def calibration_from_folder(folder: str | Path, count: int = DEFAULT_CALIBRATION_IMAGES) -> CalibrationSet:
    """The first ``count`` readable image files of ``folder`` (not recursive) by name, loaded as the
    runtime loads them. A file that cannot be read is skipped with a warning naming it and why (one
    bad file must not stop an export), and the next one is taken; none readable is a
    CalibrationError. The hash covers the files used: their names and file bytes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder not found: {folder}")
    if count < 1:
        raise CalibrationError(f"the number of calibration images must be >= 1, got {count}")
    candidates = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not candidates:
        raise CalibrationError(f"no images in the calibration folder {folder} "
                               f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    files, images, skipped = [], [], []
    for f in candidates:
        if len(files) == count:
            break
        try:
            images.append(load_image(f))
            files.append(f)
        except (ImageError, OSError) as e:
            skipped.append(" ".join(str(e).split()))
            warnings.warn(f"calibration image skipped: {skipped[-1]}", RuntimeWarning, stacklevel=2)
    if not files:
        raise CalibrationError(f"none of the {len(skipped)} images in the calibration folder {folder} can be read "
                               f"(the first: {skipped[0]})")
    digest = calibration_digest((f.name, f.read_bytes()) for f in files)
    return CalibrationSet(tuple(f.name for f in files), tuple(images), digest, str(folder))


def calibration_from_arrays(named_images: Sequence[tuple[str, np.ndarray]], source: str) -> CalibrationSet:
    """Images given as arrays (e.g. generated scenes). The hash covers the names and the raw
    pixel bytes (name them with their size: the bytes alone do not say it)."""
    if not named_images:
        raise CalibrationError(f"no calibration images from {source}")
    names = tuple(n for n, _ in named_images)
    if len(set(names)) != len(names):
        raise CalibrationError(f"calibration image names repeat in {source}")
    images = []
    for name, img in named_images:
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
            raise CalibrationError(f"calibration image {name}: expected H x W x 3 uint8 BGR")
        images.append(np.ascontiguousarray(img))
    digest = calibration_digest((n, img.tobytes()) for n, img in zip(names, images))
    return CalibrationSet(names, tuple(images), digest, source)


#: The prefix of a calibration spec naming generated scenes instead of a folder: scenes:N.
SCENES_SPEC = "scenes:"


def calibration_set(spec: str, count: int = DEFAULT_CALIBRATION_IMAGES) -> CalibrationSet:
    """A calibration spec as ``--calibration`` takes it: a folder (its first ``count`` images by name),
    or scenes:N, N generated scenes (scenes.calibration_scenes: seeds 2,000,000 + i, apart from the
    training and held-out scenes)."""
    if not spec.startswith(SCENES_SPEC):
        return calibration_from_folder(spec, count)
    from scenes import calibration_scenes

    text = spec[len(SCENES_SPEC):]
    try:
        n = int(text)
    except ValueError:
        raise CalibrationError(f"expected scenes:N with N a whole number, got {spec!r}") from None
    if n < 1:
        raise CalibrationError(f"the number of scenes must be >= 1, got {n}")
    return calibration_from_arrays(calibration_scenes(n), spec)


def network_inputs(calibration: CalibrationSet, max_size: int = DEFAULT_MAX_SIZE) -> Iterator[np.ndarray]:
    """Each calibration image as the network sees it from the Segmenter: shrunk to ``max_size``
    where larger (area interpolation), padded bottom/right with the mean pixel to the next 8k+1
    size, with a batch axis."""
    for img in calibration.images:
        size = network_size(img.shape[0], img.shape[1], max_size)
        yield pad_image(network_image(img, size), *size.padded)[None]


def convert_fp16(model):
    """An FP16 copy of an FP32 DeepLab ModelProto: the trunk's ops (FP16_OPS) and their weights in
    float16, one Cast into float16 where float32 enters the trunk (after the mean subtraction) and
    one back where it leaves (before the Resize); everything else untouched, so the uint8 input,
    the input stage, the Resize and the float32 scores stay as exported."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    all_nodes = []
    for n in g.node:  # detached copies: g.node is rebuilt from them below
        all_nodes.append(onnx.NodeProto())
        all_nodes[-1].CopyFrom(n)
    trunk = [n for n in all_nodes if n.op_type in FP16_OPS]
    trunk_ids = {id(n) for n in trunk}
    initializers = {t.name: t for t in g.initializer}
    consumers: dict = {}
    for n in all_nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    produced_in_trunk = {o for n in trunk for o in n.output}
    graph_outputs = {o.name for o in g.output}

    for name, t in initializers.items():
        users = consumers.get(name, [])
        if t.data_type == TensorProto.FLOAT and users and all(id(u) in trunk_ids for u in users):
            w = numpy_helper.to_array(t)
            if np.abs(w).max(initial=0.0) > np.finfo(np.float16).max:
                raise ValueError(f"{name} has values beyond float16's range (|x| > 65504)")
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float16), name))
    converted = {name for name, t in initializers.items() if t.data_type == TensorProto.FLOAT16}

    nodes = []
    cast_in: dict = {}   # float32 tensor -> its float16 cast
    for n in all_nodes:
        if id(n) not in trunk_ids:
            nodes.append(n)
            continue
        for i, name in enumerate(n.input):
            if not name or name in produced_in_trunk or name in converted:
                continue
            if name not in cast_in:  # float32 from outside the trunk: cast once, before its first use
                cast_in[name] = f"{name}_fp16"
                nodes.append(helper.make_node("Cast", [name], [cast_in[name]], name=f"{name}_to_fp16",
                                              to=TensorProto.FLOAT16))
            n.input[i] = cast_in[name]
        nodes.append(n)
        for o in list(n.output):  # leaving the trunk: the float32 name is kept for the readers outside
            outside = [u for u in consumers.get(o, []) if id(u) not in trunk_ids]
            if outside or o in graph_outputs:
                half = f"{o}_fp16"
                n.output[list(n.output).index(o)] = half
                for u in consumers.get(o, []):
                    if id(u) in trunk_ids:
                        u.input[list(u.input).index(o)] = half
                nodes.append(helper.make_node("Cast", [half], [o], name=f"{o}_to_fp32", to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # intermediate types changed: shape inference finds them again
    return out


def float_nodes(model) -> list[str]:
    """Nodes INT8 leaves in float: the Resize and the convolution that feeds it (the logits)."""
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    producers = {o: n for n in model.graph.node for o in n.output}
    keep = [n.name for n in resizes]
    for r in resizes:
        src = producers.get(r.input[0])
        if src is not None and src.op_type == "Conv":
            keep.append(src.name)
    return keep


def calibration_reader(calibration: CalibrationSet, input_name: str, progress: bool):
    """onnxruntime's CalibrationDataReader over a calibration set, with a progress bar."""
    from onnxruntime.quantization import CalibrationDataReader
    from tqdm import tqdm

    class ImageReader(CalibrationDataReader):
        def __init__(self):
            self.batches = network_inputs(calibration)
            self.bar = tqdm(total=len(calibration), desc="calibrate", unit="img", disable=not progress)

        def get_next(self):
            batch = next(self.batches, None)
            if batch is None:
                self.bar.close()
                return None
            self.bar.update(1)
            return {input_name: batch}

    return ImageReader()


@contextlib.contextmanager
def _quiet_preprocessing_advice() -> Iterator[None]:
    """quantize_static logs a suggestion to run its model pre-processing on the root logger; the
    exported graph is already constant-folded and shape-inferred, so the line is only noise."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-process" not in record.getMessage()

    root, drop = logging.getLogger(), Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: CalibrationSet,
                  progress: bool = True, activations: str = "symmetric") -> dict:
    """Write an INT8 Q/DQ copy of the FP32 graph at ``fp32_path`` to ``out_path``; return the
    settings used (stored in the metadata)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32_path))
    exclude = float_nodes(model)
    settings = {"format": "QDQ", "weights": "int8 symmetric per-channel", "activations": f"int8 {activations}",
                "bias": "float", "calibration": "MinMax", "op_types": list(INT8_OP_TYPES), "float_nodes": exclude}
    reader = calibration_reader(calibration, model.graph.input[0].name, progress)
    with _quiet_preprocessing_advice():
        quantize_static(
            str(fp32_path), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": activations == "symmetric", "WeightSymmetric": True,
                           "QuantizeBias": False})
    return settings


def convert_precision(fp32_path: str | Path, out_path: str | Path, precision: str,
                      calibration: CalibrationSet | None = None, progress: bool = True,
                      int8_activations: str = "symmetric") -> Path:
    """Write the ``precision`` copy of the FP32 export at ``fp32_path`` to ``out_path`` (whole or
    not at all; checked with export.onnx_export.check_graph before it takes the name)."""
    import onnx

    from runtime.output_files import replacing

    from .onnx_export import check_graph

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if int8_activations not in INT8_ACTIVATIONS:
        raise ValueError(f"int8 activations must be one of {', '.join(INT8_ACTIVATIONS)}, got {int8_activations!r}")
    out_path = Path(out_path)
    if precision == "int8" and calibration is None:
        raise CalibrationError("INT8 needs calibration images")
    meta = {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props}
    meta["precision"] = precision
    with replacing(out_path) as tmp:
        if precision == "int8":
            assert calibration is not None
            settings = quantize_int8(fp32_path, tmp, calibration, progress, int8_activations)
            model = onnx.load(str(tmp))
            meta.update(calibration_sha256=calibration.sha256, calibration_images=str(len(calibration)),
                        quantization=json.dumps(settings))
        else:
            model = onnx.load(str(fp32_path))
            if precision == "fp16":
                model = convert_fp16(model)
        del model.metadata_props[:]
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(tmp))
        check_graph(tmp)
    return out_path


def export_onnx_with_precision(net, path: str | Path, precision: str = "fp32",
                               calibration: CalibrationSet | None = None, progress: bool = True,
                               int8_activations: str = "symmetric", **export_kw) -> Path:
    """export.onnx_export.export_onnx at ``precision``: FP32 exported beside ``path`` first, then
    converted; ``path`` only ever holds a complete, checked model of that precision."""
    from .onnx_export import export_onnx

    path = Path(path)
    if precision == "fp32":
        return export_onnx(net, path, **export_kw)
    if precision == "int8" and calibration is None:
        raise CalibrationError("INT8 needs calibration images")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        fp32 = export_onnx(net, Path(tmp) / "fp32.onnx", **export_kw)
        return convert_precision(fp32, path, precision, calibration, progress, int8_activations)
