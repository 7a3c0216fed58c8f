"""DeepLab v1's fully connected CRF (Krähenbühl & Koltun 2011): arrays in, marginals out.

    from crf import refine, CRFParams
    marginals = refine(scores, image)            # scores (C, H, W) float logits, image H x W x 3 uint8 BGR
    labels = marginals.argmax(0)

Backends (``backend=``): "gpu" (the CUDA kernels through pycuda), "cpu" (the same kernel source
compiled by g++, multi-threaded), "numpy" (portable, slow). "auto" takes the first that works here and
falls back to numpy with a one-line warning when no C++ compiler exists. ``resolve_backend()``
says which one "auto" picks. Never imports torch.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np

from .features import CRFInputError, CRFTimeout, check_inputs, unary_from_scores
from .params import CRFParams

__all__ = ["refine", "refine_unary", "resolve_backend", "CRFParams", "CRFInputError", "CRFTimeout", "BACKENDS"]

BACKENDS = ("gpu", "cpu", "numpy")
_drivers: dict = {}
_unavailable: dict[str, str] = {}
# One driver per backend per process holds pooled buffers: calls from several threads take turns.
_lock = threading.RLock()


def _driver(name: str):
    """The process-wide kernel driver of a backend (built and compiled on first use)."""
    with _lock:
        return _make_driver(name)


def _make_driver(name: str):
    if name not in _drivers:
        from .cpu_kernels import CPUKernels
        from .gpu_kernels import GPUKernels
        from .driver import DenseCRFDriver

        _drivers[name] = DenseCRFDriver(GPUKernels() if name == "gpu" else CPUKernels())
    return _drivers[name]


def resolve_backend(backend: str = "auto") -> str:
    """The backend that ``backend`` means here: "auto" -> gpu, else cpu, else numpy (with a warning)."""
    from .gpu_kernels import gpu_available
    from .kernel_interface import BackendUnavailable

    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    candidates = (["gpu"] if gpu_available() else []) + ["cpu"]
    for name in candidates:
        if name in _unavailable:
            continue
        try:
            _driver(name)
            return name
        except BackendUnavailable as e:
            _unavailable[name] = str(e)
            if name == "cpu":
                warnings.warn(f"crf: using the slow numpy CRF: {e} (about 15x slower than the compiled "
                              "kernels: 4.75 s vs 0.31 s for a 300x451 photograph with 21 labels)",
                              RuntimeWarning, stacklevel=3)
    return "numpy"


def refine_unary(unary: np.ndarray, image: np.ndarray, params: CRFParams = CRFParams(),
                 backend: str = "auto") -> np.ndarray:
    """Mean field from unary energies (C, H, W) float32 = -log p. Returns marginals (C, H, W)."""
    unary, image = check_inputs(unary, image)
    return _run(unary, image, params, backend, is_logits=False)


def refine(scores: np.ndarray, image: np.ndarray, params: CRFParams = CRFParams(),
           backend: str = "auto", deadline: float | None = None) -> np.ndarray:
    """Refine network logits with the dense CRF.

    scores: (C, H, W) float logits (the upsampled network output; pass log-probabilities if you
    hold probabilities). image: H x W x 3 uint8, BGR as OpenCV loads it (the bilateral kernel uses
    the raw 0..255 colours in the order given). Returns marginals (C, H, W) float32 summing to 1
    over C. ``params.iterations`` mean-field steps; 0 returns softmax(scores). deadline: a
    time.monotonic() value; past it, CRFTimeout (a TimeoutError) is raised before the next iteration.
    """
    scores, image = check_inputs(scores, image)
    return _run(scores, image, params, backend, is_logits=True, deadline=deadline)


def _run(src: np.ndarray, image: np.ndarray, params: CRFParams, backend: str, is_logits: bool,
         deadline: float | None = None) -> np.ndarray:
    if not isinstance(params, CRFParams):  # a dict of fields would fail deep inside with an AttributeError
        raise TypeError(f"params must be CRFParams, got {type(params).__name__}: CRFParams(**fields) or "
                        "CRFParams.load(path) makes one")
    name = resolve_backend(backend)
    c, h, w = src.shape
    if name == "numpy":
        from .driver import check_key_range  # the compiled kernels' driver checks it itself
        from .numpy_backend import mean_field

        check_key_range(h, w, params)

        return mean_field(unary_from_scores(src) if is_logits else src, image, params, deadline)
    with _lock:
        # check_inputs() has already refused NaN/inf on the host
        marginals, _ = _driver(name).run(src, image, h, w, c, params, is_logits=is_logits, check_finite=False,
                                         deadline=deadline)
    return marginals
