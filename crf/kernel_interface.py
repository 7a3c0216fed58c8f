"""The launch interface of the kernels of crf/kernels/densecrf.cu, which both builds implement.

``KernelBackend`` is what the host-side driver (crf/driver.py) talks to: allocate buffers, copy
arrays in and out, launch a kernel by name over n threads with CUDA's argument convention.
``CPUKernels`` (crf/cpu_kernels.py) runs the .cu compiled for the CPU through ctypes;
``GPUKernels`` (crf/gpu_kernels.py) runs it on the GPU through pycuda. ``BufferPool`` keeps one
owner's buffers across calls. The errors here are the ones every build raises.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np

from .build_kernels import KERNEL_DIR

KERNEL_SOURCE = KERNEL_DIR / "densecrf.cu"
BLOCK = 256

# Argument kinds a kernel takes, as numpy scalar types; buffers and None (a NULL pointer) besides.
U32, F32 = np.uint32, np.float32
INT32_MAX = 2**31 - 1


class SizeLimitError(ValueError):
    """A count beyond the kernels' 32-bit indexing (thread ids and element indices are int)."""


def I32(value: int) -> np.int32:
    """A kernel's int argument, refused (not wrapped) outside the 32-bit range."""
    if not -INT32_MAX - 1 <= int(value) <= INT32_MAX:
        raise SizeLimitError(f"{int(value):,} does not fit the kernels' 32-bit int arguments (at most {INT32_MAX:,})")
    return np.int32(value)


def check_count(what: str, n: int) -> None:
    """Thread and element counts of a launch must stay below 2^31: the kernels index with int."""
    if n > INT32_MAX:
        raise SizeLimitError(f"{what}: {n:,} threads/elements exceed the kernels' 32-bit indexing "
                             f"(at most {INT32_MAX:,}); use a smaller image or fewer labels")


class BackendUnavailable(RuntimeError):
    """This backend cannot run here; the message says why and how to fix it."""


class OutOfDeviceMemory(MemoryError):
    """An allocation the backend's memory cannot hold (GPU memory, pinned host memory); nothing was
    allocated by the failed call, so the caller may free something and try again."""


class Buffer:
    """A block of backend memory: ``ptr`` is its address (host or device)."""

    def __init__(self, nbytes: int, ptr: int, owner=None):
        self.nbytes, self.ptr, self.owner = nbytes, ptr, owner


def _check_download_size(buf: Buffer, out: np.ndarray) -> None:
    """download_into copies out.nbytes bytes: more than buf holds would read past its end."""
    if out.nbytes > buf.nbytes:
        raise ValueError(f"download of {out.nbytes} bytes from a {buf.nbytes}-byte buffer")


class KernelBackend:
    name = "abstract"
    #: when a dict, every launch adds its time (ms) under the kernel's name (see kernel_times())
    profile: dict[str, list] | None = None
    #: kernel launches and graph replays made so far (a host-overhead measure; see benchmarks/gpu_report.py)
    launches = 0
    graph_launches = 0

    #: when a list, mark() records pipeline stage boundaries in stream order (see stage_times())
    marks: list | None = None

    def kernel_times(self) -> dict[str, list[float]]:
        """Per-kernel times in ms recorded since profiling was switched on (profile = {})."""
        return dict(self.profile or {})

    def mark(self, stage: str) -> None:
        """The end of ``stage`` in the stream's order (nothing unless ``marks`` is a list). The CPU
        build runs every launch and copy before returning, so the host clock is the stage's end;
        the GPU records a CUDA event on the stream (GPUKernels.mark)."""
        if self.marks is not None:
            self.marks.append((stage, time.perf_counter()))

    def stage_times(self) -> list[tuple[str, float]]:
        """(stage, ms since the previous mark) for each mark after the first one recorded since the
        last call, in order; waits for the stream, then forgets the marks."""
        if not self.marks:
            return []
        marks, self.marks[:] = list(self.marks), []
        return [(stage, (t - t0) * 1e3) for (_, t0), (stage, t) in zip(marks, marks[1:])]

    def alloc(self, nbytes: int) -> Buffer:
        raise NotImplementedError

    def upload(self, buf: Buffer, array: np.ndarray) -> None:
        raise NotImplementedError

    def download(self, buf: Buffer, shape, dtype) -> np.ndarray:
        raise NotImplementedError

    def alloc_host(self, shape, dtype) -> np.ndarray:
        """A host array the backend copies to and from fastest (pinned memory on the GPU), for
        buffers that are made once and reused (network input batches, label maps)."""
        return np.empty(shape, dtype)

    def upload_async(self, buf: Buffer, array: np.ndarray) -> None:
        """Copy a C-contiguous host array into ``buf``, ordered on the backend's stream, without
        waiting: ``array`` (from alloc_host) must stay unchanged until the stream has passed the
        copy (a synchronize, or a download, which synchronises). The CPU copies at once."""
        self.upload(buf, array)

    def download_into(self, buf: Buffer, out: np.ndarray) -> np.ndarray:
        """Copy ``out.nbytes`` bytes from ``buf`` into the C-contiguous host array ``out`` (pinned
        on the GPU: a direct DMA), ordered on the stream, and wait for it. Returns ``out``."""
        _check_download_size(buf, out)
        out[...] = self.download(buf, out.shape, out.dtype)
        return out

    def prepare(self, kernel: str, n_threads: int, *args) -> Callable[[], None]:
        """A launch of ``kernel`` over n_threads with these arguments (Buffers, None = NULL,
        np.int32 / np.uint32 / np.float32), converted once: calling it launches. The mean-field
        iterations repeat the same launches, so they prepare them once per image."""
        raise NotImplementedError

    def launch(self, kernel: str, n_threads: int, *args) -> None:
        self.prepare(kernel, n_threads, *args)()

    def capture(self, launches: list) -> Callable[[], None] | None:
        """One call that replays these prepared launches in order (a CUDA graph on the GPU), or None
        where the backend has no such thing (the CPU): then the caller calls them one by one."""
        return None

    @contextlib.contextmanager
    def active(self):
        """Makes the backend usable in the calling thread for the duration (the GPU: its context)."""
        yield self

    def host_view(self, array: np.ndarray) -> Buffer | None:
        """A Buffer over a C-contiguous host array that kernels can read and write in place, or
        None where kernels cannot address host memory (the GPU): then upload / download."""
        return None

    def synchronize(self) -> None:
        pass

    @staticmethod
    def grid(n_threads: int) -> int:
        return max(1, (n_threads + BLOCK - 1) // BLOCK)


class BufferPool:
    """Memory of one owner, kept per role and reused across calls (set-up once, per call cheap):
    ``device(role, nbytes)`` a Buffer of the backend, ``host(role, shape, dtype)`` a host array of
    its fastest kind (pinned on the GPU). A role grows when a larger one is needed: the smaller one
    is freed first (peak memory stays one copy), inside ``active()`` because pycuda frees device and
    pinned memory only with its context current in the freeing thread (else it warns and leaks)."""

    def __init__(self, kernels: KernelBackend):
        self.k = kernels
        self._device: dict[str, Buffer] = {}
        self._host: dict[str, np.ndarray] = {}

    def device(self, role: str, nbytes: int) -> Buffer:
        b = self._device.get(role)
        if b is None or b.nbytes < nbytes:
            with self.k.active():
                self._device.pop(role, None)
                b = self._device[role] = self.k.alloc(nbytes)
        return b

    def host(self, role: str, shape, dtype) -> np.ndarray:
        """A reused host array viewed as ``shape`` of ``dtype`` (a view of the role's bytes)."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        a = self._host.get(role)
        if a is None or a.nbytes < n:
            with self.k.active():
                self._host.pop(role, None)
                a = self._host[role] = self.k.alloc_host((max(n, 1),), np.uint8)
        return a[:n].view(dtype).reshape(shape)

    def __getitem__(self, role: str) -> Buffer:
        return self._device[role]

    def nbytes(self) -> int:
        """Bytes of backend (device) memory held."""
        return sum(b.nbytes for b in self._device.values())
