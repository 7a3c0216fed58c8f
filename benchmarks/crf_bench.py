#!/usr/bin/env python3
"""Dense CRF benchmark: this toolkit's backends vs pydensecrf2, same image and parameters, one run.

    python benchmarks/crf_bench.py --json benchmarks/results/crf_cpu.json
    python benchmarks/crf_bench.py --threads 1        # the CPU build on one thread
    python benchmarks/crf_bench.py --contention 2     # with two busy processes on the same cores
    python benchmarks/crf_bench.py --regime hard      # colour bandwidth 3, 40 labels, spatial bandwidth 1

Sizes 500x375 and 1024x768 (scikit-image photographs resized), 21 labels, 10 iterations,
DeepLab-LargeFOV parameters with normalisation "after" (pydensecrf2 given the same). Reports the
median time of each backend (runs alternate between contenders), both for repeated calls of one
size (the spatial lattice, which depends on the size only, is kept between calls) and cold (nothing
kept), the speed-up over pydensecrf2, the split between lattice build and iterations, per-kernel
times (CUDA events on a GPU, wall time on the CPU), and the agreement (labels equal, max |dQ|)
with pydensecrf2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


SIZES = {"500x375": ("astronaut", 500, 375), "1024x768": ("coffee", 1024, 768), "2048x2048": ("coffee", 2048, 2048)}


def timed(fn, runs):
    out, times = None, []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return out, times


# "hard": many lattice vertices (a small colour bandwidth splits the bilateral lattice, a 1-pixel
# spatial bandwidth the spatial one) and wide label rows
REGIMES = {"default": ({}, 21), "hard": ({"bi_rgb_std": 3.0, "pos_xy_std": 1.0}, 40)}


def start_contenders(n: int) -> list:
    """n CPU-bound processes (pure busy loops) that share the cores with the benchmark."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_contenders(procs: list) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["500x375", "1024x768"], choices=list(SIZES),
                    help="2048x2048 (the largest size the kernels are specified for) is left out by default: ~2.3 GB")
    ap.add_argument("--backends", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu", "numpy"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--labels", type=int, help="default: 21, 40 in the hard regime")
    ap.add_argument("--regime", choices=list(REGIMES), default="default",
                    help="hard: colour bandwidth 3, spatial bandwidth 1, 40 labels")
    ap.add_argument("--threads", type=int, help="threads of the CPU build (1: single-threaded; default: all CPUs)")
    ap.add_argument("--contention", type=int, default=0, metavar="N",
                    help="run N busy CPU-bound processes for the duration of the measurement")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.contention < 0:
        ap.error("--contention must be 0 or more")
    if args.threads is not None and not 1 <= args.threads <= 256:
        ap.error("--threads must be from 1 to 256")
    overrides, default_labels = REGIMES[args.regime]
    args.labels = args.labels or default_labels
    contenders = start_contenders(args.contention)
    try:
        return run(args, overrides)
    finally:
        stop_contenders(contenders)


def run(args, overrides: dict) -> int:
    from crf import CRFParams, _driver, refine_unary
    from crf.gpu_kernels import gpu_available
    from crf.features import unary_from_scores
    from benchmarking.inputs import photo, pydensecrf_marginals, smooth_logits

    backends = [b for b in args.backends if b != "gpu" or gpu_available()]
    if "gpu" in args.backends and "gpu" not in backends:
        print("no GPU here (pycuda + CUDA device + nvcc): GPU numbers not measured")
    p = CRFParams(**overrides)
    if "cpu" in backends and args.threads is not None:
        _driver("cpu").k.threads = args.threads
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(), "regime": args.regime,
              "contention_processes": args.contention, "params": p.__dict__, "labels": args.labels, "sizes": {}}
    if "cpu" in backends:
        result["cpu_threads"] = _driver("cpu").k.threads
    if "gpu" in backends:
        import pycuda.driver as cuda

        result["gpu"] = cuda.Device(0).name()
    for size in args.sizes:
        name, w, h = SIZES[size]
        try:
            img = photo(name, w, h)
        except ImportError:  # no scikit-image (the GPU machine): a generated scene of the same size
            from scenes import make_scene

            img = make_scene(w, h, w)[0]
        unary = unary_from_scores(smooth_logits(h, w, args.labels, seed=w))
        entry: dict = {}
        # Warm up (compile / build once), then alternate the contenders run by run, so that the
        # machine's drift hits all of them alike.
        for b in backends:
            refine_unary(unary, img, p, backend=b)
        contenders = {b: (lambda b=b: refine_unary(unary, img, p, backend=b)) for b in backends}
        # "cold": nothing kept from the previous call (the spatial lattice, which depends on the
        # image size only, is otherwise reused by the next call of the same size).
        for b in [b for b in backends if b != "numpy"]:
            contenders[b + " cold"] = lambda b=b: (_driver(b).clear_cache(), refine_unary(unary, img, p, backend=b))[1]
        try:
            import pydensecrf.densecrf  # noqa: F401

            contenders = {"pydensecrf2": lambda: pydensecrf_marginals(unary, img, p), **contenders}
        except ImportError:
            print(f"{size}: pydensecrf2 not installed here: no reference timing or agreement")
        outs: dict = {}
        runs: dict = {name: [] for name in contenders}
        for _ in range(args.runs):
            for name, fn in contenders.items():
                outs[name], t = timed(fn, 1)
                runs[name] += t
        ref = outs.get("pydensecrf2")
        if ref is not None:
            t_ref = runs["pydensecrf2"]
            entry["pydensecrf2"] = {"median_ms": statistics.median(t_ref), "runs_ms": t_ref}
            print(f"{size}: pydensecrf2 {statistics.median(t_ref):9.1f} ms")
        for b in backends:
            q, t = outs[b], runs[b]
            e = {"median_ms": statistics.median(t), "runs_ms": t}
            if b + " cold" in runs:
                e["cold_median_ms"] = statistics.median(runs[b + " cold"])
                e["cold_runs_ms"] = runs[b + " cold"]
            if ref is not None:
                if "cold_median_ms" in e:
                    e["cold_speedup_vs_pydensecrf2"] = statistics.median(t_ref) / e["cold_median_ms"]
                e.update(speedup_vs_pydensecrf2=statistics.median(t_ref) / statistics.median(t),
                         labels_equal_pct=100 * float((q.argmax(0) == ref.argmax(0)).mean()),
                         max_abs_dq=float(np.abs(q - ref).max()))
            if b in ("cpu", "gpu"):
                drv = _driver(b)
                drv.phase_times, drv.k.profile = {}, {}
                refine_unary(unary, img, p, backend=b)
                e["phases_ms"] = drv.phase_times
                e["per_iteration_ms"] = drv.phase_times["iterations"] / p.iterations
                e["kernels_ms"] = {k: sum(v) for k, v in sorted(drv.k.kernel_times().items(), key=lambda kv: -sum(kv[1]))}
                e["lattice_vertices"] = dict(drv.last_vertices)
                e["pooled_bytes"] = drv.pooled_bytes()
                if b == "cpu":
                    # The GPU's choices run here (one label per thread, rows of exactly C labels,
                    # fixed-point splat, short scan chunks): its buffers, plus the image uploaded to the device (the
                    # CPU build reads the caller's array in place), and its agreement.
                    from crf.driver import DenseCRFDriver

                    gpu_layout = DenseCRFDriver(drv.k, "gpu")
                    qg, _ = gpu_layout.run(unary, img, h, w, args.labels, p, is_logits=False)
                    e["gpu_layout_bytes"] = gpu_layout.pooled_bytes() + h * w * 3
                    line = f"{size}: the GPU's choices run on the CPU: buffers {e['gpu_layout_bytes'] / 1e6:.1f} MB"
                    if ref is not None:
                        e["gpu_choices_labels_equal_pct"] = 100 * float((qg.argmax(0) == ref.argmax(0)).mean())
                        e["gpu_choices_max_abs_dq"] = float(np.abs(qg - ref).max())
                        line += (f", labels equal to pydensecrf2 {e['gpu_choices_labels_equal_pct']:.3f}%, "
                                 f"max |dQ| {e['gpu_choices_max_abs_dq']:.1e}")
                    print(line)
                drv.phase_times, drv.k.profile = None, None
            entry[b] = e
            extra = (f"  build {e['phases_ms']['lattice_build']:.1f} ms, {e['per_iteration_ms']:.2f} ms/iteration, "
                     f"{e['pooled_bytes'] / 1e6:.0f} MB" if "phases_ms" in e else "")
            vs = (f"{e['speedup_vs_pydensecrf2']:5.2f}x pydensecrf2, labels equal {e['labels_equal_pct']:.3f}%, "
                  f"max |dQ| {e['max_abs_dq']:.1e}" if ref is not None else "")
            print(f"{size}: {b:11s} {e['median_ms']:9.1f} ms  {vs}{extra}")
            if "cold_median_ms" in e:
                cold_vs = f"{e['cold_speedup_vs_pydensecrf2']:5.2f}x pydensecrf2" if ref is not None else ""
                print(f"{size}: {b + ' cold':11s} {e['cold_median_ms']:9.1f} ms  {cold_vs}  (nothing kept from the previous call)")
        result["sizes"][size] = entry
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
