"""The CPU build of the kernels: crf/kernels/densecrf.cu compiled with cpu_shim.h into a shared
library (crf/cpu_library.py finds or builds it) and launched through ctypes as
``launch_<kernel>(grid, block, void** args)``, over a thread pool inside the library."""
from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .cpu_library import load_cpu_library
from .kernel_interface import BLOCK, Buffer, KernelBackend, check_count


CACHE_LINE = 64  # bytes; where the buffers start


class CPUKernels(KernelBackend):
    """threads: how many threads a launch uses, the caller's included (1: every launch on the
    calling thread); None keeps the process's setting (by default OMP_NUM_THREADS, else the CPUs
    this process may run on). The threads are one pool per process, shared by every CPUKernels."""

    name = "cpu"

    def __init__(self, library: Path | None = None, threads: int | None = None):
        self.lib = load_cpu_library() if library is None else ctypes.CDLL(str(library))
        self._launchers: dict[str, Any] = {}  # ctypes function pointers
        self.lib.crf_cpu_set_threads.argtypes = [ctypes.c_uint]
        self.lib.crf_cpu_set_threads.restype = None
        self.lib.crf_cpu_threads.restype = ctypes.c_uint
        if threads is not None:
            self.threads = threads

    @property
    def threads(self) -> int:
        return int(self.lib.crf_cpu_threads())

    @threads.setter
    def threads(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= 256:
            raise ValueError(f"CPU CRF threads must be an integer from 1 to 256, got {n!r}")
        self.lib.crf_cpu_set_threads(int(n))

    def alloc(self, nbytes: int) -> Buffer:
        # Aligned to a cache line (numpy's memory is 16-byte aligned): label rows of 16 floats or
        # a multiple are then whole lines, and no vector load of a row is split across two.
        arr = np.empty(max(int(nbytes), 4) + CACHE_LINE, np.uint8)
        skip = -arr.ctypes.data % CACHE_LINE
        return Buffer(int(nbytes), arr.ctypes.data + skip, arr)

    def upload(self, buf: Buffer, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        if a.nbytes > buf.nbytes:
            raise ValueError(f"upload of {a.nbytes} bytes into a {buf.nbytes}-byte buffer")
        start = self._offset(buf)
        buf.owner[start: start + a.nbytes] = a.reshape(-1).view(np.uint8)

    def download(self, buf: Buffer, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        start = self._offset(buf)
        return buf.owner[start: start + n].view(dtype).reshape(shape).copy()

    def host_view(self, array: np.ndarray) -> Buffer | None:
        # The kernels run in this process: they read the caller's arrays and write the result
        # array in place, saving a copy each way (66 MB each at 1024x768x21).
        if not array.flags.c_contiguous:
            return None
        return Buffer(array.nbytes, array.ctypes.data, array.reshape(-1).view(np.uint8))

    @staticmethod
    def _offset(buf: Buffer) -> int:
        """Where buf starts inside the host array that owns it (a Buffer may be a view at an offset)."""
        return buf.ptr - buf.owner.ctypes.data

    def prepare(self, kernel: str, n_threads: int, *args) -> Callable[[], None]:
        check_count(kernel, n_threads)
        fn = self._launchers.get(kernel)
        if fn is None:
            fn = getattr(self.lib, f"launch_{kernel}")
            fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
            fn.restype = None
            self._launchers[kernel] = fn
        holders: list[Any] = []  # ctypes scalars
        for a in args:
            if a is None:
                holders.append(ctypes.c_void_p(None))
            elif isinstance(a, Buffer):
                holders.append(ctypes.c_void_p(a.ptr))
            elif isinstance(a, np.int32):
                holders.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.uint32):
                holders.append(ctypes.c_uint32(int(a)))
            elif isinstance(a, np.float32):
                holders.append(ctypes.c_float(float(a)))
            else:
                raise TypeError(f"{kernel}: argument {a!r} must be a Buffer, None or np.int32/uint32/float32")
        params = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        grid = self.grid(n_threads)

        def call() -> None:
            self.launches += 1
            if self.profile is None:
                fn(grid, BLOCK, params)
                return
            t0 = time.perf_counter()
            fn(grid, BLOCK, params)
            self.profile.setdefault(kernel, []).append((time.perf_counter() - t0) * 1e3)

        call.holders = holders  # type: ignore[attr-defined]  # the argument values params points at
        call.spec = (kernel, grid, tuple(h.value for h in holders))  # type: ignore[attr-defined]
        return call
