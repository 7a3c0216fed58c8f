"""Finding and loading the CPU build of the kernels.

An installed wheel ships one library per instruction-set level of its platform (built by
crf/build_kernels.py); ``load_cpu_library`` loads the best one this CPU runs. Only where none is
shipped (a source checkout, a platform without wheels) is crf/kernels/densecrf.cu compiled here, once,
by g++ with -march=native, into a private cache directory, saying so in one line.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .build_kernels import COMMON_FLAGS, KERNEL_DIR, PREBUILT_DIR, CpuTarget, best_target, cpu_features, targets_for
from .kernel_interface import BackendUnavailable

# The fallback build: the shipped builds' flags, with this machine's SIMD width (the library is
# built on the machine that runs it, and cached per CPU).
CXX_FLAGS = [*COMMON_FLAGS, "-march=native"]

#: Which CPU library this process loaded: "prebuilt <file>" or "compiled here" (load_cpu_library).
cpu_library_source: str | None = None


def prebuilt_cpu_library() -> Path | None:
    """The shipped library for this CPU (crf/kernels/prebuilt/): the best level this CPU runs, or the
    one DEEPLAB_CRF_TARGET names ("x86-64-v2", ...). None where none is shipped (a checkout), or
    with DEEPLAB_CRF_BUILD=runtime."""
    if os.environ.get("DEEPLAB_CRF_BUILD") == "runtime":
        return None
    wanted = os.environ.get("DEEPLAB_CRF_TARGET")
    target: CpuTarget | None
    if wanted:
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
        target = names[wanted]
    else:
        target = best_target()
    lib = None if target is None else PREBUILT_DIR / target.filename
    return lib if lib is not None and lib.is_file() else None


def cache_dir() -> Path:
    """The toolkit's cache: $DEEPLAB_CACHE, else $XDG_CACHE_HOME or ~/.cache, /deeplab-v1-toolkit."""
    base = os.environ.get("DEEPLAB_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deeplab-v1-toolkit"


def load_cpu_library() -> ctypes.CDLL:
    """The kernels for this CPU, loaded: the shipped library of its level, else the fallback build."""
    global cpu_library_source
    shipped = prebuilt_cpu_library()
    if shipped is not None:
        try:
            handle = ctypes.CDLL(str(shipped))
            cpu_library_source = f"prebuilt {shipped.name}"
            return handle
        except OSError as e:  # a broken install: the fallback build still works where a compiler is
            print(f"crf: the shipped {shipped.name} does not load ({e}); compiling the kernels here",
                  file=sys.stderr, flush=True)
    lib = build_cpu_library()
    try:
        handle = ctypes.CDLL(str(lib))
    except OSError as e:
        raise BackendUnavailable(f"the CPU CRF kernels compiled here do not load ({lib}): {e}") from e
    cpu_library_source = "compiled here"
    return handle


def build_cpu_library() -> Path:
    """crf/kernels/*.{cu,h,cpp} compiled once into the cache, for a key hashing the sources, the
    compiler, the flags and the CPU. Concurrent processes compile once (a lock); a library appears
    only whole (compiled beside it, then renamed), named with the sha256 of its bytes, which is
    checked before every load: a damaged file would crash dlopen (a truncated one) or run other code."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BackendUnavailable("no prebuilt CPU CRF kernels here and no C++ compiler (g++) to build them; "
                                 "install a wheel, or a compiler (e.g. apt-get install g++), or set CXX")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BackendUnavailable(f"C++ compiler {cxx} does not run: {e}") from e
    key = hashlib.sha256("\0".join([version, *CXX_FLAGS, str(sorted(cpu_features())), platform.machine()]).encode())
    for f in sorted(KERNEL_DIR.glob("*")):
        if f.suffix in (".cu", ".h", ".cpp"):
            key.update(f.name.encode() + f.read_bytes())
    stem = f"libdensecrf_cpu_{key.hexdigest()[:16]}"
    directory = cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(directory)
        lib = _intact(directory, stem)
        if lib is not None:
            return lib
        with _build_lock(directory):
            lib = _intact(directory, stem, remove_damaged=True)
            if lib is not None:
                return lib  # built by another process while this one waited
            for leftover in directory.glob(".build-*"):  # of a killed build: none runs now
                leftover.unlink()
            print(f"crf: no prebuilt CPU kernels here; compiling them once with {Path(cxx).name} (cached in "
                  f"{directory})", file=sys.stderr, flush=True)
            tmp = directory / f".build-{os.getpid()}.so"
            cmd = [cxx, *CXX_FLAGS, "-o", str(tmp), str(KERNEL_DIR / "cpu_launch.cpp")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise BackendUnavailable(f"building the CPU CRF kernels failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
            os.chmod(tmp, 0o755)  # whatever the umask: never writable by others
            lib = directory / f"{stem}.{file_sha256(tmp)[:16]}.so"
            os.replace(tmp, lib)
    except OSError as e:
        raise BackendUnavailable(f"could not build the CPU CRF kernels in {directory}: {e}; "
                                 f"set DEEPLAB_CACHE to a directory of your own") from e
    return lib


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's content, read in blocks (ONNX models and TensorRT plans are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _intact(directory: Path, stem: str, remove_damaged: bool = False) -> Path | None:
    """The cached library ``stem.<digest>.so`` whose bytes still match the digest in its name."""
    for lib in sorted(directory.glob(f"{stem}.*.so")):
        if file_sha256(lib)[:16] == lib.name.split(".")[1]:
            return lib
        if remove_damaged:
            print(f"crf: the cached {lib.name} is damaged (its sha256 differs); compiling it again",
                  file=sys.stderr, flush=True)
            lib.unlink()
    return None


def _check_private(directory: Path) -> None:
    """The cache holds machine code this process loads: only a directory of this user that no one
    else can write is used (then no one else can have placed or replaced a file in it)."""
    st = os.stat(directory)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BackendUnavailable(f"not loading compiled CRF kernels from {directory}: owned by uid {st.st_uid} "
                                 f"(this user is {os.geteuid()}), mode {stat.S_IMODE(st.st_mode):o}; "
                                 f"set DEEPLAB_CACHE to a directory only you can write")


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Held while building: a second process waits here (saying so), then finds the library built."""
    import fcntl  # the CPU build is POSIX-only (a .so loaded with ctypes)

    with open(directory / ".build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"crf: waiting for another process building the CPU kernels in {directory}",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
