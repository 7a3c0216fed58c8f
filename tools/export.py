"""Export DeepLab v1 weights to ONNX, and to a TensorRT engine when TensorRT is installed.

    deeplab-export models/deeplab_shapes.safetensors --out out/deeplab_shapes.onnx
    deeplab-export models/deeplab_shapes.safetensors --out out/deeplab_shapes_fp16.onnx --precision fp16
    deeplab-export models/deeplab_shapes.safetensors --out out/deeplab_shapes_int8.onnx --precision int8 \\
        --calibration samples/
    deeplab-export models/deeplab_shapes.safetensors --out out/m.onnx --engine out/m.engine --fp16
    deeplab-export models/deeplab_shapes.onnx --engine out/m.engine --fp16

(or python -m tools.export ... from a checkout). Weights: our .safetensors (carries its config and
class names), PyTorch .pt/.pth state dicts (config inferred from shapes unless given), released
Caffe .caffemodel files (DeepLab-LargeFOV on VOC: --num-classes 21), or a torchvision ImageNet
VGG-16 state dict (--from-vgg16 --num-classes 21: fc6/fc7 decimated as in the paper, fresh fc8).
An .onnx with --engine builds the TensorRT plan only (no torch needed). The work is export/
(weights.py, precision.py, tensorrt_build.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli import int_at_least, plain_warnings, refuse_unwritable, require_packages


def parse_class_names(s: str) -> list[str]:
    names = [n.strip() for n in s.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty class name in {s!r}")
    return names


def parse_hw(s: str) -> tuple[int, int]:
    """'513x513', '480x640' or '513' (square) -> (H, W), both >= 1."""
    h, _, w = s.lower().partition("x")
    try:
        hw = int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 513x513) or one size, got {s!r}") from None
    if min(hw) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {s!r}")
    return hw


def main(argv=None) -> int:
    plain_warnings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", help=".safetensors, .pt/.pth, .caffemodel, or a VGG-16 state dict with --from-vgg16; "
                    "or an .onnx from this tool with --engine (builds only the engine: no torch needed)")
    ap.add_argument("--out", help="ONNX path (default: next to the weights, .onnx)")
    ap.add_argument("--num-classes", type=int, help="classes (default: from the weights)")
    ap.add_argument("--variant", choices=["largefov", "7x7", "4x4"], help="head (default: from the weights)")
    ap.add_argument("--width", type=float, help="width multiplier (default: from the weights)")
    ap.add_argument("--from-vgg16", action="store_true", help="weights are a torchvision ImageNet VGG-16 state dict")
    ap.add_argument("--class-names", type=parse_class_names, help="comma-separated class names to store in the model")
    ap.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                    help="fp16: an FP16 graph; int8: explicit Q/DQ, calibrated on --calibration (default fp32)")
    ap.add_argument("--calibration", metavar="DIR|scenes:N",
                    help="int8: a folder of images like the ones to segment, or scenes:N (N generated scenes)")
    ap.add_argument("--calibration-images", type=int_at_least(1), default=100, metavar="N",
                    help="int8: use the first N images of the folder by name (100)")
    ap.add_argument("--int8-activations", choices=["symmetric", "asymmetric"],
                    help="int8: symmetric (default; what TensorRT takes) or asymmetric (ONNX Runtime only: "
                    "more accurate, faster on the CPU)")
    trt = ap.add_argument_group("TensorRT engine (needs TensorRT; the plan gets a .json metadata sidecar)")
    trt.add_argument("--engine", metavar="PATH", help="also build a TensorRT engine at this path; skipped when the plan there "
                     "was built from the same ONNX, TensorRT, GPU and options")
    trt.add_argument("--force", action="store_true", help="rebuild the engine even when it is up to date")
    trt.add_argument("--fp16", action="store_true", help="TensorRT FP16 (TensorRT <= 10)")
    trt.add_argument("--min-size", type=parse_hw, default=(65, 65), metavar="HxW", help="smallest input (65x65)")
    trt.add_argument("--opt-size", type=parse_hw, default=(513, 513), metavar="HxW", help="size tuned for (513x513)")
    trt.add_argument("--max-size", type=parse_hw, default=(1025, 1025), metavar="HxW", help="largest input (1025x1025)")
    trt.add_argument("--max-batch", type=int_at_least(1), default=1, metavar="N", help="largest batch (1)")
    trt.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache file (read and updated)")
    trt.add_argument("--hardware-compatible", action="store_true",
                     help="plan runs on any Ampere or newer GPU (TensorRT >= 8.6; slower)")
    trt.add_argument("--version-compatible", action="store_true",
                     help="plan runs on newer TensorRT versions too (TensorRT >= 8.6)")
    trt.add_argument("--dla-core", type=int_at_least(0), metavar="N",
                     help="run on DLA core N (Jetson Orin): needs --fp16 and one fixed size (min = opt = max)")
    args = ap.parse_args(argv)
    engine_profile, engine_options = engine_settings(ap, args)
    from runtime.backend_choice import is_plan
    from runtime.output_files import output_file_problem

    src = Path(args.weights)
    if is_plan(src):  # a plan holds no weights to read back: say so, not "not a PyTorch checkpoint"
        ap.error(f"{src} is a TensorRT plan, the end of an export: give the weights (.safetensors, .pt/.pth, "
                 ".caffemodel) or the .onnx it was built from")
    if src.suffix == ".onnx":
        return engine_from_onnx(ap, args, src, engine_profile, engine_options)
    out = Path(args.out) if args.out else src.with_suffix(".onnx")
    problem = output_file_problem(out)
    if problem:
        ap.error(f"--out {out}: {problem}")
    if args.num_classes is not None and args.num_classes < 1:
        ap.error(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.class_names and args.num_classes and len(args.class_names) != args.num_classes:
        ap.error(f"--class-names has {len(args.class_names)} names for --num-classes {args.num_classes}")
    if (args.precision == "int8") != bool(args.calibration):
        ap.error("--precision int8 needs --calibration DIR (or scenes:N)" if args.calibration is None
                 else "--calibration applies to --precision int8")
    if args.int8_activations and args.precision != "int8":
        ap.error("--int8-activations applies to --precision int8")
    if args.int8_activations == "asymmetric" and args.engine:
        ap.error("TensorRT takes symmetric int8 only (zero-point 0): leave out --int8-activations asymmetric")
    require_packages(ap, ("torch", "onnx", "safetensors"),
                     "exporting weights (an .onnx with --engine needs none of these)")
    calibration = None
    if args.calibration:
        from export.precision import CalibrationError, calibration_set

        try:
            calibration = calibration_set(args.calibration, args.calibration_images)
        except CalibrationError as e:
            ap.error(f"--calibration {args.calibration}: {e}")

    import torch

    from export.caffe import CaffeModelError
    from export.onnx_export import LabelError
    from export.precision import export_onnx_with_precision
    from export.weights import WeightsError, load_model_as

    t0 = time.perf_counter()
    try:
        model, meta = load_model_as(src, args.num_classes, args.variant, args.width, args.from_vgg16)
    except (WeightsError, CaffeModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = args.class_names or meta.get("class_names")
    try:
        with torch.no_grad():
            export_onnx_with_precision(model, out, args.precision, calibration, class_names=names,
                                       palette=meta.get("palette"),
                                       int8_activations=args.int8_activations or "symmetric")
    except LabelError as e:
        # export_onnx checks them before it writes anything; the message says where they came from.
        origin = "--class-names" if e.field == "class_names" and args.class_names else f"{src} metadata"
        print(f"error: {origin}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the place was checked before the work; a full disk or read-only mount shows now
        print(f"error: cannot write --out {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    print(f"exported {out} ({model.config.variant}, width {model.config.width}, "
          f"{model.config.num_classes} classes, {n_params / 1e6:.2f} M params, {args.precision}) in {time.perf_counter() - t0:.1f} s")

    if args.engine:
        return build_engine_step(args, out, src, engine_profile, engine_options)
    return 0


def engine_from_onnx(ap: argparse.ArgumentParser, args: argparse.Namespace, src: Path, profile, options) -> int:
    """An .onnx exported elsewhere (say on a PC with torch): only its engine is built here, so a
    Jetson builds its plan without torch."""
    export_only = [flag for flag, on in (
        ("--num-classes", args.num_classes is not None), ("--variant", args.variant), ("--width", args.width),
        ("--from-vgg16", args.from_vgg16), ("--class-names", args.class_names),
        ("--precision", args.precision != "fp32"), ("--calibration", args.calibration),
        ("--int8-activations", args.int8_activations)) if on]
    if export_only:
        ap.error(f"{src} is an ONNX model already: {', '.join(export_only)} apply to exporting weights")
    if not args.engine:
        ap.error(f"{src} is an ONNX model already: give --engine PATH to build its TensorRT engine")
    if args.out and Path(args.out).resolve() != src.resolve():
        ap.error(f"--out {args.out}: {src} is not exported again (leave out --out)")
    if not src.is_file():
        ap.error(f"{src}: no such file")
    from export.tensorrt_build import EngineBuildError, check_onnx

    try:
        check_onnx(src)
    except EngineBuildError as e:  # the model given is at fault, not the build: exit 2, as for any bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    return build_engine_step(args, src, src, profile, options)


def build_engine_step(args: argparse.Namespace, onnx: Path, src: Path, profile, options) -> int:
    """The TensorRT plan of ``onnx`` (src: what the sidecar's rebuild command starts from)."""
    from export.tensorrt_build import EngineBuildError, build_engine
    from runtime.errors import TensorRTUnavailable

    try:
        res = build_engine(onnx, args.engine, profile, options, timing_cache=args.timing_cache,
                           weights_path=src, force=args.force)
    except (TensorRTUnavailable, EngineBuildError) as e:
        print(f"error: no TensorRT engine built: {e}", file=sys.stderr)
        return 1
    if res.built:
        print(f"built TensorRT engine {res.path} (metadata: {res.path}.json)")
    else:
        print(f"engine up to date: {res.path}")
    return 0


def engine_settings(ap: argparse.ArgumentParser, args: argparse.Namespace):
    """The engine's profile and options, refused at parse time when they cannot work."""
    from export.tensorrt_build import BuildOptions, ShapeProfile, check_options

    engine_only = [f for f, on in (("--force", args.force), ("--fp16", args.fp16),
                                   ("--hardware-compatible", args.hardware_compatible),
                                   ("--version-compatible", args.version_compatible),
                                   ("--dla-core", args.dla_core is not None),
                                   ("--timing-cache", args.timing_cache)) if on]
    if engine_only and not args.engine:
        ap.error(f"{', '.join(engine_only)} apply to the TensorRT engine: add --engine PATH")
    refuse_unwritable(ap, {"--engine": args.engine, "--timing-cache": args.timing_cache})
    try:
        profile = ShapeProfile(args.min_size, args.opt_size, args.max_size, args.max_batch)
        options = BuildOptions(fp16=args.fp16, hardware_compatible=args.hardware_compatible,
                               version_compatible=args.version_compatible, dla_core=args.dla_core)
        check_options(profile, options)
    except ValueError as e:
        ap.error(str(e))
    return profile, options


if __name__ == "__main__":
    sys.exit(main())
