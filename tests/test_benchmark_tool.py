"""The latency report (benchmarking/, deeplab-benchmark), run on the bundled model as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from benchmarking.environment import environment, isa_flags
from benchmarking.latency import STAGES, BenchConfig, benchmark_images, latency_stats, model_precision, percentile
from benchmarking.stage_chart import STAGE_COLOURS, nice_step, stage_chart
from conftest import ROOT
from tools import benchmark

MODEL = ROOT / "models" / "deeplab_shapes.onnx"
ENV_KEYS = {"cpu", "isa", "logical_cores", "load_average", "os", "python", "numpy", "onnxruntime",
            "onnxruntime_providers", "opencv", "gpu", "nvidia_driver", "cuda_driver_api", "tensorrt", "pycuda"}


def check_ordered(stats: dict) -> None:
    assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"], stats
    assert stats["min"] <= stats["mean"] <= stats["max"], stats
    assert stats["min"] >= 0


def run_main(tmp_path, *args) -> dict:
    out = tmp_path / "report.json"
    # ONNX Runtime on the CPU: the host pipeline, on a GPU machine too
    assert benchmark.main(["--model", str(MODEL), "--backend", "onnxruntime", "--size", "65x65", "--runs", "3",
                           "--warmup", "1", "--no-progress", "--json", str(out), *map(str, args)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("n", [1, 2, 3, 10, 37])
def test_percentile_is_numpy_linear(n):
    rng = np.random.default_rng(n)
    values = np.round(rng.exponential(5.0, n), 1).tolist()  # rounded: ties too
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-12)


def test_percentile_refuses_what_has_none():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_mean_of_equal_values_stays_within_min_and_max():
    # 0.1 + 0.1 + 0.1 divided by 3 is one ulp above 0.1 in floating point.
    stats = latency_stats([0.1, 0.1, 0.1])
    check_ordered(stats)
    assert stats["mean"] == 0.1
    stats = latency_stats([3.0, 1.0, 2.0, 10.0])
    assert (stats["min"], stats["mean"], stats["p50"], stats["max"]) == (1.0, 4.0, 2.5, 10.0)


def test_batch_images_are_the_size_asked_and_differ():
    images = benchmark_images(BenchConfig(str(MODEL), height=40, width=70, batch=3))
    assert [im.shape for im in images] == [(40, 70, 3)] * 3
    assert all(im.dtype == np.uint8 for im in images)
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    photo = np.zeros((100, 50, 3), np.uint8)
    photo[:, 25:] = 200
    (resized,) = benchmark_images(BenchConfig(str(MODEL), height=20, width=30), photo)
    assert resized.shape == (20, 30, 3) and resized[:, :10].max() == 0 and resized[:, -10:].min() == 200


def test_single_configuration_report(tmp_path, capsys):
    md, png = tmp_path / "r.md", tmp_path / "charts" / "r.png"
    from crf.cpu_kernels import CPUKernels

    pool = CPUKernels().threads
    report = run_main(tmp_path, "--batch", "2", "--threads", "1", "--markdown", md, "--chart", png,
                      "--chart-width", "640")
    assert CPUKernels().threads == pool  # the process-wide CRF pool is given back as it was
    (r,) = report["configurations"]
    assert r["skipped"] is None and r["precision"] == "fp32"
    assert r["pipeline"] == "host" and r["crf_backend"] in ("cpu", "numpy")
    assert r["calls"] == 3 and r["images"] == 6 and r["throughput_images_per_s"] > 0
    assert r["threads"] == {"network": 1, "crf_cpu": 1 if r["crf_backend"] == "cpu" else None}
    for stage in ("preprocess", "network", "crf", "postprocess", "total"):
        check_ordered(r["stages"][stage])
    check_ordered(r["wall"])
    # a call's stages add up to its total; the wall time around the call includes them
    assert r["stages"]["total"]["min"] <= r["wall"]["max"]
    assert r["stages"]["crf"]["p50"] > 0
    for stage in ("upload", "download"):  # absent on the host pipeline, not zero
        assert r["stages"][stage] is None and "host pipeline" in r["absent_stages"][stage]
    assert r["cuda_events"] is None and r["cuda_events_reason"]
    assert r["ratios"]["throughput"] == 1.0
    env = report["environment"]
    assert ENV_KEYS <= set(env) and env["logical_cores"] >= 1
    assert env["crf_backend"] == {f"[1] {r['label']}": r["crf_backend"]}
    assert report["settings"]["runs"] == 3 and report["settings"]["warmup"] == 1

    out = capsys.readouterr().out
    assert "   min      mean       p50       p90       p99       max" in out
    assert "upload        absent: host pipeline" in out and "throughput" in out

    table = md.read_text().splitlines()
    assert table[0] == ("| configuration | precision | preprocess | network | crf | postprocess | total p50 | "
                        "total p90 | total p99 | images/s | throughput vs [1] |")
    assert table[1] == "|" + "---|" * 11 and table[2].startswith("| [1] deeplab_shapes.onnx ")
    chart = cv2.imread(str(png))
    assert chart is not None and chart.shape[1] == 640


def test_compare_mode_alternates_and_skips_what_cannot_run(tmp_path, capsys):
    report = run_main(tmp_path, "--block", "1",
                      "--config", "crf=on", "--config", "crf=off,label=no CRF",
                      "--config", "backend=tensorrt",
                      "--config", "size=1100x1100",
                      "--config", f"model={tmp_path / 'absent.onnx'}")
    base, plain, trt, large, missing = report["configurations"]
    assert report["schedule"] == [0, 1, 0, 1, 0, 1]  # A B A B, not A A A B B B
    assert base["ratios"]["throughput"] == 1.0
    assert all(v == 1.0 for v in base["ratios"]["p50"].values() if v is not None)
    assert base["ratios"]["p50"]["network"] == 1.0 and base["ratios"]["p50"]["upload"] is None
    assert plain["label"] == "no CRF" and plain["skipped"] is None
    assert plain["stages"]["crf"] is None and plain["absent_stages"]["crf"] == "CRF off"
    assert plain["ratios"]["p50"]["crf"] is None and plain["ratios"]["p50"]["network"] > 0
    assert plain["ratios"]["throughput"] == pytest.approx(
        plain["throughput_images_per_s"] / base["throughput_images_per_s"])
    assert "TensorRT" in trt["skipped"]
    assert "1100x1100" in large["skipped"] and "max_size 1025" in large["skipped"]
    assert "not found" in missing["skipped"]
    out = capsys.readouterr().out
    assert "Against [1], the baseline" in out and "skipped: backend tensorrt" in out


def test_duration_mode(tmp_path):
    out = tmp_path / "d.json"
    assert benchmark.main(["--model", str(MODEL), "--backend", "onnxruntime", "--size", "33x33", "--crf", "off",
                           "--warmup", "0",
                           "--duration", "0.05", "--block", "2", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (r,) = report["configurations"]
    assert report["settings"]["runs"] is None and report["settings"]["duration_s"] == 0.05
    assert r["calls"] >= 2 and r["calls"] % 2 == 0 and r["wall_s"] >= 0.05


def test_nothing_runnable_exits_1(tmp_path, capsys):
    assert benchmark.main(["--model", str(tmp_path / "absent.onnx"), "--no-progress"]) == 1
    assert "no configuration could run here" in capsys.readouterr().err


def test_precision_comes_from_the_model_metadata(tmp_path):
    import onnx

    from runtime import Segmenter

    model = onnx.load(str(MODEL))
    model.metadata_props.add(key="precision", value="fp16")
    relabelled = tmp_path / "m.onnx"
    onnx.save(model, str(relabelled))
    assert model_precision(Segmenter(relabelled, crf=None)) == "fp16"
    seg = Segmenter(MODEL, crf=None)
    assert model_precision(seg) == "fp32"  # an FP32 export carries no entry
    # every stage the Segmenter times has its row in the report
    assert set(seg(np.zeros((20, 30, 3), np.uint8)).timings) <= set(STAGES)


@pytest.mark.parametrize("args, message", [
    (["--size", "abc"], "expected HxW"),
    (["--size", "0x65"], "must be >= 1"),
    (["--batch", "0"], "--batch: must be >= 1, got 0"),
    (["--runs", "0"], "--runs: must be >= 1, got 0"),
    (["--duration", "-1"], "must be > 0 seconds"),
    (["--runs", "3", "--duration", "1"], "not allowed with"),
    (["--backend", "cuda"], "unknown backend 'cuda'"),
    (["--crf", "maybe"], "expected on or off"),
    (["--threads", "300"], "must be <= 256"),
    (["--config", "batch=0"], "batch: must be >= 1, got 0"),
    (["--config", "size=big"], "size: expected HxW"),
    (["--config", "colour=red"], "expected KEY=VALUE with KEY one of model, backend"),
    (["--config", "crf=on,crf=off"], "crf given twice"),
    (["--chart", "out.jpg"], "the chart is a PNG"),
    (["--image", "no/such/image.png"], "image file not found"),
])
def test_bad_command_lines(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--model", str(MODEL), "--no-progress", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_command_lines_without_a_model(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--size", "65x65"])
    assert e.value.code == 2 and "--model is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--config", f"model={MODEL}", "--config", "crf=off"])
    assert e.value.code == 2 and "--config 2: no model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--model", str(MODEL), "--json", str(tmp_path)])
    assert e.value.code == 2 and "is a folder" in capsys.readouterr().err


def test_script_reports_bad_values_with_exit_status_2():
    out = subprocess.run([sys.executable, "-m", "tools.benchmark", "--model", str(MODEL), "--size", "abc"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "argument --size: expected HxW, e.g. 513x513, got 'abc'" in out.stderr


def test_isa_flags_from_feature_lists():
    x86 = isa_flags("fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni")
    assert x86 == {"avx2": True, "fma": True, "avx512f": True, "avx512_vnni": True, "asimd": False}
    zen2 = isa_flags("fpu sse2 avx avx2 fma")
    assert zen2["avx2"] and not zen2["avx512f"] and not zen2["avx512_vnni"]
    assert isa_flags("fp asimd evtstrm aes pmull")["asimd"]  # aarch64 `Features`
    assert isa_flags("half thumb fastmult vfp edsp neon vfpv3")["asimd"]  # 32-bit ARM says neon
    assert isa_flags("") is None


def test_environment_has_every_key():
    env = environment()
    assert ENV_KEYS <= set(env)
    assert isinstance(env["onnxruntime_providers"], list) and "CPUExecutionProvider" in env["onnxruntime_providers"]
    assert env["numpy"] == np.__version__ and env["opencv"] == cv2.__version__


def test_chart_draws_each_stage_in_its_colour():
    img = stage_chart([("[1] a", {"preprocess": 1.0, "network": 5.0, "crf": 20.0, "postprocess": 1.0}),
                       ("[2] b", {"preprocess": 1.0, "network": 5.0, "postprocess": 1.0}),
                       ("[3] c", None)], width=500)
    assert img.shape[1] == 500 and img.dtype == np.uint8
    pixels = {tuple(p) for p in img.reshape(-1, 3)}
    for stage in ("preprocess", "network", "crf", "postprocess"):
        assert STAGE_COLOURS[stage] in pixels, stage
    assert STAGE_COLOURS["upload"] not in pixels  # absent from every bar: no swatch either
    with pytest.raises(ValueError, match="no room"):
        stage_chart([("x" * 200, {"network": 1.0})], width=150)


def test_nice_axis_steps():
    assert [nice_step(s) for s in (0.6, 6, 27, 130, 999)] == [0.1, 1, 5, 50, 200]


def test_device_pipeline_reports_its_marked_stages():
    """A device-pipeline configuration (ONNX Runtime writing into the CPU build's memory, the CRF on
    those kernels: the pipeline a GPU runs, on the CPU) reports upload/network/crf/download between
    stage marks beside the wall-clock stages; the host pipeline says why it has none."""
    from benchmarking.latency import (ConfigRun, absent_stages, benchmark_images, config_result,
                                      latency_stats)
    from crf.cpu_kernels import CPUKernels
    from runtime import Segmenter
    from runtime.onnx_backend import OnnxRuntimeNetwork

    config = BenchConfig(str(MODEL), height=65, width=97)
    seg = Segmenter(MODEL, network=OnnxRuntimeNetwork(MODEL, kernels=CPUKernels()))
    assert seg.pipeline == "device"
    seg.stage_events = True
    run = ConfigRun(config, seg=seg, images=benchmark_images(config), absent=absent_stages("device", True))
    for _ in range(3):
        run.call()
    r = config_result(run)
    assert set(r["cuda_events"]) == {"network", "crf", "download"}  # no upload: the CPU reads in place
    assert r["cuda_events_clock"].startswith("host clock") and r["cuda_events_reason"] is None
    for stage, st in r["cuda_events"].items():
        assert st == latency_stats(run.events[stage]) and st["min"] >= 0
    assert r["cuda_events"]["crf"]["p50"] <= r["stages"]["crf"]["p50"] + 1e-6

    host = ConfigRun(config, seg=Segmenter(MODEL), images=benchmark_images(config))
    host.call()
    h = config_result(host)
    assert h["cuda_events"] is None and h["cuda_events_reason"].startswith("host pipeline")
