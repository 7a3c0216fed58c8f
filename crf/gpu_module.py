"""The GPU kernels built ahead of time: crf/kernels/densecrf.cu as one CUDA fatbin, loaded without nvcc.

A fatbin holds SASS (machine code) for every architecture in ``FATBIN_ARCHS`` plus the PTX of the
newest one, which the driver compiles for GPUs newer than all of them. ``fatbin_command`` is the one
place that knows the nvcc flags; a wheel build (setup.py) runs it, and the result is shipped as
``crf/kernels/densecrf.fatbin``, next to the .cu. ``load_module`` loads that file into the current
CUDA context with pycuda's ``module_from_file``, and compiles the .cu with nvcc through pycuda's
SourceModule (as before the fatbin existed) only when no usable fatbin is shipped or it holds no
code this GPU and driver can run; it says so in one line on stderr, and ``module_origin()`` tells
which way the module came.

A fatbin is used only where it was built from this very .cu with these nvcc options: nvcc records
a stamp of both (``fatbin_ident``) in the fatbin's headers, checked before loading, so an edited
kernel source never runs stale machine code.

Standard library only at import time (setup.py loads this file by path while it builds a wheel,
before anything is installed); pycuda is imported only when compiling.
"""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

KERNEL_SOURCE = Path(__file__).resolve().parent / "kernels" / "densecrf.cu"

#: nvcc's options for the kernels (crf.gpu_kernels.NVCC_OPTIONS is this: what it gives pycuda).
#: pycuda's SourceModule(no_extern_c=True, options=...) runs `nvcc --cubin <options> -arch sm_XY
#: -I<pycuda's include dir> kernel.cu`: the fatbin's ELF images are byte for byte the cubins it makes.
NVCC_OPTIONS: Tuple[str, ...] = ("--fmad=false", "-O3")

#: (compute capability as nvcc writes it, PTX too?) for each SASS image in the fatbin: every
#: architecture CUDA 13's nvcc builds from sm_75 (Turing) up. CUDA 13 dropped sm_50..sm_72 and
#: calls Thor sm_110 (sm_101 before). SASS for sm_XY runs on sm_XZ with Z >= Y (e.g. sm_88 GPUs run
#: the sm_87 image), except across desktop and Tegra parts (sm_87 Orin, sm_110 Thor), which get
#: images of their own; the PTX of the newest is compiled by the driver for any later GPU.
FATBIN_ARCHS: Tuple[Tuple[int, bool], ...] = (
    (75, False), (80, False), (86, False), (87, False), (89, False), (90, False),
    (100, False), (103, False), (110, False), (120, False), (121, True),
)

#: Load failures that mean "this fatbin has no code this GPU and driver can use" and nothing else:
#: (pycuda exception class name, the driver's cuGetErrorString text in pycuda's message). pycuda
#: raises CUDA_ERROR_NO_BINARY_FOR_GPU as pycuda.driver.RuntimeError and the other two as
#: LogicError (src/wrapper/wrap_cudadrv.cpp, translate_cuda_error); its exceptions carry no code.
NO_CODE_FOR_THIS_GPU: Tuple[Tuple[str, str], ...] = (
    # CUDA_ERROR_NO_BINARY_FOR_GPU (209): neither SASS for this GPU nor PTX it can compile
    ("RuntimeError", "no kernel image is available for execution on the device"),
    # CUDA_ERROR_UNSUPPORTED_PTX_VERSION (222): the PTX is newer than this driver's compiler
    ("LogicError", "the provided PTX was compiled with an unsupported toolchain"),
    # CUDA_ERROR_INVALID_IMAGE (200): an image this driver cannot read (e.g. a driver older than
    # the toolkit that built the fatbin)
    ("LogicError", "device kernel image is invalid"),
)


def fatbin_path(source: Path = KERNEL_SOURCE) -> Path:
    """Where the fatbin of ``source`` is shipped: next to it, .cu -> .fatbin."""
    return Path(source).with_suffix(".fatbin")


def fatbin_ident(source: Path = KERNEL_SOURCE, options: Sequence[str] = NVCC_OPTIONS) -> str:
    """The stamp nvcc records in the fatbin's headers (fatbinary --ident): the source file's name
    and a sha256 of its bytes and the nvcc options. No spaces or commas (nvcc splits -Xfatbin
    values at commas)."""
    digest = hashlib.sha256(Path(source).read_bytes())
    for option in options:
        digest.update(b"\0" + option.encode())
    return f"{Path(source).name}:sha256={digest.hexdigest()}"


def fatbin_command(nvcc: str, source: Path = KERNEL_SOURCE, out: Optional[Path] = None,
                   options: Sequence[str] = NVCC_OPTIONS) -> List[str]:
    """The nvcc command line that builds ``out`` (default: next to ``source``) from ``source``:
    SASS for every architecture in FATBIN_ARCHS, PTX where marked, the build stamp in the headers.
    The same compile as pycuda's SourceModule(no_extern_c=True, options=options) per architecture."""
    cmd = [str(nvcc), "--fatbin", *options]
    for sm, ptx in FATBIN_ARCHS:
        code = f"[sm_{sm},compute_{sm}]" if ptx else f"sm_{sm}"
        cmd += ["-gencode", f"arch=compute_{sm},code={code}"]
    out = fatbin_path(source) if out is None else out
    return cmd + ["-Xfatbin", f"--ident={fatbin_ident(source, options)}", "-o", str(out), str(source)]


def kernel_names(source: Path = KERNEL_SOURCE) -> List[str]:
    """The extern "C" __global__ functions of a .cu file, in order."""
    pattern = r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s+)?void\s+(\w+)\s*\('
    return re.findall(pattern, Path(source).read_text())


def fatbin_problem(source: Path = KERNEL_SOURCE, options: Sequence[str] = NVCC_OPTIONS) -> Optional[str]:
    """None where the fatbin next to ``source`` is there and was built from it with ``options``;
    otherwise why it cannot be used."""
    path = fatbin_path(source)
    if not path.is_file():
        return f"no prebuilt {path.name} is shipped next to {Path(source).name}"
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"{path} cannot be read: {e}"
    if fatbin_ident(source, options).encode() not in data:
        return (f"{path.name} was not built from this {Path(source).name} with these nvcc options "
                f"({', '.join(options)}): rebuild it with crf.gpu_module.fatbin_command")
    return None


def prebuilt_fatbin(source: Path = KERNEL_SOURCE, options: Sequence[str] = NVCC_OPTIONS) -> Optional[Path]:
    """The fatbin shipped next to ``source`` (crf/kernels/densecrf.fatbin) where there is one built
    from it with ``options``; else None."""
    return None if fatbin_problem(source, options) else fatbin_path(source)


class ModuleOrigin(NamedTuple):
    """How the kernel module of this process was made."""

    how: str                # "fatbin": the shipped fatbin was loaded; "nvcc": the .cu was compiled
    path: str               # the fatbin loaded, or the .cu compiled
    reason: Optional[str]   # why nvcc was used (None for "fatbin")

    def describe(self) -> str:
        if self.how == "fatbin":
            return f"loaded the shipped fatbin {self.path}, nvcc not used"
        return f"compiled {self.path} with nvcc through pycuda: {self.reason}"


_origin: Optional[ModuleOrigin] = None


def module_origin() -> Optional[ModuleOrigin]:
    """How the last module made by load_module came (None before any): the GPU report records it."""
    return _origin


def no_code_for_this_gpu(cuda: Any, error: BaseException) -> bool:
    """Whether a load error of pycuda (``cuda`` = pycuda.driver) says only that the fatbin holds no
    code this GPU and driver can use: then compiling the .cu for it is the fix."""
    text = str(error)
    return any(isinstance(error, getattr(cuda, cls)) and message in text for cls, message in NO_CODE_FOR_THIS_GPU)


def compile_source(source: Path = KERNEL_SOURCE, options: Sequence[str] = NVCC_OPTIONS):
    """The .cu compiled for the current context's GPU by pycuda (nvcc; cubin cached on disk by pycuda)."""
    from pycuda.compiler import SourceModule

    text = Path(source).read_text()
    try:
        return SourceModule(text, no_extern_c=True, options=list(options))
    except OSError:  # pycuda's on-disk cubin cache (under ~/.cache) cannot be written: compile without it
        return SourceModule(text, no_extern_c=True, options=list(options), cache_dir=False)


def load_module(cuda: Any, source: Path = KERNEL_SOURCE, options: Sequence[str] = NVCC_OPTIONS,
                require_nvcc: Optional[Callable[[], Any]] = None,
                compile_fn: Callable[[Path, Sequence[str]], Any] = compile_source):
    """The kernel module of ``source`` for the current CUDA context (``cuda`` = pycuda.driver): the
    prebuilt fatbin, else (no usable fatbin shipped, or none of its code runs here) ``source``
    compiled with nvcc, said in one line on stderr. ``require_nvcc`` is called before compiling
    (it raises where nvcc is missing). A module from either way answers get_function(name) alike.
    Errors other than "no code for this GPU" (and nvcc's, when compiling) propagate."""
    global _origin
    source = Path(source)
    reason = fatbin_problem(source, options)
    if reason is None:
        path = fatbin_path(source)
        try:
            module = cuda.module_from_file(str(path))
            # Resolve every kernel now: under lazy module loading (CUDA_MODULE_LOADING=LAZY) a
            # driver may defer work to here, and a failure belongs in this decision, not a launch.
            for name in kernel_names(source):
                module.get_function(name)
        except cuda.Error as e:
            if not no_code_for_this_gpu(cuda, e):
                raise
            reason = f"{path.name} has no code for this GPU and driver ({' '.join(str(e).split())})"
        else:
            _origin = ModuleOrigin("fatbin", str(path), None)
            return module
    print(f"crf: {reason}; compiling {source.name} with nvcc instead", file=sys.stderr, flush=True)
    if require_nvcc is not None:
        require_nvcc()
    module = compile_fn(source, options)
    _origin = ModuleOrigin("nvcc", str(source), reason)
    return module
