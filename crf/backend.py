"""One launch interface for the kernels of crf/kernels/densecrf.cu, on the CPU and on the GPU.

``KernelBackend`` is what the host-side driver (crf/driver.py) talks to: allocate buffers, copy
arrays in and out, launch a kernel by name over n threads with CUDA's argument convention. Two
implementations:

- ``CPUKernels``: the .cu file compiled with cpu_shim.h into a shared library — shipped in wheels,
  one per instruction-set level (crf/build_kernels.py), else built here by g++ on first use,
  cached on disk and checked against its recorded sha256 before every load — launched through
  ctypes: ``launch_<kernel>(grid, block, void** args)``.
- ``GPUKernels``: the same .cu file as the shipped CUDA fatbin (crf/gpu_module.py), or compiled by
  pycuda (nvcc, cached on disk by pycuda) where none is shipped or it has no code for the GPU,
  launched on the caller's stream in the device's primary context.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from .build_kernels import COMMON_FLAGS, KERNEL_DIR  # noqa: E402  (one place for the build flags)
from .gpu_module import NVCC_OPTIONS as GPU_NVCC_OPTIONS  # noqa: E402  (and for nvcc's)

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


# ------------------------------------------------------------------------------------------------
# CPU: the kernels compiled by g++

# The run-time build (a checkout, or a platform without shipped libraries): the shipped builds'
# flags (crf/build_kernels.py), with this machine's SIMD width, as the library is built on the
# machine that runs it (and cached per CPU).
CXX_FLAGS = [*COMMON_FLAGS, "-march=native"]


def cache_dir() -> Path:
    """Where the compiled CPU library is cached (as configured; see kernel_cache_dir())."""
    base = os.environ.get("DEEPLAB_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deeplab-v1-toolkit"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BackendUnavailable("no C++ compiler (g++) found to build the CPU CRF kernels; "
                                 "install one (e.g. apt-get install g++) or set CXX")
    return cxx


def _cpu_signature() -> str:
    """What -march=native depends on: a cached library is never reused on a different CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((l for l in info.splitlines() if l.startswith(("flags", "Features"))), "") + os.uname().machine
    except OSError:
        return os.uname().machine


# The cache holds machine code this process loads, so it is trusted only when no one else can
# write it, and a library is loaded only when its bytes match the sha256 recorded beside it after
# a successful compile. Builds write temp files named _BUILD_PREFIX* and replace atomically, under
# a lock, so concurrent processes compile once and a killed build leaves nothing that is loaded.
_BUILD_PREFIX = ".build-"
_LOCK_NAME = ".build.lock"
_STALE_S = 600.0  # a build leftover this old belongs to a dead builder even without a lock
_warned_dirs: set = set()


def _refusal(directory: Path, follow_symlinks: bool = True) -> str | None:
    """Why ``directory`` must not hold code we load (None when it may): it has to be a directory
    owned by this user, writable by this user and by no one else."""
    try:
        st = os.stat(directory, follow_symlinks=follow_symlinks)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if hasattr(os, "geteuid"):  # POSIX owners and modes; Windows has neither
        if st.st_uid != os.geteuid():
            return f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "not writable by this user"
    return None


def _private_temp_dir() -> Path:
    user = os.geteuid() if hasattr(os, "geteuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"deeplab-v1-toolkit-{user}"


def kernel_cache_dir() -> Path:
    """cache_dir(), created if needed, when it is safe and writable; else a private temp
    directory (mode 0700), with one warning naming the refused directory and why."""
    wanted = cache_dir()
    try:
        wanted.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = _refusal(wanted)
    except OSError as e:
        problem = f"cannot be created: {e.strerror or e}"
    if problem is None:
        return wanted
    private = _private_temp_dir()
    try:
        private.mkdir(mode=0o700, exist_ok=True)
        # no symlink here: the temp directory is shared with every user
        private_problem = _refusal(private, follow_symlinks=False)
    except OSError as e:
        private_problem = f"cannot be created: {e.strerror or e}"
    if private_problem is not None:
        raise BackendUnavailable(f"no safe directory to cache the compiled CPU CRF kernels: {wanted} {problem}, "
                                 f"and {private} {private_problem}; set DEEPLAB_CACHE to a directory of your own")
    if str(wanted) not in _warned_dirs:
        _warned_dirs.add(str(wanted))
        warnings.warn(f"crf: not caching the CPU kernels in {wanted} ({problem}); using {private}",
                      RuntimeWarning, stacklevel=2)
    return private


def _hash_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's content, read in blocks (TensorRT plans and ONNX models are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_library(lib: Path) -> tuple[str | None, str | None]:
    """(sha256, None) for a cached library that may be loaded, else (None, why not); (None, None)
    when there is none."""
    try:
        st = os.lstat(lib)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return None, "is not a regular file"
    if hasattr(os, "geteuid") and (st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        return None, "is owned or writable by another user"
    try:
        with open(_hash_path(lib), "rb") as f:
            recorded = f.read(100).decode("ascii", "replace").strip()
    except OSError:
        return None, "has no recorded sha256"
    try:
        digest = file_sha256(lib)
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}"
    if digest != recorded:
        return None, "does not match its recorded sha256 (damaged or replaced)"
    return digest, None


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Held while building in ``directory``: a second process waits here, then finds the library
    the first one built."""
    if fcntl is None:  # no flock (Windows): concurrent builders may each compile, still atomically
        yield
        return
    fd = os.open(str(directory / _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"crf: waiting for another process building the CPU kernels in {directory}",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_build_leftovers(directory: Path) -> None:
    """Temp files of builds killed mid-way, and temp directories of earlier versions' builds.
    Called under the lock, when no other build runs here: every _BUILD_PREFIX entry is a leftover."""
    now = time.time()
    for p in directory.iterdir():
        legacy = p.name.startswith("tmp") and p.is_dir() and not p.is_symlink()
        if not (p.name.startswith(_BUILD_PREFIX) or legacy):
            continue
        try:
            if (legacy or fcntl is None) and now - p.lstat().st_mtime < _STALE_S:
                continue  # may belong to a build running now
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            pass  # gone already, or not ours to remove: harmless, never loaded


def _write_durably(path: Path, data: bytes | None = None) -> None:
    """Write data to path (None: keep its contents) and wait until it is on disk."""
    with open(path, "r+b" if data is None else "wb") as f:
        if data is not None:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _compile(cxx: str, lib: Path) -> None:
    """Compile into a temp file beside ``lib``, record its sha256, then move both into place."""
    fd, name = tempfile.mkstemp(prefix=_BUILD_PREFIX, suffix=".so", dir=str(lib.parent))
    os.close(fd)
    tmp = Path(name)
    tmp_hash = _hash_path(tmp)
    try:
        cmd = [cxx, *CXX_FLAGS, "-o", str(tmp), str(KERNEL_DIR / "cpu_launch.cpp")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise BackendUnavailable(f"building the CPU CRF kernels failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.chmod(tmp, 0o755)  # whatever the umask: never writable by others (see _check_library)
        _write_durably(tmp)
        _write_durably(tmp_hash, (file_sha256(tmp) + "\n").encode())
        # A crash between the two replaces leaves a library and hash that disagree: rebuilt next time.
        os.replace(tmp, lib)
        os.replace(tmp_hash, _hash_path(lib))
        if os.name == "posix":  # the renames themselves survive a power loss
            fd = os.open(str(lib.parent), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        for p in (tmp, tmp_hash):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def build_cpu_library(force: bool = False, failed_sha256: str | None = None) -> Path:
    """Compile crf/kernels/*.{cu,h,cpp} into a shared library once; cached by content, compiler and
    CPU, and compiled again when the cached one fails its sha256 check. ``force`` always compiles;
    ``failed_sha256`` (a library that failed to load) compiles unless another process has already
    replaced that library."""
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BackendUnavailable(f"C++ compiler {cxx} does not run: {e}") from e
    h = hashlib.sha256(version.encode() + " ".join(CXX_FLAGS).encode() + _cpu_signature().encode())
    for f in sorted(KERNEL_DIR.glob("*")):
        if f.suffix in (".cu", ".h", ".cpp"):
            h.update(f.name.encode() + f.read_bytes())
    directory = kernel_cache_dir()
    lib = directory / f"libdensecrf_cpu_{h.hexdigest()[:16]}.so"
    if not force and failed_sha256 is None and _check_library(lib)[0] is not None:
        return lib
    try:
        with _build_lock(directory):
            # checked again: another process may have built it while this one waited
            digest, problem = _check_library(lib)
            if digest is not None and not force and digest != failed_sha256:
                return lib
            if digest is not None and digest == failed_sha256:
                problem = "does not load"
            _remove_build_leftovers(directory)
            # a few seconds, once per machine and kernel version: say so rather than stall silently
            why = f"; the cached {lib.name} {problem}" if problem else ""
            print(f"crf: compiling the CPU kernels once (cached in {directory}{why})", file=sys.stderr, flush=True)
            _compile(cxx, lib)
    except OSError as e:
        raise BackendUnavailable(f"could not build the CPU CRF kernels in {directory}: {e}") from e
    return lib


def prebuilt_cpu_library() -> Path | None:
    """The shipped library for this CPU (crf/kernels/prebuilt/, built into wheels by
    crf/build_kernels.py): the best level this CPU runs, or the one DEEPLAB_CRF_TARGET names
    ("x86-64-v2", ...). None where none is shipped (a checkout), or with DEEPLAB_CRF_BUILD=runtime."""
    from .build_kernels import PREBUILT_DIR, CpuTarget, best_target, cpu_features, targets_for

    if os.environ.get("DEEPLAB_CRF_BUILD") == "runtime":
        return None
    wanted = os.environ.get("DEEPLAB_CRF_TARGET")
    if wanted:
        import platform

        try:
            names = {t.name: t for t in targets_for(platform.machine())}
        except ValueError as e:
            raise BackendUnavailable(f"DEEPLAB_CRF_TARGET={wanted}: {e}") from e
        if wanted not in names:
            raise BackendUnavailable(f"DEEPLAB_CRF_TARGET={wanted}: not a target of this platform; "
                                     f"choose one of {', '.join(names)}")
        missing = names[wanted].needs - cpu_features()
        if missing:
            raise BackendUnavailable(f"DEEPLAB_CRF_TARGET={wanted}: this CPU lacks {', '.join(sorted(missing))}")
        target: CpuTarget | None = names[wanted]
    else:
        target = best_target()
    if target is None:
        return None
    lib = PREBUILT_DIR / target.filename
    return lib if lib.is_file() else None


#: Which CPU library this process loaded: "prebuilt <level>" or "compiled here" (load_cpu_library).
cpu_library_source: str | None = None


def load_cpu_library() -> ctypes.CDLL:
    """The kernels for this CPU, loaded: the shipped library of its level (prebuilt_cpu_library),
    else — a checkout, or a platform without one — compiled here once and cached, saying so. A
    verified cached library that still does not load is compiled again once; if that one does not
    load either, BackendUnavailable says why."""
    global cpu_library_source
    shipped = prebuilt_cpu_library()
    if shipped is not None:
        try:
            handle = ctypes.CDLL(str(shipped))
            cpu_library_source = f"prebuilt {shipped.name}"
            return handle
        except OSError as e:  # a broken install: the run-time build still works where a compiler is
            print(f"crf: the shipped {shipped.name} does not load ({e}); compiling the kernels here",
                  file=sys.stderr, flush=True)
    cpu_library_source = "compiled here"
    lib = build_cpu_library()
    try:
        return ctypes.CDLL(str(lib))
    except OSError:
        pass
    try:
        failed = file_sha256(lib)
    except OSError:
        failed = None
    lib = build_cpu_library(force=failed is None, failed_sha256=failed)
    try:
        return ctypes.CDLL(str(lib))
    except OSError as e:
        raise BackendUnavailable(f"the compiled CPU CRF kernels do not load, even compiled again: {e}") from e


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
        arr = np.empty(max(int(nbytes), 4), np.uint8)
        return Buffer(int(nbytes), arr.ctypes.data, arr)

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


# ------------------------------------------------------------------------------------------------
# GPU: the same kernels through pycuda

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

