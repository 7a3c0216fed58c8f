"""Triton model repositories serving a DeepLab model: the CPU form for an ``.onnx``, the GPU form for a TensorRT plan.

CPU form, ``write_repository(model.onnx, out)``: one model, ``deeplab``
    config.pbtxt     backend "python", KIND_CPU instances, dynamic batching with a queue timeout, and
                     the class names, palette, CRF defaults, max_pixels, max_iterations and
                     compute_timeout_s as parameters
    1/model.onnx     the model, run by serving.models.SegmenterModel (runtime.Segmenter per request)

GPU form, ``write_gpu_repository(plan, out)`` (``write_repository`` hands a ``.engine``/``.plan`` to it):
    deeplab          ensemble: IMAGE -> deeplab_pad -> deeplab_network -> deeplab_crf -> LABELS (+ PROBABILITIES)
    deeplab_pad      Python, KIND_CPU: pads IMAGE to the next 8k+1 size within the engine's profile
    deeplab_network  tensorrt_plan, KIND_GPU, dynamic batching: image UINT8 [-1,-1,3] -> scores FP32 [C,-1,-1]
    deeplab_crf      Python, KIND_GPU: SCORES stay on the GPU (DLPack), crop + CRF + argmax there;
                     IMAGE (the unpadded request image) goes to it too

Every Python model's ``1/`` holds ``model.py`` (MODEL_PY: it names its class of serving/models.py)
and copies of ``serving/``, ``runtime/`` and ``crf/``: the repository runs on any Triton whose Python
has the model's packages (CPU: numpy, OpenCV, ONNX Runtime; GPU: numpy, pycuda and nvcc, see
deploy/Dockerfile), with no install of this project there. Each model folder is built beside its
target and swapped in, so a failed write never leaves half a model. Imports only runtime/ and crf/
(no torch); serving.config_check checks a repository against Triton's own schema.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Optional, Sequence

from crf import CRFParams
from runtime import engine_meta
from runtime.contract import DEFAULT_MAX_SIZE
from runtime.palette import VOC_CLASSES, check_palette, voc_palette

from .contract import (CONFIG_COMPUTE_TIMEOUT, CONFIG_MAX_ITERATIONS, CONFIG_MAX_PIXELS, CONFIG_MAX_SIZE,
                       CONFIG_PROFILE, DEFAULT_MAX_ITERATIONS, DEFAULT_MAX_PIXELS, INPUT_IMAGE, MODEL_NAME,
                       OUTPUT_LABELS, OUTPUT_PROBABILITIES, PADDED_IMAGE, SCORES, config_parameters)

ROOT = Path(__file__).resolve().parents[1]
#: The packages copied beside each Python model's model.py (its folder is first on its sys.path).
PACKAGES = ("serving", "runtime", "crf")
#: Environment variable: import paths (os.pathsep-separated) a model puts before its own folder on
#: sys.path (serving.launcher sets it for the wheel's server, whose Python backend needs numpy < 2).
SITE_ENV = "DEEPLAB_TRITON_SITE"
#: A Python model's 1/model.py. Nothing but the standard library before the paths are set: the
#: Python backend's stub embeds the system's Python, and numpy must come from SITE_ENV where given.
MODEL_PY = '''"""Triton's entry to serving.models.{cls}, run from the copies of serving/, runtime/ and crf/ beside this file."""
import os
import sys

for _path in reversed([p for p in os.environ.get("{env}", "").split(os.pathsep) if p]
                      + [os.path.dirname(os.path.abspath(__file__))]):
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

from serving.models import {cls} as TritonPythonModel  # noqa: E402,F401
'''
#: Dynamic batching: how long a request may wait for others of its size (microseconds).
DEFAULT_QUEUE_DELAY_US = 2000
#: The most seconds a request waits in Triton's queue for a model instance; then Triton refuses it
#: ("Request timeout expired": HTTP 503, gRPC UNAVAILABLE). A model instance runs one batch at a
#: time to its end, so this is what bounds how long one long request can hold up the others.
DEFAULT_QUEUE_TIMEOUT_S = 10.0
PLAN_SUFFIXES = (".engine", ".plan")
PAD_MODEL, NETWORK_MODEL, CRF_MODEL = "deeplab_pad", "deeplab_network", "deeplab_crf"
#: the engine's tensor names (the ONNX graph's)
NETWORK_INPUT, NETWORK_OUTPUT = engine_meta.INPUT_NAME, engine_meta.OUTPUT_NAME


class RepositoryError(ValueError):
    """A repository that cannot be written, with the reason."""


# -- config.pbtxt ----------------------------------------------------------------------------------

def _q(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept as is)."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor(name: str, dtype: str, dims: Sequence[int]) -> str:
    return f"  {{ name: {_q(name)} data_type: {dtype} dims: [ {', '.join(str(int(d)) for d in dims)} ] }}"


def _config(name: str, max_batch: int, inputs: Sequence[str], outputs: Sequence[str], *, backend: str = "",
            platform: str = "", instances: Optional[tuple] = None, parameters: Optional[dict] = None,
            extra: str = "") -> str:
    """A model's config.pbtxt; instances: (kind, count)."""
    text = f"name: {_q(name)}\n" + (f"platform: {_q(platform)}\n" if platform else f"backend: {_q(backend)}\n")
    text += f"max_batch_size: {int(max_batch)}\n"
    text += "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n"
    if instances:
        text += f"instance_group [ {{ kind: {instances[0]} count: {int(instances[1])} }} ]\n"
    text += "".join(f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}\n"
                    for k, v in (parameters or {}).items())
    return text + extra


def _outputs(num_classes: int, probabilities: bool = True) -> list:
    return [_tensor(OUTPUT_LABELS, "TYPE_UINT8", [-1, -1])] + (
        [_tensor(OUTPUT_PROBABILITIES, "TYPE_FP32", [num_classes, -1, -1])] if probabilities else [])


# -- writing ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _staged(target: Path):
    """A folder beside ``target`` that replaces it when the block ends without an error."""
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    staging.mkdir(parents=True)
    try:
        yield staging
        if target.exists():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _python_model(model_dir: Path, cls: str) -> Path:
    """model_dir/1/ with model.py for serving.models.<cls> and the packages; returns 1/."""
    version = model_dir / "1"
    version.mkdir()
    (version / "model.py").write_text(MODEL_PY.format(cls=cls, env=SITE_ENV), encoding="utf-8")
    for package in PACKAGES:  # compiled files are left out: they are built where the model loads
        shutil.copytree(ROOT / package, version / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    return version


def _check_whole(**values) -> None:
    """Each name=(value, lowest): a whole number >= lowest, else RepositoryError."""
    for name, (value, low) in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RepositoryError(f"{name} must be a whole number >= {low}, got {value!r}")


def _check_iterations(defaults: Optional[CRFParams], max_iterations: int) -> None:
    if defaults is not None and defaults.iterations > max_iterations:
        raise RepositoryError(f"max_iterations ({max_iterations}) is below the default CRF's iterations "
                              f"({defaults.iterations}): a request could not ask for the model's own default")


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


def write_repository(model_path, out_dir, instances: int = 1, max_batch: int = 8, crf_params=None,
                     no_crf: bool = False, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                     max_pixels: int = DEFAULT_MAX_PIXELS, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                     queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S) -> Path:
    """Write (or replace) ``<out_dir>/deeplab`` for ``model_path``; returns that folder.

    crf_params: CRFParams or a JSON file of them (the model's default CRF; requests may change it);
    no_crf: the CRF off by default. max_pixels: the most pixels of one request's images;
    max_iterations: the most CRF iterations a request may ask for (at least the defaults');
    queue_timeout_s: the most seconds a request waits for a model instance before Triton refuses
    it, and computes before the model stops it. The ONNX is loaded and run once on a small image
    first (a model that is not ours fails here, not in the server). A plan (.engine/.plan) goes to
    write_gpu_repository with instances, max_batch, the CRF defaults and max_iterations (it has
    no queue or max_pixels options: it refuses images above the runtime's max_size)."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise RepositoryError(f"{model_path}: no such model file")
    if model_path.suffix in PLAN_SUFFIXES:
        write_gpu_repository(model_path, out_dir, max_batch=max_batch, instances=instances,
                             crf_defaults=_crf_defaults({}, crf_params, no_crf), max_iterations=max_iterations)
        return out_dir / MODEL_NAME
    if model_path.suffix != ".onnx":
        raise RepositoryError(f"{model_path}: expected an .onnx (or a TensorRT .engine/.plan)")
    _check_whole(instances=(instances, 1), max_batch=(max_batch, 1), queue_delay_us=(queue_delay_us, 0),
                 max_pixels=(max_pixels, 1), max_iterations=(max_iterations, 0))
    # Triton reads 0 as "no timeout"; below a millisecond every queued request would be refused.
    if not isinstance(queue_timeout_s, (int, float)) or isinstance(queue_timeout_s, bool) \
            or not 0.001 <= queue_timeout_s <= 86400:
        raise RepositoryError(f"queue_timeout_s must be a number of seconds in 0.001..86400, got {queue_timeout_s!r}")
    from runtime.segmenter import Segmenter

    seg = Segmenter(model_path, crf=None, backend="onnxruntime", threads=1)
    defaults = _crf_defaults(seg.network.metadata, crf_params, no_crf)
    _check_iterations(defaults, max_iterations)
    parameters = config_parameters(seg.class_names, seg.palette.tolist(), defaults)
    parameters[CONFIG_MAX_PIXELS] = str(max_pixels)
    parameters[CONFIG_MAX_ITERATIONS] = str(max_iterations)
    # The same limit on computing: past it a batch's CRF stops and its requests get 503.
    parameters[CONFIG_COMPUTE_TIMEOUT] = repr(float(queue_timeout_s))
    # The queue policy cannot be overridden by a client, so the bound holds for every request.
    batching = (f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n"
                f"  default_queue_policy {{ timeout_action: REJECT default_timeout_microseconds: "
                f"{round(queue_timeout_s * 1e6)} allow_timeout_override: false }}\n}}\n")
    config = _config(MODEL_NAME, max_batch, [_tensor(INPUT_IMAGE, "TYPE_UINT8", [-1, -1, 3])],
                     _outputs(seg.num_classes), backend="python", instances=("KIND_CPU", instances),
                     parameters=parameters, extra=batching)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with _staged(out_dir / MODEL_NAME) as staging:
            (staging / "config.pbtxt").write_text(config, encoding="utf-8")
            shutil.copyfile(model_path, _python_model(staging, "SegmenterModel") / "model.onnx")
    except OSError as e:
        raise RepositoryError(f"cannot write the repository in {out_dir}: {e}") from e
    return out_dir / MODEL_NAME


def _batch_limit(max_batch: int, profile: Optional[dict], plan: Path) -> int:
    """The batch the models declare: at most the engine's profile allows (Triton's TensorRT backend
    refuses a max_batch_size above it), which must start at 1."""
    if profile is None:
        return max_batch
    lo, hi = int(profile["min"][0]), int(profile["max"][0])
    if lo != 1:
        raise RepositoryError(f"{plan}: the engine's profile starts at batch {lo}; Triton sends batches from 1 "
                              "(rebuild it with deeplab-export, whose profiles start at batch 1)")
    if max_batch > hi:
        warnings.warn(f"{plan}: the engine's profile runs batches of at most {hi}: max_batch {max_batch} "
                      f"lowered to {hi} (rebuild with --max-batch {max_batch} for more)", RuntimeWarning, stacklevel=3)
        return hi
    return max_batch


def write_gpu_repository(plan_path: str | Path, out_dir: str | Path, *, max_batch: int = 8, instances: int = 1,
                         crf_defaults: Optional[CRFParams] = CRFParams(), class_names: Optional[Sequence[str]] = None,
                         palette=None, max_size: int = DEFAULT_MAX_SIZE, probabilities: bool = True,
                         max_iterations: int = DEFAULT_MAX_ITERATIONS) -> Path:
    """Write (or replace) the GPU ensemble's four models for the TensorRT plan ``plan_path`` in
    ``out_dir``; returns out_dir.

    max_batch: the models' max_batch_size (lowered, with a warning, to the profile's largest batch).
    instances: instances per model (each on KIND_GPU, the pad step on KIND_CPU).
    crf_defaults: the CRF a request gets unless its parameters say otherwise; None: no CRF by default.
    class_names / palette: else the sidecar's, else VOC's (21 classes) or class_<i>, as runtime.Segmenter.
    max_size: the runtime's max_size; larger images are refused (the Segmenter would shrink them).
    probabilities: declare the optional PROBABILITIES output. Through an ensemble, Triton asks a step
    for every output it maps, so with it the CRF step copies the C x H x W marginals to the host for
    every request; False leaves only LABELS.
    max_iterations: the most CRF iterations a request may ask for (the CRF step refuses more).
    """
    plan, root = Path(plan_path), Path(out_dir)
    if not plan.is_file():
        raise RepositoryError(f"{plan}: no such model file")
    _check_whole(instances=(instances, 1), max_batch=(max_batch, 1), max_iterations=(max_iterations, 0))
    _check_iterations(crf_defaults, max_iterations)
    meta = engine_meta.read_sidecar(plan)  # warns when there is none: then class names must be given
    num_classes = None
    if meta is not None:
        out = next(t for t in meta.io if t["name"] == NETWORK_OUTPUT)
        num_classes = int(out["shape"][1]) if int(out["shape"][1]) > 0 else None
        class_names = meta.class_names if class_names is None else class_names
        palette = meta.palette if palette is None else palette
    if num_classes is None:
        if class_names is None:
            raise RepositoryError(f"{plan}: the class count is unknown (no sidecar "
                                  f"{engine_meta.sidecar_path(plan).name} with it): give class_names")
        num_classes = len(class_names)
    if class_names is None:
        class_names = list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise RepositoryError(f"{len(class_names)} class names for a {num_classes}-class engine")
    pal = check_palette(voc_palette(num_classes) if palette is None else palette, num_classes)
    profile = meta.profile if meta is not None else None
    batch = _batch_limit(max_batch, profile, plan)
    params = config_parameters(class_names, pal.tolist(), crf_defaults)
    image_in = _tensor(INPUT_IMAGE, "TYPE_UINT8", [-1, -1, 3])
    outputs = _outputs(num_classes, probabilities)
    root.mkdir(parents=True, exist_ok=True)

    with _staged(root / PAD_MODEL) as staging:
        _python_model(staging, "PadModel")
        (staging / "config.pbtxt").write_text(_config(
            PAD_MODEL, batch, [image_in], [_tensor(PADDED_IMAGE, "TYPE_UINT8", [-1, -1, 3])], backend="python",
            instances=("KIND_CPU", instances),
            parameters={CONFIG_PROFILE: json.dumps(profile), CONFIG_MAX_SIZE: str(int(max_size))}), encoding="utf-8")

    with _staged(root / NETWORK_MODEL) as staging:  # the plan, its sidecar beside it for engine_meta.check_compatible
        (staging / "1").mkdir()
        shutil.copyfile(plan, staging / "1" / "model.plan")
        if meta is not None:
            shutil.copyfile(engine_meta.sidecar_path(plan), engine_meta.sidecar_path(staging / "1" / "model.plan"))
        (staging / "config.pbtxt").write_text(_config(
            NETWORK_MODEL, batch, [_tensor(NETWORK_INPUT, "TYPE_UINT8", [-1, -1, 3])],
            [_tensor(NETWORK_OUTPUT, "TYPE_FP32", [num_classes, -1, -1])], platform="tensorrt_plan",
            instances=("KIND_GPU", instances), extra="dynamic_batching { }\n"), encoding="utf-8")

    with _staged(root / CRF_MODEL) as staging:  # GPU inputs stay on the GPU (the backend copies them to the host otherwise)
        _python_model(staging, "CRFModel")
        (staging / "config.pbtxt").write_text(_config(
            CRF_MODEL, batch, [_tensor(SCORES, "TYPE_FP32", [num_classes, -1, -1]), image_in], outputs,
            backend="python", instances=("KIND_GPU", instances),
            parameters={"FORCE_CPU_ONLY_INPUT_TENSORS": "no", **params, CONFIG_MAX_ITERATIONS: str(max_iterations)}),
            encoding="utf-8")

    # the ensemble: its parameters are the ones clients read (class names, palette, CRF defaults)
    steps = [
        (PAD_MODEL, {INPUT_IMAGE: INPUT_IMAGE}, {PADDED_IMAGE: "padded_image"}),
        (NETWORK_MODEL, {NETWORK_INPUT: "padded_image"}, {NETWORK_OUTPUT: "scores"}),
        (CRF_MODEL, {SCORES: "scores", INPUT_IMAGE: INPUT_IMAGE},
         {OUTPUT_LABELS: OUTPUT_LABELS, **({OUTPUT_PROBABILITIES: OUTPUT_PROBABILITIES} if probabilities else {})}),
    ]
    step_text = ",\n".join(
        f"    {{\n      model_name: {_q(m)}\n      model_version: -1\n"
        + "".join(f"      input_map {{ key: {_q(k)} value: {_q(v)} }}\n" for k, v in ins.items())
        + "".join(f"      output_map {{ key: {_q(k)} value: {_q(v)} }}\n" for k, v in outs.items()) + "    }"
        for m, ins, outs in steps)
    with _staged(root / MODEL_NAME) as staging:
        (staging / "1").mkdir()
        (staging / "config.pbtxt").write_text(_config(
            MODEL_NAME, batch, [image_in], outputs, platform="ensemble", parameters=params,
            extra="ensemble_scheduling {\n  step [\n" + step_text + "\n  ]\n}\n"), encoding="utf-8")
    return root
