"""The TensorRT network backend: a plan from deeplab-export --engine, run on the CRF's stream.

NEVER EXECUTED in this project: TensorRT cannot be installed on its machines. Written from the
official bindings (NVIDIA/TensorRT python/src/infer/pyCore.cpp, checked at 8.5.1, 8.6.1, 10.0,
10.3, 10.16, 11.0 and 11.1: every call below exists with the same signature in all of them; see
docs/tensorrt.md) and type-checked against tensorrt-stubs; version differences live in
runtime/trt_compat.py.

``TensorRTNetwork(plan_path, kernels=None)`` is a device backend (runtime/network.py): set up once
(sidecar read and checked against this TensorRT and GPU, plan deserialised, I/O checked by name,
dtype and layout, one execution context, device buffers for the profile's MAXIMUM batch and size
and a pinned host buffer for the input batch, all allocated through the CRF's KernelBackend), then
per call: batch copied into the pinned buffer, uploaded, ``set_input_shape``,
``execute_async_v3(stream)``, with nothing waited for: the scores stay in device memory for the
CRF kernels that follow on the same stream. Every call runs inside ``kernels.active()`` (the
device's primary context pushed in the calling thread), so worker threads may call it (one at a
time: the context and buffers are shared).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

import numpy as np

from crf.gpu_kernels import GPUKernels, gpu_identity
from crf.kernel_interface import Buffer, KernelBackend

from . import engine_meta, trt_compat
from .errors import ModelFormatError, OutOfDeviceMemory, SidecarError, TensorRTUnavailable
from .network import SizeBounds, batch_dims, model_metadata

if TYPE_CHECKING:
    import tensorrt

INPUT_NAME = engine_meta.INPUT_NAME
OUTPUT_NAME = engine_meta.OUTPUT_NAME
log = logging.getLogger("deeplab")


def allocate_all(makers: List[Callable[[], Any]], message: Callable[[str], str]) -> List[Any]:
    """What each of ``makers`` makes, in order. When one runs out of memory, what the earlier ones
    made is released before OutOfDeviceMemory(message(reason)) is raised, so a caller may free
    something and retry while it still holds the error."""
    made: List[Any] = []
    reason = None
    try:
        for make in makers:
            made.append(make())
    except OutOfDeviceMemory as e:
        reason = str(e)
    if reason is not None:
        # Raised here, not in the except block: the caught error's traceback holds this frame, and
        # with it whatever its locals still reference.
        made.clear()
        raise OutOfDeviceMemory(message(reason))
    return made


class TensorRTNetwork:
    """uint8 N x H x W x 3 BGR batch -> float32 N x C x H x W scores, with a TensorRT plan.

    kernels: the CRF's GPUKernels (default: a new one); the network runs on its stream.
    cuda_graph: capture execute_async_v3 as a CUDA graph per input shape and replay it, through the
    kernels' capture: plain enqueue where their graphs are off, and (with one warning) where capture
    fails. Off by default.

    ``size_bounds`` is the plan's optimisation profile: the Segmenter shrinks larger images and
    pads smaller ones to fit it. Raises TensorRTUnavailable (no TensorRT: checked first, before the
    file is read), EngineMismatch (a plan for another TensorRT, GPU or DLA core, from its sidecar),
    ModelFormatError (a plan that does not deserialise or is not our graph), OutOfDeviceMemory."""

    name = "tensorrt"

    def __init__(self, plan_path: str | Path, kernels: Optional[KernelBackend] = None, cuda_graph: bool = False):
        path = Path(plan_path)
        try:
            trt_compat.load_tensorrt()  # the reason, before anything else (the file is not read)
        except TensorRTUnavailable as e:
            raise TensorRTUnavailable(f"{path}: this TensorRT plan cannot run here: {e}") from e
        import tensorrt as trt  # the real library now (imported here so mypy checks against the stubs)

        if not path.is_file():
            raise FileNotFoundError(f"TensorRT plan not found: {path}")
        self.plan_path = path
        meta = engine_meta.read_sidecar(path)  # None (with a warning): nothing can be checked
        if kernels is None:
            kernels = GPUKernels()
        if kernels.name != "gpu":
            raise ValueError(f"TensorRT runs on the GPU: it needs the CRF's GPU kernels, not {kernels.name!r}")
        self.kernels: KernelBackend = kernels
        if meta is not None:
            gpu = gpu_identity(getattr(kernels, "device", 0))
            notes = engine_meta.check_compatible(meta, trt_compat.full_version(), gpu.name if gpu else None,
                                                 gpu.compute_capability if gpu else None, path)
            for note in notes:
                warnings.warn(f"{path}: {note}", RuntimeWarning, stacklevel=2)
        self.metadata = model_metadata(meta.class_names, meta.palette) if meta is not None else {}
        self._logger = trt.Logger(trt.Logger.WARNING)
        with kernels.active():
            self._runtime = trt.Runtime(self._logger)
            if meta is not None and meta.version_compatible:
                trt_compat.allow_plan_host_code(self._runtime)
            if meta is not None and meta.dla_core is not None:
                # The runtime's DLA core defaults to -1: a DLA plan gets its core before it is loaded.
                engine_meta.check_dla_core(meta, self._runtime.num_DLA_cores, path)
                self._runtime.DLA_core = meta.dla_core
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ModelFormatError(engine_meta.undeserializable_message(meta, trt_compat.full_version(), path))
            self.engine: tensorrt.ICudaEngine = engine
            self.num_classes = self._check_io(engine, path)
            low, _, high = trt_compat.profile_shapes(engine, INPUT_NAME, 0)
            self.size_bounds = SizeBounds(low[0], low[1], low[2], high[0], high[1], high[2])
            dims = trt_compat.dims_list(engine.get_tensor_shape(INPUT_NAME), INPUT_NAME)
            #: (N, H, W) where the plan fixes them, else None per axis
            self.fixed_input_dims = tuple(d if d >= 0 else None for d in dims[:3])
            self._allocate(engine, path)
        self.use_graph = cuda_graph
        self._graph: Optional[Callable[[], None]] = None
        self._graph_shape: Optional[Tuple[int, int, int]] = None

    @staticmethod
    def _check_io(engine: tensorrt.ICudaEngine, path: Path) -> int:
        """Input 'image' uint8 N x H x W x 3 and output 'scores' float32 N x C x H x W, row-major,
        nothing else (engine_meta.check_io, the sidecar's rule); returns C."""
        io = trt_compat.engine_io(engine)
        try:
            engine_meta.check_io(io, str(path))
        except SidecarError as e:
            raise ModelFormatError(str(e)) from e
        for name in (INPUT_NAME, OUTPUT_NAME):
            if not trt_compat.is_linear(engine, name):
                raise ModelFormatError(f"{path}: tensor '{name}' is not in the linear (row-major) format; build "
                                       "the plan with deeplab-export, which leaves the I/O formats as they are")
        c = next(t["shape"][1] for t in io if t["name"] == OUTPUT_NAME)
        if c <= 0:
            raise ModelFormatError(f"{path}: the class axis of '{OUTPUT_NAME}' is dynamic; it must be fixed")
        return int(c)

    def _allocate(self, engine: tensorrt.ICudaEngine, path: Path) -> None:
        """The execution context and the buffers for the profile's largest batch, made once. Out of
        memory leaves nothing half-made: what was allocated is released before the error is raised."""
        b = self.size_bounds

        def new_context() -> Any:
            made = engine.create_execution_context()
            if made is None:  # TensorRT logs why; its activation memory is the usual cause
                raise OutOfDeviceMemory(f"{path}: TensorRT could not create an execution context (out of GPU "
                                        "memory? its activations are allocated here; see TensorRT's log)")
            return made

        context, image, scores, staging = allocate_all(
            [new_context,
             lambda: self.kernels.alloc(b.max_batch * b.max_h * b.max_w * 3),
             lambda: self.kernels.alloc(b.max_batch * self.num_classes * b.max_h * b.max_w * 4),
             lambda: self.kernels.alloc_host((b.max_batch * b.max_h * b.max_w * 3,), np.uint8)],
            lambda reason: (f"{path}: not enough memory for the plan's profile maximum ({b.describe()}): "
                            f"{reason}; rebuild with a smaller --max-size/--max-batch"))
        # Addresses never change: set once (the context keeps them between calls).
        for name, buf in ((INPUT_NAME, image), (OUTPUT_NAME, scores)):
            if not context.set_tensor_address(name, buf.ptr):
                raise ModelFormatError(f"{path}: TensorRT refused the address of '{name}'")
        self.context: tensorrt.IExecutionContext = context
        self._image, self._scores, self._staging = image, scores, staging

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        buf, shape = self.run_into(batch)
        return self.kernels.download(buf, shape, np.float32)

    def run_into(self, batch: np.ndarray) -> Tuple[Buffer, Tuple[int, int, int, int]]:
        """Scores of a uint8 N x H x W x 3 batch in the plan's output buffer (device memory), the
        work queued on the kernels' stream and not waited for. A batch smaller than the profile's
        minimum is filled up with copies of its last image (their scores are ignored)."""
        batch = np.ascontiguousarray(batch, np.uint8)
        n, h, w = batch_dims(batch)
        b = self.size_bounds
        if not (n <= b.max_batch and b.min_h <= h <= b.max_h and b.min_w <= w <= b.max_w):
            raise ValueError(f"a {n} x {h}x{w} batch is outside the plan's profile ({b.describe()})")
        run_n = max(n, b.min_batch)
        with self.kernels.active():
            # The previous call's upload from the pinned buffer must be over before it is rewritten.
            self.kernels.synchronize()
            staged = self._staging[:run_n * h * w * 3].reshape(run_n, h, w, 3)
            staged[:n] = batch
            staged[n:] = batch[-1]
            self.kernels.upload_async(self._image, staged)
            self.kernels.mark("upload")
            if not self.context.set_input_shape(INPUT_NAME, (run_n, h, w, 3)):
                raise ValueError(f"TensorRT refused the input shape {run_n}x{h}x{w}x3 ({b.describe()})")
            out = trt_compat.dims_list(self.context.get_tensor_shape(OUTPUT_NAME), OUTPUT_NAME)
            if out != [run_n, self.num_classes, h, w]:
                raise ModelFormatError(f"{self.plan_path}: scores of shape {out} for a {run_n}x{h}x{w}x3 input "
                                       f"(expected {[run_n, self.num_classes, h, w]})")
            self._enqueue_or_replay((run_n, h, w))
            self.kernels.mark("network")
        return self._scores, (n, self.num_classes, h, w)

    def _enqueue(self) -> None:
        stream = getattr(self.kernels, "stream")
        if not self.context.execute_async_v3(stream.handle):
            raise RuntimeError(f"{self.plan_path}: TensorRT's execute_async_v3 failed (see TensorRT's log; "
                               "out of GPU memory is one cause)")

    def _enqueue_or_replay(self, shape: Tuple[int, int, int]) -> None:
        if not self.use_graph:
            self._enqueue()
            return
        if self._graph is not None and self._graph_shape == shape:
            self._graph()
            return
        # TensorRT updates internal state on the first enqueue after a shape change: run once
        # plainly, then capture (addresses are fixed, so only the shape triggers a recapture).
        # The kernels' capture is None where graphs are off or a capture failed (it warns once):
        # then every call enqueues plainly.
        self._enqueue()
        self._graph = self.kernels.capture([self._enqueue])
        self._graph_shape = shape if self._graph is not None else None
