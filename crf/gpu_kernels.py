"""The GPU build of the kernels: crf/kernels/densecrf.cu as the shipped CUDA fatbin, or compiled by
pycuda with nvcc where none is shipped or it has no code for this GPU (crf/gpu_module.py), launched
on the caller's stream in the device's primary context. The one owner of pycuda's context, streams
and device buffers in this project: the TensorRT backend and the device pipeline use it."""
from __future__ import annotations

import contextlib
import shutil
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np

from .gpu_module import NVCC_OPTIONS as GPU_NVCC_OPTIONS
from .kernel_interface import (BLOCK, KERNEL_SOURCE, BackendUnavailable, Buffer, KernelBackend, OutOfDeviceMemory,
                               _check_download_size, check_count)


# nvcc's options, from the one place that builds the fatbin too (no FMA contraction: the GPU
# matches the CPU path closely)
NVCC_OPTIONS = list(GPU_NVCC_OPTIONS)


def require_nvcc() -> str:
    """pycuda compiles kernels at run time with nvcc: say how to fix it when nvcc is missing."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BackendUnavailable(
            "pycuda compiles the CRF kernels at run time with nvcc, which is not on PATH: install the "
            "CUDA toolkit and add its bin/ to PATH (e.g. export PATH=/usr/local/cuda/bin:$PATH), "
            "or use backend='cpu'")
    return nvcc


def import_pycuda():
    """pycuda.driver, or BackendUnavailable naming what is missing: pycuda itself, or one of its
    own dependencies (pytools, platformdirs, mako, ...), which is a broken install, not a missing GPU."""
    try:
        import pycuda.driver as cuda
        # pycuda.driver imports none of pycuda's own dependencies: pycuda.compiler imports pytools,
        # and platformdirs only when it compiles. Import them now, so that a missing one is named
        # here instead of surfacing later as a bare ModuleNotFoundError.
        import platformdirs  # noqa: F401
        import pycuda.compiler  # noqa: F401
    except ImportError as e:
        missing = getattr(e, "name", None) or ""
        if missing == "pycuda" or missing.startswith("pycuda."):
            raise BackendUnavailable(f"pycuda is not installed (pip install 'deeplab-v1-toolkit[gpu]'): {e}") from e
        if missing:
            raise BackendUnavailable(f"pycuda is installed but its dependency {missing!r} is missing "
                                     f"(pip install {missing}): {e}") from e
        raise BackendUnavailable(f"pycuda cannot be imported (its driver extension did not load: is the "
                                 f"NVIDIA driver's libcuda.so.1 installed?): {e}") from e
    return cuda


class GPUKernels(KernelBackend):
    """pycuda driver: the device's primary context (shared with TensorRT, PyTorch and others), one
    module per process (pycuda caches the cubin on disk), launches on ``stream`` (a pycuda Stream;
    None = a stream of our own, never the legacy default stream).

    Usable from any thread: every entry point pushes the primary context and pops it after
    (``with k.active():`` for a sequence of calls; DenseCRFDriver.run does that once per call).
    pycuda frees device memory in the thread that allocated it: let the backend (and the driver
    that pools its buffers) be released in the thread that made it, or at process exit."""

    name = "gpu"
    _module: Any = None

    def __init__(self, stream=None, device: int = 0):
        cuda = import_pycuda()
        try:
            cuda.init()
            self.context = cuda.Device(device).retain_primary_context()
        except Exception as e:  # no device, no driver, driver too old
            raise BackendUnavailable(f"no usable CUDA device: {e}") from e
        self.cuda = cuda
        self.device = device
        with self.active():
            self.stream = stream or cuda.Stream()
            if GPUKernels._module is None:
                GPUKernels._module = _compile_module(cuda)
        self.module = GPUKernels._module
        self._functions: dict = {}
        self._events: list = []
        #: set to False to launch the mean-field iterations one kernel at a time (no CUDA graph)
        self.use_graphs = True
        self.graph_error: str | None = None

    @contextlib.contextmanager
    def active(self):
        """The primary context current in this thread for the duration (push / pop: re-entrant,
        and the thread's own current context, e.g. PyTorch's, is back afterwards)."""
        self.context.push()
        try:
            yield self
        finally:
            self.cuda.Context.pop()

    def alloc(self, nbytes: int) -> Buffer:
        with self.active():
            try:
                mem = self.cuda.mem_alloc(max(int(nbytes), 4))
            except self.cuda.MemoryError as e:
                raise OutOfDeviceMemory(f"out of GPU memory allocating {int(nbytes):,} bytes: {e}") from e
        return Buffer(int(nbytes), int(mem), mem)

    def alloc_host(self, shape, dtype) -> np.ndarray:
        """Page-locked (pinned) host memory: copies to and from it are direct DMA and truly
        asynchronous on the stream."""
        with self.active():
            try:
                return self.cuda.pagelocked_empty(shape, dtype)
            except self.cuda.Error as e:  # pycuda's MemoryError, or the driver's own refusal
                n = int(np.prod(shape)) * np.dtype(dtype).itemsize
                raise OutOfDeviceMemory(f"cannot pin {n:,} bytes of host memory: {e}") from e

    def upload_async(self, buf: Buffer, array: np.ndarray) -> None:
        if array.nbytes > buf.nbytes:
            raise ValueError(f"upload of {array.nbytes} bytes into a {buf.nbytes}-byte buffer")
        if not array.flags.c_contiguous:
            raise ValueError("upload_async copies C-contiguous (pinned) host arrays only")
        with self.active():
            self.cuda.memcpy_htod_async(buf.ptr, array, self.stream)

    def download_into(self, buf: Buffer, out: np.ndarray) -> np.ndarray:
        if not out.flags.c_contiguous:
            raise ValueError("download_into writes C-contiguous host arrays only")
        _check_download_size(buf, out)
        with self.active():
            self.cuda.memcpy_dtoh_async(out, buf.ptr, self.stream)
            self.stream.synchronize()
        return out

    def upload(self, buf: Buffer, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        if a.nbytes > buf.nbytes:
            raise ValueError(f"upload of {a.nbytes} bytes into a {buf.nbytes}-byte buffer")
        with self.active():
            self.cuda.memcpy_htod_async(buf.ptr, a, self.stream)
            self.stream.synchronize()  # the host array may be a temporary

    def download(self, buf: Buffer, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        with self.active():
            self.cuda.memcpy_dtoh_async(out, buf.ptr, self.stream)
            self.stream.synchronize()
        return out

    # pycuda argument codes: pointers as "P", numpy scalars by type.
    _CODES = {np.int32: "i", np.uint32: "I", np.float32: "f"}

    def prepare(self, kernel: str, n_threads: int, *args) -> Callable[[], None]:
        """A prepared launch; call it with the context active (inside ``active()``)."""
        check_count(kernel, n_threads)
        fn = self._functions.get(kernel)
        if fn is None:
            # Prepared calls: the argument layout is worked out once per kernel instead of at every
            # launch (a CRF makes ~170 launches, and the GPU target is a couple of milliseconds).
            codes = "".join("P" if a is None or isinstance(a, Buffer) else self._CODES[type(a)] for a in args)
            fn = self._functions[kernel] = self.module.get_function(kernel)
            fn.prepare(codes)
        conv = [a.ptr if isinstance(a, Buffer) else (0 if a is None else a) for a in args]
        grid, block, stream = (self.grid(n_threads), 1), (BLOCK, 1, 1), self.stream
        # The arguments packed once, launched with pycuda's raw launcher (cuLaunchKernel with the
        # parameter buffer): what prepared_async_call does, without re-packing at every launch and
        # without its legacy cuFuncSetBlockShape call, which has no place inside a stream capture.
        from pycuda._pvt_struct import pack

        argbuf = pack(fn.arg_format, *conv)
        launch = fn._launch_kernel

        def call() -> None:
            self.launches += 1
            if self.profile is None:
                launch(grid, block, argbuf, 0, stream)
                return
            start, end = self.cuda.Event(), self.cuda.Event()
            start.record(stream)
            launch(grid, block, argbuf, 0, stream)
            end.record(stream)
            self._events.append((kernel, start, end))

        call.spec = (kernel, grid[0], tuple(conv))  # type: ignore[attr-defined]
        return call

    def capture(self, launches: list) -> Callable[[], None] | None:
        """The launches recorded once as a CUDA graph on this stream (crf/cuda_graph.py): calling the
        result replays them all with one graph launch. None where graphs are off, while profiling
        per kernel, or after a capture failed (then the caller launches one by one)."""
        if not self.use_graphs or self.profile is not None or self.graph_error is not None:
            return None
        from .cuda_graph import CudaGraphError, capture_launches

        try:
            graph = capture_launches(self.stream.handle, launches)
        except CudaGraphError as e:
            self.graph_error = str(e)
            warnings.warn(f"crf: CUDA graph capture failed, launching kernels one by one: {e}",
                          RuntimeWarning, stacklevel=2)
            return None

        def replay() -> None:
            self.graph_launches += 1
            graph.launch(self.stream.handle)

        replay.graph = graph  # type: ignore[attr-defined]
        return replay

    def mark(self, stage: str) -> None:
        """A CUDA event recorded on the stream: the end of ``stage`` on the GPU's own clock."""
        if self.marks is not None:
            with self.active():
                event = self.cuda.Event()
                event.record(self.stream)
            self.marks.append((stage, event))

    def stage_times(self) -> list[tuple[str, float]]:
        """(stage, ms between consecutive CUDA events), after the stream has passed the last one."""
        if not self.marks:
            return []
        marks, self.marks[:] = list(self.marks), []
        with self.active():
            marks[-1][1].synchronize()
            times = [(stage, e0.time_till(e)) for (_, e0), (stage, e) in zip(marks, marks[1:])]
            del marks  # the events are destroyed with the context current, as pycuda needs
        return times

    def kernel_times(self) -> dict[str, list[float]]:
        """CUDA-event times per kernel (ms), resolved after a synchronize."""
        with self.active():
            self.stream.synchronize()
            sink = self.profile if self.profile is not None else {}
            for kernel, start, end in self._events:
                sink.setdefault(kernel, []).append(start.time_till(end))
        self._events.clear()
        return dict(self.profile or {})

    def synchronize(self) -> None:
        with self.active():
            self.stream.synchronize()


def _compile_module(cuda):
    """The kernel module for the current context: the prebuilt fatbin shipped next to the .cu (no
    nvcc needed), else the .cu compiled by pycuda with nvcc (crf/gpu_module.py, load_module). A
    compile or load failure is BackendUnavailable with nvcc's message, so that "auto" falls back to
    the CPU build instead of failing."""
    from .gpu_module import load_module

    try:
        return load_module(cuda, KERNEL_SOURCE, NVCC_OPTIONS, require_nvcc=require_nvcc)
    except cuda.CompileError as e:  # its text holds nvcc's command line, stdout and stderr
        raise BackendUnavailable(f"nvcc could not compile the CRF kernels ({KERNEL_SOURCE.name}) for this GPU: "
                                 f"{str(e)[-4000:]}") from e
    except cuda.Error as e:  # e.g. a cubin the driver cannot load (driver older than the toolkit)
        raise BackendUnavailable(f"the compiled CRF kernels do not load on this GPU: {e}") from e


class GpuIdentity(NamedTuple):
    name: str                 # as the driver names it, e.g. "NVIDIA A100-SXM4-80GB", "Orin"
    compute_capability: str   # "8.0", "8.7"


def gpu_identity(device: int = 0) -> GpuIdentity | None:
    """Name and compute capability of CUDA device ``device`` (what a TensorRT plan is tied to),
    asked through pycuda without creating or touching any context; None where pycuda or a CUDA
    driver is missing."""
    try:
        cuda = import_pycuda()
        cuda.init()
        dev = cuda.Device(device)
        major, minor = dev.compute_capability()
        return GpuIdentity(str(dev.name()), f"{major}.{minor}")
    except Exception:  # BackendUnavailable, or pycuda's own errors (no driver, no device, bad index)
        return None


def gpu_available() -> bool:
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return False
        from .gpu_module import prebuilt_fatbin

        # the shipped fatbin needs no nvcc; without it the kernels are compiled with the machine's
        return shutil.which("nvcc") is not None or prebuilt_fatbin() is not None
    except Exception:
        return False
