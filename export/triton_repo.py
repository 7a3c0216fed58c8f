"""A Triton model repository serving a DeepLab ``.onnx`` on the CPU (Python backend, dynamic batching).

    <out>/deeplab/config.pbtxt      backend "python", KIND_CPU instances, dynamic batching with a
                                    queue timeout, and the class names, palette, CRF defaults,
                                    max_pixels and max_iterations as parameters
    <out>/deeplab/1/model.py        runtime/triton_model.py (runs runtime.Segmenter per request)
    <out>/deeplab/1/model.onnx      the model
    <out>/deeplab/1/runtime/, crf/  the toolkit's runtime and CRF, copied: the repository runs on any
                                    Triton whose Python has numpy, OpenCV and ONNX Runtime (an NGC
                                    container too), with no install of this project there

A TensorRT plan (``.engine`` / ``.plan``) goes to export/triton_gpu.py's GPU form. Imports only
runtime/ and crf/ (no torch).
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from crf import CRFParams
from runtime.triton_contract import (CONFIG_COMPUTE_TIMEOUT, CONFIG_MAX_ITERATIONS, CONFIG_MAX_PIXELS,
                                     DEFAULT_MAX_ITERATIONS,
                                     DEFAULT_MAX_PIXELS, INPUT_IMAGE, MODEL_NAME, OUTPUT_LABELS,
                                     OUTPUT_PROBABILITIES, config_parameters)

ROOT = Path(__file__).resolve().parents[1]
#: Dynamic batching: how long a request may wait for others of its size (microseconds).
DEFAULT_QUEUE_DELAY_US = 2000
#: The most seconds a request waits in Triton's queue for a model instance; then Triton refuses it
#: ("Request timeout expired": HTTP 503, gRPC UNAVAILABLE). A model instance runs one batch at a
#: time to its end, so this is what bounds how long one long request can hold up the others.
DEFAULT_QUEUE_TIMEOUT_S = 10.0
PLAN_SUFFIXES = (".engine", ".plan")


class RepositoryError(ValueError):
    """A repository that cannot be written, with the reason."""


def _pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept as is)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def config_text(num_classes: int, parameters: dict, instances: int, max_batch: int,
                queue_delay_us: int, queue_timeout_us: int = int(DEFAULT_QUEUE_TIMEOUT_S * 1e6)) -> str:
    """The model's config.pbtxt. The queue policy refuses a request still queued after
    ``queue_timeout_us``; a client cannot override it (allow_timeout_override false), so the bound
    holds for every request."""
    params = "\n".join(f"  {{ key: {_pbtxt_string(k)} value: {{ string_value: {_pbtxt_string(v)} }} }}"
                       + ("," if i < len(parameters) - 1 else "") for i, (k, v) in enumerate(parameters.items()))
    return f"""name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "{INPUT_IMAGE}" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }}
]
output [
  {{ name: "{OUTPUT_LABELS}" data_type: TYPE_UINT8 dims: [ -1, -1 ] }},
  {{ name: "{OUTPUT_PROBABILITIES}" data_type: TYPE_FP32 dims: [ {num_classes}, -1, -1 ] }}
]
instance_group [
  {{ kind: KIND_CPU count: {instances} }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {queue_timeout_us}
    allow_timeout_override: false
  }}
}}
parameters [
{params}
]
"""


def _crf_defaults(metadata: dict, crf_params, no_crf: bool) -> CRFParams | None:
    """--no-crf, else the given CRFParams (or a JSON file of them), else the model's metadata "crf", else DeepLab's."""
    if no_crf:
        return None
    if isinstance(crf_params, CRFParams):
        return crf_params
    if crf_params is not None:
        return CRFParams.load(crf_params)
    if "crf" in metadata:
        try:
            return CRFParams.from_dict(json.loads(metadata["crf"]))
        except ValueError as e:
            raise RepositoryError(f"the model's metadata has unreadable CRF parameters: {e}") from e
    return CRFParams()


def _copy_package(name: str, dest: Path) -> None:
    shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))


def write_repository(model_path, out_dir, instances: int = 1, max_batch: int = 8, crf_params=None,
                     no_crf: bool = False, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                     max_pixels: int = DEFAULT_MAX_PIXELS, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                     queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S) -> Path:
    """Write (or replace) ``<out_dir>/deeplab`` for ``model_path``; returns that folder.

    crf_params: CRFParams or a JSON file of them (the model's default CRF; requests may change it);
    no_crf: the CRF off by default. max_pixels: the most pixels of one request's images;
    max_iterations: the most CRF iterations a request may ask for (at least the defaults');
    queue_timeout_s: the most seconds a request waits for a model instance before Triton refuses
    it. The ONNX is loaded and run once on a small image first (a model that is not ours fails
    here, not in the server). A plan (.engine/.plan) is handed, with the options it has, to
    export.triton_gpu.write_gpu_repository."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise RepositoryError(f"{model_path}: no such model file")
    if model_path.suffix in PLAN_SUFFIXES:
        try:
            from export.triton_gpu import write_gpu_repository
        except ImportError as e:
            raise RepositoryError(f"{model_path}: a TensorRT plan needs the GPU repository writer "
                                  f"(export/triton_gpu.py), which cannot be imported: {e}") from e
        # The GPU form takes the plan's class names from its sidecar and has no queue delay, queue
        # timeout or max_pixels option (it refuses images above the runtime's max_size).
        return write_gpu_repository(model_path, out_dir, max_batch=max_batch, instances=instances,
                                    crf_defaults=_crf_defaults({}, crf_params, no_crf), force=True,
                                    max_iterations=max_iterations)
    if model_path.suffix != ".onnx":
        raise RepositoryError(f"{model_path}: expected an .onnx (or a TensorRT .engine/.plan)")
    for name, value, low in (("instances", instances, 1), ("max_batch", max_batch, 1),
                             ("queue_delay_us", queue_delay_us, 0), ("max_pixels", max_pixels, 1),
                             ("max_iterations", max_iterations, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RepositoryError(f"{name} must be a whole number >= {low}, got {value!r}")
    # Triton reads 0 as "no timeout"; below a millisecond every queued request would be refused.
    if not isinstance(queue_timeout_s, (int, float)) or isinstance(queue_timeout_s, bool) \
            or not 0.001 <= queue_timeout_s <= 86400:
        raise RepositoryError(f"queue_timeout_s must be a number of seconds in 0.001..86400, got {queue_timeout_s!r}")
    from runtime.segmenter import Segmenter

    seg = Segmenter(model_path, crf=None, backend="onnxruntime", threads=1)
    defaults = _crf_defaults(seg.network.metadata, crf_params, no_crf)
    if defaults is not None and defaults.iterations > max_iterations:
        raise RepositoryError(f"max_iterations ({max_iterations}) is below the default CRF's iterations "
                              f"({defaults.iterations}): a request could not ask for the model's own default")
    parameters = config_parameters(seg.class_names, seg.palette.tolist(), defaults)
    parameters[CONFIG_MAX_PIXELS] = str(max_pixels)
    parameters[CONFIG_MAX_ITERATIONS] = str(max_iterations)
    # The same limit on computing: past it a batch's CRF stops and its requests get 503.
    parameters[CONFIG_COMPUTE_TIMEOUT] = repr(float(queue_timeout_s))
    config = config_text(seg.num_classes, parameters, instances, max_batch, queue_delay_us,
                         round(queue_timeout_s * 1e6))

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Built beside the target, then swapped in: a failed write never leaves half a repository.
        staging = out_dir / f".{MODEL_NAME}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            version = staging / "1"
            version.mkdir(parents=True)
            (staging / "config.pbtxt").write_text(config, encoding="utf-8")
            shutil.copyfile(ROOT / "runtime" / "triton_model.py", version / "model.py")
            shutil.copyfile(model_path, version / "model.onnx")
            for package in ("runtime", "crf"):
                _copy_package(package, version)
            target = out_dir / MODEL_NAME
            if target.exists():
                old = out_dir / f".{MODEL_NAME}.{uuid.uuid4().hex[:12]}.old"
                target.rename(old)
                staging.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        raise RepositoryError(f"cannot write the repository in {out_dir}: {e}") from e
    return target
