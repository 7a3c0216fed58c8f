#!/usr/bin/env python3
"""The GPU report: CRF timings on the device, launch overhead, memory, and the device-resident
pipeline (PyTorch network on CUDA -> CRF kernels on the same stream -> uint8 labels).

    PYTHONPATH=$PWD python benchmarks/gpu_report.py --json out/gpu_report.json   # on a GPU machine, from a checkout
    PYTHONPATH=$PWD python benchmarks/gpu_report.py --device cpu --runs 3 --pipeline-runs 5   # same code, CPU build

CRF (21 labels, 10 iterations, DeepLab-LargeFOV parameters) at 500x375 and 1024x768 with the scores
and image already in device memory and the labels as output: total per call from CUDA events
(repeated = spatial lattice kept; cold = nothing kept), with the mean-field iterations replayed as
a CUDA graph and launched kernel by kernel; the lattice build / iterations split (synchronised
phases); per-kernel totals (CUDA events, one call); launches per call and the host time per
launch; device memory (pooled buffers and the drop in free memory). The CPU build of the same
kernels at the same sizes gives the ratio. The pipeline: >= 100 calls on a generated 500x375 scene,
p50/p90/p99 per stage (network, CRF incl. labels download, total) and of the unsynchronised total.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SIZES = {"500x375": (375, 500), "1024x768": (768, 1024)}


from onnx_vs_pytorch import stats as pct  # (min, mean, median, p90, p99, max, runs); a sibling script


class Timer:
    """Milliseconds between two points of the stream (CUDA events), or of the host clock on the CPU."""

    def __init__(self, kernels):
        self.k = kernels

    def __call__(self, fn) -> float:
        if self.k.name != "gpu":
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        cuda = self.k.cuda
        with self.k.active():
            start, end = cuda.Event(), cuda.Event()
            start.record(self.k.stream)
            fn()
            end.record(self.k.stream)
            end.synchronize()
            return start.time_till(end)


def versions(device: str) -> dict:
    import torch

    v = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "python": platform.python_version(),
         "torch": torch.__version__, "numpy": np.__version__}
    if device == "cuda":
        import pycuda

        from crf.gpu_kernels import gpu_identity, import_pycuda

        gpu = gpu_identity()
        drv = import_pycuda().get_driver_version()
        v.update(gpu=gpu.name if gpu else None, compute_capability=gpu.compute_capability if gpu else None,
                 cuda_driver_api=f"{drv // 1000}.{drv % 1000 // 10}", pycuda=pycuda.VERSION_TEXT)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
            v["nvidia_driver"] = smi
        except (OSError, subprocess.SubprocessError):
            pass
        try:
            nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout
            v["nvcc"] = nvcc.strip().splitlines()[-1]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return v


def crf_report(kernels, size: str, runs: int) -> dict:
    from crf import CRFParams
    from crf.driver import DenseCRFDriver
    from benchmarking.inputs import smooth_logits
    from scenes import make_scene

    h, w = SIZES[size]
    c, p = 21, CRFParams()
    img = make_scene(5, h, w)[0]
    scores = smooth_logits(h, w, c, seed=w)
    k = kernels
    free = (lambda: k.cuda.mem_get_info()[0]) if k.name == "gpu" else (lambda: 0)
    with k.active():
        free0 = free()
        drv = DenseCRFDriver(k)
        s_buf, i_buf = k.alloc(scores.nbytes), k.alloc(img.nbytes)  # device-resident inputs, as a pipeline has them
        k.upload(s_buf, scores)
        k.upload(i_buf, img)

        def call():
            return drv.run(s_buf, i_buf, h, w, c, p, marginals=False, labels=True)

        labels = call()[1]  # compiles / builds once
        timer = Timer(k)
        out: dict = {"labels_shape": list(labels.shape)}
        graphs_available = getattr(k, "use_graphs", False)
        modes = [("graph", True), ("launches", False)] if graphs_available else [("launches", False)]
        for mode, use_graphs in modes:
            if graphs_available:
                k.use_graphs = use_graphs
            call()
            rep, cold = [], []
            for _ in range(runs):  # alternate repeated and cold calls: drift hits both alike
                rep.append(timer(call))
                drv.clear_cache()
                cold.append(timer(call))
            l0, g0 = k.launches, k.graph_launches
            call()
            out[mode] = {"repeated_ms": pct(rep), "cold_ms": pct(cold), "launch_calls_per_call": k.launches - l0,
                         "graph_launches_per_call": k.graph_launches - g0}
        if graphs_available:
            k.use_graphs = True
            out["graph_error"] = k.graph_error
        # Host time per launch: issue one iteration's prepared launches 20 times without waiting.
        iteration = drv.last_iteration
        t = time.perf_counter()
        for _ in range(20):
            for launch in iteration:
                launch()
        host = (time.perf_counter() - t) * 1e3
        k.synchronize()
        out["host_us_per_launch"] = host * 1e3 / (20 * len(iteration))
        out["launches_per_iteration"] = len(iteration)
        # Phases (synchronised between phases) and per-kernel totals (one call, events per kernel).
        drv.clear_cache()
        drv.phase_times = {}
        call()
        out["cold_phases_ms"] = dict(drv.phase_times)
        drv.phase_times, k.profile = {}, {}
        call()
        out["phases_ms"] = dict(drv.phase_times)
        out["kernels_ms"] = {name: round(sum(v), 4) for name, v in
                             sorted(k.kernel_times().items(), key=lambda kv: -sum(kv[1]))}
        drv.phase_times, k.profile = None, None
        out["pooled_bytes"] = drv.pooled_bytes() + scores.nbytes + img.nbytes
        out["device_memory_drop_bytes"] = free0 - free()
        out["lattice_vertices"] = dict(drv.last_vertices)
    return out


def cpu_reference(size: str, runs: int) -> dict:
    from crf import CRFParams, _driver
    from benchmarking.inputs import smooth_logits
    from scenes import make_scene

    h, w = SIZES[size]
    img = make_scene(5, h, w)[0]
    scores = smooth_logits(h, w, 21, seed=w)
    drv = _driver("cpu")
    drv.run(scores, img, h, w, 21, CRFParams(), marginals=False, labels=True)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        drv.run(scores, img, h, w, 21, CRFParams(), marginals=False, labels=True)
        times.append((time.perf_counter() - t) * 1e3)
    return {"repeated_ms": pct(times), "threads": "OpenMP default"}


def pipeline_report(device: str, runs: int) -> dict:
    from export.torch_pipeline import TorchPipeline
    from scenes import make_scene

    pipe = TorchPipeline(ROOT / "models" / "deeplab_shapes.safetensors", device=device)
    img = make_scene(11, 375, 500)[0]
    for _ in range(3):
        pipe(img)
    stages: dict = {"network": [], "crf": [], "total": []}
    plain = []
    for _ in range(runs):
        t: dict = {}
        pipe(img, t)
        for name in stages:
            stages[name].append(t[name])
        t0 = time.perf_counter()
        pipe(img)
        plain.append((time.perf_counter() - t0) * 1e3)
    return {"image": "generated scene 500x375", "classes": pipe.num_classes,
            "stages_ms": {name: pct(v) for name, v in stages.items()}, "total_unsynchronised_ms": pct(plain)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: run the same report with the CPU build (a check of this script without a GPU)")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--runs", type=int, default=30, help="CRF calls per mode and size")
    ap.add_argument("--cpu-runs", type=int, default=3, help="CPU-build calls per size, for the ratio")
    ap.add_argument("--pipeline-runs", type=int, default=120)
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)

    from crf.cpu_kernels import CPUKernels
    from crf.gpu_kernels import GPUKernels

    report: dict = {"versions": versions(args.device), "crf": {}, "crf_cpu_build": {}}

    def save() -> None:  # after every section: a run cut short keeps what it measured
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))

    kernels = GPUKernels() if args.device == "cuda" else CPUKernels()
    if args.device == "cuda":  # how the kernels came: the shipped fatbin (no nvcc) or compiled here
        import shutil

        from crf.gpu_module import module_origin

        origin = module_origin()
        report["versions"]["crf_module"] = None if origin is None else origin._asdict()
        report["versions"]["nvcc_on_path"] = shutil.which("nvcc")
        print(f"crf module: {origin.describe() if origin is not None else 'unknown'}; "
              f"nvcc on PATH: {shutil.which('nvcc') or 'none'}", flush=True)
    else:
        from crf import cpu_library

        report["versions"]["crf_cpu_library"] = cpu_library.cpu_library_source
    for size in args.sizes:
        r = report["crf"][size] = crf_report(kernels, size, args.runs)
        ref = report["crf_cpu_build"][size] = cpu_reference(size, args.cpu_runs)
        best = r["graph"] if "graph" in r else r["launches"]
        r["speedup_vs_cpu_build"] = ref["repeated_ms"]["median"] / best["repeated_ms"]["median"]
        print(f"crf {size}: " + ", ".join(
            f"{mode} {r[mode]['repeated_ms']['median']:.3f} ms (cold {r[mode]['cold_ms']['median']:.3f}, "
            f"{r[mode]['launch_calls_per_call']} launch calls, {r[mode]['graph_launches_per_call']} graph launches)"
            for mode in ("graph", "launches") if mode in r)
            + f"; build {r['phases_ms'].get('lattice_build', 0):.3f} ms, iterations {r['phases_ms'].get('iterations', 0):.3f} ms"
            + f"; host {r['host_us_per_launch']:.1f} us/launch; {r['pooled_bytes'] / 1e6:.1f} MB pooled, "
            f"free memory -{r['device_memory_drop_bytes'] / 1e6:.1f} MB; CPU build {ref['repeated_ms']['median']:.1f} ms "
            f"({r['speedup_vs_cpu_build']:.1f}x)", flush=True)
        save()
    try:
        p = report["pipeline"] = pipeline_report(args.device, args.pipeline_runs)
    except Exception as e:  # the CRF numbers above are kept; the failure is reported
        report["pipeline"] = {"error": repr(e)}
        save()
        raise
    print("pipeline 500x375: " + ", ".join(f"{k} p50 {v['median']:.3f} / p90 {v['p90']:.3f} / p99 {v['p99']:.3f} ms"
                                           for k, v in p["stages_ms"].items())
          + f"; unsynchronised total p50 {p['total_unsynchronised_ms']['median']:.3f} ms", flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
