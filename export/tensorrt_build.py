"""Build a TensorRT engine from our ONNX graph (TensorRT 8.5 .. 11, through runtime.trt_compat).

NOT RUN in this project's CI: TensorRT cannot be installed on its machines. Written from the
official Python API (NVIDIA/TensorRT samples) and type-checked against ``tensorrt-stubs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime import trt_compat

INPUT_NAME = "image"


@dataclass(frozen=True)
class ShapeProfile:
    """Min / opt / max input sizes (H, W) for the dynamic-shape optimisation profile; batch fixed ranges."""

    min_hw: tuple[int, int] = (65, 65)
    opt_hw: tuple[int, int] = (513, 513)
    max_hw: tuple[int, int] = (1025, 1025)
    max_batch: int = 1

    def __post_init__(self) -> None:
        for a, b in ((self.min_hw, self.opt_hw), (self.opt_hw, self.max_hw)):
            if a[0] > b[0] or a[1] > b[1]:
                raise ValueError(f"profile sizes must be ordered min <= opt <= max, got {self}")
        if self.max_batch < 1 or min(self.min_hw) < 1:
            raise ValueError(f"invalid profile {self}")


class EngineBuildError(RuntimeError):
    pass


def build_engine(onnx_path: str | Path, engine_path: str | Path, profile: ShapeProfile = ShapeProfile(),
                 fp16: bool = False, workspace_bytes: int = 1 << 30, timing_cache: str | Path | None = None) -> Path:
    """Parse the ONNX file, build a serialized engine for ``profile`` and write it to engine_path."""
    trt_compat.load_tensorrt()  # raises TensorRTUnavailable with the reason
    import tensorrt as trt  # the checked real library; typed by tensorrt-stubs under mypy

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(trt_compat.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    trt_compat.set_workspace(config, workspace_bytes)
    if fp16:
        if not trt_compat.supports_precision_flags():
            raise EngineBuildError("TensorRT 11 takes precision from the ONNX model: convert the ONNX "
                                   "to FP16 offline instead of passing --fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    cache_blob = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    b = profile.max_batch
    # Explicit Dims (pybind11 would also convert tuples, but the typed API says Dims).
    opt_profile.set_shape(INPUT_NAME, trt.Dims([1, *profile.min_hw, 3]), trt.Dims([1, *profile.opt_hw, 3]),
                          trt.Dims([b, *profile.max_hw, 3]))
    config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError("TensorRT failed to build the engine (see the log above)")
    out = Path(engine_path)
    out.write_bytes(bytes(plan))
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return out
