"""``Segmenter``: image -> preprocess -> network -> (upsampled in-graph) -> CRF -> labels.

    from runtime import Segmenter
    seg = Segmenter("models/deeplab_shapes.onnx")
    result = seg("samples/scene_0.png")       # or a BGR uint8 array, or a list of them
    cv2.imwrite("overlay.png", seg.overlay(result))
    print(result.labels.shape, result.timings)

Two pipelines, the same labels. The host pipeline (a host network backend: ONNX Runtime on the
CPU): the scores come back as a numpy array, are cropped, checked and refined by crf.refine. The
device pipeline (a device backend: TensorRT, ONNX Runtime's CUDA provider, or ONNX Runtime on the
CPU made with CPU kernels — runtime/network.py — with the CRF on the same kind of kernels): the
scores stay where the network wrote them, are cropped, checked and refined there on one stream,
and only the labels come back (runtime/device_pipeline.py lists what remains a host step).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from crf import CRFParams, refine, resolve_backend
from crf.features import check_deadline
from crf.backend import OutOfDeviceMemory

from .backend_choice import open_network
from .contract import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIZE, ImageError, ImageLike, ImageTooLarge, as_bgr_uint8,
                       check_pixels, load_image, pad_image)
from .device_pipeline import DevicePipeline
from .memory import (CRF_MEMORY_BUDGET, DEFAULT_MEMORY_BUDGET, CallMemory, call_memory,  # noqa: F401 (re-exported)
                     crf_buffer_bytes, crf_bytes_per_pixel, crf_size, default_crf_max_pixels)
from .network import check_input_size, is_device_network, network_image, network_size
from .onnx_backend import ModelFormatError, nonfinite_scores_error, parse_metadata
from .palette import VOC_CLASSES, ClassAccessors, check_palette, voc_palette
from .upsample import resize_scores, upsampled_argmax

log = logging.getLogger("deeplab")

_DEFAULT = object()


def _no_progress(stage: str) -> None:
    pass
#: Side of the padded image the network is tried on when a model is loaded (8k+1, tiny).
PROBE_SIZE = 17


@dataclass
class _Run:
    """One network run of a seg() call: images of one padded size, at most max_batch of them."""
    prepared: list  # every image of the call: (image, network image, scale, padded size)
    names: list  # every image's name in messages
    idx: list  # which of them this run takes
    batch: np.ndarray  # their padded network inputs, N x H x W x 3
    t_pre: float  # preprocess milliseconds per image
    return_probabilities: bool
    return_scores: bool
    results: list  # the call's results, filled in at idx
    tick: Callable[[str], None]
    deadline: float | None = None  # time.monotonic() value: CRFTimeout past it


@dataclass
class Segmentation:
    """Result of one image. labels: H x W uint8 class ids. probabilities: C x H x W float32 (CRF
    marginals, or the network's softmax without CRF), only when asked for. timings: milliseconds
    per stage (preprocess, network, crf, postprocess, total). image: the BGR image segmented.
    scores: C x H x W float32, the network's upsampled logits (what the CRF starts from), only
    when asked for. crf_scale: 1, or the factor (< 1) by which the image was shrunk for the CRF
    because it had more than the Segmenter's crf_max_pixels."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    timings: dict[str, float]
    image: np.ndarray = field(repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)
    crf_scale: float = 1.0


def _softmax_in_place(scores: np.ndarray) -> np.ndarray:
    """softmax over the class axis of C x H x W float32 scores, written over them (no C x H x W
    temporaries: this runs on full-size maps)."""
    scores -= scores.max(axis=0)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=0)
    return scores


def _shape_problems(shape: tuple, n: int, c: int, h: int, w: int) -> list[str]:
    """What is off in a network output of ``shape`` for n images of h x w with c classes."""
    if len(shape) != 4:
        return [f"scores of shape {shape}, not N x C x H x W"]
    problems = []
    if shape[0] != n:
        problems.append(f"{shape[0]} score maps for a batch of {n}")
    if shape[1] != c:
        problems.append(f"{shape[1]} class channels for a {c}-class model")
    if tuple(shape[2:]) != (h, w):
        problems.append(f"{shape[2]}x{shape[3]} scores for a {h}x{w} input "
                        "(the graph must upsample them to the input size)")
    return problems


def _device_stage_timings(per_batch: dict, per_image: list) -> dict:
    """Timings keys "device_<stage>" (ms) from the batch's share of its stage marks and one image's
    own (stage, ms) marks: upload (the batch's and the image's), network, crf, download."""
    out: dict = {}
    for stage, ms in list(per_batch.items()) + list(per_image):
        key = "device_" + stage
        out[key] = out.get(key, 0.0) + ms
    return out


def check_network_output(network, source: str) -> None:
    """Run the network once on a small image padded as the Segmenter pads and refuse a model
    whose scores are not N x C x H x W at the input size, whose class count disagrees with its
    metadata, or which gives NaN/inf there (raises ModelFormatError naming what is off)."""
    fixed_n, fixed_h, fixed_w = network.fixed_input_dims
    n, h, w = fixed_n or 1, fixed_h or PROBE_SIZE, fixed_w or PROBE_SIZE
    bounds = getattr(network, "size_bounds", None)
    if bounds is not None:  # a TensorRT profile: probe at its smallest size from PROBE_SIZE up
        h = fixed_h or min(max(PROBE_SIZE, bounds.min_h), bounds.max_h)
        w = fixed_w or min(max(PROBE_SIZE, bounds.min_w), bounds.max_w)
    image = np.full((max(1, h - 4), max(1, w - 6), 3), 128, np.uint8)
    batch = np.stack([pad_image(image, h, w)] * n)
    try:
        scores = np.asarray(network(batch))
    except Exception as e:  # the backend's own error types
        raise ModelFormatError(f"{source}: the network fails on a {h}x{w} probe image: {e}") from e
    problems = _shape_problems(scores.shape, n, network.num_classes, h, w)
    # ModelFormatError naming the file and the key for metadata that is not JSON or not of its type;
    # checked here so that __init__ reads class_names and palette only once they are known good.
    labels = parse_metadata(network.metadata, source)
    config_classes, names = labels.num_classes, labels.class_names
    if config_classes is not None and config_classes != network.num_classes:
        problems.append(f"its metadata's config says {config_classes} classes, its output shape "
                        f"{network.num_classes}")
    if names is not None and scores.ndim == 4 and len(names) != scores.shape[1]:
        problems.append(f"its metadata lists {len(names)} class names for {scores.shape[1]} class channels")
    if labels.palette is not None and len(labels.palette) < network.num_classes:
        problems.append(f"its metadata's palette has {len(labels.palette)} colours for {network.num_classes} classes")
    with np.errstate(over="ignore"):
        finite = np.isfinite(scores.astype(np.float32)).all()  # as the runtime casts them
    if not problems and not finite:
        problems.append(f"NaN/inf scores on a uniform {h}x{w} image (broken weights?)")
    if problems:
        raise ModelFormatError(f"{source}: " + "; ".join(problems))


class Segmenter(ClassAccessors):
    """DeepLab v1 segmentation with the dense CRF, for embedded apps.

    model_path: an .onnx exported by tools/export.py, or a TensorRT plan (.engine / .plan) built by
    tools/export.py --engine. crf: CRFParams (default: DeepLab-LargeFOV's), the path of a JSON file of
    them (CRFParams.load: e.g. what tools/evaluate.py --search-crf writes), or None to skip the CRF.
    backend: "auto" (TensorRT for a plan, else ONNX Runtime's CUDA provider where onnxruntime-gpu
    and pycuda work, else ONNX Runtime on the CPU), "tensorrt", "onnxruntime-cuda" or "onnxruntime"
    (runtime/backend_choice.py); ``seg.backend`` says which one runs. crf_backend: "auto" (the
    network's own kernels when it runs on them — the GPU for TensorRT and ONNX Runtime CUDA —,
    else GPU kernels, else the same kernels compiled for the CPU, else numpy), "gpu", "cpu" or
    "numpy"; ``seg.crf_backend`` says which one runs. ``seg.pipeline`` is "device" when the
    scores stay in the network's memory for the CRF, else "host". One INFO line on the "deeplab"
    logger says what was chosen. network: a network backend object (runtime/network.py) to use
    instead of opening model_path (which then only names it in messages). class_names /
    palette (RGB rows): override the model's (from its metadata) or VOC's. max_size: images with a
    side above it are shrunk for the network and the scores resized back (see runtime.contract).
    input_size: (H, W) to pad every image to a fixed network size instead of the next 8k+1.
    max_batch: the most images of one padded size sent to the network at once. A TensorRT plan's
    optimisation profile bounds the network input: larger images are shrunk to its maximum (as
    max_size does), smaller ones padded up to its minimum, max_batch capped at its batch.
    crf_max_pixels: images with more pixels run the CRF on a copy shrunk to fit (default: what
    keeps the CRF's buffers under ~1.5 GB for the model's class count, ~2.8 M pixels with 21
    classes). A deviation from DeepLab, which always ran it at full size: the image is shrunk
    with area interpolation, the scores bilinearly, the spatial bandwidths (bi_xy_std,
    pos_xy_std) by the same factor; the marginals are resized back bilinearly and the labels are
    their argmax (in strips: runtime/upsample.py). ``result.crf_scale`` says when it happened.
    max_pixels: the largest image taken (default 100 MP); a file whose header declares more is
    refused before it is decoded (a decompression-bomb guard). memory_budget: bound (bytes, default
    2.5e9) of the modelled peak memory of one image's segmentation (runtime/memory.py:
    ``seg.memory_model(h, w)``); an image over max_pixels or over the budget raises ImageTooLarge
    (an ImageError) naming its size and the limit, before anything large is allocated.

    The network is tried once at load on a small padded image: scores not at the input's size,
    a class count that disagrees with the metadata, or NaN/inf there raise ModelFormatError.
    NaN/inf scores for an image raise NetworkOutputError naming it (with the CRF or without).
    Out of device memory raises crf.backend.OutOfDeviceMemory (a MemoryError); the Segmenter stays
    usable. Calls from several threads are fine; on the device pipeline they take turns.
    """

    def __init__(self, model_path: str | Path, crf: CRFParams | str | os.PathLike | None = _DEFAULT, backend: str = "auto",  # type: ignore[assignment]
                 class_names: Sequence[str] | None = None, palette=None, max_size: int = DEFAULT_MAX_SIZE,
                 input_size: tuple[int, int] | None = None, crf_backend: str = "auto", threads: int | None = None,
                 max_batch: int = 8, crf_max_pixels: int | None = None, network=None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, memory_budget: float = DEFAULT_MEMORY_BUDGET):
        path = Path(model_path)
        if isinstance(crf, (str, os.PathLike)):  # a JSON file of CRF parameters
            crf = CRFParams.load(crf)
        self.crf_params = CRFParams() if crf is _DEFAULT else crf
        if self.crf_params is not None and not isinstance(self.crf_params, CRFParams):
            raise TypeError(f"crf must be CRFParams, a JSON file path or None, got {type(crf).__name__}")
        self.network = open_network(path, backend, threads) if network is None else network
        self.model_path = path
        check_network_output(self.network, str(path))
        self.backend = self.network.name
        self.size_bounds = getattr(self.network, "size_bounds", None)
        on_device = is_device_network(self.network)
        kernels_name = self.network.kernels.name if on_device else None
        # Resolved (and the CPU kernels built) now, not inside the first timed call.
        if self.crf_params is None:
            self.crf_backend = None
        elif on_device and crf_backend == "auto":
            self.crf_backend = kernels_name  # the CRF on the kernels the network writes for
        else:
            self.crf_backend = resolve_backend(crf_backend)
        self._device: DevicePipeline | None = None
        if on_device:
            self._device = DevicePipeline(self.network.kernels, crf=self.crf_backend == kernels_name)
        self._device_lock = threading.Lock()
        self.pipeline = "device" if self._device is not None else "host"
        #: device pipeline only: when True, each result's timings gain "device_upload",
        #: "device_network", "device_crf", "device_download" (ms between stage marks in stream
        #: order: CUDA events on the GPU, the host clock on the CPU build; see KernelBackend.mark)
        self.stage_events = False
        if max_size < 9:
            raise ValueError(f"max_size must be >= 9, got {max_size}")
        self.max_size = int(max_size)
        if input_size is not None:
            input_size = (int(input_size[0]), int(input_size[1]))
            if min(input_size) < 1:
                raise ValueError(f"input_size must be positive, got {input_size}")
            check_input_size(input_size, self.size_bounds, str(path))
        self.input_size = input_size
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = int(max_batch) if self.size_bounds is None else min(int(max_batch), self.size_bounds.max_batch)
        meta = self.network.metadata
        n = self.network.num_classes
        if n > 256:
            raise ValueError(f"{n} classes: labels are uint8, at most 256 classes are supported")
        self.num_classes = n
        if crf_max_pixels is not None and crf_max_pixels < 1:
            raise ValueError(f"crf_max_pixels must be >= 1, got {crf_max_pixels}")
        self.crf_max_pixels = default_crf_max_pixels(n) if crf_max_pixels is None else int(crf_max_pixels)
        # By default the shrunken CRF's buffers are held to CRF_MEMORY_BUDGET too; a crf_max_pixels
        # given is a cap in pixels only.
        self._crf_budget = CRF_MEMORY_BUDGET if crf_max_pixels is None else None
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a whole number >= 1, got {max_pixels!r}")
        self.max_pixels = max_pixels
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0:
            raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget!r}")
        self.memory_budget = float(memory_budget)
        if class_names is None:
            class_names = json.loads(meta["class_names"]) if "class_names" in meta else (
                VOC_CLASSES if n == len(VOC_CLASSES) else [f"class_{i}" for i in range(n)])
        if len(class_names) != n:
            raise ValueError(f"{len(class_names)} class names for a {n}-class model")
        self.class_names = tuple(class_names)
        if palette is None:
            palette = json.loads(meta["palette"]) if "palette" in meta else voc_palette(n)
        self.palette = check_palette(palette, n)
        crf_where = "off" if self.crf_backend is None else (
            f"{self.crf_backend}, on the network's scores in place" if self._device is not None and
            self._device.driver is not None else f"{self.crf_backend}, scores from the host")
        log.info("%s: network %s, CRF %s, %s pipeline", path, self.backend, crf_where, self.pipeline)

    def with_crf(self, crf: CRFParams | None) -> "Segmenter":
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

    # -- segmentation ---------------------------------------------------------------------------
    def __call__(self, images, return_probabilities: bool = False, return_scores: bool = False,
                 progress: Callable[[str], None] | None = None, timeout: float | None = None):
        return self.seg(images, return_probabilities, return_scores, progress, timeout)

    def seg(self, images, return_probabilities: bool = False, return_scores: bool = False,
            progress: Callable[[str], None] | None = None, timeout: float | None = None):
        """Segment one image (path or BGR uint8 array) -> Segmentation, or a list -> list.
        return_scores keeps the network's logits (e.g. to try other CRF parameters with crf.refine).
        progress: called with "preprocess", "network" and "crf" as each image passes each stage (a
        progress bar that moves while a large image is in the CRF). timeout: seconds the call may
        take; checked between stages and, on the host CRF, between mean-field iterations: past it,
        crf.CRFTimeout (a TimeoutError) is raised and the Segmenter stays usable."""
        tick = progress or _no_progress
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        if isinstance(images, (list, tuple)):
            return self._seg_batch(list(images), return_probabilities, return_scores, tick, deadline)
        return self._seg_batch([images], return_probabilities, return_scores, tick, deadline)[0]

    def memory_model(self, height: int, width: int, return_probabilities: bool = False,
                     return_scores: bool = False) -> CallMemory:
        """Modelled peak bytes of segmenting one height x width image (runtime/memory.py)."""
        size = network_size(height, width, self.max_size, self.size_bounds, self.input_size)
        crf_pixels, crf_buffers = None, 0.0
        if self.crf_params is not None:
            sh, sw = self._crf_size(height, width)
            crf_pixels = sh * sw
            scale = math.sqrt(crf_pixels / (height * width))
            crf_buffers = crf_buffer_bytes(crf_pixels, self.num_classes, self.crf_params.pos_xy_std * scale,
                                           self.crf_params.bi_xy_std * scale)
        return call_memory(height, width, self.num_classes, size.padded[0] * size.padded[1], crf_pixels,
                           crf_buffers, return_probabilities, return_scores)

    def _check_size(self, height: int, width: int, source: str, return_probabilities: bool,
                    return_scores: bool) -> None:
        """ImageTooLarge for an image above max_pixels or whose modelled peak exceeds memory_budget."""
        check_pixels(height, width, self.max_pixels, source)
        need = self.memory_model(height, width, return_probabilities, return_scores).total
        if need > self.memory_budget:
            extra = " (return_probabilities / return_scores add 4 bytes per class and pixel each)" \
                if return_probabilities or return_scores else ""
            raise ImageTooLarge(f"{source}: segmenting {width}x{height} needs about {need / 1e9:.2f} GB, above "
                                f"the memory_budget of {self.memory_budget / 1e9:.2f} GB{extra}", height * width,
                                int(self.memory_budget))

    def _prepare(self, image: ImageLike, name: str, return_probabilities: bool = False,
                 return_scores: bool = False) -> tuple[np.ndarray, np.ndarray, float, tuple[int, int]]:
        """(image, what the network sees before padding, its scale, the padded network size)."""
        def check(h: int, w: int) -> None:
            self._check_size(h, w, name, return_probabilities, return_scores)

        if isinstance(image, (str, Path)):  # checked from the file's header, before decoding
            img = load_image(image, max_pixels=self.max_pixels, check_size=check)
        else:
            img = as_bgr_uint8(image)
            check(*img.shape[:2])
        h, w = img.shape[:2]
        size = network_size(h, w, self.max_size, self.size_bounds, self.input_size)
        return img, network_image(img, size), size.scale, size.padded

    def _refine(self, scores: np.ndarray, image: np.ndarray, params: CRFParams,
                deadline: float | None = None) -> np.ndarray:
        """crf.refine, or, on the device pipeline, the same CRF on the network's kernels."""
        check_deadline(deadline, 0, params.iterations)
        if self._device is not None and self._device.driver is not None:
            return self._device.refine(scores, image, params)
        assert self.crf_backend is not None, "the CRF is off"
        return refine(scores, image, params, backend=self.crf_backend, deadline=deadline)

    def _crf_size(self, h: int, w: int) -> tuple[int, int]:
        """The size the CRF runs at for an h x w image (runtime.memory.crf_size): itself, or shrunk
        to at most crf_max_pixels, and by default to what keeps its buffers in CRF_MEMORY_BUDGET."""
        p = self.crf_params
        assert p is not None, "the CRF is off"
        return crf_size(h, w, self.num_classes, self.crf_max_pixels, p.pos_xy_std, p.bi_xy_std, self._crf_budget)

    def _seg_batch(self, images: list, return_probabilities: bool, return_scores: bool = False,
                   tick: Callable[[str], None] = _no_progress, deadline: float | None = None) -> list[Segmentation]:
        if not images:
            return []
        t0 = time.perf_counter()
        names = [str(im) if isinstance(im, (str, Path)) else
                 (f"image {k} of the batch" if len(images) > 1 else "the image") for k, im in enumerate(images)]
        prepared = []
        for k, im in enumerate(images):
            try:
                prepared.append(self._prepare(im, names[k], return_probabilities, return_scores))
                tick("preprocess")
            except ImageError as e:
                if len(images) > 1:  # the same error (ImageTooLarge keeps its sizes), the image named
                    e.args = (f"image {k} of the batch: {e}",)
                raise
        t_pre = (time.perf_counter() - t0) * 1e3 / len(images)
        # Images that pad to the same network size run together, max_batch at a time.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, _, _, padded) in enumerate(prepared):
            groups.setdefault(padded, []).append(i)
        runs = [(size, idx[k:k + self.max_batch]) for size, idx in groups.items()
                for k in range(0, len(idx), self.max_batch)]
        results: list[Segmentation | None] = [None] * len(images)
        for (ph, pw), idx in runs:
            t1 = time.perf_counter()
            batch = np.stack([pad_image(prepared[i][1], ph, pw) for i in idx])
            t_pad = (time.perf_counter() - t1) * 1e3 / len(idx)
            run = _Run(prepared, names, idx, batch, t_pre + t_pad, return_probabilities, return_scores, results, tick,
                       deadline)
            check_deadline(deadline, 0, 0)
            if self._device is not None:
                # The batch runs with the device's context current: buffers it lets go of (a crop
                # outgrown by the next image's) are freed there, where pycuda can free them. Out of
                # memory is raised after the failed batch's frames (and what they hold) are gone.
                out_of_memory = None
                with self._device_lock, self.network.kernels.active():
                    try:
                        self._run_on_device(run)
                    except OutOfDeviceMemory as e:
                        out_of_memory = str(e)
                if out_of_memory is not None:
                    raise OutOfDeviceMemory(f"{self.model_path}: {out_of_memory} (a batch of {len(idx)} at {ph}x{pw}); "
                                            "the Segmenter is still usable: try fewer or smaller images "
                                            "(max_batch, max_size)")
            else:
                self._run_on_host(run)
        return results  # type: ignore[return-value]

    def _run_on_host(self, run: _Run) -> None:
        t1 = time.perf_counter()
        scores = self.network(run.batch)
        t_net = (time.perf_counter() - t1) * 1e3 / len(run.idx)
        for _ in run.idx:
            run.tick("network")
        problems = _shape_problems(scores.shape, len(run.idx), self.num_classes, *run.batch.shape[1:3])
        if problems:
            raise ModelFormatError(f"{self.model_path}: " + "; ".join(problems))
        for j, i in enumerate(run.idx):
            img, net_img, s, _ = run.prepared[i]
            timings = {"preprocess": run.t_pre, "network": t_net}
            t2 = time.perf_counter()
            nh, nw = net_img.shape[:2]
            sc = scores[j, :, :nh, :nw]  # crop top-left
            timings["postprocess"] = (time.perf_counter() - t2) * 1e3
            run.results[i] = self._finish_on_host(sc, img, s, run.names[i], timings, run.return_probabilities,
                                                  run.return_scores, run.deadline)
            run.tick("crf")

    def _finish_on_host(self, sc: np.ndarray, img: np.ndarray, s: float, name: str, timings: dict,
                        return_probabilities: bool, return_scores: bool,
                        deadline: float | None = None) -> Segmentation:
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
        full_scores = None  # the scores at the image's size, made only where needed
        if return_scores or (s < 1.0 and self.crf_params is not None and h * w <= self.crf_max_pixels):
            full_scores = resize_scores(sc, h, w) if s < 1.0 else sc
        timings["postprocess"] = timings.get("postprocess", 0.0) + (time.perf_counter() - t2) * 1e3
        t2 = time.perf_counter()
        crf_scale = 1.0
        probs: np.ndarray | None = None
        labels: np.ndarray | None = None
        params = self.crf_params
        if params is not None:
            ch, cw = self._crf_size(h, w)
            if (ch, cw) == (h, w):
                probs = self._refine(full_scores if full_scores is not None else sc, img, params, deadline)
            else:  # a shrunken CRF (crf_max_pixels): the network's scores go straight to its size
                crf_scale = math.sqrt(ch * cw / (h * w))
                small_params = dataclasses.replace(params, bi_xy_std=params.bi_xy_std * crf_scale,
                                                   pos_xy_std=params.pos_xy_std * crf_scale)
                small = self._refine(resize_scores(sc, ch, cw),
                                     cv2.resize(img, (cw, ch), interpolation=cv2.INTER_AREA), small_params, deadline)
                labels = upsampled_argmax(small, h, w)
                probs = resize_scores(small, h, w) if return_probabilities else None
                del small
            timings["crf"] = (time.perf_counter() - t2) * 1e3
        else:
            timings["crf"] = 0.0
        t2 = time.perf_counter()
        if labels is None:
            if probs is not None:
                labels = probs.argmax(axis=0).astype(np.uint8)
            elif s < 1.0:
                labels = upsampled_argmax(sc, h, w)
            else:
                labels = sc.argmax(axis=0).astype(np.uint8)
        if return_probabilities and probs is None:  # no CRF: the network's softmax
            probs = _softmax_in_place(resize_scores(sc, h, w) if s < 1.0 else sc.copy())
        timings["postprocess"] += (time.perf_counter() - t2) * 1e3
        timings["total"] = sum(timings.values())
        return Segmentation(labels, probs if return_probabilities else None, timings, img,
                            full_scores if return_scores else None, crf_scale)

    def _run_on_device(self, run: _Run) -> None:
        """The scores stay where the network wrote them; per image: crop (device), then the CRF on
        the device when it runs at the image's full size, else the host steps from the downloaded crop."""
        dev = self._device
        assert dev is not None
        k = self.network.kernels
        events = self.stage_events
        k.marks = [] if events else None
        try:
            self._device_calls(dev, k, events, run)
        finally:
            with k.active():  # marks left by a failed call (CUDA events) go with the context current
                k.marks = None

    def _device_calls(self, dev: DevicePipeline, k, events: bool, run: _Run) -> None:
        idx, results = run.idx, run.results
        k.mark("start")
        t1 = time.perf_counter()
        buf, shape = self.network.run_into(run.batch)
        k.synchronize()  # once per batch, so that "network" times the network, not a later stage
        t_net = (time.perf_counter() - t1) * 1e3 / len(idx)
        # the batch's upload and network, shared by its images (as t_net)
        per_batch = {stage: ms / len(idx) for stage, ms in k.stage_times()}
        for _ in idx:
            run.tick("network")
        problems = _shape_problems(shape, len(idx), self.num_classes, *run.batch.shape[1:3])
        if problems:
            raise ModelFormatError(f"{self.model_path}: " + "; ".join(problems))
        c = self.num_classes
        for j, i in enumerate(idx):
            img, net_img, s, _ = run.prepared[i]
            timings = {"preprocess": run.t_pre, "network": t_net}
            t2 = time.perf_counter()
            nh, nw = net_img.shape[:2]
            crop = dev.crop(buf, shape, j, nh, nw)
            k.mark("start")  # the crop counts in postprocess, as in the wall-clock timings
            on_device = (dev.driver is not None and self.crf_params is not None and s == 1.0
                         and nh * nw <= self.crf_max_pixels)
            if not on_device:  # a host step follows: the crop comes back
                sc = dev.download(crop, c, nh, nw)
                timings["postprocess"] = (time.perf_counter() - t2) * 1e3
                results[i] = self._finish_on_host(sc, img, s, run.names[i], timings, run.return_probabilities,
                                                  run.return_scores, run.deadline)
                if events:
                    results[i].timings.update(_device_stage_timings(per_batch, k.stage_times()))
                run.tick("crf")
                continue
            assert self.crf_params is not None  # dev.driver exists only with the CRF
            timings["postprocess"] = (time.perf_counter() - t2) * 1e3
            t2 = time.perf_counter()
            labels, probs = dev.labels(crop, img, c, self.crf_params, run.return_probabilities, run.names[i])
            timings["crf"] = (time.perf_counter() - t2) * 1e3
            scores = dev.download(crop, c, nh, nw) if run.return_scores else None
            timings["total"] = sum(timings.values())
            if events:  # after the total: these split the same time differently
                timings.update(_device_stage_timings(per_batch, k.stage_times()))
            results[i] = Segmentation(labels, probs, timings, img, scores, 1.0)
            run.tick("crf")
