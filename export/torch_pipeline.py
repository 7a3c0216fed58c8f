"""The device-resident pipeline with PyTorch as the network: image -> network -> CRF -> labels,
the scores never leaving device memory, only the uint8 label map coming back.

It stands in for the TensorRT engine where TensorRT is absent (the GPU test machine has PyTorch
with CUDA, and no TensorRT): the same CRF kernels take the network's scores by device pointer
(``DenseCRFDriver(GPUKernels(stream))`` with ``Buffer``s over the tensors' memory), and the
network runs on the very stream the kernels use (``torch.cuda.ExternalStream``), so upload,
network, CRF, argmax and download are ordered by one stream with no host synchronisation between
them. With ``device="cpu"`` the same code runs with the CPU build of the kernels (the tests).

    pipe = TorchPipeline("models/deeplab_shapes.safetensors")      # CUDA + pycuda
    labels, timings = pipe(image)                                   # H x W uint8, ms per stage
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from crf import CRFParams
from crf.cpu_kernels import CPUKernels
from crf.gpu_kernels import GPUKernels
from crf.kernel_interface import Buffer, KernelBackend
from crf.driver import DenseCRFDriver
from export.model import DeepLabPipeline
from export.weights import load_model
from runtime.contract import PAD_PIXEL_BGR, aligned_size, as_bgr_uint8


def tensor_buffer(t: torch.Tensor, kernels: KernelBackend) -> Buffer:
    """A kernel Buffer over a contiguous tensor's memory (no copy): the device pointer on the GPU;
    on the CPU a numpy view, which is what the CPU backend addresses host memory through."""
    if not t.is_contiguous():
        raise ValueError("the CRF reads planar memory: pass a contiguous tensor")
    nbytes = t.numel() * t.element_size()
    if t.is_cuda:
        return Buffer(nbytes, t.data_ptr(), t)
    if kernels.name == "gpu":
        raise ValueError("a host tensor cannot be handed to the GPU kernels by pointer")
    return Buffer(nbytes, t.data_ptr(), t.numpy().reshape(-1).view(np.uint8))


class TorchPipeline:
    """weights: a checkpoint export/ loads (the bundled .safetensors). device: "cuda" (pycuda must
    be installed: the CRF runs on the GPU, on one stream with the network) or "cpu"."""

    def __init__(self, weights: str | Path, crf: CRFParams = CRFParams(), device: str = "cuda"):
        model, _ = load_model(weights)
        self.device = torch.device(device)
        self.net = DeepLabPipeline(model).eval().to(self.device)
        self.num_classes = model.config.num_classes
        self.crf = crf
        if self.device.type == "cuda":
            # Exact float32 convolutions: the comparison with the CPU path is about the pipeline,
            # not about TF32 rounding.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            self.kernels: KernelBackend = GPUKernels()
            self.torch_stream: torch.cuda.ExternalStream | None = torch.cuda.ExternalStream(
                self.kernels.stream.handle, device=self.device)
        else:
            self.kernels = CPUKernels()
            self.torch_stream = None
        self.driver = DenseCRFDriver(self.kernels)
        self.pad = torch.tensor(PAD_PIXEL_BGR, dtype=torch.uint8, device=self.device)

    def _scores(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(image H x W x 3 uint8 on the device, scores C x H x W float32 on the device, contiguous)."""
        h, w = image.shape[:2]
        src = torch.from_numpy(image)
        if self.device.type == "cuda":
            src = src.pin_memory()
        img = src.to(self.device, non_blocking=True)
        padded = self.pad.expand(aligned_size(h), aligned_size(w), 3).clone()
        padded[:h, :w] = img
        with torch.inference_mode():
            scores = self.net(padded[None])[0, :, :h, :w].contiguous()
        return img, scores

    def __call__(self, image: np.ndarray, timings: dict | None = None) -> tuple[np.ndarray, dict]:
        """image: H x W x 3 uint8 BGR -> (labels H x W uint8, {stage: ms}). Stages: network (upload,
        pad, network, crop; on the device), crf (lattice, iterations, argmax, labels download), total.
        Stage times come from host clocks around synchronised stages; pass timings=None for a call
        without the intermediate synchronisation."""
        image = as_bgr_uint8(image)
        h, w = image.shape[:2]
        t0 = time.perf_counter()
        with self.kernels.active():
            if self.torch_stream is not None:
                # allocated and used on this one stream: the caching allocator needs no record_stream
                with torch.cuda.stream(self.torch_stream):
                    img, scores = self._scores(image)
            else:
                img, scores = self._scores(image)
            if timings is not None:
                self.kernels.synchronize()
                timings["network"] = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            _, labels = self.driver.run(tensor_buffer(scores, self.kernels), tensor_buffer(img, self.kernels),
                                        h, w, self.num_classes, self.crf, marginals=False, labels=True)
            # the driver downloaded the labels on the stream and synchronised it
        if timings is not None:
            timings["crf"] = (time.perf_counter() - t1) * 1e3
            timings["total"] = (time.perf_counter() - t0) * 1e3
        return labels, timings or {}
