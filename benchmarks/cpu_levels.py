#!/usr/bin/env python3
"""The shipped CPU libraries, one per instruction-set level, against a -march=native build.

    python benchmarks/cpu_levels.py --json benchmarks/results/cpu_levels.json

Builds the libraries of this machine's platform as a wheel does (crf/build_kernels.py, zig), and
the run-time build (g++ -march=native, what a checkout compiles); times the CRF with each at
500x375 (a scikit-image photograph), 21 labels, 10 iterations, DeepLab's parameters, on all CPUs,
rounds alternating between the contenders; prints each median, its ratio to native, and whether
the results are bit-identical. The level the loader picks here is marked.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per contender (default 9)")
    ap.add_argument("--threads", type=int, help="threads of the CPU build (default: all CPUs)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    from crf import CRFParams
    from crf.cpu_kernels import CPUKernels
    from crf.cpu_library import build_cpu_library
    from crf.build_kernels import best_target, build_cpu_libraries, cpu_features, targets_for
    from crf.driver import DenseCRFDriver
    from benchmarking.inputs import photo, smooth_logits

    img = photo("astronaut", 500, 375)
    scores = smooth_logits(375, 500, 21, seed=500)
    params = CRFParams()
    with tempfile.TemporaryDirectory() as tmp:
        build_cpu_libraries(Path(tmp), platform.machine())
        libs = {"native (g++ -march=native)": build_cpu_library()}
        libs.update({t.name: Path(tmp) / t.filename for t in targets_for(platform.machine())
                     if t.needs <= cpu_features()})
        drivers = {name: DenseCRFDriver(CPUKernels(lib, threads=args.threads)) for name, lib in libs.items()}
        results = {name: d.run(scores, img, 375, 500, 21, params)[0] for name, d in drivers.items()}  # warm
        times: dict = {name: [] for name in drivers}
        for _ in range(args.rounds):
            for name, d in drivers.items():
                t = time.perf_counter()
                d.run(scores, img, 375, 500, 21, params)
                times[name].append((time.perf_counter() - t) * 1e3)
    native = "native (g++ -march=native)"
    base = statistics.median(times[native])
    picked = best_target().name
    rows = []
    print(f"CRF 500x375, 21 labels, 10 iterations, {args.threads or 'all'} thread(s), {args.rounds} rounds alternating")
    for name, t in times.items():
        med = statistics.median(t)
        same = bool(np.array_equal(results[name], results[native]))
        rows.append({"library": name, "median_ms": round(med, 1), "ratio_to_native": round(med / base, 3),
                     "bit_identical_to_native": same, "picked_here": name == picked})
        print(f"{name:28s} {med:8.1f} ms  {med / base:6.3f}x native  {'identical' if same else 'DIFFERENT'}"
              + ("   <- the loader's pick here" if name == picked else ""))
    if args.json:
        from runtime.output_files import write_bytes_atomically

        flags = cpu_features()
        doc = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
               "cpu_has": sorted(f for f in ("avx2", "fma", "avx512f", "avx512vl", "avx512_vnni") if f in flags),
               "command": "python benchmarks/cpu_levels.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "results": rows}
        write_bytes_atomically(args.json, (json.dumps(doc, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
