"""The CRF kernels built ahead of time (crf/build_kernels.py): which library a CPU gets, and the
shipped libraries themselves — portable (old glibc, no C++ runtime of the build machine, no static
TLS) and equal to the run-time build."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from crf.build_kernels import CPU_TARGETS, best_target, cpu_features, targets_for, wheel_platform_tag

X86_V2 = {"sse4_2", "sse4_1", "ssse3", "popcnt", "cx16", "sse2"}
X86_V3 = X86_V2 | {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
X86_V4 = X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@pytest.mark.parametrize("machine,features,expected", [
    ("x86_64", X86_V4 | {"avx512_vnni"}, "x86-64-v4"),
    ("x86_64", X86_V3, "x86-64-v3"),
    ("x86_64", X86_V4 - {"avx512vl"}, "x86-64-v3"),  # AVX-512 without VL is not v4
    ("x86_64", X86_V2, "x86-64-v2"),
    ("x86_64", X86_V2 - {"popcnt"}, None),  # older than the baseline: compiled here instead
    ("aarch64", {"fp", "asimd", "asimdhp", "asimddp"}, "armv8.2-a"),  # Orin
    ("aarch64", {"fp", "asimd"}, "armv8-a"),  # Nano (Cortex-A57)
    ("arm64", {"fp", "asimd"}, "armv8-a"),
    ("riscv64", {"rv64"}, None),
])
def test_the_best_level_the_cpu_runs_is_chosen(machine, features, expected):
    target = best_target(machine, frozenset(features))
    assert (target.name if target else None) == expected


def test_this_machine_gets_a_level_it_runs():
    import platform

    target = best_target()
    if platform.machine() in ("x86_64", "aarch64"):
        assert target is not None and target.needs <= cpu_features()


def test_platform_tags():
    assert wheel_platform_tag("x86_64") == "manylinux_2_28_x86_64"
    assert wheel_platform_tag("aarch64") == "manylinux_2_31_aarch64"
    with pytest.raises(ValueError, match="riscv64"):
        targets_for("riscv64")
    assert {t.machine for t in CPU_TARGETS} == {"x86_64", "aarch64"}


def run_env(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=full,
                          timeout=300)


def test_a_target_forced_by_name_is_checked():
    code = "import sys; sys.path.insert(0, '.'); from crf.backend import prebuilt_cpu_library; prebuilt_cpu_library()"
    out = run_env(code, DEEPLAB_CRF_TARGET="x86-64-v9")
    assert out.returncode != 0 and "DEEPLAB_CRF_TARGET=x86-64-v9" in out.stderr
    out = run_env(code + "; print('ok')", DEEPLAB_CRF_BUILD="runtime", DEEPLAB_CRF_TARGET="x86-64-v9")
    assert out.returncode == 0 and "ok" in out.stdout  # the run-time build asked for: no prebuilt looked at
