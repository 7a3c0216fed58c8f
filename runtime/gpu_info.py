"""Which GPU this process builds and runs TensorRT plans on: the one place that asks."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuIdentity:
    name: str                 # as the driver names it, e.g. "NVIDIA A100-SXM4-80GB", "Orin"
    compute_capability: str   # "8.0", "8.7"


def current_gpu(device: int = 0) -> GpuIdentity | None:
    """CUDA device ``device`` of those visible (TensorRT builds and runs on device 0 unless told
    otherwise), asked through pycuda; None where pycuda or a CUDA driver is missing. Needs no CUDA
    context: it does not touch the primary context others share."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return None
    try:
        cuda.init()
        dev = cuda.Device(device)
        major, minor = dev.compute_capability()
        return GpuIdentity(str(dev.name()), f"{major}.{minor}")
    except Exception:  # pycuda raises its own error classes (no driver, no device, bad index)
        return None
