"""Which network backend runs a model: ``open_network(path, backend)``.

"auto" picks TensorRT for a plan (.engine / .plan / .trt), else ONNX Runtime with its CUDA provider
when onnxruntime-gpu's provider is in the installed build and pycuda works (a GPU, its driver,
nvcc for the CRF kernels), else ONNX Runtime on the CPU. A plan has no fallback (ONNX Runtime does
not read plans): without TensorRT it fails with TensorRT's reason, naming the plan. When the CUDA
provider is there but cannot run, "auto" falls back to the CPU with one warning line naming why (a
CPU-only onnxruntime is no fallback: it is what was installed). A forced backend ("tensorrt",
"onnxruntime-cuda", "onnxruntime") that cannot run raises with the reason. A backend that cannot
run here raises crf.kernel_interface.BackendUnavailable (TensorRTUnavailable is one); a model file that is
not ours, ModelFormatError (a ValueError).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .errors import BackendUnavailable, SidecarError
from .network import Network

BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime")
PLAN_SUFFIXES = (".engine", ".plan", ".trt")
log = logging.getLogger("deeplab")


def is_plan(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PLAN_SUFFIXES


def model_precision(path: str | Path, metadata: Optional[dict] = None) -> str:
    """The precision a model was exported or built at: a plan's sidecar's ("unknown (why)" without a
    readable one), else the ONNX metadata's "precision" entry (export/precision.py writes it; an
    FP32 export carries none)."""
    if not is_plan(path):
        return str((metadata or {}).get("precision", "fp32"))
    import warnings

    from .engine_meta import read_sidecar

    try:
        with warnings.catch_warnings():  # a missing sidecar is said in the answer
            warnings.simplefilter("ignore", RuntimeWarning)
            sidecar = read_sidecar(path)
    except SidecarError as e:
        return f"unknown ({e})"
    return sidecar.precision if sidecar is not None else "unknown (no sidecar)"


def open_network(path: str | Path, backend: str = "auto", threads: Optional[int] = None) -> Network:
    """The network backend that ``backend`` means for the model at ``path`` (see the module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    if is_plan(path):
        if backend not in ("auto", "tensorrt"):
            raise ValueError(f"{path} is a TensorRT plan: backend {backend!r} runs .onnx models; use "
                             "backend='tensorrt' (or 'auto') for the plan, or pass its .onnx")
        from .trt_backend import TensorRTNetwork

        return TensorRTNetwork(path)  # TensorRTUnavailable first when TensorRT is absent
    if backend == "tensorrt":
        raise ValueError(f"{path}: backend 'tensorrt' runs TensorRT plans (.engine / .plan): build one with "
                         f"deeplab-export ... --engine out/model.engine, or use backend='onnxruntime'")
    from .onnx_backend import OnnxRuntimeNetwork, cuda_provider_missing

    if backend == "onnxruntime-cuda":
        return OnnxRuntimeNetwork(path, threads=threads, cuda=True)
    # A build without the provider is silent (it is what was installed); anything else that stops
    # the provider (onnxruntime-gpu too old, no GPU, pycuda missing) is said once.
    if backend == "auto" and cuda_provider_missing() is None:
        try:
            return OnnxRuntimeNetwork(path, threads=threads, cuda=True)
        except BackendUnavailable as e:
            log.warning("%s: ONNX Runtime's CUDA provider cannot run here, using the CPU: %s", path, e)
    return OnnxRuntimeNetwork(path, threads=threads)
