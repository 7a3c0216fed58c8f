#!/usr/bin/env python3
"""Dense CRF benchmark: this toolkit's backends vs pydensecrf2, same images and parameters, one run.

    python benchmarks/crf_bench.py --json out/crf_grid.json                  # the grid, both cores
    python benchmarks/crf_bench.py --threads 1 --json out/crf_grid_1t.json   # the CPU build on one thread
    python benchmarks/crf_bench.py --regime hard --labels 40                 # colour bandwidth 3, spatial 1
    python benchmarks/crf_bench.py --sizes 500x375 --labels 21 --instructions   # + callgrind counts
    python benchmarks/crf_bench.py --contention 2     # with two busy processes on the same cores
    python benchmarks/crf_bench.py --freed-memory release   # freed arrays go back to the kernel (see below)

A grid of label counts (default 2, 7, 21, 40, 60) and sizes (500x375 and 1024x768, scikit-image
photographs resized), 10 iterations, DeepLab-LargeFOV's parameters with normalisation "after"
(pydensecrf2 given the same). For each cell: the median time of each contender (runs alternate
between them, so that the machine's drift hits all alike, and each round runs every cell once, so
that a slow spell hits one run of many cells rather than all runs of one), warm (the spatial
lattice, which depends on the size and label count only, kept from an untimed call of the same
cell just before) and cold (nothing kept); the speed-up over
pydensecrf2; the split between lattice build and iterations; per-kernel times (CUDA events on a
GPU, wall time on the CPU); the agreement (labels equal, max |dQ|) with pydensecrf2. Then each of
the CPU targets (see TARGETS) is judged, met or not, from the numbers of this run.
``--instructions`` adds the instructions of one cold call inside the kernel library (callgrind,
one thread: the same count on a busy machine), for each size at 21 labels or the first label count,
with the library built for x86-64-v3 (AVX2 + FMA: valgrind runs no AVX-512), so that counts from
different machines compare.
By default the memory every contender frees stays inside the process (glibc: no mmap, no trim;
``--freed-memory hold``) rather than going back to the kernel. On a VM whose guest reports free
pages to its host (virtio-balloon free page reporting, e.g. Firecracker), memory handed back is
discarded by the host, and touching it again costs ~2 ms per MB: pydensecrf2, which allocates its
arrays anew on every call, then took 5.8 s instead of 4.3-4.9 s at 1024x768 with 60 labels, and a
fresh 189 MB marginals array 50 or 400 ms by chance. Holding it measures the CRFs as on a machine
whose freed memory stays warm; ``--freed-memory release`` measures as before. Recorded in the result.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"500x375": ("astronaut", 500, 375), "1024x768": ("coffee", 1024, 768), "2048x2048": ("coffee", 2048, 2048)}
LABELS = (2, 7, 21, 40, 60)

# "hard": many lattice vertices (a small colour bandwidth splits the bilateral lattice, a 1-pixel
# spatial bandwidth the spatial one)
REGIMES = {"default": {}, "hard": {"bi_rgb_std": 3.0, "pos_xy_std": 1.0}}

#: The CPU build's targets, judged from one run: the speed-up over pydensecrf2, warm, on every cell
#: (both cores, or one thread); a cold call against a warm one; the lattice build at 500x375 and
#: its growth with the pixel count; the agreement with pydensecrf2.
TARGETS = {"speedup_all_cores": 4.0, "speedup_one_thread": 2.5, "cold_over_warm": 1.15,
           "build_ms_500x375": 25.0, "labels_equal_pct": 99.5, "max_abs_dq": 1e-3}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1e3


def hold_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process: one arena for every thread (other
    threads' arenas serve large blocks by mmap and unmap whole heaps whatever the settings), no
    allocation served by mmap (whose free is an munmap) and no trimming of the heap's top. False
    where that is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    return (bool(mallopt(m_arena_max, 1)) and bool(mallopt(m_mmap_max, 0))
            and bool(mallopt(m_trim_threshold, 2**31 - 1)))


def free_page_reporting() -> bool:
    """Whether this virtual machine reports free pages to its host, which discards them: a
    virtio balloon bound to its driver with the reporting feature (bit 5, VIRTIO_BALLOON_F_REPORTING)."""
    for device in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*"):
        try:
            features = (device / "features").read_text().strip()
        except OSError:
            continue
        if len(features) > 5 and features[5] == "1":
            return True
    return False


def start_contenders(n: int) -> list:
    """n CPU-bound processes (pure busy loops) that share the cores with the benchmark."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_contenders(procs: list) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait()


def judge(result: dict) -> list:
    """[(target, measured, limit, met)] for the CPU build's targets from a run's result: the
    smallest speed-up of any cell (warm), the largest cold/warm ratio, the lattice build at 500x375,
    its growth against the pixel count's from 500x375 to the largest size measured (medians over
    the label counts), and the worst agreement. Targets this run has no numbers for are left out."""
    cells = [(size, labels, e["cpu"]) for size, by_labels in result["sizes"].items()
             for labels, e in by_labels.items() if "cpu" in e]
    if not cells:
        return []
    out = []
    one_thread = result.get("cpu_threads") == 1
    name = "speedup_one_thread" if one_thread else "speedup_all_cores"
    speedups = [(e["speedup_vs_pydensecrf2"], f"{s} {c} labels") for s, c, e in cells if "speedup_vs_pydensecrf2" in e]
    if speedups:
        worst, where = min(speedups)
        out.append((f"{name} (worst: {where})", worst, TARGETS[name], worst >= TARGETS[name]))
    # a cold call against the warm call just before it, in the same round (the median over the
    # rounds); results saved before runs were paired: the ratio of the medians
    cold = [(e.get("cold_over_warm", e["cold_median_ms"] / e["median_ms"]), f"{s} {c} labels")
            for s, c, e in cells if "cold_median_ms" in e]
    if cold:
        worst, where = max(cold)
        out.append((f"cold_over_warm (worst: {where})", worst, TARGETS["cold_over_warm"],
                    worst <= TARGETS["cold_over_warm"]))
    # the build does not depend on the label count: one sample per cell, their median per size
    builds = {s: statistics.median(e["phases_ms"]["lattice_build_cold"] for s2, _, e in cells if s2 == s)
              for s, _, _ in cells}
    if "500x375" in builds:
        out.append(("build_ms_500x375 (cold: both lattices)", builds["500x375"], TARGETS["build_ms_500x375"],
                    builds["500x375"] <= TARGETS["build_ms_500x375"]))
        largest = max(builds, key=lambda s: SIZES[s][1] * SIZES[s][2])
        if largest != "500x375":
            pixels = SIZES[largest][1] * SIZES[largest][2] / (500 * 375)
            growth = builds[largest] / builds["500x375"]
            out.append((f"build_growth_500x375_to_{largest} (pixels x{pixels:.2f})", growth, pixels, growth <= pixels))
    agree = [(e["labels_equal_pct"], e["max_abs_dq"]) for _, _, e in cells if "labels_equal_pct" in e]
    if agree:
        labels_pct, dq = min(a for a, _ in agree), max(d for _, d in agree)
        out.append(("labels_equal_pct (worst)", labels_pct, TARGETS["labels_equal_pct"],
                    labels_pct >= TARGETS["labels_equal_pct"]))
        out.append(("max_abs_dq (worst)", dq, TARGETS["max_abs_dq"], dq <= TARGETS["max_abs_dq"]))
    return out


def markdown(result: dict) -> str:
    """A saved result as a markdown table (one row per cell) and its target verdicts."""
    rows = ["| size | labels | pydensecrf2 | warm | speed-up | cold | speed-up | build (cold) | per iteration "
            "| labels equal | max \\|ΔQ\\| |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, by_labels in result["sizes"].items():
        for labels, e in by_labels.items():
            cpu, ref = e.get("cpu", {}), e.get("pydensecrf2", {}).get("median_ms")
            rows.append(f"| {size} | {labels} | {ref:.0f} ms | {cpu['median_ms']:.0f} ms | "
                        f"**{cpu.get('speedup_vs_pydensecrf2', float('nan')):.2f}x** | {cpu['cold_median_ms']:.0f} ms | "
                        f"{cpu.get('cold_speedup_vs_pydensecrf2', float('nan')):.2f}x | "
                        f"{cpu['phases_ms']['lattice_build_cold']:.0f} ms | {cpu['per_iteration_ms']:.1f} ms | "
                        f"{cpu.get('labels_equal_pct', float('nan')):.3f} % | {cpu.get('max_abs_dq', float('nan')):.1e} |")
    verdicts = [f"{t['target']}: {t['measured']:.4g} (limit {t['limit']:.4g}) {'met' if t['met'] else '**not met**'}"
                for t in result.get("targets", [])]
    return "\n".join(rows + [""] + [f"- {v}" for v in verdicts])


# One cold call of the CPU build on one thread, run under callgrind with collection switched on only
# inside the kernel launchers (Launcher<...>: cpu_launch.cpp): the instructions of the kernels, not of Python.
_ONE_CALL = """
import sys
from crf.cpu_kernels import CPUKernels
from crf.driver import DenseCRFDriver
from crf.params import CRFParams
from benchmarking.inputs import photo, smooth_logits
name, w, h, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
img = photo(name, w, h)
k = CPUKernels(library=sys.argv[6], threads=1)
DenseCRFDriver(k).run(smooth_logits(h, w, c, seed=w), img, h, w, c, CRFParams(**eval(sys.argv[5])))
"""


def x86_64_v3_library(directory: Path) -> Path | None:
    """The kernels built by g++ for x86-64-v3 into ``directory`` (None without g++ or off x86-64)."""
    from crf.build_kernels import COMMON_FLAGS, KERNEL_DIR

    cxx = shutil.which("g++")
    if cxx is None or platform.machine() != "x86_64":
        return None
    lib = directory / "libdensecrf_x86-64-v3.so"
    subprocess.run([cxx, *COMMON_FLAGS, "-march=x86-64-v3", "-o", str(lib), str(KERNEL_DIR / "cpu_launch.cpp")],
                   check=True)
    return lib


def callgrind_instructions(size: str, labels: int, overrides: dict, library: Path) -> int | None:
    """Instructions executed inside ``library`` by one cold call (None without valgrind)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None
    name, w, h = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run([valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", "--toggle-collect=*Launcher<*",
                        sys.executable, "-c", _ONE_CALL, name, str(w), str(h), str(labels), repr(overrides),
                        str(library)], check=True, capture_output=True, text=True)
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["500x375", "1024x768"], choices=list(SIZES),
                    help="2048x2048 (the largest size the kernels are specified for) is left out by default: ~2.3 GB "
                         "for the CRF, and every cell's inputs are held for the whole run (~0.5 GB for the default grid, "
                         "~2.2 GB more with 2048x2048)")
    ap.add_argument("--labels", nargs="+", type=int, default=list(LABELS), help="label counts (default: %(default)s)")
    ap.add_argument("--backends", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu", "numpy"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--regime", choices=list(REGIMES), default="default",
                    help="hard: colour bandwidth 3, spatial bandwidth 1")
    ap.add_argument("--threads", type=int, help="threads of the CPU build (1: single-threaded; default: all CPUs)")
    ap.add_argument("--contention", type=int, default=0, metavar="N",
                    help="run N busy CPU-bound processes for the duration of the measurement")
    ap.add_argument("--freed-memory", choices=["hold", "release"], default="hold",
                    help="hold: memory freed by any contender stays in the process (glibc); release: it goes "
                         "back to the kernel (default: %(default)s; see above)")
    ap.add_argument("--instructions", action="store_true", help="also count instructions with callgrind (slow)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--markdown", metavar="RESULT_JSON", help="print a saved result as a markdown table, measure nothing")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.contention < 0:
        ap.error("--contention must be 0 or more")
    if args.threads is not None and not 1 <= args.threads <= 256:
        ap.error("--threads must be from 1 to 256")
    if any(not 1 <= c <= 256 for c in args.labels):
        ap.error("--labels must be from 1 to 256")
    if args.runs < 1:
        ap.error("--runs must be 1 or more")
    if args.freed_memory == "hold" and not hold_freed_memory():
        ap.error("--freed-memory hold needs glibc's mallopt: pass --freed-memory release")
    contenders = start_contenders(args.contention)
    try:
        return run(args, REGIMES[args.regime])
    finally:
        stop_contenders(contenders)


class Cell:
    """One (size, label count): its inputs and its contenders, timed a run at a time by run_rounds."""

    def __init__(self, size: str, labels: int, backends: list, p):
        from crf import _driver, refine_unary
        from crf.features import unary_from_scores
        from benchmarking.inputs import photo, pydensecrf_marginals, smooth_logits

        self.size, self.labels, self.backends, self.p = size, labels, backends, p
        name, w, h = SIZES[size]
        try:
            img = photo(name, w, h)
        except ImportError:  # no scikit-image (the GPU machine): a generated scene of the same size
            from scenes import make_scene

            img = make_scene(w, h, w)[0]
        self.img, self.unary = img, unary_from_scores(smooth_logits(h, w, labels, seed=w))
        unary = self.unary
        for b in backends:  # warm up (compile / build once)
            refine_unary(unary, img, p, backend=b)
        self.contenders = {b: (lambda b=b: refine_unary(unary, img, p, backend=b)) for b in backends}
        # Before each run of this cell, an untimed call of each compiled backend: the spatial lattice,
        # which depends on the size and label count only, is then the one a warm call keeps.
        self.prepare = [self.contenders[b] for b in backends if b != "numpy"]
        # "cold": nothing kept from the previous call
        for b in [b for b in backends if b != "numpy"]:
            self.contenders[b + " cold"] = lambda b=b: (_driver(b).clear_cache(),
                                                        refine_unary(unary, img, p, backend=b))[1]
        try:
            import pydensecrf.densecrf  # noqa: F401

            self.contenders = {"pydensecrf2": lambda: pydensecrf_marginals(unary, img, p), **self.contenders}
        except ImportError:
            print(f"{size}: pydensecrf2 not installed here: no reference timing or agreement")
        self.times: dict = {name: [] for name in self.contenders}
        self.agreement: dict = {}

    def run_once(self, last: bool) -> None:
        """One run of every contender, in turn (the untimed preparation first); on the last run, the
        agreement of each backend's marginals with pydensecrf2's."""
        for fn in self.prepare:
            fn()
        outs = {}
        for name, fn in self.contenders.items():
            out, t = timed(fn)
            self.times[name].append(t)
            if last and (name == "pydensecrf2" or name in self.backends):
                outs[name] = out
        ref = outs.get("pydensecrf2")
        if ref is not None:
            for b in self.backends:
                self.agreement[b] = {"labels_equal_pct": 100 * float((outs[b].argmax(0) == ref.argmax(0)).mean()),
                                     "max_abs_dq": float(np.abs(outs[b] - ref).max())}


def run_rounds(cells: list, runs: int) -> None:
    """runs rounds, each one run of every cell: a slow spell of the machine (on a shared VM they come
    and go over minutes) hits one run of many cells rather than every run of one cell."""
    for r in range(runs):
        t0 = time.perf_counter()
        for cell in cells:
            cell.run_once(last=r == runs - 1)
        print(f"round {r + 1}/{runs}: {time.perf_counter() - t0:.0f} s", flush=True)


def measure_cell(cell: Cell) -> dict:
    """The medians of a cell's runs, the speed-ups, the agreement, and the CPU / GPU details."""
    from crf import _driver, refine_unary

    unary, img, p, times = cell.unary, cell.img, cell.p, cell.times
    entry: dict = {}
    if "pydensecrf2" in times:
        entry["pydensecrf2"] = {"median_ms": statistics.median(times["pydensecrf2"]), "runs_ms": times["pydensecrf2"]}
    for b in cell.backends:
        t = times[b]
        e = {"median_ms": statistics.median(t), "runs_ms": t}
        if b + " cold" in times:
            e["cold_median_ms"] = statistics.median(times[b + " cold"])
            e["cold_runs_ms"] = times[b + " cold"]
            # paired: each cold call against the warm call of the same round (a slow spell hits both alike)
            e["cold_over_warm"] = statistics.median(c / w for w, c in zip(t, times[b + " cold"]))
        if "pydensecrf2" in entry:
            t_ref = entry["pydensecrf2"]["median_ms"]
            e["speedup_vs_pydensecrf2"] = t_ref / e["median_ms"]
            # for information (the target is judged on the medians): each run against pydensecrf2's
            # run of the same round
            e["speedup_paired"] = statistics.median(r / x for r, x in zip(times["pydensecrf2"], t))
            if "cold_median_ms" in e:
                e["cold_speedup_vs_pydensecrf2"] = t_ref / e["cold_median_ms"]
            e.update(cell.agreement.get(b, {}))
        if b in ("cpu", "gpu"):
            drv = _driver(b)
            builds = []
            for _ in range(3):  # cold: both lattices built; the median of three
                drv.clear_cache()
                drv.phase_times = {}
                refine_unary(unary, img, p, backend=b)
                builds.append(drv.phase_times["lattice_build"])
            cold_build = statistics.median(builds)
            drv.phase_times, drv.k.profile = {}, {}
            refine_unary(unary, img, p, backend=b)  # warm, per kernel
            e["phases_ms"] = dict(drv.phase_times, lattice_build_cold=cold_build)
            e["per_iteration_ms"] = drv.phase_times["iterations"] / max(p.iterations, 1)
            e["kernels_ms"] = {k: sum(v) for k, v in sorted(drv.k.kernel_times().items(), key=lambda kv: -sum(kv[1]))}
            e["lattice_vertices"] = dict(drv.last_vertices)
            e["pooled_bytes"] = drv.pooled_bytes()
            drv.phase_times, drv.k.profile = None, None
        entry[b] = e
    return entry


def run(args, overrides: dict) -> int:
    from crf import CRFParams, _driver
    from crf.gpu_kernels import gpu_available

    backends = [b for b in args.backends if b != "gpu" or gpu_available()]
    if "gpu" in args.backends and "gpu" not in backends:
        print("no GPU here (pycuda + CUDA device + nvcc or the shipped fatbin): GPU numbers not measured")
    p = CRFParams(**overrides)
    if "cpu" in backends and args.threads is not None:
        _driver("cpu").k.threads = args.threads
    result: dict = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(), "regime": args.regime,
                    "contention_processes": args.contention, "freed_memory": args.freed_memory,
                    "free_page_reporting": free_page_reporting(), "params": p.__dict__, "sizes": {}}
    if "cpu" in backends:
        from crf import cpu_library

        result["cpu_threads"] = _driver("cpu").k.threads
        result["cpu_library"] = cpu_library.cpu_library_source
        from crf.build_kernels import cpu_features

        flags = cpu_features()
        result["cpu_simd"] = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    if "gpu" in backends:
        import pycuda.driver as cuda

        result["gpu"] = cuda.Device(0).name()
    header = f"{'size':9s} {'labels':>6s} {'pydensecrf2':>11s} " + " ".join(
        f"{b + ' warm':>10s} {'x':>5s} {b + ' cold':>10s} {'x':>5s}" for b in backends) + "  build(cold) iter  agree"
    cells = [Cell(size, labels, backends, p) for size in args.sizes for labels in args.labels]
    run_rounds(cells, args.runs)
    print(header)
    for cell in cells:
        size, labels = cell.size, cell.labels
        e = result["sizes"].setdefault(size, {})[str(labels)] = measure_cell(cell)
        ref = e.get("pydensecrf2", {}).get("median_ms")
        line = f"{size:9s} {labels:6d} {ref if ref is not None else float('nan'):11.1f} "
        for b in backends:
            be = e[b]
            line += (f"{be['median_ms']:10.1f} {be.get('speedup_vs_pydensecrf2', float('nan')):5.2f} "
                     f"{be.get('cold_median_ms', float('nan')):10.1f} "
                     f"{be.get('cold_speedup_vs_pydensecrf2', float('nan')):5.2f} ")
        cpu = e.get("cpu")
        if cpu is not None:
            line += f" {cpu['phases_ms']['lattice_build_cold']:6.1f} ms {cpu['per_iteration_ms']:5.2f} ms"
            if "labels_equal_pct" in cpu:
                line += f"  {cpu['labels_equal_pct']:.3f}% {cpu['max_abs_dq']:.1e}"
        print(line, flush=True)
    if args.instructions and "cpu" in backends:
        with tempfile.TemporaryDirectory() as tmp:
            lib = x86_64_v3_library(Path(tmp))
            counts: dict = {}
            for size in args.sizes if lib is not None else []:
                labels = 21 if 21 in args.labels else args.labels[0]
                n = callgrind_instructions(size, labels, overrides, lib)
                if n is None:
                    break
                counts[f"{size} {labels} labels"] = n
                print(f"instructions in the x86-64-v3 kernels, one cold call on one thread, {size}, {labels} labels: "
                      f"{n / 1e6:.0f} M")
            if not counts:
                print("no instruction counts: they need valgrind, g++ and an x86-64 machine")
            result["instructions_one_cold_call_x86_64_v3"] = counts
    result["targets"] = [{"target": t, "measured": m, "limit": lim, "met": met} for t, m, lim, met in judge(result)]
    for t in result["targets"]:
        print(f"target {t['target']}: {t['measured']:.4g} (limit {t['limit']:.4g}) {'MET' if t['met'] else 'NOT MET'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
