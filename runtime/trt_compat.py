"""The one place that knows TensorRT version differences (8.5 / 8.6 / 10.x / 11.x).

TensorRT is imported from wherever it is installed (a system package on Jetson, a wheel on x86)
and never pinned. Note that ``tensorrt-stubs`` installs an importable ``tensorrt`` namespace with
no implementation, so availability is decided by the presence of ``Builder``, not by the import.
"""
from __future__ import annotations

from types import ModuleType


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the real library) cannot be imported here."""


def load_tensorrt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT is not installed: it comes from NVIDIA (JetPack on Jetson, NVIDIA's package "
            f"index on x86); the ONNX model works with ONNX Runtime meanwhile ({e})") from e
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable("the 'tensorrt' module here has no implementation (type stubs only?)")
    return trt


def version(trt: ModuleType) -> tuple[int, int]:
    major, minor = (int(x) for x in trt.__version__.split(".")[:2])
    if (major, minor) < (8, 5):
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: 8.5 or newer is needed "
                                  "(name-based I/O API)")
    return major, minor


def network_flags(trt: ModuleType) -> int:
    """8.x needs EXPLICIT_BATCH; 10.x has it as the only mode; 11.x removed the enum member."""
    major, _ = version(trt)
    if major < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def supports_precision_flags(trt: ModuleType) -> bool:
    """BuilderFlag.FP16/INT8 exist up to 10.x; 11.x takes precision from the ONNX model itself."""
    return version(trt)[0] < 11 and hasattr(trt.BuilderFlag, "FP16")


def set_workspace(trt: ModuleType, config, nbytes: int) -> None:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, nbytes)
