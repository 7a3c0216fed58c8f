#!/usr/bin/env python3
"""FP32 vs INT8 vs FP16 exports of DeepLab-LargeFOV on ONNX Runtime (CPU), same input and threads.

    python benchmarks/precision_bench.py --size 513 --runs 6 --json benchmarks/results/precision_513.json

Full-width LargeFOV, He-initialised (timings do not depend on the values), exported at each
precision by export/precision.py exactly as `deeplab-export --precision` does; INT8 calibrated on
a few generated scenes of the benchmark size ("int8": symmetric activations, the default;
"int8_asymmetric": --int8-activations asymmetric). "int8_conv_only" is the plain recipe for comparison:
quantize_static's defaults (QDQ, per-channel, asymmetric activations) on the convolutions alone.
The variants run in blocks (A B C A B C ...), one warm-up per block; the load average before
and after is recorded, since the machine is shared. Last, the ceiling: one 3x3 convolution
(256 -> 256 channels, 129x129) alone in FP32 and in INT8, what ONNX Runtime's int8 kernels gain
on this CPU before any graph overhead. And the accuracy side on the bundled model: its exports
at each precision (INT8 calibrated on scenes:100, as in the README) against its FP32 export, the
% of equal labels (no CRF) on samples/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


VARIANTS = ("fp32", "int8", "int8_asymmetric", "int8_conv_only", "fp16")


def plain_conv_only_int8(fp32_path: Path, out_path: Path, calibration) -> None:
    """quantize_static with its defaults, per-channel QDQ on the convolutions only."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from export.precision import calibration_reader

    quantize_static(str(fp32_path), str(out_path), calibration_reader(calibration, "image", False),
                    quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=["Conv"])


def single_conv_ratio(threads: int, runs: int = 7) -> dict:
    """Median ms of one ReLU'd 3x3 convolution (256 -> 256, 129x129) in FP32 and in INT8 (QDQ,
    per-channel, fused by ONNX Runtime into one QLinearConv), alternating run by run."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    c, n = 256, 129
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((c, c, 3, 3)) * (2.0 / (9 * c)) ** 0.5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y"], ["z"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, n, n])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c, n, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(c, np.float32), "b")])
    x = np.abs(rng.standard_normal((1, c, n, n))).astype(np.float32)

    class OneBatch(CalibrationDataReader):
        def __init__(self):
            self.left = [{"x": x}]

        def get_next(self):
            return self.left.pop() if self.left else None

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), f"{tmp}/fp32.onnx")
        quantize_static(f"{tmp}/fp32.onnx", f"{tmp}/int8.onnx", OneBatch(), quant_format=QuantFormat.QDQ,
                        per_channel=True)
        for p in ("fp32", "int8"):
            sessions[p] = ort.InferenceSession(f"{tmp}/{p}.onnx", opts, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {p: [] for p in sessions}
    for s in sessions.values():
        s.run(None, {"x": x})
    for _ in range(runs):
        for p, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"x": x})
            times[p].append((time.perf_counter() - t) * 1e3)
    ms = {p: float(np.median(v)) for p, v in times.items()}
    return {"median_ms": ms, "gmac_per_s": {p: c * c * 9 * n * n / v / 1e6 for p, v in ms.items()},
            "speedup_int8": ms["fp32"] / ms["int8"]}


def bundled_agreement() -> dict:
    """% of pixels whose label (no CRF) equals the FP32 export's, per sample, per export of the
    bundled model; INT8 calibrated on 100 generated scenes (deeplab-export --calibration scenes:100)."""
    import torch

    from export.precision import export_onnx_with_precision
    from export.weights import load_model
    from runtime import Segmenter
    from export.precision import calibration_set

    root = Path(__file__).resolve().parents[1]
    samples = sorted((root / "samples").glob("*.png"))
    model, meta = load_model(root / "models" / "deeplab_shapes.safetensors")
    calibration = calibration_set("scenes:100", 100)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        labels = {}
        for variant in ("fp32",) + tuple(v for v in VARIANTS if v not in ("fp32", "int8_conv_only")):
            precision, _, activations = variant.partition("_")
            path = Path(tmp) / f"{variant}.onnx"
            with torch.no_grad():
                export_onnx_with_precision(model, path, precision, calibration if precision == "int8" else None,
                                           progress=False, int8_activations=activations or "symmetric",
                                           class_names=meta.get("class_names"), palette=meta.get("palette"))
            seg = Segmenter(path, crf=None)
            labels[variant] = [seg(f).labels for f in samples]
            if variant != "fp32":
                result[variant] = {f.name: 100 * float((a == b).mean())
                                   for f, a, b in zip(samples, labels["fp32"], labels[variant])}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--runs", type=int, default=6, help="timed runs per precision")
    ap.add_argument("--rounds", type=int, default=3, help="blocks per precision the runs are split into")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration-images", type=int, default=4)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from onnx_vs_pytorch import he_initialised_largefov, stats
    from export.precision import calibration_from_arrays, export_onnx_with_precision
    from runtime.output_files import write_bytes_atomically
    from scenes import CALIBRATION_SEED, make_scene

    torch.set_num_threads(args.threads)
    net = he_initialised_largefov()
    calibration = calibration_from_arrays(
        [(f"scene_{i}", make_scene(CALIBRATION_SEED + i, args.size, args.size)[0]) for i in range(args.calibration_images)],
        source="generated scenes")
    x = np.random.default_rng(0).integers(0, 256, (1, args.size, args.size, 3), dtype=np.uint8)
    sessions, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in VARIANTS:
            path = Path(tmp) / f"largefov_{p}.onnx"
            if p == "int8_conv_only":
                plain_conv_only_int8(Path(tmp) / "largefov_fp32.onnx", path, calibration)
            else:
                precision, _, activations = p.partition("_")
                with torch.no_grad():
                    export_onnx_with_precision(net, path, precision, calibration if precision == "int8" else None,
                                               progress=False, int8_activations=activations or "symmetric")
            sizes[p] = path.stat().st_size
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sessions[p] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {p: [] for p in VARIANTS}
    for r in range(args.rounds):
        for p, sess in sessions.items():
            sess.run(None, {"image": x})  # warm-up: the block starts with caches and threads settled
            for _ in range(args.runs // args.rounds + (r < args.runs % args.rounds)):
                t = time.perf_counter()
                sess.run(None, {"image": x})
                times[p].append((time.perf_counter() - t) * 1e3)
    load_after = os.getloadavg()
    conv = single_conv_ratio(args.threads)
    agreement = bundled_agreement()

    result = {
        "what": f"DeepLab-LargeFOV (He-initialised) ONNX exports, {args.size}x{args.size}, batch 1, ONNX Runtime CPU",
        "threads": args.threads, "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_before": load_before, "load_average_after": load_after,
        "model_bytes": sizes, "latency_ms": {p: stats(v) for p, v in times.items()},
        "single_conv_3x3_256ch_129px": conv,
        "bundled_model_labels_equal_to_fp32_pct": agreement,
    }
    fp32 = result["latency_ms"]["fp32"]["median"]
    result["speedup_over_fp32"] = {p: fp32 / result["latency_ms"][p]["median"] for p in VARIANTS}
    print(f"{result['what']}, {args.threads} threads, {args.runs} runs each; load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"{'variant':14s} {'min':>8s} {'median':>8s} {'mean':>8s} {'max':>8s}  (ms)  speed-up   MB")
    for p, s in result["latency_ms"].items():
        print(f"{p:14s} " + " ".join(f"{s[f]:8.1f}" for f in ("min", "median", "mean", "max"))
              + f"  {result['speedup_over_fp32'][p]:8.2f}x {sizes[p] / 1e6:5.1f}")
    print(f"one 3x3 convolution, 256 channels, 129x129: fp32 {conv['median_ms']['fp32']:.1f} ms "
          f"({conv['gmac_per_s']['fp32']:.0f} GMAC/s), int8 {conv['median_ms']['int8']:.1f} ms "
          f"({conv['gmac_per_s']['int8']:.0f} GMAC/s): {conv['speedup_int8']:.2f}x")
    for v, per_sample in agreement.items():
        print(f"bundled model {v}: labels equal to fp32 on samples/ (no CRF): "
              + ", ".join(f"{k} {pct:.3f} %" for k, pct in per_sample.items()))
    if args.json:
        write_bytes_atomically(args.json, json.dumps(result, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
