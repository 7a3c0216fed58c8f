"""``Segmenter``: image -> preprocess -> network -> (upsampled in-graph) -> CRF -> labels.

    from runtime import Segmenter
    seg = Segmenter("models/deeplab_shapes.onnx")
    result = seg("samples/scene_0.png")       # or a BGR uint8 array, or a list of them
    cv2.imwrite("overlay.png", seg.overlay(result))
    print(result.labels.shape, result.timings)
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from crf import CRFParams, refine, resolve_backend
from crf.features import unary_from_scores

from .contract import (DEFAULT_MAX_SIZE, ImageError, ImageLike, aligned_size, as_bgr_uint8, fit_scale,
                       load_image, pad_image)
from .onnx_backend import ModelFormatError, NetworkOutputError
from .palette import VOC_CLASSES, blend, check_palette, colour_mask, voc_palette

_DEFAULT = object()
#: Side of the padded image the network is tried on when a model is loaded (8k+1, tiny).
PROBE_SIZE = 17
#: Bytes the CRF may take by default before it runs on a shrunken copy (see crf_max_pixels).
CRF_MEMORY_BUDGET = 1.5e9


def crf_bytes_per_pixel(num_classes: int) -> float:
    """CRF memory per pixel by the README's formula with C-float label rows (the GPU's layout),
    lattice vertices ~ N/5 per kernel as on photographs, the hash table at its largest
    (4 pow2(3N/4) <= 6N) and the GPU's extra terms: ~530 bytes with 21 classes."""
    s = num_classes
    return 8 * s + 236 + 6 + (28 + 8 * s + 52 + 8 * s + 8) / 5 + 8 * s / 5 + 3


def default_crf_max_pixels(num_classes: int) -> int:
    """Largest image (pixels) the CRF runs on at full size within CRF_MEMORY_BUDGET."""
    return int(CRF_MEMORY_BUDGET // crf_bytes_per_pixel(num_classes))


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


def _softmax(scores: np.ndarray) -> np.ndarray:
    return np.exp(-unary_from_scores(scores))


def _resize_scores(scores: np.ndarray, h: int, w: int) -> np.ndarray:
    """C x h0 x w0 -> C x h x w, bilinear align-corners-free (cv2), in chunks of <= 512 channels."""
    import cv2

    out = np.empty((scores.shape[0], h, w), np.float32)
    for c0 in range(0, scores.shape[0], 512):
        part = np.ascontiguousarray(scores[c0:c0 + 512].transpose(1, 2, 0))
        r = cv2.resize(part, (w, h), interpolation=cv2.INTER_LINEAR)
        out[c0:c0 + 512] = r.reshape(h, w, -1).transpose(2, 0, 1)
    return out


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


def check_network_output(network, source: str) -> None:
    """Run the network once on a small image padded as the Segmenter pads and refuse a model
    whose scores are not N x C x H x W at the input size, whose class count disagrees with its
    metadata, or which gives NaN/inf there (raises ModelFormatError naming what is off)."""
    fixed_n, fixed_h, fixed_w = network.fixed_input_dims
    n, h, w = fixed_n or 1, fixed_h or PROBE_SIZE, fixed_w or PROBE_SIZE
    image = np.full((max(1, h - 4), max(1, w - 6), 3), 128, np.uint8)
    batch = np.stack([pad_image(image, h, w)] * n)
    try:
        scores = np.asarray(network(batch))
    except Exception as e:  # the backend's own error types
        raise ModelFormatError(f"{source}: the network fails on a {h}x{w} probe image: {e}") from e
    problems = _shape_problems(scores.shape, n, network.num_classes, h, w)
    meta = network.metadata
    try:
        config_classes = json.loads(meta.get("deeplab_config", "{}")).get("num_classes")
        names = json.loads(meta["class_names"]) if "class_names" in meta else None
    except (ValueError, AttributeError) as e:
        raise ModelFormatError(f"{source}: unreadable metadata: {e}") from e
    if config_classes is not None and config_classes != network.num_classes:
        problems.append(f"its metadata's config says {config_classes} classes, its output shape "
                        f"{network.num_classes}")
    if names is not None and scores.ndim == 4 and len(names) != scores.shape[1]:
        problems.append(f"its metadata lists {len(names)} class names for {scores.shape[1]} class channels")
    with np.errstate(over="ignore"):
        finite = np.isfinite(scores.astype(np.float32)).all()  # as the runtime casts them
    if not problems and not finite:
        problems.append(f"NaN/inf scores on a uniform {h}x{w} image (broken weights?)")
    if problems:
        raise ModelFormatError(f"{source}: " + "; ".join(problems))


class Segmenter:
    """DeepLab v1 segmentation with the dense CRF, for embedded apps.

    model_path: an .onnx exported by tools/export.py. crf: CRFParams (default: DeepLab-LargeFOV's)
    or None to skip the CRF. backend: "auto" or "onnxruntime" for the network. crf_backend: "auto"
    (GPU kernels, else the same kernels compiled for the CPU, else numpy), "gpu", "cpu" or "numpy";
    ``seg.crf_backend`` says which one runs. class_names /
    palette (RGB rows): override the model's (from its metadata) or VOC's. max_size: images with a
    side above it are shrunk for the network and the scores resized back (see runtime.contract).
    input_size: (H, W) to pad every image to a fixed network size instead of the next 8k+1.
    max_batch: the most images of one padded size sent to the network at once.
    crf_max_pixels: images with more pixels run the CRF on a copy shrunk to fit (default: what
    keeps the CRF's buffers under ~1.5 GB for the model's class count, ~2.8 M pixels with 21
    classes). A deviation from DeepLab, which always ran it at full size: the image is shrunk
    with area interpolation, the scores bilinearly, the spatial bandwidths (bi_xy_std,
    pos_xy_std) by the same factor; the marginals are resized back bilinearly and the labels are
    their argmax. ``result.crf_scale`` says when it happened.

    The network is tried once at load on a small padded image: scores not at the input's size,
    a class count that disagrees with the metadata, or NaN/inf there raise ModelFormatError.
    NaN/inf scores for an image raise NetworkOutputError naming it (with the CRF or without).
    """

    def __init__(self, model_path: str | Path, crf: CRFParams | None = _DEFAULT, backend: str = "auto",  # type: ignore[assignment]
                 class_names: Sequence[str] | None = None, palette=None, max_size: int = DEFAULT_MAX_SIZE,
                 input_size: tuple[int, int] | None = None, crf_backend: str = "auto", threads: int | None = None,
                 max_batch: int = 8, crf_max_pixels: int | None = None):
        path = Path(model_path)
        if backend not in ("auto", "onnxruntime"):
            raise ValueError(f"unknown backend {backend!r}: choose 'auto' or 'onnxruntime'")
        if path.suffix in (".engine", ".plan", ".trt"):
            raise ValueError(f"{path}: TensorRT engines are not run by this release of the runtime; "
                             "pass the .onnx (ONNX Runtime backend)")
        from .onnx_backend import OnnxRuntimeNetwork

        self.network = OnnxRuntimeNetwork(path, threads=threads)
        self.model_path = path
        check_network_output(self.network, str(path))
        self.backend = self.network.name
        self.crf_params = CRFParams() if crf is _DEFAULT else crf
        if self.crf_params is not None and not isinstance(self.crf_params, CRFParams):
            raise TypeError(f"crf must be CRFParams or None, got {type(crf).__name__}")
        # Resolved (and the CPU kernels built) now, not inside the first timed call.
        self.crf_backend = resolve_backend(crf_backend) if self.crf_params is not None else None
        if max_size < 9:
            raise ValueError(f"max_size must be >= 9, got {max_size}")
        self.max_size = int(max_size)
        if input_size is not None:
            input_size = (int(input_size[0]), int(input_size[1]))
            if min(input_size) < 1:
                raise ValueError(f"input_size must be positive, got {input_size}")
        self.input_size = input_size
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = int(max_batch)
        meta = self.network.metadata
        n = self.network.num_classes
        if n > 256:
            raise ValueError(f"{n} classes: labels are uint8, at most 256 classes are supported")
        self.num_classes = n
        if crf_max_pixels is not None and crf_max_pixels < 1:
            raise ValueError(f"crf_max_pixels must be >= 1, got {crf_max_pixels}")
        self.crf_max_pixels = default_crf_max_pixels(n) if crf_max_pixels is None else int(crf_max_pixels)
        if class_names is None:
            class_names = json.loads(meta["class_names"]) if "class_names" in meta else (
                VOC_CLASSES if n == len(VOC_CLASSES) else [f"class_{i}" for i in range(n)])
        if len(class_names) != n:
            raise ValueError(f"{len(class_names)} class names for a {n}-class model")
        self.class_names = tuple(class_names)
        if palette is None:
            palette = json.loads(meta["palette"]) if "palette" in meta else voc_palette(n)
        self.palette = check_palette(palette, n)

    # -- segNet-style accessors ---------------------------------------------------------------
    def class_name(self, i: int) -> str:
        return self.class_names[i]

    def class_color(self, i: int) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.palette[i])  # type: ignore[return-value]

    def mask(self, result: Segmentation) -> np.ndarray:
        """Colour mask (H x W x 3 BGR uint8) of a result."""
        return colour_mask(result.labels, self.palette)

    def overlay(self, result: Segmentation, alpha: float = 0.5, skip_background: bool = True) -> np.ndarray:
        """The segmented image with class colours blended in (BGR uint8)."""
        return blend(result.image, result.labels, self.palette, alpha, skip_background)

    # -- segmentation ---------------------------------------------------------------------------
    def __call__(self, images, return_probabilities: bool = False, return_scores: bool = False):
        return self.seg(images, return_probabilities, return_scores)

    def seg(self, images, return_probabilities: bool = False, return_scores: bool = False):
        """Segment one image (path or BGR uint8 array) -> Segmentation, or a list -> list.
        return_scores keeps the network's logits (e.g. to try other CRF parameters with crf.refine)."""
        if isinstance(images, (list, tuple)):
            return self._seg_batch(list(images), return_probabilities, return_scores)
        return self._seg_batch([images], return_probabilities, return_scores)[0]

    def _prepare(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray, float]:
        import cv2

        img = load_image(image) if isinstance(image, (str, Path)) else as_bgr_uint8(image)
        h, w = img.shape[:2]
        s = fit_scale(h, w, self.max_size)
        net_img = img
        if s < 1.0:
            net_img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        return img, net_img, s

    def _crf(self, scores: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, float]:
        """CRF marginals at the image's size, and the factor the CRF ran at (see crf_max_pixels)."""
        import cv2

        h, w = image.shape[:2]
        if h * w <= self.crf_max_pixels:
            return refine(scores, image, self.crf_params, backend=self.crf_backend), 1.0
        f = math.sqrt(self.crf_max_pixels / (h * w))
        sh, sw = max(1, int(h * f)), max(1, int(w * f))  # rounded down: within the budget
        scale = math.sqrt(sh * sw / (h * w))
        params = dataclasses.replace(self.crf_params, bi_xy_std=self.crf_params.bi_xy_std * scale,
                                     pos_xy_std=self.crf_params.pos_xy_std * scale)
        small = refine(_resize_scores(scores, sh, sw), cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA),
                       params, backend=self.crf_backend)
        return _resize_scores(small, h, w), scale

    def _padded_size(self, h: int, w: int) -> tuple[int, int]:
        if self.input_size is not None:
            if h > self.input_size[0] or w > self.input_size[1]:
                raise ImageError(f"image {h}x{w} (after max_size shrinking) exceeds input_size {self.input_size}")
            return self.input_size
        return aligned_size(h), aligned_size(w)

    def _seg_batch(self, images: list, return_probabilities: bool, return_scores: bool = False) -> list[Segmentation]:
        if not images:
            return []
        t0 = time.perf_counter()
        names = [str(im) if isinstance(im, (str, Path)) else
                 (f"image {k} of the batch" if len(images) > 1 else "the image") for k, im in enumerate(images)]
        prepared = []
        for k, im in enumerate(images):
            try:
                prepared.append(self._prepare(im))
            except ImageError as e:
                raise ImageError(f"image {k} of the batch: {e}" if len(images) > 1 else str(e)) from e
        t_pre = (time.perf_counter() - t0) * 1e3 / len(images)
        # Images that pad to the same network size run together, max_batch at a time.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, net_img, _) in enumerate(prepared):
            groups.setdefault(self._padded_size(*net_img.shape[:2]), []).append(i)
        runs = [(size, idx[k:k + self.max_batch]) for size, idx in groups.items()
                for k in range(0, len(idx), self.max_batch)]
        results: list[Segmentation | None] = [None] * len(images)
        for (ph, pw), idx in runs:
            t1 = time.perf_counter()
            batch = np.stack([pad_image(prepared[i][1], ph, pw) for i in idx])
            t_pad = (time.perf_counter() - t1) * 1e3 / len(idx)
            t1 = time.perf_counter()
            scores = self.network(batch)
            t_net = (time.perf_counter() - t1) * 1e3 / len(idx)
            problems = _shape_problems(scores.shape, len(idx), self.num_classes, ph, pw)
            if problems:
                raise ModelFormatError(f"{self.model_path}: " + "; ".join(problems))
            for j, i in enumerate(idx):
                img, net_img, s = prepared[i]
                timings = {"preprocess": t_pre + t_pad, "network": t_net}
                t2 = time.perf_counter()
                nh, nw = net_img.shape[:2]
                sc = scores[j, :, :nh, :nw]  # crop top-left
                if s < 1.0:
                    sc = _resize_scores(sc, *img.shape[:2])
                with np.errstate(over="ignore"):
                    sc = np.ascontiguousarray(sc, np.float32)
                # After the cast: a float64 graph output can overflow there. The float64
                # sum is non-finite exactly when an element is (float32 values cannot overflow it).
                if not np.isfinite(sc.sum(dtype=np.float64)):
                    bad = int(sc.size - np.count_nonzero(np.isfinite(sc)))
                    raise NetworkOutputError(f"{names[i]}: the network's scores contain {bad} NaN/inf "
                                             f"values (of {sc.size}); no labels can be drawn from them")
                timings["postprocess"] = (time.perf_counter() - t2) * 1e3
                t2 = time.perf_counter()
                crf_scale = 1.0
                if self.crf_params is not None:
                    probs, crf_scale = self._crf(sc, img)
                    timings["crf"] = (time.perf_counter() - t2) * 1e3
                else:
                    probs = _softmax(sc) if return_probabilities else None
                    timings["crf"] = 0.0
                t2 = time.perf_counter()
                labels = (probs if probs is not None else sc).argmax(axis=0).astype(np.uint8)
                timings["postprocess"] += (time.perf_counter() - t2) * 1e3
                timings["total"] = sum(timings.values())
                results[i] = Segmentation(labels, probs if return_probabilities else None, timings, img,
                                          sc if return_scores else None, crf_scale)
        return results  # type: ignore[return-value]
