"""Build hooks: the CRF kernels are compiled when a wheel is built, not on the user's machine.

Everything else is in pyproject.toml. `pip wheel .` builds the CPU libraries of this machine's
platform (every instruction-set level, crf/build_kernels.py) and, where nvcc is found, the CUDA
fatbin, into the wheel's crf/kernels/; DEEPLAB_WHEEL_MACHINE=aarch64 cross-builds the aarch64 wheel
(tools/build_wheels.sh builds both). The libraries are loaded with ctypes and the fatbin by the CUDA
driver: one wheel serves every Python 3.8+, tagged py3-none-manylinux_<glibc>_<machine>.
An editable install (pip install -e .) builds nothing: a checkout compiles the kernels on first use.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    """A module of the source tree by path (nothing of the project is importable while it builds),
    executed once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _machine() -> str:
    return os.environ.get("DEEPLAB_WHEEL_MACHINE") or platform.machine()


class BuildWithKernels(build_py):
    """build_py, then the CRF kernels into the build's crf/kernels/: the CPU libraries (a failure is
    an error: a wheel without them would compile at run time, which is what wheels are for avoiding)
    and the CUDA fatbin where nvcc is found (without it the wheel has none, and says so)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        if os.environ.get("DEEPLAB_WHEEL_KERNELS") == "0":  # a wheel that compiles at run time, as a checkout
            print("crf: DEEPLAB_WHEEL_KERNELS=0: no prebuilt kernels in this wheel")
            return
        kernels = Path(self.build_lib) / "crf" / "kernels"
        # another platform's libraries from an earlier build in the same folder must not ship
        shutil.rmtree(kernels / "prebuilt", ignore_errors=True)
        build = _load("_deeplab_build_kernels", ROOT / "crf" / "build_kernels.py")
        build.build_cpu_libraries(kernels / "prebuilt", _machine())
        gpu_module = ROOT / "crf" / "gpu_module.py"
        nvcc = shutil.which("nvcc")
        if nvcc and gpu_module.is_file() and os.environ.get("DEEPLAB_WHEEL_FATBIN", "1") != "0":
            fat = _load("_deeplab_gpu_module", gpu_module)
            out = kernels / "densecrf.fatbin"
            subprocess.run(fat.fatbin_command(nvcc, ROOT / "crf" / "kernels" / "densecrf.cu", out), check=True)
            print(f"crf: built {out.name} ({out.stat().st_size // 1024} KB)")
        else:
            print("crf: no nvcc here: this wheel has no CUDA fatbin (the GPU CRF will compile its kernels "
                  "with the machine's nvcc through pycuda)")


cmdclass = {"build_py": BuildWithKernels}

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]


class PlatformWheel(bdist_wheel):
    """py3-none-manylinux_<glibc>_<machine>: compiled files, but no Python extension modules (the
    files install beside the Python ones, in purelib, as any package data)."""

    def get_tag(self):
        build = _load("_deeplab_build_kernels", ROOT / "crf" / "build_kernels.py")
        return "py3", "none", build.wheel_platform_tag(_machine())


cmdclass["bdist_wheel"] = PlatformWheel

setup(cmdclass=cmdclass)
