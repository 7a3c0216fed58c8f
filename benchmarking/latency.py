"""Latency of runtime.Segmenter configurations, stage by stage (trtexec style): the library of the
deeplab-benchmark command (tools/benchmark.py; docs/benchmark.md says what each stage includes).

A configuration (``BenchConfig``) is a model, a network backend, the CRF on or off, an image size,
a batch (N variants of the image per call) and a thread count. ``run_benchmark()`` opens each one
(or records why it cannot run here), measures them in alternating blocks of calls after a warm-up
(the machine's speed drifts), and returns a JSON-ready report: per stage min, mean, p50, p90, p99,
max in ms per call, the throughput, and ratios to the first configuration, the baseline.
``format_console``, ``format_markdown`` and ``chart_png`` render it.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

#: Stages in pipeline order; "total" is the pipeline's own sum of its stages.
STAGES = ("preprocess", "upload", "network", "crf", "download", "postprocess", "total")
#: The call as the caller sees it: perf_counter around Segmenter.__call__.
WALL = "wall"
STAT_KEYS = ("min", "mean", "p50", "p90", "p99", "max")
#: Device stages timed between the kernels' stage marks (Segmenter.stage_events): CUDA events in
#: stream order on a GPU, the host clock on the CPU build of the kernels.
EVENT_STAGES = ("upload", "network", "crf", "download")
CUDA_EVENTS_HOST = "host pipeline: no device stage to mark"


# -- statistics -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the two nearest ranks:
    position (n - 1) * q / 100 in the sorted values, numpy.percentile's default ("linear")."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    a = sorted(float(v) for v in values)
    pos = (len(a) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(a) - 1)
    return a[lo] + (a[hi] - a[lo]) * (pos - lo)


def latency_stats(values: Sequence[float]) -> Dict[str, float]:
    """min, mean, p50, p90, p99, max of values (ms)."""
    lo, hi = float(min(values)), float(max(values))
    # fsum then clamped: a sum of n equal values divided by n can land one ulp outside [min, max].
    mean = min(max(math.fsum(values) / len(values), lo), hi)
    return {"min": lo, "mean": mean, "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": hi}


# -- configurations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    model: str
    backend: str = "auto"
    crf: bool = True
    height: int = 513
    width: int = 513
    batch: int = 1
    threads: Optional[int] = None  # None: ONNX Runtime's and the CPU CRF's own defaults
    label: Optional[str] = None

    def name(self) -> str:
        if self.label:
            return self.label
        threads = f" t{self.threads}" if self.threads else ""
        return (f"{Path(self.model).name} {self.backend} crf={'on' if self.crf else 'off'} "
                f"{self.height}x{self.width} b{self.batch}{threads}")

    def as_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "backend": self.backend, "crf": "on" if self.crf else "off",
                "size": f"{self.height}x{self.width}", "batch": self.batch, "threads": self.threads}


def make_config(base: Dict[str, Any], override: Dict[str, Any]) -> BenchConfig:
    """A BenchConfig from the plain options (base) with a --config's keys (override) on top."""
    v = {**base, **override}
    h, w = v["size"]
    return BenchConfig(model=str(v["model"]), backend=v["backend"], crf=v["crf"], height=h, width=w,
                       batch=v["batch"], threads=v.get("threads"), label=v.get("label"))


def benchmark_images(config: BenchConfig, image=None) -> list:
    """The call's batch: ``image`` (BGR uint8, default: a generated scene) resized to the
    configuration's size, and for a batch of N, N - 1 variants of it rolled sideways by k/N of
    its width (the same content statistics, different bytes)."""
    import cv2
    import numpy as np

    h, w = config.height, config.width
    if image is None:
        from scenes import make_scene

        base = make_scene(0, h, w)[0]
    else:
        shrink = h * w < image.shape[0] * image.shape[1]
        base = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return [base] + [np.ascontiguousarray(np.roll(base, k * w // config.batch, axis=1))
                     for k in range(1, config.batch)]


def model_precision(seg) -> str:
    """The precision the Segmenter's model was exported or built at (runtime.backend_choice.model_precision)."""
    from runtime.backend_choice import model_precision as precision_of

    return precision_of(seg.model_path, seg.network.metadata)


def absent_stages(pipeline: str, crf: bool) -> Dict[str, str]:
    """The stages a configuration's pipeline does not time, with the reason."""
    if pipeline == "host":
        copies = "host pipeline: the network reads and writes host memory, there is no device copy"
        out = {"upload": copies, "download": copies}
    else:
        out = {"upload": "device pipeline: the batch upload is queued on the stream inside the network "
                         "call and counted in network (cuda_events splits it out)",
               "download": "device pipeline: the labels come back inside the CRF's stage (crf), the "
                           "scores (CRF off, shrunk images) inside postprocess"}
    if not crf:
        out["crf"] = "CRF off"
    return out


# -- measurement ----------------------------------------------------------------------------------
@dataclass
class ConfigRun:
    """One configuration's Segmenter, its input batch and what its calls measured."""

    config: BenchConfig
    seg: Any = None
    images: list = field(default_factory=list)
    skipped: Optional[str] = None
    absent: Dict[str, str] = field(default_factory=dict)
    samples: Dict[str, List[float]] = field(default_factory=dict)
    crf_scale: float = 1.0
    crf_threads: Optional[int] = None  # the CPU CRF's pool size during its calls (None: not the CPU kernels)
    events: Dict[str, List[float]] = field(default_factory=dict)  # device stages between stage marks

    @property
    def calls(self) -> int:
        return len(self.samples.get(WALL, []))

    def wall_seconds(self) -> float:
        return math.fsum(self.samples.get(WALL, [])) / 1e3

    def call(self, record: bool = True) -> None:
        """One Segmenter call on the batch; with record, its per-stage times summed over the
        batch's images (ms per call) and its wall time."""
        t0 = time.perf_counter()
        results = self.seg(self.images)
        wall = (time.perf_counter() - t0) * 1e3
        if not record:
            return
        for stage in STAGES:
            if stage not in self.absent and all(stage in r.timings for r in results):
                self.samples.setdefault(stage, []).append(math.fsum(r.timings[stage] for r in results))
        self.samples.setdefault(WALL, []).append(wall)
        for stage in EVENT_STAGES:
            key = "device_" + stage
            if results and all(key in r.timings for r in results):
                self.events.setdefault(stage, []).append(math.fsum(r.timings[key] for r in results))
        self.crf_scale = min([self.crf_scale] + [r.crf_scale for r in results])


def tensorrt_problem(config: BenchConfig) -> Optional[str]:
    """Why TensorRT cannot run this configuration here (None when it does not need it or can)."""
    from runtime.backend_choice import is_plan
    from runtime.errors import TensorRTUnavailable
    from runtime.trt_compat import load_tensorrt

    if config.backend != "tensorrt" and not is_plan(config.model):
        return None
    try:
        load_tensorrt()
    except TensorRTUnavailable as e:
        return str(e)
    return None


def open_config(config: BenchConfig, image=None) -> ConfigRun:
    """A ConfigRun ready to call, or one with ``skipped`` saying why this machine cannot run it."""
    from crf import CRFParams
    from runtime import Segmenter, SizeLimits
    from runtime.network import network_size

    run = ConfigRun(config)
    if not Path(config.model).is_file():
        run.skipped = f"model file not found: {config.model}"
        return run
    problem = tensorrt_problem(config)
    if problem:
        run.skipped = f"backend {config.backend}: {problem}"
        return run
    try:
        seg = Segmenter(config.model, crf=CRFParams() if config.crf else None, backend=config.backend,
                        threads=config.threads, limits=SizeLimits(max_batch=config.batch))
    except (ValueError, RuntimeError, ImportError, OSError, MemoryError) as e:
        run.skipped = f"cannot load: {type(e).__name__}: {e}"
        return run
    size = network_size(config.height, config.width, seg.limits.max_size, seg.size_bounds, seg.limits.input_size)
    if size.scale < 1.0:
        limit = f"max_size {seg.limits.max_size}" if seg.size_bounds is None else \
            f"max_size {seg.limits.max_size} and the plan's profile {seg.size_bounds.describe()}"
        run.skipped = (f"{config.height}x{config.width} is above what the network runs at full size ({limit}): "
                       f"the Segmenter would shrink it to {size.resized[0]}x{size.resized[1]}")
        return run
    if seg.pipeline == "device":
        seg.stage_events = True  # device stages between stage marks, beside the wall-clock stages
    run.seg = seg
    run.images = benchmark_images(config, image)
    run.absent = absent_stages(seg.pipeline, config.crf)
    return run


class CrfThreads:
    """The CPU CRF's thread pool is one per process: set to each configuration's thread count
    before its calls (its default where the configuration names none)."""

    def __init__(self) -> None:
        self._kernels: Any = None  # crf.cpu_kernels.CPUKernels, made when a configuration first needs it
        self.default: Optional[int] = None

    def apply(self, run: ConfigRun) -> Optional[int]:
        """Set the pool for ``run``; the thread count its CRF uses (None: not the CPU kernels)."""
        if run.seg is None or run.seg.crf_backend != "cpu":
            return None
        if self._kernels is None:
            from crf.cpu_kernels import CPUKernels

            self._kernels = CPUKernels()
            self.default = self._kernels.threads
        self._kernels.threads = run.config.threads or self.default
        return self._kernels.threads

    def restore(self) -> None:
        """The pool as it was before the first apply."""
        if self._kernels is not None and self.default is not None:
            self._kernels.threads = self.default


def measure(runs: List[ConfigRun], warmup: int, calls: Optional[int], duration: Optional[float],
            block: int, progress: bool = True) -> List[int]:
    """Warm up every runnable configuration, then measure them in alternating blocks of ``block``
    calls until each has ``calls`` calls (or ``duration`` seconds of call wall time). A
    configuration whose call fails is skipped from then on. Returns the schedule: the index of
    the configuration each block ran."""
    from tqdm import tqdm

    threads = CrfThreads()

    def guarded(i: int, n: int, record: bool) -> None:
        run = runs[i]
        run.crf_threads = threads.apply(run)
        try:
            for _ in range(n):
                run.call(record)
                if record and duration is None:
                    bar.update(1)
        except (ValueError, RuntimeError, OSError, MemoryError) as e:
            run.skipped = f"failed after {run.calls} measured calls: {type(e).__name__}: {e}"
            run.seg, run.images = None, []

    active = [i for i, r in enumerate(runs) if r.skipped is None]
    total = duration if duration is not None else (calls or 0) * len(active)
    bar = tqdm(total=total, desc="benchmark", unit="call" if duration is None else "s", file=sys.stderr,
               disable=not progress)
    for i in active:
        if warmup:
            guarded(i, warmup, record=False)
    schedule: List[int] = []

    def more(i: int) -> int:
        r = runs[i]
        if r.skipped is not None:
            return 0
        if duration is None:
            return min(block, calls - r.calls)  # type: ignore[operator]
        return block if r.wall_seconds() < duration else 0

    while True:
        todo = [(i, more(i)) for i in active]
        if not any(n for _, n in todo):
            break
        for i, n in todo:
            if n:
                guarded(i, n, record=True)
                schedule.append(i)
        if duration is not None:
            running = [runs[i].wall_seconds() for i in active if runs[i].skipped is None]
            bar.n = round(min(running + [duration]), 2)  # the slowest-to-finish configuration's progress
            bar.refresh()
    bar.close()
    threads.restore()
    return schedule


# -- the report -----------------------------------------------------------------------------------
def config_result(run: ConfigRun) -> Dict[str, Any]:
    out: Dict[str, Any] = {"label": run.config.name(), "configuration": run.config.as_dict(), "skipped": run.skipped}
    if run.skipped is not None:
        return out
    seg = run.seg
    images = run.calls * run.config.batch
    wall = run.wall_seconds()
    out.update({
        "precision": model_precision(seg),
        "network_backend": seg.backend,
        "pipeline": seg.pipeline,
        "crf_backend": seg.crf_backend,
        "threads": {"network": run.config.threads, "crf_cpu": run.crf_threads},
        "network_batch": seg.limits.max_batch,
        "calls": run.calls,
        "images": images,
        "wall_s": wall,
        "throughput_images_per_s": images / wall if wall > 0 else None,
        "stages": {s: latency_stats(run.samples[s]) if s in run.samples else None for s in STAGES},
        "absent_stages": {s: run.absent.get(s, "not reported by the pipeline") for s in STAGES
                          if s not in run.samples},
        WALL: latency_stats(run.samples[WALL]),
        "crf_scale": run.crf_scale,
        "cuda_events": {s: latency_stats(run.events[s]) for s in EVENT_STAGES if s in run.events} or None,
        "cuda_events_clock": None if seg.pipeline != "device" else (
            "CUDA events on the stream" if getattr(seg.network.kernels, "name", "") == "gpu"
            else "host clock (the CPU build runs each stage before returning)"),
        "cuda_events_reason": CUDA_EVENTS_HOST if seg.pipeline != "device" else None,
    })
    return out


def add_ratios(results: List[Dict[str, Any]]) -> None:
    """Each measured configuration's p50 per stage and throughput over the baseline's (the first):
    time ratios (< 1: faster than the baseline) and a throughput ratio (> 1: faster)."""
    base = results[0] if results else None
    for r in results:
        if r["skipped"] is not None:
            continue
        if base is None or base["skipped"] is not None:
            r["ratios"] = None
            r["ratios_reason"] = "the baseline (the first configuration) was skipped"
            continue
        p50 = {}
        for s in STAGES + (WALL,):
            mine = r[WALL] if s == WALL else r["stages"][s]
            theirs = base[WALL] if s == WALL else base["stages"][s]
            p50[s] = mine["p50"] / theirs["p50"] if mine and theirs and theirs["p50"] > 0 else None
        tp, base_tp = r["throughput_images_per_s"], base["throughput_images_per_s"]
        r["ratios"] = {"p50": p50, "throughput": tp / base_tp if tp and base_tp else None}


def run_benchmark(configs: List[BenchConfig], image=None, warmup: int = 3, runs: Optional[int] = 20,
                  duration: Optional[float] = None, block: int = 5, progress: bool = True) -> Dict[str, Any]:
    """Measure ``configs`` (the first is the baseline) and return the report (JSON-ready)."""
    from .environment import environment

    env = environment()  # first: the load average before the benchmark's own load
    opened = [open_config(c, image) for c in configs]
    schedule = measure(opened, warmup, None if duration is not None else runs, duration, block, progress)
    results = [config_result(r) for r in opened]
    add_ratios(results)
    measured = [(f"[{k}] {r['label']}", r) for k, r in enumerate(results, 1) if r["skipped"] is None]
    env["crf_backend"] = {name: r["crf_backend"] for name, r in measured}
    env["threads"] = {name: r["threads"] for name, r in measured}
    return {"tool": "deeplab-benchmark", "unit": "ms per call (a call segments the batch)",
            "settings": {"warmup": warmup, "runs": None if duration is not None else runs, "duration_s": duration,
                         "block": block, "image": "generated scene (scenes.make_scene, seed 0)"
                         if image is None else "given image"},
            "environment": env, "schedule": schedule, "configurations": results}


def format_ms(v: Optional[float]) -> str:
    """A time in ms for a table: 2 decimals below 100, 1 from there, "-" for none."""
    return "-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def format_console(report: Dict[str, Any]) -> str:
    lines = []
    env = report["environment"]
    isa = env.get("isa")
    flags = " ".join(f for f, on in isa.items() if on) if isa else "unknown"
    lines.append(f"CPU: {env['cpu']} ({flags}), {env['logical_cores']} logical cores, load {env['load_average']}")
    lines.append(f"{env['os']}; Python {env['python']}, numpy {env['numpy']}, onnxruntime {env['onnxruntime']} "
                 f"({', '.join(env['onnxruntime_providers'])}), OpenCV {env['opencv']}")
    lines.append(f"GPU: {env['gpu'] or 'none'}" + (f" (driver {env['nvidia_driver']}, CUDA {env['cuda_driver_api']})"
                                                   if env["gpu"] else "")
                 + f"; TensorRT {env['tensorrt'] or 'none'}; pycuda {env['pycuda'] or 'none'}")
    for k, r in enumerate(report["configurations"], 1):
        lines.append("")
        lines.append(f"[{k}] {r['label']}" + ("  (baseline)" if k == 1 else ""))
        if r["skipped"] is not None:
            lines.append(f"    skipped: {r['skipped']}")
            continue
        t = r["threads"]
        lines.append(f"    precision {r['precision']}; network {r['network_backend']}, {r['pipeline']} pipeline; "
                     f"CRF {r['crf_backend'] or 'off'}; threads: network {t['network'] or 'default'}, "
                     f"CRF {t['crf_cpu'] or '-'}")
        tp = r["throughput_images_per_s"]
        lines.append(f"    {r['calls']} calls of batch {r['configuration']['batch']} in {r['wall_s']:.2f} s: "
                     f"throughput {tp:.2f} images/s")
        lines.append(f"    {'stage':12s}" + "".join(f"{s:>10s}" for s in STAT_KEYS) + "   (ms per call)")
        for s in STAGES + (WALL,):
            st = r[WALL] if s == WALL else r["stages"][s]
            if st is None:
                lines.append(f"    {s:12s}  absent: {r['absent_stages'][s]}")
            else:
                lines.append(f"    {s:12s}" + "".join(f"{format_ms(st[q]):>10s}" for q in STAT_KEYS))
        if r["cuda_events"]:
            lines.append(f"    device stages between stage marks ({r['cuda_events_clock']}):")
            for s, st in r["cuda_events"].items():
                lines.append(f"    {s:12s}" + "".join(f"{format_ms(st[q]):>10s}" for q in STAT_KEYS))
    measured = [(k, r) for k, r in enumerate(report["configurations"], 1) if r["skipped"] is None]
    if len(report["configurations"]) > 1 and measured and report["configurations"][0]["skipped"] is None:
        lines.append("")
        lines.append("Against [1], the baseline: p50 time ratios (< 1: faster) and the throughput ratio (> 1: faster)")
        lines.append(f"    {'':12s}" + "".join(f"{f'[{k}]':>10s}" for k, _ in measured))
        for s in STAGES + (WALL,):
            cells = [r["ratios"]["p50"][s] for _, r in measured]
            if any(c is not None for c in cells):
                lines.append(f"    {s:12s}" + "".join(f"{'-' if c is None else f'{c:.3f}':>10s}" for c in cells))
        lines.append(f"    {'throughput':12s}" + "".join(
            f"{'-' if r['ratios']['throughput'] is None else format(r['ratios']['throughput'], '.3f'):>10s}"
            for _, r in measured))
    return "\n".join(lines)


def markdown_stages(report: Dict[str, Any]) -> List[str]:
    """The stages (total aside) that any measured configuration reports, in pipeline order."""
    return [s for s in STAGES[:-1] if any(r["skipped"] is None and r["stages"][s] is not None
                                          for r in report["configurations"])]


def markdown_header(stages: Sequence[str]) -> str:
    cells = ["configuration", "precision"] + list(stages) + ["total p50", "total p90", "total p99", "images/s",
                                                           "throughput vs [1]"]
    return "| " + " | ".join(cells) + " |"


def format_markdown(report: Dict[str, Any]) -> str:
    stages = markdown_stages(report)
    lines = [markdown_header(stages), "|" + "---|" * (len(stages) + 7)]
    skipped = []
    for k, r in enumerate(report["configurations"], 1):
        name = f"[{k}] {r['label']}".replace("|", "/")
        if r["skipped"] is not None:
            skipped.append(f"- [{k}] {r['label']}: skipped ({r['skipped']})")
            continue
        total = r["stages"]["total"]
        ratio = r["ratios"]["throughput"] if r.get("ratios") else None
        cells = [name, r["precision"]] + [format_ms(r["stages"][s]["p50"]) if r["stages"][s] else "-"
                                          for s in stages]
        cells += [format_ms(total["p50"]), format_ms(total["p90"]), format_ms(total["p99"]),
                  f"{r['throughput_images_per_s']:.2f}",
                  "-" if ratio is None else f"{ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    env = report["environment"]
    lines.append("")
    lines.append(f"Stage columns: median ms per call (a call segments the batch); configurations measured "
                 f"in alternating blocks. {env['cpu']}, {env['logical_cores']} logical cores, "
                 f"load average at start {env['load_average']}, {env['date']}.")
    lines += skipped
    return "\n".join(lines) + "\n"


def chart_png(report: Dict[str, Any], width: int) -> bytes:
    from .stage_chart import encode_png, stage_chart

    bars = []
    for k, r in enumerate(report["configurations"], 1):
        times = None
        if r["skipped"] is None:
            times = {s: st["p50"] for s, st in r["stages"].items() if st is not None and s != "total"}
        bars.append((f"[{k}] {r['label']}", times))
    return encode_png(stage_chart(bars, width))
