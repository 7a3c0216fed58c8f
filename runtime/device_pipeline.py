"""Where the scores go between the network and the labels: ``HostPipeline`` and ``DevicePipeline``.

The Segmenter runs one loop over either; they differ only in where buffers live. Both offer:
``session(events)`` around a batch, ``run_network(network, batch) -> (scores, shape)``,
``crop(scores, shape, j, h, w)`` (image j's top-left C x h x w), ``download(crop, c, h, w)`` (to a
host array), ``mark(stage)`` / ``stage_times()`` (stage marks in stream order), and ``driver``: the
CRF on these kernels, or None where the CRF runs from host arrays (crf.refine).

HostPipeline: a host backend's scores are a numpy array; cropping is slicing, downloading nothing.

DevicePipeline: the scores stay where a device backend (runtime/network.py) left them in a Buffer.
``crop`` copies the image's part of the padded N x C x Hp x Wp scores into a dense planar buffer
(kernel crf_crop_scores), ``labels`` uploads the image once and runs the CRF (DenseCRFDriver, whose
unary kernel refuses NaN/inf scores: NetworkOutputError naming the image) on the cropped scores,
the argmax kernel writing the labels into pinned host memory: only the H x W uint8 labels come back
(and the marginals when asked). ``download`` brings the cropped scores to the host, for what stays a
host step: the score resize of a shrunk image, the CRF on a shrunken copy of an image above
crf_max_pixels, the argmax without a CRF (crf_argmax reads label rows of a pixel, not planar scores,
so planar scores are downloaded and argmax'd by numpy), return_scores. All of it on the network's
KernelBackend and its one stream, inside ``kernels.active()``; ``session`` holds a lock, so calls
from several threads take turns.
"""
from __future__ import annotations

import contextlib
import threading
from typing import ContextManager, Iterator, List, Optional, Protocol, Tuple, TypeVar, cast

import numpy as np

from crf import CRFParams
from crf.kernel_interface import Buffer, BufferPool, I32, KernelBackend
from crf.driver import DenseCRFDriver
from crf.features import CRFInputError

from .errors import nonfinite_scores_error
from .network import DeviceNetwork, Network, ScoresShape


S = TypeVar("S")  # where a pipeline's scores live: a numpy array (host) or a Buffer (device)


class ScoresPipeline(Protocol[S]):
    """What the Segmenter's loop calls (see the module's doc)."""

    driver: Optional[DenseCRFDriver]

    def session(self, events: bool) -> ContextManager[None]: ...

    def run_network(self, network: Network, batch: np.ndarray) -> Tuple[S, ScoresShape]: ...

    def crop(self, scores: S, shape: ScoresShape, j: int, h: int, w: int) -> S: ...

    def download(self, scores: S, c: int, h: int, w: int) -> np.ndarray: ...

    def mark(self, stage: str) -> None: ...

    def stage_times(self) -> List[Tuple[str, float]]: ...


class HostPipeline:
    """The scores of a host backend: numpy arrays, cropped by slicing; no stage marks."""

    driver: Optional[DenseCRFDriver] = None

    @contextlib.contextmanager
    def session(self, events: bool) -> Iterator[None]:
        yield  # ONNX Runtime sessions take concurrent runs: no lock

    def run_network(self, network: Network, batch: np.ndarray) -> Tuple[np.ndarray, ScoresShape]:
        scores = network(batch)
        return scores, scores.shape

    def crop(self, scores: np.ndarray, shape: ScoresShape, j: int, h: int, w: int) -> np.ndarray:
        return scores[j, :, :h, :w]

    def download(self, scores: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
        return scores

    def mark(self, stage: str) -> None:
        pass

    def stage_times(self) -> List[Tuple[str, float]]:
        return []


class DevicePipeline:
    """kernels: the network's KernelBackend. crf: whether the CRF runs here (a driver on these
    kernels, its buffers pooled and reused across calls)."""

    def __init__(self, kernels: KernelBackend, crf: bool):
        self.k = kernels
        self.driver: Optional[DenseCRFDriver] = DenseCRFDriver(kernels) if crf else None
        self._pool = BufferPool(kernels)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def session(self, events: bool) -> Iterator[None]:
        """One batch at a time, with the kernels' context current: buffers let go of during it (a
        crop outgrown by the next image's) are freed there, where pycuda can free them. events: keep
        stage marks (CUDA events on the GPU, the host clock on the CPU build) for stage_times."""
        with self._lock, self.k.active():
            self.k.marks = [] if events else None
            try:
                yield
            finally:
                self.k.marks = None  # marks left by a failed call (CUDA events) go with the context current

    def run_network(self, network: Network, batch: np.ndarray) -> Tuple[Buffer, ScoresShape]:
        """network: a DeviceNetwork on these kernels (the Segmenter makes a DevicePipeline for no other)."""
        self.k.mark("start")
        scores, shape = cast(DeviceNetwork, network).run_into(batch)
        self.k.synchronize()  # once per batch, so that "network" times the network, not a later stage
        return scores, shape

    def mark(self, stage: str) -> None:
        self.k.mark(stage)

    def stage_times(self) -> List[Tuple[str, float]]:
        return self.k.stage_times()

    def _buffer(self, role: str, nbytes: int) -> Buffer:
        return self._pool.device(role, nbytes)

    def _pinned(self, role: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
        return self._pool.host(role, shape, dtype)

    def crop(self, scores: Buffer, shape: ScoresShape, j: int, h: int, w: int) -> Buffer:
        """Image j's top-left C x h x w of the N x C x Hp x Wp scores, dense (a reused buffer)."""
        _, c, hp, wp = shape
        plane = c * hp * wp * 4
        src = Buffer(plane, scores.ptr + j * plane, scores.owner)
        dst = self._buffer("scores", c * h * w * 4)
        with self.k.active():
            self.k.launch("crf_crop_scores", c * h * w, src, I32(c), I32(hp), I32(wp), I32(h), I32(w), dst)
        return dst

    def upload(self, scores: np.ndarray) -> Buffer:
        """Scores handed on the host (e.g. a batch's padded N x C x Hp x Wp, the source of ``crop``)
        copied into a reused buffer of the kernels."""
        a = np.ascontiguousarray(scores, np.float32)
        buf = self._buffer("uploaded", a.nbytes)
        self.k.upload(buf, a)
        return buf

    def download(self, scores: Buffer, c: int, h: int, w: int) -> np.ndarray:
        """Cropped scores to the host (a new C x h x w float32 array)."""
        return self.k.download(scores, (c, h, w), np.float32)

    def labels(self, scores: Buffer, image: np.ndarray, c: int, params: CRFParams,
               marginals: bool, name: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """CRF on the cropped planar scores against the H x W x 3 image: (labels H x W uint8,
        marginals C x H x W float32 or None). NaN/inf scores raise NetworkOutputError naming the
        image ``name``."""
        assert self.driver is not None, "DevicePipeline made without the CRF"
        h, w = image.shape[:2]
        with self.k.active():
            img = self.k.host_view(image)  # the CPU kernels read the image in place
            if img is None:
                staged = self._pinned("image", image.shape, np.uint8)
                self.k.synchronize()  # the previous image's upload from this memory is over
                staged[...] = image
                img = self._buffer("image", image.nbytes)
                self.k.upload_async(img, staged)
                self.k.mark("upload")
            out = self._pinned("labels", (h, w), np.uint8)
            try:
                probs, labels = self.driver.run(scores, img, h, w, c, params, marginals=marginals, labels=True,
                                                labels_out=out)
            except CRFInputError as e:
                # The driver refuses more than NaN/inf (label count, lattice range): the scores,
                # downloaded, tell which; the error names the image and counts the bad values.
                host = self.download(scores, c, h, w)
                if np.isfinite(host).all():
                    raise
                raise nonfinite_scores_error(name, host) from e
        return labels.copy(), probs  # the pinned label map is reused by the next image

    def refine(self, scores: np.ndarray, image: np.ndarray, params: CRFParams) -> np.ndarray:
        """crf.refine's marginals, on this pipeline's driver (host arrays in and out)."""
        assert self.driver is not None, "DevicePipeline made without the CRF"
        c, h, w = scores.shape
        marginals, _ = self.driver.run(scores, image, h, w, c, params, check_finite=False)
        return marginals
