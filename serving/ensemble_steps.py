"""The work of the GPU ensemble's Python steps, free of Triton's Python API (serving/models.py holds that).

Runs inside Triton from the copies of ``serving/``, ``runtime/`` and ``crf/`` in the model's version
folder (serving.repository). Needs numpy, and pycuda with nvcc for the GPU kernels: nothing else
of the toolkit's dependencies (no OpenCV, no ONNX Runtime).

- ``pad_batch``: the runtime's size policy for one request's images (runtime.network.network_size,
  runtime.contract.pad_image): padded bottom/right with the mean pixel to the next 8k+1 size,
  within the engine's profile. An image the Segmenter would shrink is refused (shrinking and the
  score resize back are host steps this ensemble does not have).
- ``dlpack_view``: a crf.kernel_interface.Buffer over a DLPack capsule's memory (Triton's GPU tensors), read
  with ctypes: no framework is needed to take the pointer.
- ``CRFStep``: per image, crop the padded scores (device), the CRF and the argmax (device,
  runtime.device_pipeline.DevicePipeline); only the uint8 labels, and the marginals when asked,
  come back to the host. Runs on any crf KernelBackend: GPUKernels in Triton, CPUKernels in the tests.
"""
from __future__ import annotations

import ctypes
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from crf import CRFParams
from crf.kernel_interface import Buffer, KernelBackend
from crf.features import unary_from_scores
from runtime.contract import DEFAULT_MAX_SIZE, pad_image
from runtime.device_pipeline import DevicePipeline
from runtime.network import SizeBounds, network_size
from runtime.errors import ImageError, nonfinite_scores_error

from .contract import RequestError, check_image_batch


# -- deeplab_pad -----------------------------------------------------------------------------------

def bounds_from_profile(profile: Optional[Dict[str, List[int]]]) -> Optional[SizeBounds]:
    """The engine's optimisation profile (the plan sidecar's {"min": [N, H, W, 3], "max": ...}) as the
    runtime's SizeBounds; None: any size."""
    if not profile:
        return None
    lo, hi = profile["min"], profile["max"]
    return SizeBounds(int(lo[0]), int(lo[1]), int(lo[2]), int(hi[0]), int(hi[1]), int(hi[2]))


def pad_batch(images: np.ndarray, bounds: Optional[SizeBounds], max_size: int = DEFAULT_MAX_SIZE) -> np.ndarray:
    """One request's N x H x W x 3 uint8 images padded as runtime.Segmenter pads them for this engine."""
    images = check_image_batch(images, max_pixels=None)
    n, h, w = images.shape[:3]
    size = network_size(h, w, max_size, bounds)
    if size.scale < 1.0:
        limit = f"max_size {max_size}" + (f" and the engine's profile ({bounds.describe()})" if bounds else "")
        raise RequestError(f"image {h}x{w} exceeds {limit}: this ensemble runs images at their own size and does "
                        "not shrink them (runtime.Segmenter does); send an image that fits, or rebuild the plan "
                        "with a larger --max-size")
    ph, pw = size.padded
    try:
        return np.stack([pad_image(images[i], ph, pw) for i in range(n)])
    except ImageError as e:  # an image above the profile's maximum when the profile caps 8k+1
        raise RequestError(str(e)) from e


# -- DLPack ----------------------------------------------------------------------------------------

K_DL_CPU, K_DL_CUDA, K_DL_CUDA_HOST = 1, 2, 3
_DL_DTYPES = {(0, 8): np.int8, (1, 8): np.uint8, (2, 32): np.float32, (2, 16): np.float16, (0, 32): np.int32,
              (0, 64): np.int64, (2, 64): np.float64}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class DLView(NamedTuple):
    buffer: Buffer            # over the tensor's memory; its owner keeps the capsule alive
    shape: Tuple[int, ...]
    dtype: Any                # numpy dtype
    device_type: int          # K_DL_CPU, K_DL_CUDA, K_DL_CUDA_HOST
    device_id: int


def dlpack_view(capsule: Any) -> DLView:
    """The memory of an unconsumed DLPack capsule ("dltensor": what pb_utils.Tensor.to_dlpack() and
    numpy's __dlpack__() return), without consuming it: the capsule keeps its name, so its own
    destructor still releases the tensor when the last reference (the Buffer's owner) goes."""
    try:
        address = _capsule_pointer(capsule, b"dltensor")
    except ValueError as e:  # a consumed capsule ("used_dltensor"), or not a DLPack capsule
        raise RequestError(f"not an unconsumed DLPack tensor capsule: {e}") from e
    t = _DLTensor.from_address(address)  # DLManagedTensor starts with its DLTensor
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    key = (int(t.dtype.code), int(t.dtype.bits))
    if key not in _DL_DTYPES or t.dtype.lanes != 1:
        raise RequestError(f"DLPack dtype code {key[0]}, {key[1]} bits, {t.dtype.lanes} lanes is not supported")
    dtype = np.dtype(_DL_DTYPES[key])
    if t.strides:
        expected, stride = [], 1
        for d in reversed(shape):
            expected.append(stride)
            stride *= d
        actual = [int(t.strides[i]) for i in range(t.ndim)]
        if any(a != e for a, e, d in zip(actual, reversed(expected), shape) if d > 1):
            raise RequestError(f"DLPack tensor of shape {list(shape)} is not C-contiguous (strides {actual})")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = Buffer(nbytes, int(t.data or 0) + int(t.byte_offset), capsule)
    return DLView(buf, shape, dtype, int(t.device.device_type), int(t.device.device_id))


# -- deeplab_crf -----------------------------------------------------------------------------------

class CRFStep:
    """The CRF step on ``kernels``: labels (and marginals) from an engine's padded scores.

    kernels: GPUKernels(device=...) in Triton (the device's primary context, the one Triton's Python
    backend opens its GPU tensors in, so their pointers are valid to the kernels), CPUKernels in tests.
    """

    def __init__(self, kernels: KernelBackend, device_id: int = 0):
        self.k = kernels
        self.device_id = device_id
        self.pipeline = DevicePipeline(kernels, crf=True)

    def addressable(self, view: DLView) -> bool:
        """Whether the kernels can read the tensor where it is (else it is copied from the host)."""
        if self.k.name == "gpu":
            return view.device_type == K_DL_CUDA and view.device_id == self.device_id
        return view.device_type in (K_DL_CPU, K_DL_CUDA_HOST)

    def scores_buffer(self, view: DLView, host: Optional[np.ndarray]) -> Buffer:
        """The N x C x Hp x Wp scores as a Buffer of the kernels: in place where addressable, else
        uploaded from ``host`` (Triton handed them on the host)."""
        if view.dtype != np.float32 or len(view.shape) != 4:
            raise RequestError(f"SCORES must be N x C x H x W float32, got {view.dtype} {list(view.shape)}")
        if self.addressable(view):
            return view.buffer
        if host is None:
            if view.device_type != K_DL_CUDA:
                raise RequestError(f"SCORES are on DLPack device type {view.device_type} #{view.device_id}, which "
                                f"the {self.k.name} kernels cannot read")
            # Triton hands a Python model a GPU input on the GPU that wrote it, whichever GPU the
            # model instance runs on.
            kernels = f"GPU {self.device_id}" if self.k.name == "gpu" else f"the {self.k.name}"
            raise RequestError(f"SCORES are on GPU {view.device_id}, which {kernels} kernels cannot read: on a "
                            "server with several GPUs, pin deeplab_network and deeplab_crf to the same GPU "
                            "(instance_group gpus), or serve one GPU per server")
        return self.pipeline.upload(host)

    def run(self, scores: Buffer, shape: Tuple[int, int, int, int], images: np.ndarray,
            params: Optional[CRFParams], probabilities: bool, name: str = "request"
            ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """scores: N x C x Hp x Wp float32 on the kernels; images: N x H x W x 3 uint8 (H <= Hp, W <= Wp).
        Returns labels N x H x W uint8 and, when asked, probabilities N x C x H x W float32 (the CRF's
        marginals, or the softmax without CRF), as runtime.Segmenter computes them."""
        n, c, hp, wp = shape
        if images.ndim != 4 or images.shape[0] != n or images.shape[3] != 3 or images.dtype != np.uint8:
            raise RequestError(f"IMAGE {images.dtype} {list(images.shape)} does not fit SCORES {list(shape)}")
        h, w = images.shape[1:3]
        if h > hp or w > wp:
            raise RequestError(f"SCORES {hp}x{wp} are smaller than IMAGE {h}x{w}")
        labels = np.empty((n, h, w), np.uint8)
        probs = np.empty((n, c, h, w), np.float32) if probabilities else None
        try:
            for j in range(n):
                image = np.ascontiguousarray(images[j])
                crop = self.pipeline.crop(scores, shape, j, h, w)
                if params is not None:
                    lab, mar = self.pipeline.labels(crop, image, c, params, probabilities, f"{name} image {j}")
                    labels[j] = lab
                    if probs is not None:
                        probs[j] = mar
                    continue
                # Without the CRF: the planar scores come back and the argmax is numpy's (the
                # argmax kernel reads label rows, not planes), as in runtime.Segmenter.
                sc = self.pipeline.download(crop, c, h, w)
                if not np.isfinite(sc.sum(dtype=np.float64)):
                    raise nonfinite_scores_error(f"{name} image {j}", sc)
                p = np.exp(-unary_from_scores(sc)) if probs is not None else None
                labels[j] = (p if p is not None else sc).argmax(axis=0)
                if probs is not None:
                    probs[j] = p
        finally:
            # Triton may reuse the memory of the step's inputs as soon as execute returns: every
            # kernel reading them must be over. (Each image's labels download already waited.)
            self.k.synchronize()
        return labels, probs

    def close(self) -> None:
        """Release the pooled buffers with the context current (pycuda frees device memory only then)."""
        with self.k.active():
            self.pipeline = DevicePipeline(self.k, crf=False)

