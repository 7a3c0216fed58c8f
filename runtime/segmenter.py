"""``Segmenter``: image -> preprocess -> network -> (upsampled in-graph) -> CRF -> labels.

    from runtime import Segmenter
    seg = Segmenter("models/deeplab_shapes.onnx")
    result = seg("samples/scene_0.png")       # or a BGR uint8 array, or a list of them
    cv2.imwrite("overlay.png", seg.overlay(result))
    print(result.labels.shape, result.timings)

One loop, two places for the scores (runtime/device_pipeline.py). A host backend (ONNX Runtime on
the CPU) returns them as a numpy array: cropped, checked and refined by crf.refine. A device
backend (TensorRT, ONNX Runtime's CUDA provider, or ONNX Runtime on the CPU made with CPU kernels)
leaves them where the network wrote them: cropped, checked and refined there on one stream, and
only the labels come back. The same labels either way.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from crf import CRFParams, refine, resolve_backend
from crf.features import check_deadline

from .backend_choice import open_network
from .contract import ImageLike, as_bgr_uint8, load_image, pad_image
from .device_pipeline import DevicePipeline, HostPipeline, ScoresPipeline
from .errors import ImageError, ModelFormatError, OutOfDeviceMemory, nonfinite_scores_error
from .limits import SizeLimits
from .memory import CallMemory
from .model_check import check_network_output, shape_problems
from .network import Network, check_input_size, network_image, network_size
from .palette import ClassAccessors, model_classes
from .result import Segmentation
from .upsample import resize_scores, upsampled_argmax

log = logging.getLogger("deeplab")
_DEFAULT = object()


@dataclass
class _Call:
    """What one call asked for, handed down to each image."""

    probabilities: bool
    scores: bool
    tick: Callable[[str], None]
    deadline: Optional[float]  # a time.monotonic() value: CRFTimeout past it


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1e3


class Segmenter(ClassAccessors):
    """DeepLab v1 segmentation with the dense CRF, for embedded apps.

    model_path: an .onnx exported by deeplab-export, or a TensorRT plan (.engine / .plan) built by
    deeplab-export --engine. crf: CRFParams (default: DeepLab-LargeFOV's), the path of a JSON file of
    them (CRFParams.load), or None to skip the CRF. backend: "auto" (TensorRT for a plan, else ONNX
    Runtime's CUDA provider where onnxruntime-gpu and pycuda work, else ONNX Runtime on the CPU),
    "tensorrt", "onnxruntime-cuda" or "onnxruntime" (runtime/backend_choice.py); ``seg.backend``
    says which one runs. crf_backend: "auto" (the network's own kernels when it runs on them, else
    GPU kernels, else the same kernels compiled for the CPU, else numpy), "gpu", "cpu" or "numpy";
    ``seg.crf_backend`` says which. ``seg.pipeline`` is "device" when the scores stay in the
    network's memory for the CRF, else "host". One INFO line on the "deeplab" logger says what was
    chosen. network: a Network (runtime/network.py) to use instead of opening model_path (which then
    only names it in messages). class_names / palette (RGB rows): override the model's (from its
    metadata) or VOC's. limits: a SizeLimits (runtime/limits.py: max_size, input_size, max_batch,
    max_pixels, memory_budget, crf_max_pixels); ``seg.limits`` holds those in force (max_batch capped
    at a plan's profile, crf_max_pixels resolved for the model's class count).

    The network is tried once at load on a small padded image: scores not at the input's size,
    a class count that disagrees with the metadata, or NaN/inf there raise ModelFormatError.
    NaN/inf scores for an image raise NetworkOutputError naming it (with the CRF or without).
    Out of device memory raises OutOfDeviceMemory (a MemoryError); the Segmenter stays usable.
    Calls from several threads are fine; on the device pipeline they take turns.
    """

    def __init__(self, model_path: Union[str, Path], crf: Union[CRFParams, str, os.PathLike, None] = _DEFAULT,  # type: ignore[assignment]
                 backend: str = "auto", crf_backend: str = "auto", threads: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None, palette=None, limits: Optional[SizeLimits] = None,
                 network: Optional[Network] = None):
        path = self.model_path = Path(model_path)
        if isinstance(crf, (str, os.PathLike)):  # a JSON file of CRF parameters
            crf = CRFParams.load(crf)
        self.crf_params: Optional[CRFParams] = CRFParams() if crf is _DEFAULT else crf
        if self.crf_params is not None and not isinstance(self.crf_params, CRFParams):
            raise TypeError(f"crf must be CRFParams, a JSON file path or None, got {type(crf).__name__}")
        limits = SizeLimits() if limits is None else limits
        if not isinstance(limits, SizeLimits):
            raise TypeError(f"limits must be a SizeLimits, got {type(limits).__name__}")
        self.network: Network = open_network(path, backend, threads) if network is None else network
        check_network_output(self.network, str(path))
        self.backend, self.size_bounds, n = self.network.name, self.network.size_bounds, self.network.num_classes
        if n > 256:
            raise ValueError(f"{n} classes: labels are uint8, at most 256 classes are supported")
        self.num_classes = n
        kernels = self.network.kernels
        # Resolved (and the CPU kernels built) now, not inside the first timed call.
        if self.crf_params is None:
            self.crf_backend = None
        elif kernels is not None and crf_backend == "auto":
            self.crf_backend = kernels.name  # the CRF on the kernels the network writes for
        else:
            self.crf_backend = resolve_backend(crf_backend)
        self._pipeline: ScoresPipeline[Any] = HostPipeline() if kernels is None else \
            DevicePipeline(kernels, crf=self.crf_backend == kernels.name)
        self.pipeline = "host" if kernels is None else "device"
        #: when True, each result's timings gain "device_upload", "device_network", "device_crf",
        #: "device_download" (ms between the device pipeline's stage marks, in stream order)
        self.stage_events = False
        if limits.input_size is not None:
            check_input_size(limits.input_size, self.size_bounds, str(path))
        bounds = self.size_bounds
        if bounds is not None:  # a plan's profile caps the batch
            limits = dataclasses.replace(limits, max_batch=min(limits.max_batch, bounds.max_batch))
        self.limits = limits
        self.class_names, self.palette = model_classes(self.network.metadata, n, class_names, palette)
        crf_where = "off" if self.crf_backend is None else f"{self.crf_backend}, " + (
            "on the network's scores in place" if self._pipeline.driver is not None else "scores from the host")
        log.info("%s: network %s, CRF %s, %s pipeline", path, self.backend, crf_where, self.pipeline)

    def with_crf(self, crf: Optional[CRFParams]) -> "Segmenter":
        """This Segmenter with other CRF parameters (None: no CRF), sharing its network, kernels
        and settings: per-request CRF settings without loading the model again. The CRF backend is
        the one resolved at construction, so a Segmenter made with crf=None cannot give a CRF view."""
        if crf is not None and not isinstance(crf, CRFParams):
            raise TypeError(f"crf must be CRFParams or None, got {type(crf).__name__}")
        if crf is not None and self.crf_params is None:
            raise ValueError("this Segmenter was made with crf=None: make it with CRFParams to run the CRF")
        view = copy.copy(self)
        view.crf_params = crf
        return view

    def __call__(self, images, return_probabilities: bool = False, return_scores: bool = False,
                 progress: Optional[Callable[[str], None]] = None, timeout: Optional[float] = None):
        """Segment one image (path or BGR uint8 array) -> Segmentation, or a list -> list.
        return_scores keeps the network's logits (e.g. to try other CRF parameters with crf.refine).
        progress: called with "preprocess", "network" and "crf" as each image passes each stage (a
        progress bar that moves while a large image is in the CRF). timeout: seconds the call may
        take; checked between stages and, on the host CRF, between mean-field iterations: past it,
        crf.CRFTimeout (a TimeoutError) is raised and the Segmenter stays usable."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        call = _Call(return_probabilities, return_scores, progress or (lambda stage: None),
                     None if timeout is None else time.monotonic() + timeout)
        if isinstance(images, (list, tuple)):
            return self._segment(list(images), call)
        return self._segment([images], call)[0]

    def memory_model(self, height: int, width: int, return_probabilities: bool = False,
                     return_scores: bool = False) -> CallMemory:
        """Modelled peak bytes of segmenting one height x width image (runtime/memory.py)."""
        return self.limits.memory_model(height, width, self.num_classes, self.crf_params, self.size_bounds,
                                        return_probabilities, return_scores)

    def _prepare(self, image: ImageLike, name: str, call: _Call) -> tuple:
        """(image, what the network sees before padding, its scale, the padded network size)."""
        def check(h: int, w: int) -> None:  # before anything large is allocated
            memory = self.memory_model(h, w, call.probabilities, call.scores)
            self.limits.check_image(h, w, name, memory, call.probabilities or call.scores)

        if isinstance(image, (str, Path)):  # checked from the file's header, before decoding
            img = load_image(image, max_pixels=self.limits.max_pixels, check_size=check)
        else:
            img = as_bgr_uint8(image)
            check(*img.shape[:2])
        h, w = img.shape[:2]
        size = network_size(h, w, self.limits.max_size, self.size_bounds, self.limits.input_size)
        return img, network_image(img, size), size.scale, size.padded

    def _refine(self, scores: np.ndarray, image: np.ndarray, params: CRFParams, deadline: Optional[float]) -> np.ndarray:
        """crf.refine, or, on the device pipeline, the same CRF on the network's kernels."""
        check_deadline(deadline, 0, params.iterations)
        if isinstance(self._pipeline, DevicePipeline) and self._pipeline.driver is not None:
            return self._pipeline.refine(scores, image, params)
        assert self.crf_backend is not None, "the CRF is off"
        return refine(scores, image, params, backend=self.crf_backend, deadline=deadline)

    def _segment(self, images: list, call: _Call) -> list:
        t0 = time.perf_counter()
        names = [str(im) if isinstance(im, (str, Path)) else
                 (f"image {k} of the batch" if len(images) > 1 else "the image") for k, im in enumerate(images)]
        prepared = []
        for k, im in enumerate(images):
            try:
                prepared.append(self._prepare(im, names[k], call))
                call.tick("preprocess")
            except ImageError as e:
                if len(images) > 1:  # the same error (ImageTooLarge keeps its sizes), the image named
                    e.args = (f"image {k} of the batch: {e}",)
                raise
        t_pre = _ms(t0) / max(1, len(images))
        # Images that pad to the same network size run together, max_batch at a time.
        groups: dict = {}
        for i, (_, _, _, padded) in enumerate(prepared):
            groups.setdefault(padded, []).append(i)
        step = self.limits.max_batch
        results: list = [None] * len(images)
        for (ph, pw), idx in [(size, idx[k:k + step]) for size, idx in groups.items() for k in range(0, len(idx), step)]:
            t1 = time.perf_counter()
            batch = np.stack([pad_image(prepared[i][1], ph, pw) for i in idx])
            t_batch = t_pre + _ms(t1) / len(idx)
            check_deadline(call.deadline, 0, 0)
            out_of_memory = None
            with self._pipeline.session(self.stage_events):
                try:
                    done = self._run_batch(batch, [prepared[i] for i in idx], [names[i] for i in idx], t_batch, call)
                except OutOfDeviceMemory as e:
                    # Kept as text: the error's traceback holds the failed batch's frames (and the
                    # buffers they reference), released here while the device's context is current.
                    out_of_memory = str(e)
            if out_of_memory is not None:
                raise OutOfDeviceMemory(f"{self.model_path}: {out_of_memory} (a batch of {len(idx)} at {ph}x{pw}); "
                                        "the Segmenter is still usable: try fewer or smaller images "
                                        "(max_batch, max_size)")
            for i, result in zip(idx, done):
                results[i] = result
        return results

    def _run_batch(self, batch: np.ndarray, prepared: list, names: list, t_pre: float, call: _Call) -> list:
        """One network run, then each image's crop and CRF: on the device when the pipeline has the
        CRF and the image runs it at its own size, else as host steps from the downloaded crop."""
        pipe, c, n, events = self._pipeline, self.num_classes, len(prepared), self.stage_events
        t1 = time.perf_counter()
        scores, shape = pipe.run_network(self.network, batch)
        t_net = _ms(t1) / n
        per_batch = {stage: ms / n for stage, ms in pipe.stage_times()}  # the batch's upload and network, shared
        for _ in prepared:
            call.tick("network")
        problems = shape_problems(tuple(shape), n, c, *batch.shape[1:3])
        if problems:
            raise ModelFormatError(f"{self.model_path}: " + "; ".join(problems))
        results = []
        for j, ((img, net_img, s, _), name) in enumerate(zip(prepared, names)):
            timings = {"preprocess": t_pre, "network": t_net}
            t2 = time.perf_counter()
            nh, nw = net_img.shape[:2]
            crop = pipe.crop(scores, shape, j, nh, nw)
            if (isinstance(pipe, DevicePipeline) and pipe.driver is not None and self.crf_params is not None
                    and s == 1.0 and nh * nw <= self.limits.crf_pixels(c)):
                timings["postprocess"] = _ms(t2)
                check_deadline(call.deadline, 0, self.crf_params.iterations)
                t2 = time.perf_counter()
                # After t2: the marked "crf" stage lies inside the wall-clock one (the crop counts in
                # postprocess in both), so its time can never exceed it.
                pipe.mark("start")
                labels, probs = pipe.labels(crop, img, c, self.crf_params, call.probabilities, name)
                timings["crf"] = _ms(t2)
                full = pipe.download(crop, c, nh, nw) if call.scores else None
                timings["total"] = sum(timings.values())
                result = Segmentation(labels, probs, timings, img, full, 1.0)
            else:
                pipe.mark("start")
                sc = pipe.download(crop, c, nh, nw)
                timings["postprocess"] = _ms(t2)
                result = self._finish_on_host(sc, img, s, name, timings, call)
            if events:  # after the total: these split the same time differently
                for stage, ms in list(per_batch.items()) + pipe.stage_times():
                    result.timings["device_" + stage] = result.timings.get("device_" + stage, 0.0) + ms
            results.append(result)
            call.tick("crf")
        return results

    def _finish_on_host(self, sc: np.ndarray, img: np.ndarray, s: float, name: str, timings: dict,
                        call: _Call) -> Segmentation:
        """From one image's cropped network scores (host, at the network's size) to its Segmentation.
        Nothing of C x H x W at the image's full size is made unless it is returned or the CRF runs
        at that size: labels reach full size through upsampled_argmax's bounded strips."""
        import cv2

        t2 = time.perf_counter()
        h, w = img.shape[:2]
        with np.errstate(over="ignore"):
            sc = np.ascontiguousarray(sc, np.float32)
        # After the cast: a float64 graph output can overflow there. The float64 sum is non-finite
        # exactly when an element is (float32 values cannot overflow it); bilinear resizing of
        # finite scores stays finite, so checking them at the network's size is enough.
        if not np.isfinite(sc.sum(dtype=np.float64)):
            raise nonfinite_scores_error(name, sc)
        params = self.crf_params
        full_scores = None  # the scores at the image's size, made only where needed
        if call.scores or (s < 1.0 and params is not None and h * w <= self.limits.crf_pixels(self.num_classes)):
            full_scores = resize_scores(sc, h, w) if s < 1.0 else sc
        timings["postprocess"] += _ms(t2)
        t2 = time.perf_counter()
        crf_scale, probs, labels = 1.0, None, None
        if params is not None:
            ch, cw = self.limits.crf_size(h, w, self.num_classes, params)
            if (ch, cw) == (h, w):
                probs = self._refine(full_scores if full_scores is not None else sc, img, params, call.deadline)
            else:  # a shrunken CRF (crf_max_pixels): the network's scores go straight to its size
                crf_scale = math.sqrt(ch * cw / (h * w))
                small_params = dataclasses.replace(params, bi_xy_std=params.bi_xy_std * crf_scale,
                                                   pos_xy_std=params.pos_xy_std * crf_scale)
                small = self._refine(resize_scores(sc, ch, cw), cv2.resize(img, (cw, ch), interpolation=cv2.INTER_AREA),
                                     small_params, call.deadline)
                labels = upsampled_argmax(small, h, w)
                probs = resize_scores(small, h, w) if call.probabilities else None
                del small
        timings["crf"] = _ms(t2) if params is not None else 0.0
        t2 = time.perf_counter()
        if labels is None:
            if probs is not None:
                labels = probs.argmax(axis=0).astype(np.uint8)
            else:
                labels = upsampled_argmax(sc, h, w) if s < 1.0 else sc.argmax(axis=0).astype(np.uint8)
        if call.probabilities and probs is None:  # no CRF: the network's softmax, written over its input
            probs = resize_scores(sc, h, w) if s < 1.0 else sc.copy()
            probs -= probs.max(axis=0)
            np.exp(probs, out=probs)
            probs /= probs.sum(axis=0)
        timings["postprocess"] += _ms(t2)
        timings["total"] = sum(timings.values())
        return Segmentation(labels, probs if call.probabilities else None, timings, img,
                            full_scores if call.scores else None, crf_scale)
