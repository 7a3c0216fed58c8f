"""Network backends and the device pipeline: the ONNX Runtime I/O-binding path (run here on the CPU
with the CPU kernels), the crop kernel, the Segmenter's device pipeline against its host pipeline,
backend selection and its messages, the TensorRT profile's size policy, a plan refused without
TensorRT. TensorRT itself cannot run on this project's machines (docs/tensorrt.md); the GPU tests
(marked gpu) need onnxruntime-gpu, pycuda and a GPU."""
from __future__ import annotations

import logging
import threading

import cv2
import numpy as np
import pytest

from conftest import ROOT, SAMPLES
from crf import CRFParams
from crf.backend import BackendUnavailable, CPUKernels, OutOfDeviceMemory, gpu_available
from runtime import NetworkOutputError, Segmenter
from runtime.backend_choice import open_network
from runtime.contract import ImageError, aligned_size, fit_scale
from runtime.network import SizeBounds, check_input_size, is_device_network, network_size
from runtime.onnx_backend import OnnxRuntimeNetwork, cuda_provider_problem
from runtime.trt_compat import TensorRTUnavailable

MODEL = ROOT / "models" / "deeplab_shapes.onnx"
# ONNX Runtime's CUDA and CPU scores differ by float rounding; where two labels are that close the
# CRF may pick either: this share of pixels may differ (as tests/test_device_pipeline.py).
TIE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def kernels():
    return CPUKernels()


@pytest.fixture(scope="module")
def binding_net(kernels):
    return OnnxRuntimeNetwork(MODEL, kernels=kernels)


@pytest.fixture(scope="module")
def samples():
    return [cv2.imread(str(p)) for p in sorted(SAMPLES.glob("*.png"))]


# -- the ONNX Runtime I/O-binding path on the CPU --------------------------------------------------

def test_binding_run_into_equals_session_run(binding_net, kernels):
    rng = np.random.default_rng(0)
    assert is_device_network(binding_net) and not is_device_network(OnnxRuntimeNetwork(MODEL))
    first = None
    for shape in [(2, 65, 81, 3), (1, 33, 17, 3), (3, 9, 9, 3), (2, 65, 81, 3)]:
        batch = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = binding_net.session.run(["scores"], {"image": batch})[0]
        buf, out_shape = binding_net.run_into(batch)
        assert out_shape == (shape[0], binding_net.num_classes, shape[1], shape[2])
        # read back from the CPU kernels' own buffer: ONNX Runtime wrote the scores there
        assert np.array_equal(kernels.download(buf, out_shape, np.float32), expected)
        first = first or buf
        assert buf is first  # made once (for the largest batch, the first here), then reused


def test_run_into_needs_kernels_and_the_cuda_provider_needs_onnxruntime_gpu(kernels):
    with pytest.raises(RuntimeError, match="run_into needs the CRF's kernels"):
        OnnxRuntimeNetwork(MODEL).run_into(np.zeros((1, 9, 9, 3), np.uint8))
    if cuda_provider_problem() is not None:
        with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider is not in this onnxruntime build.*"
                                                     "install onnxruntime-gpu"):
            OnnxRuntimeNetwork(MODEL, cuda=True)
    else:
        with pytest.raises(ValueError, match="needs GPU kernels, not 'cpu'"):
            OnnxRuntimeNetwork(MODEL, cuda=True, kernels=kernels)


# -- the crop kernel -----------------------------------------------------------------------------

@pytest.mark.parametrize("c,hp,wp,h,w", [(5, 17, 25, 11, 20), (21, 9, 9, 9, 9), (3, 33, 41, 1, 41), (2, 8, 3, 8, 1)])
def test_crop_kernel_equals_numpy(kernels, c, hp, wp, h, w):
    from runtime.device_pipeline import DevicePipeline

    rng = np.random.default_rng(c * 100 + h)
    scores = rng.standard_normal((3, c, hp, wp)).astype(np.float32)
    src = kernels.alloc(scores.nbytes)
    kernels.upload(src, scores)
    pipe = DevicePipeline(kernels, crf=False)
    for j in range(3):
        crop = pipe.crop(src, scores.shape, j, h, w)
        assert np.array_equal(pipe.download(crop, c, h, w), scores[j, :, :h, :w])


# -- the Segmenter's device pipeline vs its host pipeline ------------------------------------------

def _device_segmenter(kernels, **kw):
    return Segmenter(MODEL, network=OnnxRuntimeNetwork(MODEL, kernels=kernels), **kw)


def test_device_pipeline_equals_host_pipeline_on_the_samples(kernels, samples, caplog):
    host = Segmenter(MODEL, crf_backend="cpu")
    with caplog.at_level(logging.INFO, logger="deeplab"):
        dev = _device_segmenter(kernels)
    assert (host.pipeline, dev.pipeline, dev.crf_backend, dev._device.driver is not None) == ("host", "device", "cpu", True)
    assert [r.message for r in caplog.records if r.name == "deeplab"] == [
        f"{MODEL}: network onnxruntime, CRF cpu, on the network's scores in place, device pipeline"]
    a = host(samples, return_probabilities=True, return_scores=True)
    b = dev(samples, return_probabilities=True, return_scores=True)
    for ra, rb in zip(a, b):
        # the same session, the same CRF code on the same kernels: equal, not just close
        assert np.array_equal(ra.labels, rb.labels)
        assert np.array_equal(ra.probabilities, rb.probabilities) and np.array_equal(ra.scores, rb.scores)
        assert set(rb.timings) == set(ra.timings) == {"preprocess", "network", "postprocess", "crf", "total"}
        assert rb.timings["crf"] > 0 and rb.crf_scale == 1.0
    only_labels = dev(samples[2])
    assert only_labels.probabilities is None and only_labels.scores is None
    assert np.array_equal(only_labels.labels, a[2].labels)


@pytest.mark.parametrize("options", [{"crf": None}, {"max_size": 97, "crf": CRFParams(iterations=3)},
                                     {"crf_max_pixels": 3000, "crf": CRFParams(iterations=3)},
                                     {"crf_backend": "numpy", "crf": CRFParams(iterations=2)}])
def test_device_pipeline_host_steps_equal_host_pipeline(kernels, samples, options):
    """Without the CRF (scores downloaded, argmax on the host), a shrunk image (score resize on
    the host), the CRF on a shrunken copy, and a CRF on other kernels than the network's."""
    small = [cv2.resize(im, (im.shape[1] // 3, im.shape[0] // 3), interpolation=cv2.INTER_AREA) for im in samples]
    host, dev = Segmenter(MODEL, **options), _device_segmenter(kernels, **options)
    assert dev.pipeline == "device"
    for ra, rb in zip(host(small, return_probabilities=True), dev(small, return_probabilities=True)):
        assert np.array_equal(ra.labels, rb.labels) and np.array_equal(ra.probabilities, rb.probabilities)
        assert ra.crf_scale == rb.crf_scale


def test_device_pipeline_names_the_image_with_nan_scores(kernels, tmp_path):
    from test_model_outputs import graph_model, scalar, to_nchw
    from onnx import helper

    path = graph_model(tmp_path / "log.onnx", to_nchw("image", "t") + [helper.make_node("Sub", ["t", "k"], ["d"]),
                                                                       helper.make_node("Log", ["d"], ["scores"])],
                       [scalar("k", 50.0)], channels=3)
    seg = Segmenter(path, crf=CRFParams(iterations=2), network=OnnxRuntimeNetwork(path, kernels=kernels))
    bright = np.full((20, 30, 3), 200, np.uint8)
    dark = bright.copy()
    dark[5:8, 5:9] = 10
    assert seg(bright).labels.shape == (20, 30)
    with pytest.raises(NetworkOutputError, match=r"image 1 of the batch: the network's scores contain 36 NaN/inf "
                                                 r"values \(of 1800\)"):
        seg([bright, dark])


class CappedCPUKernels(CPUKernels):
    """The CPU kernels with a memory cap: allocations beyond it fail as a full GPU's do."""

    cap = 1 << 62

    def alloc(self, nbytes):
        if nbytes > self.cap:
            raise OutOfDeviceMemory(f"out of GPU memory allocating {nbytes:,} bytes")
        return super().alloc(nbytes)


def test_out_of_memory_is_reported_and_the_segmenter_stays_usable(samples):
    k = CappedCPUKernels()
    seg = Segmenter(MODEL, crf=CRFParams(iterations=2), network=OnnxRuntimeNetwork(MODEL, kernels=k))
    image = samples[2][:60, :70]
    expected = seg(image).labels
    k.cap = 80_000  # below the CRF's buffers for a 241x241 image
    with pytest.raises(OutOfDeviceMemory, match=r"out of GPU memory allocating .* the Segmenter is still usable"):
        seg(samples[2])
    k.cap = 1 << 62
    assert np.array_equal(seg(image).labels, expected)
    assert seg(samples[2]).labels.shape == samples[2].shape[:2]


# -- backend selection -----------------------------------------------------------------------------

def test_auto_picks_what_runs_here_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="deeplab"):
        seg = Segmenter(MODEL, crf=None)
    lines = [r for r in caplog.records if r.name == "deeplab"]
    if cuda_provider_problem() is None and gpu_available():
        assert seg.backend == "onnxruntime-cuda" and seg.pipeline == "device"
    else:
        # a CPU-only onnxruntime is what was installed, not a fallback: no warning
        assert (seg.backend, seg.pipeline, seg.crf_backend) == ("onnxruntime", "host", None)
        assert [(r.levelname, r.message) for r in lines] == [
            ("INFO", f"{MODEL}: network onnxruntime, CRF off, host pipeline")]


def test_forced_backends_that_cannot_run_say_why(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'tensorflow': choose one of auto, tensorrt, "
                                         "onnxruntime-cuda, onnxruntime"):
        open_network(MODEL, "tensorflow")
    with pytest.raises(ValueError, match="backend 'tensorrt' runs TensorRT plans .*--engine"):
        Segmenter(MODEL, backend="tensorrt")
    with pytest.raises(ValueError, match="is a TensorRT plan: backend 'onnxruntime-cuda' runs .onnx models"):
        Segmenter(tmp_path / "m.plan", backend="onnxruntime-cuda")
    if cuda_provider_problem() is not None:
        with pytest.raises(BackendUnavailable, match="install onnxruntime-gpu"):
            Segmenter(MODEL, backend="onnxruntime-cuda")
    assert open_network(MODEL, "onnxruntime").name == "onnxruntime"


@pytest.mark.parametrize("backend", ["auto", "tensorrt"])
def test_a_plan_without_tensorrt_fails_with_tensorrt_s_reason(tmp_path, backend):
    """Before the file is even read: a corrupt plan, with a sidecar or not, or none at all."""
    try:
        from runtime.trt_compat import load_tensorrt

        load_tensorrt()
        pytest.skip("TensorRT is installed here")
    except TensorRTUnavailable:
        pass
    corrupt = tmp_path / "model.engine"
    corrupt.write_bytes(b"\x00not a plan")
    (tmp_path / "model.engine.json").write_text("{broken")
    for plan in (corrupt, tmp_path / "absent.engine", tmp_path / "model.plan"):
        with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed") as info:
            Segmenter(plan, backend=backend)
        assert "not supported by this release" not in str(info.value)
        assert "not run by this release" not in str(info.value)


# -- the size policy of a TensorRT profile (a pure function) -------------------------------------

def test_network_size_without_bounds_is_today_s_policy():
    for h, w in [(1, 1), (241, 241), (375, 500), (1025, 1025), (1100, 300), (2000, 3001)]:
        s = fit_scale(h, w, 1025)
        resized = (max(1, round(h * s)), max(1, round(w * s))) if s < 1 else (h, w)
        assert network_size(h, w, 1025) == (s, resized, (aligned_size(resized[0]), aligned_size(resized[1])))


def test_network_size_within_a_profile():
    b = SizeBounds(1, 65, 97, 4, 513, 769)
    # inside: padded to 8k+1 as usual
    assert network_size(375, 500, 1025, b) == (1.0, (375, 500), (377, 505))
    # above the profile's height (not above max_size): shrunk to fit it, aspect kept
    s, resized, padded = network_size(1000, 800, 1025, b)
    assert s == pytest.approx(513 / 1000) and resized == (513, 410) and padded == (513, 417)
    # above its width: the width decides
    s, resized, padded = network_size(300, 1538, 1025, b)
    assert s == pytest.approx(769 / 1538) and resized == (150, 769) and padded == (153, 769)
    # max_size smaller than the profile still rules
    assert network_size(600, 600, 257, b)[1:] == ((257, 257), (257, 257))
    # below the minimum: padded up to it, not shrunk or grown
    assert network_size(20, 30, 1025, b) == (1.0, (20, 30), (65, 97))
    # padding to 8k+1 never steps past the maximum (513 is 8k+1; 769 is too: try a profile that is not)
    odd = SizeBounds(1, 9, 9, 1, 500, 500)
    assert network_size(499, 498, 1025, odd) == (1.0, (499, 498), (500, 500))
    assert network_size(1000, 1000, 1025, odd)[1:] == ((500, 500), (500, 500))


def test_input_size_must_fit_the_profile():
    b = SizeBounds(1, 65, 65, 1, 513, 513)
    check_input_size((321, 321), b, "m.engine")
    check_input_size((9, 9), None, "m.onnx")
    with pytest.raises(ValueError, match=r"input_size 33x321 is outside what m.engine runs \(65x65 to 513x513, batch 1..1\)"):
        check_input_size((33, 321), b, "m.engine")
    with pytest.raises(ImageError, match="exceeds input_size"):
        network_size(400, 300, 1025, b, input_size=(321, 321))


# -- GPU (pytest -m gpu on a machine with onnxruntime-gpu, pycuda and nvcc) -------------------------

needs_cuda_ort = pytest.mark.skipif(cuda_provider_problem() is not None or not gpu_available(),
                                    reason="no onnxruntime-gpu CUDA provider with pycuda, nvcc and a GPU here")


@pytest.mark.gpu
@needs_cuda_ort
def test_ort_cuda_device_pipeline_equals_the_host_pipeline(samples):
    """ONNX Runtime's CUDA provider on the CRF's stream, scores cropped and refined in device
    memory, only labels back; repeated calls allocate nothing more."""
    import pycuda.driver as cuda

    host = Segmenter(MODEL, backend="onnxruntime", crf_backend="cpu")
    dev = Segmenter(MODEL, backend="onnxruntime-cuda")
    assert (dev.backend, dev.crf_backend, dev.pipeline) == ("onnxruntime-cuda", "gpu", "device")
    expected = [r.labels for r in host(samples)]

    def check():
        for got, want in zip(dev(samples), expected):
            assert float((got.labels != want).mean()) <= TIE_TOLERANCE

    check()
    with dev.network.kernels.active():
        free0, _ = cuda.mem_get_info()
    check()
    with dev.network.kernels.active():
        free1, _ = cuda.mem_get_info()
    assert free0 - free1 < 8 << 20, f"device memory grew by {free0 - free1} bytes"


@pytest.mark.gpu
@needs_cuda_ort
def test_ort_cuda_segmenter_from_worker_threads(samples):
    dev = Segmenter(MODEL, backend="onnxruntime-cuda")
    expected = [dev(im).labels for im in samples]
    out: dict = {}
    errors: list = []

    def work(t):
        try:
            out[t] = [dev(im).labels for im in samples]
        except Exception as e:  # reported below with the thread's number
            errors.append((t, e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for t in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(out[t], expected))
