"""The one place that knows TensorRT version differences (8.5 / 8.6 / 10.x / 11.x).

TensorRT is imported from wherever it is installed (a system package on Jetson, a wheel on x86)
and never pinned. ``tensorrt-stubs`` installs an importable ``tensorrt`` namespace with no
implementation, so availability is decided by the presence of ``Builder``, not by the import.
Functions below import ``tensorrt`` themselves so that mypy checks them against the stubs; the
pure functions at the end (version arithmetic) need no TensorRT and serve the plan loader too.
"""
from __future__ import annotations

import re
from types import ModuleType
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ModelFormatError, TensorRTUnavailable

if TYPE_CHECKING:
    import tensorrt


def load_tensorrt() -> ModuleType:
    """Import the real TensorRT, 8.5 or newer, or raise TensorRTUnavailable."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT is not installed: it comes from NVIDIA (JetPack on Jetson, NVIDIA's package "
            f"index on x86); the ONNX model works with ONNX Runtime meanwhile ({e})") from e
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable("TensorRT is not installed: the 'tensorrt' module here has no "
                                  "implementation (type stubs only?)")
    if version() < (8, 5):
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: 8.5 or newer is needed "
                                  "(name-based I/O API, execute_async_v3)")
    return trt


def full_version() -> str:
    """The installed version as TensorRT prints it (e.g. 10.3.0.30): a plan records this exact string."""
    import tensorrt as trt

    return str(trt.__version__)


def version() -> tuple[int, int]:
    major, minor = parse_version(full_version())[:2]
    return major, minor


def network_flags() -> int:
    """8.x needs EXPLICIT_BATCH; 10.x builds explicit-batch networks only; 11.x removed the member.
    Never hard-code the enum's integer value: it moved between versions."""
    import tensorrt as trt

    if version()[0] < 10:
        return 1 << int(getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"))
    return 0


def supports_precision_flags() -> bool:
    """BuilderFlag.FP16/INT8 exist up to 10.x; 11.x takes precision from the ONNX model itself."""
    import tensorrt as trt

    return version()[0] < 11 and hasattr(trt.BuilderFlag, "FP16")


def builder_precision_flags(major: int, onnx_precision: str, fp16: bool) -> tuple:
    """The BuilderFlag names a build sets (pure: TensorRT is not imported). Up to 10.x a network is
    weakly typed: an FP16 ONNX or ``fp16`` needs FP16 for the builder to pick half kernels, and a Q/DQ
    (INT8) ONNX needs INT8 even though its scales are explicit (8.x refuses Q/DQ layers without it).
    11.x has no precision flags: the ONNX's own tensor types decide."""
    if major >= 11:
        return ()
    return tuple(name for name, on in (("FP16", fp16 or onnx_precision == "fp16"),
                                       ("INT8", onnx_precision == "int8")) if on)


def precision_name(fp16: bool, onnx_precision: str = "fp32") -> str:
    """What a build's precision is called in the plan's metadata: the ONNX's precision ("fp32",
    "fp16", "int8"), with "+fp16" when the FP16 builder flag (<= 10.x) lets an FP32 or INT8 graph's
    float layers run in half ("fp32+fp16" is written "fp16", as trtexec's --fp16 on an FP32 model)."""
    if not fp16 or onnx_precision == "fp16":
        return onnx_precision
    return "fp16" if onnx_precision == "fp32" else onnx_precision + "+fp16"


def set_precision(config: tensorrt.IBuilderConfig, onnx_precision: str, fp16: bool) -> None:
    """Set the builder flags builder_precision_flags() names for this TensorRT (none on 11.x, where
    ``fp16`` is refused: convert the ONNX to FP16 instead)."""
    if not supports_precision_flags():
        if fp16:
            raise TensorRTUnavailable(f"TensorRT {full_version()} has no FP16 builder flag: from 11.0 on the "
                                      "ONNX model's own tensor types decide the precision")
        return
    import tensorrt as trt

    names = builder_precision_flags(version()[0], onnx_precision, fp16)
    if "FP16" in names:
        config.set_flag(trt.BuilderFlag.FP16)
    if "INT8" in names:
        config.set_flag(trt.BuilderFlag.INT8)


def set_workspace(config: tensorrt.IBuilderConfig, nbytes: int) -> None:
    """Workspace limit: set_memory_pool_limit exists from 8.4 on (max_workspace_size is gone in 10)."""
    import tensorrt as trt

    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, nbytes)


def supports_portable_plans() -> bool:
    """Hardware-compatible (HardwareCompatibilityLevel) and version-compatible (BuilderFlag.
    VERSION_COMPATIBLE) plans exist from 8.6 on."""
    return version() >= (8, 6)


def _no_portable_plans(what: str) -> TensorRTUnavailable:
    return TensorRTUnavailable(f"{what} need TensorRT 8.6 or newer; this is TensorRT {full_version()}")


def set_hardware_compatible(config: tensorrt.IBuilderConfig) -> None:
    """A plan that runs on every Ampere or newer GPU (8.6+; slower: fewer tactics, no cuDNN/cuBLAS)."""
    if not supports_portable_plans():
        raise _no_portable_plans("hardware-compatible plans")
    import tensorrt as trt

    config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS


def set_version_compatible(config: tensorrt.IBuilderConfig) -> None:
    """A plan that newer TensorRT runtimes load (8.6+); it embeds a lean runtime, so the loader must
    allow host code (allow_plan_host_code)."""
    if not supports_portable_plans():
        raise _no_portable_plans("version-compatible plans")
    import tensorrt as trt

    config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)


def allow_plan_host_code(runtime: tensorrt.Runtime) -> None:
    """Needed to deserialize a version-compatible plan (IRuntime::setEngineHostCodeAllowed, 8.6+)."""
    if not supports_portable_plans():
        raise _no_portable_plans("version-compatible plans")
    runtime.engine_host_code_allowed = True


def use_dla(config: tensorrt.IBuilderConfig, core: int) -> None:
    """Run on DLA core ``core`` (Jetson Orin), layers DLA cannot run going to the GPU. The same
    properties exist from 8.5 to 11.x."""
    import tensorrt as trt

    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)


def describe_parser_error(error: tensorrt.ParserError, nodes: Sequence[tuple[str, str]] = ()) -> str:
    """One parser error naming the ONNX node: node_name()/node_operator() exist from 9.1 on; before
    that the node index is looked up in ``nodes`` ((name, op_type) in graph order, the parser's index)."""
    index = error.node()  # -1 when the error is not about one node
    name = op = ""
    if hasattr(error, "node_name") and hasattr(error, "node_operator"):
        name, op = error.node_name(), error.node_operator()
    if not name and 0 <= index < len(nodes):
        name, op = nodes[index]
    where = "model" if index < 0 else f"node {index} {name!r} ({op or 'unknown op'})"
    code = getattr(error.code(), "name", str(error.code()))
    return f"{where}: {error.desc()} [{code}]"


# TensorRT DataType member names -> numpy-style names (the plan's metadata speaks numpy); trt.nptype
# is not used because 8.5.1-8.5.2 build its table with np.bool, which numpy >= 1.24 no longer has.
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8", "INT4": "int4"}


def dtype_name(dtype: tensorrt.DataType) -> str:
    name = str(getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1]))
    return _DTYPE_NAMES.get(name, name.lower())


def dims_list(dims: tensorrt.Dims, name: str) -> list[int]:
    """The extents of tensor ``name``'s ``dims`` (-1 for a dynamic axis). TensorRT answers a shape
    query for a name it does not know with an invalid Dims (nbDims -1); the bindings expose nbDims
    only as ``len()``, which Python refuses for a negative length (ValueError)."""
    try:
        n = len(dims)
    except ValueError:
        n = -1
    if n < 0:
        raise ModelFormatError(f"TensorRT has no shape for tensor {name!r} (invalid dimensions): the plan has "
                               "no such tensor")
    return [int(dims[i]) for i in range(n)]


def engine_io(engine: tensorrt.ICudaEngine) -> list[dict[str, Any]]:
    """The plan's I/O tensors (name, mode, dtype, shape with -1 for dynamic axes) through the
    name-based API: num_io_tensors, get_tensor_name/mode/dtype/shape, the same from 8.5 to 11.x."""
    import tensorrt as trt

    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        io.append({"name": name, "mode": mode, "dtype": dtype_name(engine.get_tensor_dtype(name)),
                   "shape": dims_list(engine.get_tensor_shape(name), name)})
    return io


def profile_shapes(engine: tensorrt.ICudaEngine, name: str, profile: int = 0) -> tuple[list[int], list[int], list[int]]:
    """(min, opt, max) shapes of input ``name`` in optimisation profile ``profile``.
    ``get_tensor_profile_shape(name, profile_index)`` is in the bindings from 8.5.1 to 11.x alike
    (the binding-index ``get_profile_shape`` was removed in 10.x)."""
    shapes = engine.get_tensor_profile_shape(name, profile)
    low, opt, high = (dims_list(d, name) for d in shapes)
    return low, opt, high


def is_linear(engine: tensorrt.ICudaEngine, name: str) -> bool:
    """Whether tensor ``name`` is laid out row-major (TensorFormat.LINEAR; 8.5+): the Segmenter pads and
    the CRF reads plain N x H x W x 3 and N x C x H x W arrays."""
    import tensorrt as trt

    return engine.get_tensor_format(name) == trt.TensorFormat.LINEAR


# --- version arithmetic, no TensorRT needed -------------------------------------------------------

# Cross-major pairs (built by, run by) that version-compatible plans support (TensorRT support
# matrix: 8 -> 9 and 10, 10 -> 11); within one major version any newer runtime loads them.
_CROSS_MAJOR_VERSION_COMPATIBLE = {(8, 9), (8, 10), (10, 11)}
_AMPERE = (8, 0)


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); suffixes such as 'post1' or 'rc' are dropped."""
    parts = []
    for p in text.strip().split("."):
        m = re.match(r"\d+", p)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.end() < len(p):  # '0b6', '1rc2': the rest is a pre-release tag
            break
    if not parts:
        raise ValueError(f"not a TensorRT version: {text!r}")
    return tuple(parts)


def runs_version_compatible_plan(built_by: str, running: str) -> bool:
    """Whether TensorRT ``running`` loads a version-compatible plan built by ``built_by``: never an
    older runtime; a newer one of the same major version, or of a supported next major version."""
    b, r = parse_version(built_by), parse_version(running)
    if r < b or b[:2] < (8, 6):
        return False
    return r[0] == b[0] or (b[0], r[0]) in _CROSS_MAJOR_VERSION_COMPATIBLE


def runs_hardware_compatible_plan(compute_capability: str) -> bool:
    """Whether a GPU runs an AMPERE_PLUS hardware-compatible plan: compute capability 8.0 or newer."""
    return parse_version(compute_capability)[:2] >= _AMPERE
