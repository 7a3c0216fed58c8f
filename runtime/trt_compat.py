"""The one place that knows TensorRT version differences (8.5 / 8.6 / 10.x / 11.x).

TensorRT is imported from wherever it is installed (a system package on Jetson, a wheel on x86)
and never pinned. ``tensorrt-stubs`` installs an importable ``tensorrt`` namespace with no
implementation, so availability is decided by the presence of ``Builder``, not by the import.
Functions below import ``tensorrt`` themselves so that mypy checks them against the stubs.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorrt


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the real library) cannot be used here; the message says why."""


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


def version() -> tuple[int, int]:
    import tensorrt as trt

    major, minor = (int(x) for x in trt.__version__.split(".")[:2])
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


def set_workspace(config: tensorrt.IBuilderConfig, nbytes: int) -> None:
    """Workspace limit: set_memory_pool_limit exists from 8.4 on (max_workspace_size is gone in 10)."""
    import tensorrt as trt

    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, nbytes)
