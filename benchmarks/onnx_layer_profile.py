#!/usr/bin/env python3
"""Where ONNX Runtime spends a DeepLab-LargeFOV forward on the CPU, layer by layer, against the
machine's measured FP32 multiply-add peak.

    python benchmarks/onnx_layer_profile.py --size 513 --json benchmarks/results/onnx_layer_profile_513.json

Per convolution: median kernel time over the runs (ONNX Runtime's own profiler), multiply-adds
(from the layer shapes), GMAC/s, and the share of the peak. The peak is measured here: a small C
loop of independent FMAs of the widest kind the CPU has (AVX-512F where /proc/cpuinfo lists it,
else AVX2 + FMA), compiled with the system C compiler and run on the same number of threads
(x86-64 and a C compiler only; otherwise it is left out). A convolution cannot beat that number,
so it bounds what any speed-up of ONNX Runtime could still come from; a share above 100 % is
flagged, as it means the peak was measured wrong.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


from benchmarking.environment import cpu_flags  # this CPU's feature list, '' where unknown

# One register-only loop, written once and instantiated per vector width: 12 independent FMA
# chains keep two FMA pipes busy through the FMA latency (2 x 5 in flight).
FMA_LOOP = r"""
#include <immintrin.h>
#define STEP(a) a = {fmadd}(a, x, y)
float fma_loop(long iters)
{{
    const {vec} x = {set1}(0.999999f), y = {set1}(1e-7f);
    {vec} a0 = {set1}(0.f), a1 = {set1}(1.f), a2 = {set1}(2.f), a3 = {set1}(3.f);
    {vec} a4 = {set1}(4.f), a5 = {set1}(5.f), a6 = {set1}(6.f), a7 = {set1}(7.f);
    {vec} a8 = {set1}(8.f), a9 = {set1}(9.f), a10 = {set1}(10.f), a11 = {set1}(11.f);
    for (long i = 0; i < iters; i++) {{
        STEP(a0); STEP(a1); STEP(a2); STEP(a3); STEP(a4); STEP(a5);
        STEP(a6); STEP(a7); STEP(a8); STEP(a9); STEP(a10); STEP(a11);
    }}
    {vec} s = {add}({add}({add}(a0, a1), {add}(a2, a3)), {add}({add}(a4, a5), {add}(a6, a7)));
    s = {add}(s, {add}({add}(a8, a9), {add}(a10, a11)));
    float out[{lanes}];
    {store}(out, s);
    return out[0];
}}
"""
FMA_CHAINS = 12

# Widest first: the peak is the widest FMA the CPU has, or a convolution can "beat" it.
FMA_ISAS = {
    "avx512f": dict(vec="__m512", fmadd="_mm512_fmadd_ps", set1="_mm512_set1_ps", add="_mm512_add_ps",
                    store="_mm512_storeu_ps", lanes=16, cflags=["-mavx512f"]),
    "avx2": dict(vec="__m256", fmadd="_mm256_fmadd_ps", set1="_mm256_set1_ps", add="_mm256_add_ps",
                 store="_mm256_storeu_ps", lanes=8, cflags=["-mavx2", "-mfma"]),
}

ABOVE_PEAK = "above the measured peak: the peak measurement is wrong"


def widest_fma_isa(cpu_flags: str) -> str | None:
    """The widest FP32 FMA in a CPU flags string (as /proc/cpuinfo's `flags` line lists them):
    'avx512f', 'avx2' (needs the separate `fma` flag too) or None."""
    flags = set(cpu_flags.split())
    if "avx512f" in flags:  # AVX-512F includes the 512-bit FMAs
        return "avx512f"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return None


def fma_loop_source(isa: str) -> str:
    return FMA_LOOP.format(**FMA_ISAS[isa])


def share_of_peak(rate: float, peak: float) -> tuple[float, bool]:
    """(percent of the peak, whether it is above 100 %: impossible for a real peak)."""
    pct = 100.0 * rate / peak
    return pct, pct > 100.0


def format_share(rate: float, peak: float) -> str:
    """'83%', or '196%!' for a rate above the measured peak (the '!' is explained under the table)."""
    pct, above = share_of_peak(rate, peak)
    return f"{pct:.0f}%!" if above else f"{pct:.0f}%"


def fma_peak_gmacs(threads: int, iters: int = 20_000_000) -> tuple[str, float] | None:
    """(ISA measured, FP32 FMA throughput in G multiply-adds/s of `threads` threads), or None
    where there is no x86-64 FMA or no C compiler."""
    import platform
    import time
    from concurrent.futures import ThreadPoolExecutor

    cc = shutil.which("cc") or shutil.which("gcc")
    isa = widest_fma_isa(cpu_flags())
    if platform.machine() not in ("x86_64", "AMD64") or cc is None or isa is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "fma.c", Path(tmp) / "libfma.so"
        src.write_text(fma_loop_source(isa))
        subprocess.run([cc, "-O2", *FMA_ISAS[isa]["cflags"], "-ffp-contract=off", "-shared", "-fPIC",
                        "-o", str(lib), str(src)], check=True)
        fn = ctypes.CDLL(str(lib)).fma_loop  # ctypes releases the GIL during the call
        fn.argtypes, fn.restype = [ctypes.c_long], ctypes.c_float
        best = 0.0
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(3):
                t = time.perf_counter()
                list(pool.map(fn, [iters] * threads))
                best = max(best, threads * iters * FMA_CHAINS * FMA_ISAS[isa]["lanes"]
                           / (time.perf_counter() - t) / 1e9)
        return isa, best


def conv_macs(net, size: int) -> list[tuple[str, float]]:
    """(layer name, multiply-adds) of every convolution, in execution order, for one size x size image."""
    import torch

    out: list[tuple[str, float]] = []
    names = {m: n for n, m in net.named_modules()}

    def hook(m, _inp, y):
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        out.append((names[m], float(y.numel() * k)))

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        net(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from onnx_vs_pytorch import he_initialised_largefov
    from export.onnx_export import export_onnx

    net = he_initialised_largefov()
    layers = conv_macs(net, args.size)
    x = np.random.default_rng(0).integers(0, 256, (1, args.size, args.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net, Path(tmp) / "largefov.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort_profile")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(args.runs + 1):  # the first run is a warm-up, left out below
            sess.run(None, {"image": x})
        events = json.loads(Path(sess.end_profiling()).read_text())

    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per_node[(ev["name"][: -len("_kernel_time")], ev["args"].get("op_name", "?"))].append(ev["dur"] / 1e3)
    nodes = [(name, op, float(np.median(t[1:] if len(t) > 1 else t))) for (name, op), t in per_node.items()]
    convs = [n for n in nodes if n[1] == "Conv"]
    if len(convs) != len(layers):
        print(f"{len(convs)} Conv nodes in the optimised graph for {len(layers)} convolutions: no per-layer MACs")
        return 1
    measured = fma_peak_gmacs(args.threads)
    isa, peak = measured if measured else (None, None)
    above_peak = []
    rows = []
    print(f"DeepLab-LargeFOV {args.size}x{args.size}, ONNX Runtime {ort.__version__}, {args.threads} threads, "
          f"median of {args.runs} runs")
    print(f"{'layer':8s} {'ms':>8s} {'GMAC':>7s} {'GMAC/s':>8s}" + (f" {'of peak':>8s}" if peak else ""))
    for (layer, macs), (_, _, ms) in zip(layers, convs):
        rate = macs / ms / 1e6
        row = {"layer": layer, "ms": ms, "gmac": macs / 1e9, "gmac_per_s": rate}
        if peak:
            row["percent_of_peak"], row["above_peak"] = share_of_peak(rate, peak)
            if row["above_peak"]:
                above_peak.append(layer)
        rows.append(row)
        print(f"{layer:8s} {ms:8.1f} {macs / 1e9:7.2f} {rate:8.1f}" + (f" {format_share(rate, peak):>8s}" if peak else ""))
    conv_ms = sum(r["ms"] for r in rows)
    total_ms = sum(n[2] for n in nodes)
    gmac = sum(r["gmac"] for r in rows)
    print(f"convolutions {conv_ms:.0f} ms of {total_ms:.0f} ms, {gmac:.1f} GMAC at {gmac / conv_ms * 1e3:.1f} GMAC/s")
    if peak:
        print(f"measured FP32 FMA peak ({isa} loop) on {args.threads} threads: {peak:.1f} GMAC/s "
              f"(convolutions at {format_share(gmac / conv_ms * 1e3, peak)} of it)")
        if above_peak:
            print(f"! {', '.join(above_peak)} {ABOVE_PEAK}")
    else:
        print("FMA peak not measured here (needs x86-64 with AVX-512F or AVX2 + FMA, and a C compiler)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "size": args.size, "threads": args.threads, "onnxruntime": ort.__version__, "runs": args.runs,
            "layers": rows, "conv_ms": conv_ms, "all_nodes_ms": total_ms, "gmac": gmac, "fma_peak_gmac_per_s": peak,
            "fma_isa": isa, "layers_above_peak": above_peak,
            "other_nodes": [{"name": n, "op": op, "ms": ms} for n, op, ms in nodes if op != "Conv"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
