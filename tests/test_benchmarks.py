"""Benchmark helpers whose logic decides what a benchmark reports (not the benchmarks themselves)."""
from __future__ import annotations

import platform
import shutil
import subprocess

import pytest

from benchmarks.onnx_layer_profile import (ABOVE_PEAK, FMA_ISAS, cpu_flags, fma_loop_source, fma_peak_gmacs,
                                           format_share, share_of_peak, widest_fma_isa)

# Abridged `flags` lines of real CPUs.
SKYLAKE_X = "fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl"
EPYC_ZEN2 = "fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 sha_ni"
HASWELL_NO_FMA_FLAG = "fpu sse sse2 avx avx2"
SANDY_BRIDGE = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx"


def test_widest_fma_isa_from_flags():
    assert widest_fma_isa(SKYLAKE_X) == "avx512f"
    assert widest_fma_isa(EPYC_ZEN2) == "avx2"
    assert widest_fma_isa(HASWELL_NO_FMA_FLAG) is None  # AVX2 integer ops alone carry no FMA
    assert widest_fma_isa(SANDY_BRIDGE) is None
    assert widest_fma_isa("") is None
    # Whole flags, not substrings: other AVX-512 subsets or AMD's fma4 are not what the loop needs.
    assert widest_fma_isa("avx2 fma4 avx512vl avx512_bf16") is None
    assert widest_fma_isa("avx2 fma4 fma avx512vl") == "avx2"


def test_share_above_peak_is_flagged():
    assert share_of_peak(81.0, 97.8) == pytest.approx((82.82, False), abs=0.01)
    pct, above = share_of_peak(191.7, 97.8)
    assert above and pct == pytest.approx(196.0, abs=0.1)
    assert share_of_peak(97.8, 97.8)[1] is False  # exactly at the peak is possible
    assert format_share(81.0, 97.8) == "83%"
    assert format_share(191.7, 97.8) == "196%!"
    assert "peak measurement is wrong" in ABOVE_PEAK


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.parametrize("isa", sorted(FMA_ISAS))
def test_fma_loop_compiles_for_each_isa(isa, tmp_path):
    """Both loops compile on any x86-64 compiler, whether or not this CPU could run them."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 intrinsics")
    cc = shutil.which("cc") or shutil.which("gcc")
    src = tmp_path / "fma.c"
    src.write_text(fma_loop_source(isa))
    subprocess.run([cc, "-O2", *FMA_ISAS[isa]["cflags"], "-c", "-o", str(tmp_path / "fma.o"), str(src)], check=True)
    assert (tmp_path / "fma.o").stat().st_size > 0


def test_fma_peak_measures_this_cpus_widest_fma():
    expected = widest_fma_isa(cpu_flags())
    if expected is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no x86-64 FMA on this CPU")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    isa, gmacs = fma_peak_gmacs(threads=1, iters=200_000)
    assert isa == expected
    assert gmacs > 1.0  # any FMA unit does more than 1 GMAC/s on one thread
