"""Build a TensorRT engine from our ONNX graph (TensorRT 8.5 .. 11, through runtime.trt_compat),
with its metadata sidecar (runtime.engine_meta) next to the plan.

NOT RUN in this project's CI: TensorRT cannot be installed on its machines. Written from the
official Python API (NVIDIA/TensorRT bindings and samples) and type-checked against ``tensorrt-stubs``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crf.gpu_kernels import gpu_identity
from runtime import engine_meta, trt_compat
from runtime.engine_meta import EngineMeta
from runtime.errors import ModelFormatError, SidecarError
from runtime.onnx_backend import metadata_json, parse_metadata
from runtime.output_files import write_bytes_atomically

if TYPE_CHECKING:
    import tensorrt

INPUT_NAME = engine_meta.INPUT_NAME


def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class ShapeProfile:
    """Min / opt / max input sizes (H, W) for the dynamic-shape optimisation profile; batch 1..max_batch."""

    min_hw: tuple[int, int] = (65, 65)
    opt_hw: tuple[int, int] = (513, 513)
    max_hw: tuple[int, int] = (1025, 1025)
    max_batch: int = 1

    def __post_init__(self) -> None:
        if self.max_batch < 1 or min(self.min_hw) < 1:
            raise ValueError(f"invalid profile: sizes and max batch must be >= 1, got min size {_hw(self.min_hw)}, "
                             f"max batch {self.max_batch}")
        for a, b in ((self.min_hw, self.opt_hw), (self.opt_hw, self.max_hw)):
            if a[0] > b[0] or a[1] > b[1]:
                raise ValueError(f"profile sizes must be ordered min <= opt <= max in H and in W, got min "
                                 f"{_hw(self.min_hw)}, opt {_hw(self.opt_hw)}, max {_hw(self.max_hw)}")

    @property
    def is_static(self) -> bool:
        return self.min_hw == self.max_hw and self.max_batch == 1

    def shapes(self) -> dict[str, list[int]]:
        """The input's N, H, W, 3 shapes as given to TensorRT (and recorded in the sidecar)."""
        return {"min": [1, *self.min_hw, 3], "opt": [1, *self.opt_hw, 3], "max": [self.max_batch, *self.max_hw, 3]}


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False                 # builder flag, TensorRT <= 10.x (an FP16/INT8 ONNX sets its own flag)
    hardware_compatible: bool = False  # runs on any Ampere+ GPU (8.6+)
    version_compatible: bool = False   # newer TensorRT runtimes load it (8.6+)
    dla_core: int | None = None        # Jetson Orin DLA core; needs FP16 and a static shape
    workspace_bytes: int = 1 << 30


def check_options(profile: ShapeProfile, options: BuildOptions) -> None:
    """What can be refused without TensorRT (tools/export.py calls this at argument parsing)."""
    if options.dla_core is None:
        return
    if options.dla_core < 0:
        raise ValueError(f"DLA core must be >= 0, got {options.dla_core}")
    if not profile.is_static:
        raise ValueError(
            "DLA runs static shapes only: give one size as --min-size, --opt-size and --max-size and "
            f"--max-batch 1 (got min {_hw(profile.min_hw)}, opt {_hw(profile.opt_hw)}, max {_hw(profile.max_hw)}, "
            f"max batch {profile.max_batch})")
    if options.hardware_compatible:
        raise ValueError("a DLA plan is tied to its Jetson: --hardware-compatible does not apply with --dla-core")


class EngineBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class BuildResult:
    path: Path
    meta: EngineMeta
    built: bool  # False: an identical plan existed (same engine key) and was kept


def onnx_precision(metadata: dict[str, str], source: str) -> str:
    """The precision export/precision.py recorded in the ONNX's metadata ("fp32" when absent).
    INT8 with asymmetric activations (non-zero zero points) is refused: TensorRT's Q/DQ layers
    take symmetric scales only."""
    precision = metadata.get("precision", "fp32")
    if precision not in ("fp32", "fp16", "int8"):
        raise EngineBuildError(f"{source}: unknown precision {precision!r} in its metadata")
    if precision == "int8":
        try:
            settings = metadata_json(metadata, "quantization", source, dict, "a JSON object") or {}
        except ModelFormatError as e:
            raise EngineBuildError(str(e)) from e
        if "asymmetric" in str(settings.get("activations", "")):
            raise EngineBuildError(
                f"{source} has asymmetric INT8 activations (non-zero zero points), which TensorRT does not "
                "take: export it again with --precision int8 and the default --int8-activations symmetric")
    return precision


def _check_versioned_options(options: BuildOptions, precision: str = "fp32") -> None:
    """What depends on the installed TensorRT (and on the ONNX's precision)."""
    if options.fp16 and not trt_compat.supports_precision_flags():
        raise EngineBuildError("TensorRT 11 takes precision from the ONNX model: convert the ONNX "
                               "to FP16 offline (keeping uint8/float32 I/O) instead of passing --fp16")
    if (options.dla_core is not None and not options.fp16 and precision == "fp32"
            and trt_compat.supports_precision_flags()):
        raise EngineBuildError("DLA runs FP16 or INT8 only: add --fp16 (or build from an FP16 or INT8 ONNX)")
    if (options.hardware_compatible or options.version_compatible) and not trt_compat.supports_portable_plans():
        raise EngineBuildError(f"hardware- and version-compatible plans need TensorRT 8.6 or newer; this is "
                               f"TensorRT {trt_compat.full_version()}")


def _onnx_nodes_and_metadata(onnx_path: Path) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(name, op_type) of the graph's nodes in order (TensorRT 8.x parser errors give only the
    index) and the metadata_props export/onnx_export.py wrote (class names, palette).

    Without the onnx package (a Jetson installs the runtime alone: ``pip install .``) ONNX Runtime
    reads the metadata and the node list is empty: parser errors then give the node index only.
    EngineBuildError for a file that is not an ONNX model, or whose metadata is not JSON of its type
    (naming the key): the sidecar takes the class names and palette from there."""
    try:
        import onnx
    except ImportError:
        from runtime.onnx_backend import read_model_metadata

        try:
            return [], read_model_metadata(onnx_path)  # parse_metadata's checks included
        except ModelFormatError as e:
            raise EngineBuildError(str(e)) from e
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors for what is not a model
        raise EngineBuildError(f"{onnx_path} is not a loadable ONNX model: {e}") from e
    nodes = [(n.name, n.op_type) for n in model.graph.node]
    metadata = {p.key: p.value for p in model.metadata_props}
    try:
        parse_metadata(metadata, onnx_path)
    except ModelFormatError as e:
        raise EngineBuildError(str(e)) from e
    return nodes, metadata


def check_onnx(onnx_path: str | Path) -> None:
    """What build_engine checks of its input first, whether or not TensorRT is here: EngineBuildError
    for a file that is not an ONNX model or whose metadata is malformed. A tool calls it to tell a
    bad input model from a build that failed."""
    _onnx_nodes_and_metadata(Path(onnx_path))


def _json_list(metadata: dict[str, str], key: str) -> Any:
    try:
        value = json.loads(metadata[key])
    except (KeyError, ValueError):
        return None
    return value if isinstance(value, list) else None


def _attach_timing_cache(config: tensorrt.IBuilderConfig, path: Path | None) -> tensorrt.ITimingCache:
    """Reuse the tactic timings in ``path``; a cache TensorRT refuses (made on another GPU or
    TensorRT version) is reported and replaced by a fresh one rather than silently ignored."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(blob) if blob else None
    if blob and (cache is None or not config.set_timing_cache(cache, ignore_mismatch=False)):
        print(f"warning: timing cache {path} was made on another GPU or TensorRT version: "
              "starting a fresh one (it will replace the file)", file=sys.stderr)
        cache = None
    if cache is None:
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineBuildError("TensorRT refused a fresh timing cache")
    return cache


def _network_io(network: tensorrt.INetworkDefinition) -> list[dict[str, Any]]:
    tensors = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    tensors += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    return [{"name": t.name, "mode": mode, "dtype": trt_compat.dtype_name(t.dtype),
             "shape": trt_compat.dims_list(t.shape, t.name)} for mode, t in tensors]


def build_engine(onnx_path: str | Path, engine_path: str | Path, profile: ShapeProfile = ShapeProfile(),
                 options: BuildOptions = BuildOptions(), timing_cache: str | Path | None = None,
                 weights_path: str | Path | None = None, force: bool = False) -> BuildResult:
    """Parse the ONNX file, build a serialized engine for ``profile`` and write it to engine_path
    with its sidecar (engine_path + ".json"). Skips the build when the plan there has the same engine
    key (ONNX sha256, TensorRT version, GPU, precision, profile, options), unless ``force``."""
    check_options(profile, options)
    onnx_path, out = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path}: no such ONNX file")
    # Read first: a graph TensorRT cannot take is refused whether or not TensorRT is here.
    nodes, metadata = _onnx_nodes_and_metadata(onnx_path)
    graph_precision = onnx_precision(metadata, str(onnx_path))
    trt_compat.load_tensorrt()  # raises TensorRTUnavailable with the reason
    import tensorrt as trt  # the checked real library; typed by tensorrt-stubs under mypy

    _check_versioned_options(options, graph_precision)
    gpu = gpu_identity()
    if options.hardware_compatible and gpu is not None and not trt_compat.runs_hardware_compatible_plan(
            gpu.compute_capability):
        raise EngineBuildError(f"hardware-compatible plans are built on Ampere or newer GPUs; this is {gpu.name} "
                               f"(compute capability {gpu.compute_capability})")
    gpu_name, cc = (gpu.name, gpu.compute_capability) if gpu else (None, None)
    onnx_sha256, trt_version = engine_meta.file_sha256(onnx_path), trt_compat.full_version()
    precision, shapes = trt_compat.precision_name(options.fp16, graph_precision), profile.shapes()
    key = engine_meta.engine_key(onnx_sha256, trt_version, gpu_name, cc, precision, shapes,
                                 options.hardware_compatible, options.version_compatible, options.dla_core)
    if not force and engine_meta.up_to_date(out, key):
        existing = engine_meta.read_sidecar(out)
        assert existing is not None  # up_to_date has read it
        return BuildResult(out, existing, built=False)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(trt_compat.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(trt_compat.describe_parser_error(parser.get_error(i), nodes)
                             for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}:\n  {errors}")
    try:
        engine_meta.check_io(_network_io(network), str(onnx_path))
    except SidecarError as e:
        raise EngineBuildError(str(e)) from e

    config = builder.create_builder_config()
    trt_compat.set_workspace(config, options.workspace_bytes)
    trt_compat.set_precision(config, graph_precision, options.fp16)
    if options.hardware_compatible:
        trt_compat.set_hardware_compatible(config)
    if options.version_compatible:
        trt_compat.set_version_compatible(config)
    if options.dla_core is not None:
        if options.dla_core >= builder.num_DLA_cores:
            raise EngineBuildError(f"DLA core {options.dla_core} does not exist: this machine has "
                                   f"{builder.num_DLA_cores} DLA core(s)")
        trt_compat.use_dla(config, options.dla_core)
    cache_file = Path(timing_cache) if timing_cache else None
    # The attached cache gathers this build's timings; it is written back to the file afterwards.
    cache = _attach_timing_cache(config, cache_file)
    opt_profile = builder.create_optimization_profile()
    # Explicit Dims (pybind11 would also convert tuples, but the typed API says Dims).
    opt_profile.set_shape(INPUT_NAME, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"]))
    config.add_optimization_profile(opt_profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError("TensorRT failed to build the engine (see the log above)")
    plan_bytes = bytes(plan)
    runtime = trt.Runtime(logger)
    if options.version_compatible:
        trt_compat.allow_plan_host_code(runtime)
    if options.dla_core is not None:
        runtime.DLA_core = options.dla_core
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise EngineBuildError("TensorRT built a plan it cannot load again (see the log above)")

    meta = EngineMeta(
        tensorrt_version=trt_version, gpu_name=gpu_name, compute_capability=cc, precision=precision,
        profile=shapes, hardware_compatible=options.hardware_compatible,
        version_compatible=options.version_compatible, dla_core=options.dla_core, onnx_sha256=onnx_sha256,
        plan_sha256=hashlib.sha256(plan_bytes).hexdigest(), io=trt_compat.engine_io(engine),
        class_names=_json_list(metadata, "class_names"), palette=_json_list(metadata, "palette"),
        onnx_path=str(onnx_path), weights_path=str(weights_path) if weights_path else None, engine_path=str(out))
    write_bytes_atomically(out, plan_bytes)
    engine_meta.write_sidecar(out, meta)
    if cache_file is not None:
        write_bytes_atomically(cache_file, bytes(cache.serialize()))
    return BuildResult(out, meta, built=True)
