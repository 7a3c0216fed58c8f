"""Building the CRF kernels ahead of time: the one place that knows each target and its flags.

The CPU build of crf/kernels/densecrf.cu is a shared library loaded with ctypes, so one file serves
every Python. A wheel ships one library per instruction-set level of its platform and the loader
(crf/cpu_library.py) takes the best one this CPU runs:

    x86_64   x86-64-v2 (SSE4.2, the baseline), x86-64-v3 (AVX2 + FMA), x86-64-v4 (AVX-512)
    aarch64  armv8-a (the baseline), armv8.2-a+fp16+dotprod (Jetson Xavier / Orin)

Standard library only: setup.py loads this file by path while building a wheel, before anything
is installed.

    python crf/build_kernels.py --out crf/kernels/prebuilt            # this machine's platform
    python crf/build_kernels.py --machine aarch64 --out DIR            # cross-compiled (needs zig)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
#: Where a wheel (or `--out` in a checkout) puts the libraries, inside the crf package.
PREBUILT_DIR = KERNEL_DIR / "prebuilt"

#: The flags every build shares (the target's own -march goes with the target).
COMMON_FLAGS = ["-O3", "-std=c++17", "-pthread", "-fPIC", "-shared",
                # kernels not exported, so they inline into the launchers' thread loops
                "-fvisibility=hidden",
                # no FMA contraction and no fast-math: the CPU path follows the reference's rounding
                "-ffp-contract=off", "-fno-fast-math",
                # no FP traps are ever enabled: lets the compiler if-convert float selects, so label loops vectorise
                "-fno-trapping-math",
                # CRF_SIMD loops (densecrf.cu) as simd loops; no OpenMP runtime
                "-fopenmp-simd"]
#: What a shipped library adds: no debug info (zig's libc++ brings ~3 MB of it), and only the
#: launchers exported (libc++'s weak operator new/delete stay inside).
SHIPPED_FLAGS = ["-s", f"-Wl,--version-script={KERNEL_DIR / 'exports.map'}"]


class CpuTarget(NamedTuple):
    """One shipped CPU library: ``name`` (its level), the machine it runs on, the compiler flags
    that select the level, and the /proc/cpuinfo flags (x86 "flags", Arm "Features") it needs."""

    name: str
    machine: str
    arch_flags: tuple
    needs: frozenset

    @property
    def filename(self) -> str:
        return f"libdensecrf_{self.name}.so"


_X86_V2 = frozenset({"sse4_2", "sse4_1", "ssse3", "popcnt", "cx16"})
_X86_V3 = _X86_V2 | {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

#: Best first: the loader takes the first whose needs the CPU has. zig's CPU names (it refuses
#: -march=x86-64-v3). armv8.2-a: LSE atomics and FP16, what Xavier (Carmel) and Orin (A78AE) both
#: have; no dotprod, which Xavier lacks.
CPU_TARGETS = (
    CpuTarget("x86-64-v4", "x86_64", ("-mcpu=x86_64_v4",), _X86_V4),
    CpuTarget("x86-64-v3", "x86_64", ("-mcpu=x86_64_v3",), _X86_V3),
    CpuTarget("x86-64-v2", "x86_64", ("-mcpu=x86_64_v2",), _X86_V2),
    CpuTarget("armv8.2-a", "aarch64", ("-mcpu=generic+v8_2a+fullfp16",),
              frozenset({"atomics", "fphp", "asimdhp", "asimdrdm"})),
    CpuTarget("armv8-a", "aarch64", ("-mcpu=generic",), frozenset()),
)

#: The oldest glibc each platform's libraries load on, and the wheel's platform tag that says so:
#: manylinux_2_28 on x86_64; glibc 2.31 on aarch64 (JetPack 5, Ubuntu 20.04).
GLIBC = {"x86_64": (2, 28), "aarch64": (2, 31)}
ZIG_TARGETS = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}


def platform_of(machine: str) -> str:
    """A platform with shipped libraries, as platform.machine() names it (arm64 = aarch64,
    amd64 = x86_64); ValueError for any other."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())
    if machine not in GLIBC:
        raise ValueError(f"no prebuilt CRF kernels for {machine}; platforms: {', '.join(sorted(GLIBC))}")
    return machine


def targets_for(machine: str) -> List[CpuTarget]:
    """The CPU targets of a platform (machine as platform.machine() says it)."""
    machine = platform_of(machine)
    return [t for t in CPU_TARGETS if t.machine == machine]


def wheel_platform_tag(machine: str) -> str:
    machine = platform_of(machine)
    major, minor = GLIBC[machine]
    return f"manylinux_{major}_{minor}_{machine}"


def zig_command() -> Optional[List[str]]:
    """How to run zig's C++ compiler (the ziglang package, or zig on PATH), or None."""
    try:
        import ziglang  # noqa: F401  (PyPI's ziglang: python -m ziglang)
        return [sys.executable, "-m", "ziglang", "c++"]
    except ImportError:
        zig = shutil.which("zig")
        return [zig, "c++"] if zig else None


def compiler_for(machine: str) -> List[str]:
    """The compiler command for a platform's shipped libraries: zig's C++ targeting the platform's
    oldest glibc (it links its own static libc++, so no libstdc++ of the build machine is needed
    where the wheel runs). Without zig: RuntimeError saying how to get it."""
    zig = zig_command()
    if zig is None:
        raise RuntimeError("building the shipped CRF kernels needs zig's C++ compiler (it targets an old glibc "
                           "and cross-compiles): pip install ziglang")
    machine = platform_of(machine)
    major, minor = GLIBC[machine]
    return zig + ["-target", f"{ZIG_TARGETS[machine]}.{major}.{minor}"]


def compile_command(compiler: Sequence[str], arch_flags: Sequence[str], out: Path) -> List[str]:
    """The command building a shipped CPU library at ``out`` from crf/kernels/cpu_launch.cpp."""
    return [*compiler, *COMMON_FLAGS, *SHIPPED_FLAGS, *arch_flags, "-o", str(out),
            str(KERNEL_DIR / "cpu_launch.cpp")]


def build_cpu_libraries(out_dir: Path, machine: str, compiler: Optional[Sequence[str]] = None,
                        log=print) -> List[Path]:
    """Every CPU target of ``machine`` built into ``out_dir`` (each written beside and renamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compiler = list(compiler) if compiler else compiler_for(machine)
    built = []
    for target in targets_for(machine):
        out = out_dir / target.filename
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        cmd = compile_command(compiler, target.arch_flags, tmp)
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            if tmp.exists():
                tmp.unlink()
            raise RuntimeError(f"building the CRF kernels for {target.name} failed:\n{' '.join(cmd)}\n"
                               f"{res.stderr[-4000:]}")
        os.replace(tmp, out)
        log(f"crf: built {out.name} ({target.name}, {out.stat().st_size // 1024} KB, {time.monotonic() - t0:.0f} s)")
        built.append(out)
    return built


def cpu_features() -> frozenset:
    """This CPU's feature flags as Linux lists them (/proc/cpuinfo "flags" on x86, "Features" on Arm)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def best_target(machine: Optional[str] = None, features: Optional[frozenset] = None) -> Optional[CpuTarget]:
    """The best CPU target this machine runs (None for a platform without shipped libraries)."""
    machine = machine or platform.machine()
    features = cpu_features() if features is None else features
    try:
        candidates = targets_for(machine)
    except ValueError:
        return None
    return next((t for t in candidates if t.needs <= features), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=PREBUILT_DIR, help="folder for the libraries (default: %(default)s)")
    ap.add_argument("--machine", default=platform.machine(), help="x86_64 or aarch64 (default: this machine's)")
    args = ap.parse_args(argv)
    try:
        build_cpu_libraries(args.out, args.machine)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
