"""Benchmark helpers whose logic decides what a benchmark reports (not the benchmarks themselves)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

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


def _cell(speedup, cold_ratio, build_ms, labels_pct=100.0, dq=1e-6):
    warm = 100.0
    return {"cpu": {"median_ms": warm, "cold_median_ms": warm * cold_ratio, "speedup_vs_pydensecrf2": speedup,
                    "phases_ms": {"lattice_build_cold": build_ms}, "labels_equal_pct": labels_pct, "max_abs_dq": dq}}


def test_crf_bench_judges_each_target_by_the_worst_cell():
    from benchmarks.crf_bench import TARGETS, judge

    result = {"cpu_threads": 2, "sizes": {
        "500x375": {"2": _cell(4.5, 1.10, 24.0), "21": _cell(3.9, 1.20, 23.0, labels_pct=99.9)},
        "1024x768": {"21": _cell(5.0, 1.05, 24.0 * 4.5, dq=2e-3)}}}
    verdicts = {t.split(" ")[0]: (measured, limit, met) for t, measured, limit, met in judge(result)}
    assert verdicts["speedup_all_cores"] == (3.9, TARGETS["speedup_all_cores"], False)  # one cell below 4x fails it
    assert verdicts["cold_over_warm"][0] == pytest.approx(1.20) and not verdicts["cold_over_warm"][2]
    assert verdicts["build_ms_500x375"] == (23.5, 25.0, True)  # the median over the label counts
    growth, pixels, met = verdicts["build_growth_500x375_to_1024x768"]
    assert growth == pytest.approx(24.0 * 4.5 / 23.5) and pixels == pytest.approx(1024 * 768 / (500 * 375)) and not met
    assert verdicts["labels_equal_pct"] == (99.9, 99.5, True)
    assert verdicts["max_abs_dq"] == (2e-3, 1e-3, False)


def test_crf_bench_one_thread_has_its_own_speedup_target_and_missing_numbers_are_not_judged():
    from benchmarks.crf_bench import judge

    cell = _cell(2.6, 1.0, 30.0)
    del cell["cpu"]["speedup_vs_pydensecrf2"], cell["cpu"]["labels_equal_pct"], cell["cpu"]["max_abs_dq"]
    names = [t.split(" ")[0] for t, *_ in judge({"cpu_threads": 1, "sizes": {"1024x768": {"7": cell}}})]
    assert names == ["cold_over_warm"]  # no pydensecrf2 numbers, no 500x375 build
    one = judge({"cpu_threads": 1, "sizes": {"500x375": {"7": _cell(2.6, 1.0, 30.0)}}})
    assert one[0][0].startswith("speedup_one_thread") and one[0][3] is True
    assert judge({"sizes": {}}) == []


def test_crf_bench_renders_a_saved_result_one_row_per_cell():
    from benchmarks.crf_bench import judge, markdown

    cell = _cell(3.0, 1.1, 30.0)
    cell["pydensecrf2"] = {"median_ms": 300.0}
    cell["cpu"].update(cold_speedup_vs_pydensecrf2=2.7, per_iteration_ms=6.0)
    result = {"cpu_threads": 2, "sizes": {"500x375": {"2": cell, "21": cell}}}
    result["targets"] = [{"target": t, "measured": m, "limit": lim, "met": met} for t, m, lim, met in judge(result)]
    table = markdown(result).splitlines()
    rows = [line for line in table if line.startswith("| 500x375")]
    assert [r.split(" | ")[1] for r in rows] == ["2", "21"]
    assert "**3.00x**" in rows[0] and "300 ms" in rows[0]
    assert sum("**not met**" in line for line in table) == 2  # the speed-up and the build; the rest met


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_crf_bench_holds_freed_memory_inside_the_process():
    # Held: a large array comes from the heap (below the program break), not from a fresh mmap that
    # free() would hand back to the kernel; and its memory is reused by the next one.
    code = """
import ctypes, sys
import numpy as np
sys.path.insert(0, "benchmarks")
from crf_bench import hold_freed_memory
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
def in_heap():
    a = np.empty(64 << 20, np.uint8)
    return a.ctypes.data < libc.sbrk(0), a.ctypes.data
before = in_heap()[0]
assert hold_freed_memory()
(first, at), (second, again) = in_heap(), in_heap()
print(before, first, second, at == again)
"""
    root = Path(__file__).resolve().parents[1]
    # glibc's malloc as configured by nothing but the call under test (no tunables, no other malloc)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root, env=env).stdout.split()
    assert out == ["False", "True", "True", "True"]


def test_crf_bench_without_mallopt_asks_for_freed_memory_release(monkeypatch, capsys):
    """A C library without glibc's mallopt (musl, macOS) cannot hold freed memory: the default
    --freed-memory hold is refused before anything is measured, naming the way out."""
    import ctypes

    from benchmarks import crf_bench

    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    monkeypatch.setattr(crf_bench, "run", lambda *a: pytest.fail("measured without holding freed memory"))
    with pytest.raises(SystemExit) as exit_info:
        crf_bench.main(["--sizes", "500x375", "--labels", "2"])
    assert exit_info.value.code == 2
    assert "--freed-memory release" in capsys.readouterr().err


def test_crf_bench_judges_cold_against_the_warm_call_of_the_same_round():
    from benchmarks.crf_bench import judge

    cell = _cell(4.5, 1.25, 24.0)  # medians 1.25 apart: a slow spell in the cold calls' rounds
    cell["cpu"]["cold_over_warm"] = 1.04  # but each cold call within 4 % of the warm call before it
    cold = [(m, met) for t, m, _, met in judge({"cpu_threads": 2, "sizes": {"500x375": {"2": cell}}})
            if t.startswith("cold_over_warm")]
    assert cold == [(1.04, True)]
