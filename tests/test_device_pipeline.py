"""The device-resident pipeline (network -> CRF -> labels, scores kept where the network wrote them),
with PyTorch as the network: on the CPU here with the CPU build of the kernels, on a GPU (marked
gpu) with the network on CUDA and the CRF kernels on the same stream. Both must give the labels of
the ordinary path (Segmenter: ONNX Runtime, scores on the host, then crf.refine)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import BUNDLED, SAMPLES
from crf.gpu_kernels import gpu_available

# Network scores from PyTorch and from ONNX Runtime differ by float rounding (~1e-5); where two
# labels are that close the CRF may pick either: this share of pixels may differ.
TIE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference(bundled_onnx):
    from runtime import Segmenter

    seg = Segmenter(bundled_onnx, crf_backend="cpu")
    return {p.name: (cv2.imread(str(p)), seg(str(p)).labels) for p in sorted(SAMPLES.glob("*.png"))}


def _check(pipe, reference, repeats=1):
    for name, (image, expected) in reference.items():
        for _ in range(repeats):
            timings: dict = {}
            labels, timings = pipe(image, timings)
            assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
            differ = float((labels != expected).mean())
            assert differ <= TIE_TOLERANCE, f"{name}: {100 * differ:.3f}% of labels differ"
            assert set(timings) == {"network", "crf", "total"}
        print(f"{name}: labels differ from the host path on {100 * differ:.4f}% of pixels")


def test_pipeline_on_the_cpu_equals_the_host_path(reference):
    from export.torch_pipeline import TorchPipeline

    pipe = TorchPipeline(BUNDLED, device="cpu")
    _check(pipe, reference)


def test_tensor_buffer_refuses_what_the_kernels_cannot_read():
    import torch

    from crf.cpu_kernels import CPUKernels
    from export.torch_pipeline import tensor_buffer

    k = CPUKernels()
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        tensor_buffer(t.t(), k)
    buf = tensor_buffer(t, k)
    assert buf.nbytes == 48 and np.array_equal(k.download(buf, (3, 4), np.float32), t.numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU with pycuda and nvcc here")
def test_pipeline_on_the_gpu_equals_the_host_path(reference):
    """Network on CUDA, scores handed to the CRF kernels by device pointer on the same stream,
    only the uint8 labels copied back; repeated calls give the same labels."""
    import pycuda.driver as cuda

    from export.torch_pipeline import TorchPipeline

    pipe = TorchPipeline(BUNDLED, device="cuda")
    _check(pipe, reference, repeats=3)
    with pipe.kernels.active():
        free0, _ = cuda.mem_get_info()
    _check(pipe, reference, repeats=5)
    with pipe.kernels.active():
        free1, _ = cuda.mem_get_info()
    assert free0 - free1 < 8 << 20, f"device memory grew by {free0 - free1} bytes"


def test_buffer_pool_reuses_a_role_and_grows_it_only_when_needed():
    """crf.kernel_interface.BufferPool: the one owner of the pooled memory of the driver, the device
    pipeline and ONNX Runtime's device path."""
    from crf.cpu_kernels import CPUKernels
    from crf.kernel_interface import BufferPool

    pool = BufferPool(CPUKernels())
    a = pool.device("scores", 1000)
    assert pool.device("scores", 800) is a and pool["scores"] is a  # smaller: the same buffer
    b = pool.device("scores", 4000)
    assert b is not a and b.nbytes == 4000 and pool.nbytes() == 4000  # the smaller one was let go
    pool.device("image", 12)
    assert pool.nbytes() == 4012
    h = pool.host("labels", (3, 5), np.uint8)
    h[...] = 7
    again = pool.host("labels", (5, 3), np.uint8)  # a view of the same bytes at another shape
    assert again.shape == (5, 3) and (again == 7).all()
    f = pool.host("labels", (2, 4), np.float32)  # 32 bytes > 15: grown
    assert f.dtype == np.float32 and f.shape == (2, 4)


def _crf_step_from_dlpack(onnx_model, device: str):
    """The Triton GPU ensemble's CRF step (serving/ensemble_steps.py) fed as Triton feeds
    it: padded network scores handed over as a DLPack capsule (here from a torch tensor, on ``device``),
    read by pointer, cropped, refined and argmaxed by the kernels. Returns (labels, reference labels)
    per sample, the reference being the in-process Segmenter's from the same scores."""
    import torch
    from torch.utils.dlpack import to_dlpack

    from crf import CRFParams
    from crf.cpu_kernels import CPUKernels
    from crf.gpu_kernels import GPUKernels
    from serving.ensemble_steps import CRFStep, bounds_from_profile, dlpack_view, pad_batch
    from runtime import Segmenter

    seg = Segmenter(onnx_model, crf_backend="cpu")
    kernels = GPUKernels() if device == "cuda" else CPUKernels()
    step = CRFStep(kernels)
    out = []
    for p in sorted(SAMPLES.glob("*.png")):
        image = cv2.imread(str(p))
        padded = pad_batch(image[None], bounds_from_profile(None))
        scores = seg.network(padded)  # N x C x Hp x Wp float32 on the host, as ONNX Runtime gives them
        t = torch.from_numpy(np.ascontiguousarray(scores)).to(device)
        if device == "cuda":
            torch.cuda.synchronize()  # Triton hands inputs with no work pending on them
        view = dlpack_view(to_dlpack(t))
        assert step.addressable(view)
        labels, _ = step.run(step.scores_buffer(view, None), tuple(view.shape), image[None], CRFParams(), False)
        out.append((p.name, labels[0], seg(image).labels))
    step.close()
    return out


def test_triton_crf_step_reads_dlpack_scores_on_the_cpu(bundled_onnx):
    for name, labels, expected in _crf_step_from_dlpack(bundled_onnx, "cpu"):
        assert np.array_equal(labels, expected), name


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU with pycuda and nvcc here")
def test_triton_crf_step_reads_dlpack_scores_on_the_gpu(bundled_onnx):
    """The device pointer of a DLPack capsule (torch's CUDA allocator, the primary context) read by
    the pycuda kernels: labels as the host path's, within the GPU/CPU tie tolerance."""
    for name, labels, expected in _crf_step_from_dlpack(bundled_onnx, "cuda"):
        differ = float((labels != expected).mean())
        assert differ <= TIE_TOLERANCE, f"{name}: {100 * differ:.3f}% of labels differ"


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU with pycuda and nvcc here")
def test_gpu_stage_marks_are_cuda_events_in_stream_order():
    """GPUKernels.mark records CUDA events on the stream; stage_times gives the gaps between them
    (what the benchmark's device stages are made of), after the stream has passed the last one."""
    from crf.gpu_kernels import GPUKernels

    k = GPUKernels()
    data = np.arange(1 << 22, dtype=np.float32)  # 16 MB: a copy long enough to time
    with k.active():
        buf = k.alloc(data.nbytes)
        staged = k.alloc_host(data.shape, np.float32)
    staged[...] = data
    k.marks = []
    k.mark("start")
    k.upload_async(buf, staged)
    k.mark("upload")
    back = k.download(buf, data.shape, np.float32)
    k.mark("download")
    times = k.stage_times()
    k.marks = None
    assert [s for s, _ in times] == ["upload", "download"] and all(ms > 0 for _, ms in times), times
    assert np.array_equal(back, data)
