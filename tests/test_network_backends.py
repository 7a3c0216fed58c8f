"""Network backends and the device pipeline: the ONNX Runtime I/O-binding path (run here on the CPU
with the CPU kernels), the crop kernel, the Segmenter's device pipeline against its host pipeline,
backend selection and its messages, the TensorRT profile's size policy, a plan refused without
TensorRT. TensorRT itself cannot run on this project's machines (docs/tensorrt.md); the GPU tests
(marked gpu) need onnxruntime-gpu, pycuda and a GPU."""
from __future__ import annotations

import contextlib
import gc
import logging
import threading
import warnings
import weakref

import cv2
import numpy as np
import pytest

from conftest import ROOT, SAMPLES
from crf import CRFParams
from crf.cpu_kernels import CPUKernels
from crf.gpu_kernels import gpu_available
from runtime import NetworkOutputError, Segmenter, SizeLimits
from runtime.backend_choice import open_network
from runtime.contract import aligned_size, fit_scale
from runtime.errors import BackendUnavailable, ImageError, OutOfDeviceMemory, TensorRTUnavailable
from runtime.network import SizeBounds, check_input_size, network_size
from runtime.onnx_backend import (OnnxRuntimeNetwork, check_user_stream_taken, cuda_provider_missing,
                                  cuda_provider_problem, cuda_provider_too_old)

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
    assert binding_net.kernels is not None and OnnxRuntimeNetwork(MODEL).kernels is None  # device / host network
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
        with pytest.raises(BackendUnavailable, match="(CUDAExecutionProvider is not in this onnxruntime build.*"
                                                     "install onnxruntime-gpu|needs onnxruntime-gpu 1.18 or newer)"):
            OnnxRuntimeNetwork(MODEL, cuda=True)
    else:
        with pytest.raises(ValueError, match="needs GPU kernels, not 'cpu'"):
            OnnxRuntimeNetwork(MODEL, cuda=True, kernels=kernels)


def test_cuda_provider_needs_onnxruntime_gpu_1_18_for_the_shared_stream():
    for old in ("1.16.3", "1.17.0", "1.17.1"):
        assert f"onnxruntime-gpu {old} cannot run on the CRF's stream" in cuda_provider_too_old(old)
        assert "needs onnxruntime-gpu 1.18 or newer" in cuda_provider_too_old(old)
    for new in ("1.18.0", "1.18.1", "1.20.1", "1.32.0", "2.0.0"):
        assert cuda_provider_too_old(new) is None


def test_a_session_that_dropped_the_stream_option_is_refused():
    """onnxruntime's Python fallback recreates a failed session without provider options: the
    provider options a session reports must say that it took the stream."""
    cpu_session = OnnxRuntimeNetwork(MODEL).session  # no CUDA provider options at all
    for reported in (cpu_session.get_provider_options(),
                     {"CUDAExecutionProvider": {"device_id": "0", "has_user_compute_stream": "0"}}):
        with pytest.raises(BackendUnavailable, match="ONNX Runtime ignored the CUDA provider options "
                                                     r"\(user_compute_stream\) for .*deeplab_shapes.onnx"):
            check_user_stream_taken(reported, MODEL)
    check_user_stream_taken({"CUDAExecutionProvider": {"has_user_compute_stream": "1"}}, MODEL)


def test_providers_are_refused_with_cuda():
    with pytest.raises(ValueError, match="cuda=True runs the CUDAExecutionProvider .* leave providers out"):
        OnnxRuntimeNetwork(MODEL, providers=["CPUExecutionProvider"], cuda=True)


@pytest.mark.parametrize("shape", [(9, 9, 3), (1, 9, 9), (1, 9, 9, 1), (0, 9, 9, 3), (1, 1, 9, 9, 3)])
def test_run_into_refuses_a_batch_that_is_not_n_h_w_3(binding_net, shape):
    with pytest.raises(ValueError, match=r"expected an N x H x W x 3 uint8 batch of at least one image, got "
                                         rf"shape \({', '.join(map(str, shape))}\)"):
        binding_net.run_into(np.zeros(shape, np.uint8))


def test_download_into_refuses_an_array_larger_than_the_buffer(kernels):
    buf = kernels.alloc(8)
    kernels.upload(buf, np.array([1.5, -2.0], np.float32))
    with pytest.raises(ValueError, match="download of 12 bytes from a 8-byte buffer"):
        kernels.download_into(buf, np.empty(3, np.float32))
    assert kernels.download_into(buf, np.empty(2, np.float32)).tolist() == [1.5, -2.0]


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
    assert (host.pipeline, dev.pipeline, dev.crf_backend, dev._pipeline.driver is not None) == ("host", "device", "cpu", True)
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


def test_device_pipeline_stage_marks(kernels, samples):
    """stage_events: each result's timings gain the device stages between the kernels' stage marks
    (the host clock on the CPU build, CUDA events on a GPU), in stream order; the wall-clock stages
    and their total are unchanged; no mark is kept once the call is over."""
    dev = _device_segmenter(kernels)
    plain = dev(samples[0])
    assert not [k for k in plain.timings if k.startswith("device_")]
    dev.stage_events = True
    results = dev(samples)
    for r in results:
        t = r.timings
        device = {k: v for k, v in t.items() if k.startswith("device_")}
        # the CPU network reads the batch in place and the CPU kernels the image: no upload mark
        assert set(device) == {"device_network", "device_crf", "device_download"}, t
        assert all(v >= 0 for v in device.values()) and device["device_crf"] > 0
        assert t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total" and k not in device))
        assert device["device_crf"] <= t["crf"] + 1e-6
        assert device["device_network"] <= t["network"] + 1e-6
    assert kernels.marks is None
    dev.stage_events = False
    assert not [k for k in dev(samples[1]).timings if k.startswith("device_")] and kernels.marks is None


def test_stage_times_are_the_gaps_between_marks():
    k = CPUKernels()
    k.mark("ignored: marks off")
    assert k.marks is None and k.stage_times() == []
    k.marks = []
    for stage in ("start", "upload", "network"):
        k.mark(stage)
    times = k.stage_times()
    assert [s for s, _ in times] == ["upload", "network"] and all(ms >= 0 for _, ms in times)
    assert k.marks == [] and k.stage_times() == []


@pytest.mark.parametrize("options", [{"crf": None}, {"limits": SizeLimits(max_size=97), "crf": CRFParams(iterations=3)},
                                     {"limits": SizeLimits(crf_max_pixels=3000), "crf": CRFParams(iterations=3)},
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


@pytest.mark.parametrize("pipeline", ["host", "device"])
def test_a_deadline_passed_in_the_network_stops_the_call_before_the_crf(kernels, samples, pipeline):
    """Both pipelines check the call's deadline between the network and the CRF; the Segmenter
    (its device lock and stage marks included) stays usable after the CRFTimeout."""
    import time

    from runtime.errors import CRFTimeout

    seg = Segmenter(MODEL, crf=CRFParams(iterations=2)) if pipeline == "host" else _device_segmenter(kernels)
    assert seg.pipeline == pipeline
    seg.stage_events = True
    stages: list = []

    def slow_network(stage):
        stages.append(stage)
        if stage == "network":
            time.sleep(0.3)

    with pytest.raises(CRFTimeout):
        seg(samples[0], progress=slow_network, timeout=0.2)
    assert stages == ["preprocess", "network"] and kernels.marks is None
    assert seg(samples[0], timeout=60).labels.shape == samples[0].shape[:2]


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


def test_device_pipeline_labels_names_the_image_only_for_nan_scores(kernels, samples):
    """The driver's NaN/inf refusal becomes NetworkOutputError naming the image, with the count of
    bad values; its other refusals (here a bandwidth too small for the image) pass unchanged."""
    from crf.features import CRFInputError
    from runtime.device_pipeline import DevicePipeline

    pipe = DevicePipeline(kernels, crf=True)
    h, w = 20, 30
    scores = np.random.default_rng(2).standard_normal((1, 5, h, w)).astype(np.float32)
    image = np.ascontiguousarray(samples[0][:h, :w])
    src = kernels.alloc(scores.nbytes)
    kernels.upload(src, scores)
    crop = pipe.crop(src, scores.shape, 0, h, w)
    with pytest.raises(CRFInputError, match="lattice coordinates overflow 16 bits"):
        pipe.labels(crop, image, 5, CRFParams(iterations=1, pos_xy_std=1e-6), marginals=False, name="tiny.png")
    scores[0, 2, 3:5, 4:7] = np.nan
    scores[0, 4, 0, 0] = np.inf
    kernels.upload(src, scores)
    crop = pipe.crop(src, scores.shape, 0, h, w)
    with pytest.raises(NetworkOutputError, match=r"^bad.png: the network's scores contain 7 NaN/inf values "
                                                 r"\(of 3000\); no labels can be drawn from them$"):
        pipe.labels(crop, image, 5, CRFParams(iterations=1), marginals=False, name="bad.png")


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


class ContextCheckingCPUKernels(CPUKernels):
    """The CPU kernels with pycuda's rule for freeing memory: device and pinned memory are freed
    with the context current in the freeing thread (``active()``); pycuda warns about any other
    free and leaks the memory. Frees outside ``active()`` are recorded (a warning raised by a
    finaliser would only be printed)."""

    def __init__(self):
        super().__init__()
        self._depth = threading.local()
        self.stray_frees: list = []

    @contextlib.contextmanager
    def active(self):
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        try:
            yield self
        finally:
            self._depth.n = depth

    def _tracked(self, owner, nbytes, kind):
        weakref.finalize(owner, self._freed, nbytes, kind)
        return owner

    def _freed(self, nbytes, kind):
        if not getattr(self._depth, "n", 0):
            self.stray_frees.append(f"{kind} of {nbytes} bytes freed in {threading.current_thread().name} "
                                    "without the context current")

    def alloc(self, nbytes):
        buf = super().alloc(nbytes)
        self._tracked(buf.owner, nbytes, "device memory")
        return buf

    def alloc_host(self, shape, dtype):
        return self._tracked(super().alloc_host(shape, dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize,
                             "pinned memory")


def _in_worker_thread(fn):
    """fn() run in a new thread with warnings as errors; its exception re-raised here."""
    errors: list = []

    def run():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                fn()
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)

    t = threading.Thread(target=run, name="worker")
    t.start()
    t.join()
    if errors:
        raise errors[0]


def test_device_pipeline_frees_grown_buffers_with_the_context_current(samples):
    """The crop, CRF (its NaN/inf flag included), image and label buffers grow from a worker thread: the smaller ones are
    freed inside active(), where pycuda can free them."""
    from runtime.device_pipeline import DevicePipeline

    k = ContextCheckingCPUKernels()
    pipe = DevicePipeline(k, crf=True)
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((1, 5, 65, 73)).astype(np.float32)
    src = k.alloc(scores.nbytes)
    k.upload(src, scores)
    params = CRFParams(iterations=1)

    def grow():
        for h, w in [(9, 9), (30, 41), (65, 73)]:  # each larger than the last
            crop = pipe.crop(src, scores.shape, 0, h, w)
            assert np.array_equal(pipe.download(crop, 5, h, w), scores[0, :, :h, :w])
            # labels runs the driver's NaN/inf check: its flag buffer, too, is made in this thread
            labels, _ = pipe.labels(crop, np.ascontiguousarray(samples[0][:h, :w]), 5, params, marginals=False,
                                    name="sample")
            assert labels.shape == (h, w)
            del crop  # the pipeline keeps its buffer; the caller's reference goes

    _in_worker_thread(grow)
    assert k.stray_frees == []


def test_segmenter_frees_grown_buffers_with_the_context_current(samples):
    """One batch whose images crop to growing sizes, run from a worker thread: the Segmenter's own
    reference to the previous crop is dropped with the context current too."""
    k = ContextCheckingCPUKernels()
    seg = Segmenter(MODEL, crf=CRFParams(iterations=1), network=OnnxRuntimeNetwork(MODEL, kernels=k))
    # 60x70 and 64x72 pad to the same 65x73 batch; the second crop is larger than the first
    images = [np.ascontiguousarray(samples[1][:60, :70]), np.ascontiguousarray(samples[2][:64, :72])]
    expected = [r.labels for r in Segmenter(MODEL, crf=CRFParams(iterations=1), crf_backend="cpu")(images)]
    out: list = []
    _in_worker_thread(lambda: out.extend(seg(images)))
    assert [r.labels.shape for r in out] == [(60, 70), (64, 72)]
    assert all(np.array_equal(r.labels, e) for r, e in zip(out, expected))
    assert k.stray_frees == []


def test_out_of_memory_on_a_grown_crop_frees_the_old_one_with_the_context_current(samples):
    """The second image's larger crop cannot be allocated: the first one's, which the failed batch
    still referenced, is freed inside active() too, not when the caller drops the error."""

    class RefusingKernels(ContextCheckingCPUKernels):
        refuse = -1

        def alloc(self, nbytes):
            if nbytes == self.refuse:
                raise OutOfDeviceMemory(f"out of GPU memory allocating {nbytes:,} bytes")
            return super().alloc(nbytes)

    k = RefusingKernels()
    seg = Segmenter(MODEL, crf=None, network=OnnxRuntimeNetwork(MODEL, kernels=k))
    images = [np.ascontiguousarray(samples[1][:60, :70]), np.ascontiguousarray(samples[2][:64, :72])]
    k.refuse = 5 * 64 * 72 * 4  # the second image's crop
    with pytest.raises(OutOfDeviceMemory, match="allocating 92,160 bytes .*the Segmenter is still usable"):
        _in_worker_thread(lambda: seg(images))
    gc.collect()  # the error and whatever it still referenced are gone now
    assert k.stray_frees == []
    k.refuse = -1
    assert [r.labels.shape for r in seg(images)] == [(60, 70), (64, 72)]


def test_allocate_all_releases_what_it_made_before_raising():
    """Out of memory part-way: the earlier allocations are gone while the caller still holds the
    error (a traceback keeps its frames' locals alive), so a retry finds the memory free."""
    from runtime.trt_backend import allocate_all

    k = CappedCPUKernels()
    k.cap = 1000
    made: list = []

    def tracked(nbytes):
        buf = k.alloc(nbytes)
        made.append(weakref.ref(buf.owner))
        return buf

    with pytest.raises(OutOfDeviceMemory, match="plan maximum: out of GPU memory allocating 4,000 bytes; rebuild") \
            as info:
        allocate_all([lambda: tracked(100), lambda: tracked(200), lambda: tracked(4000)],
                     lambda reason: f"plan maximum: {reason}; rebuild")
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert len(made) == 2 and all(ref() is None for ref in made)
    bufs = allocate_all([lambda: k.alloc(100), lambda: k.alloc(200)], str)
    assert [b.nbytes for b in bufs] == [100, 200]


# -- backend selection -----------------------------------------------------------------------------

def test_auto_picks_what_runs_here_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="deeplab"):
        seg = Segmenter(MODEL, crf=None)
    lines = [r for r in caplog.records if r.name == "deeplab"]
    if cuda_provider_problem() is None and gpu_available():
        assert seg.backend == "onnxruntime-cuda" and seg.pipeline == "device"
        return
    assert (seg.backend, seg.pipeline, seg.crf_backend) == ("onnxruntime", "host", None)
    chosen = ("INFO", f"{MODEL}: network onnxruntime, CRF off, host pipeline")
    if cuda_provider_missing() is not None:
        # a CPU-only onnxruntime is what was installed, not a fallback: no warning
        assert [(r.levelname, r.message) for r in lines] == [chosen]
    else:  # the provider is there but cannot run (too old, no GPU): one warning says why
        assert [r.levelname for r in lines] == ["WARNING", "INFO"] and lines[1].message == chosen[1]
        assert "ONNX Runtime's CUDA provider cannot run here, using the CPU" in lines[0].message


def test_forced_backends_that_cannot_run_say_why(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'tensorflow': choose one of auto, tensorrt, "
                                         "onnxruntime-cuda, onnxruntime"):
        open_network(MODEL, "tensorflow")
    with pytest.raises(ValueError, match="backend 'tensorrt' runs TensorRT plans .*--engine"):
        Segmenter(MODEL, backend="tensorrt")
    with pytest.raises(ValueError, match="is a TensorRT plan: backend 'onnxruntime-cuda' runs .onnx models"):
        Segmenter(tmp_path / "m.plan", backend="onnxruntime-cuda")
    if cuda_provider_problem() is not None:
        with pytest.raises(BackendUnavailable, match="(install onnxruntime-gpu|needs onnxruntime-gpu 1.18 or newer)"):
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
