"""The GPU form of the Triton model repository: a TensorRT plan and the CUDA CRF, chained by an ensemble.

    deeplab            ensemble: IMAGE -> deeplab_pad -> deeplab_network -> deeplab_crf -> LABELS (+ PROBABILITIES)
    deeplab_pad        Python, KIND_CPU: pads IMAGE to the next 8k+1 size within the engine's profile
    deeplab_network    tensorrt_plan, KIND_GPU, dynamic batching: image UINT8 [-1,-1,3] -> scores FP32 [C,-1,-1]
    deeplab_crf        Python, KIND_GPU: SCORES stay on the GPU (DLPack), crop + CRF + argmax there;
                       IMAGE (the unpadded request image) goes to it too

``write_gpu_repository(plan, out_dir)`` writes it; the tensor and parameter names are
runtime.triton_contract's. Class names, palette and profile come from the plan's sidecar
(runtime.engine_meta) unless given. The Python models get copies of ``runtime/`` and ``crf/`` in their
model directories, so the repository is self-contained; the server image needs numpy, pycuda and nvcc
(deploy/Dockerfile). Written and validated without a GPU (export/triton_config.py); it runs only on
a GPU machine with Triton. docs/triton.md ("GPU ensemble") says what differs from runtime.Segmenter.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence

from crf import CRFParams
from export.triton_repo import _pbtxt_string as _q  # one quoting for both repository forms
from runtime import engine_meta
from runtime.contract import DEFAULT_MAX_SIZE
from runtime.palette import VOC_CLASSES, check_palette, voc_palette
from runtime.triton_contract import (CONFIG_MAX_ITERATIONS, CONFIG_MAX_SIZE, CONFIG_PROFILE, DEFAULT_MAX_ITERATIONS,
                                     INPUT_IMAGE, MODEL_NAME, OUTPUT_LABELS, OUTPUT_PROBABILITIES, PADDED_IMAGE,
                                     SCORES, config_parameters)

PAD_MODEL, NETWORK_MODEL, CRF_MODEL = "deeplab_pad", "deeplab_network", "deeplab_crf"
#: the engine's tensor names (the ONNX graph's)
NETWORK_INPUT, NETWORK_OUTPUT = engine_meta.INPUT_NAME, engine_meta.OUTPUT_NAME
TEMPLATES = Path(__file__).resolve().parent / "triton_models"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: copied beside each Python model (its model directory is on the Python backend's sys.path)
PACKAGES = ("runtime", "crf")


def _tensor(name: str, dtype: str, dims: Sequence[int]) -> str:
    return f"  {{ name: {_q(name)} data_type: {dtype} dims: [ {', '.join(str(int(d)) for d in dims)} ] }}"


def _tensors(kind: str, entries: Sequence[str]) -> str:
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def _parameters(values: dict) -> str:
    return "".join(f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}\n" for k, v in values.items())


def _instances(kind: str, count: int) -> str:
    return f"instance_group [ {{ kind: {kind} count: {int(count)} }} ]\n"


def _header(name: str, max_batch: int, platform: str = "", backend: str = "") -> str:
    head = f"name: {_q(name)}\n"
    head += f"platform: {_q(platform)}\n" if platform else f"backend: {_q(backend)}\n"
    return head + f"max_batch_size: {int(max_batch)}\n"


def _copy_packages(model_dir: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(PROJECT_ROOT / pkg, model_dir / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _python_model(model_dir: Path, template: str) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True)
    shutil.copyfile(TEMPLATES / template, version / "model.py")
    shutil.copyfile(TEMPLATES / "ensemble_steps.py", version / "ensemble_steps.py")
    _copy_packages(model_dir)


def _batch_limit(max_batch: int, profile: Optional[dict], plan: Path) -> int:
    """The batch the models declare: at most the engine's profile allows (Triton's TensorRT backend
    refuses a max_batch_size above it), which must start at 1."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if profile is None:
        return max_batch
    lo, hi = int(profile["min"][0]), int(profile["max"][0])
    if lo != 1:
        raise ValueError(f"{plan}: the engine's profile starts at batch {lo}; Triton sends batches from 1 "
                         "(rebuild it with tools/export.py, whose profiles start at batch 1)")
    if max_batch > hi:
        warnings.warn(f"{plan}: the engine's profile runs batches of at most {hi}: max_batch {max_batch} "
                      f"lowered to {hi} (rebuild with --max-batch {max_batch} for more)", RuntimeWarning, stacklevel=3)
        return hi
    return max_batch


def write_gpu_repository(plan_path: str | Path, out_dir: str | Path, *, max_batch: int = 8, instances: int = 1,
                         crf_defaults: Optional[CRFParams] = CRFParams(), class_names: Optional[Sequence[str]] = None,
                         palette=None, max_size: int = DEFAULT_MAX_SIZE, probabilities: bool = True,
                         force: bool = False, max_iterations: int = DEFAULT_MAX_ITERATIONS) -> Path:
    """Write the GPU ensemble for the TensorRT plan ``plan_path`` into ``out_dir``; returns out_dir.

    max_batch: the models' max_batch_size (lowered, with a warning, to the profile's largest batch).
    instances: instances per model (each on KIND_GPU, the pad step on KIND_CPU).
    crf_defaults: the CRF a request gets unless its parameters say otherwise; None: no CRF by default.
    class_names / palette: else the sidecar's, else VOC's (21 classes) or class_<i>, as runtime.Segmenter.
    max_size: the runtime's max_size; larger images are refused (the Segmenter would shrink them).
    probabilities: declare the optional PROBABILITIES output. Through an ensemble, Triton asks a step
    for every output it maps, so with it the CRF step copies the C x H x W marginals to the host for
    every request; False leaves only LABELS.
    force: replace the four models' directories when out_dir already holds them.
    max_iterations: the most CRF iterations a request may ask for (the CRF step refuses more).
    """
    plan = Path(plan_path)
    if not plan.is_file():
        raise FileNotFoundError(f"TensorRT plan not found: {plan}")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if crf_defaults is not None and not crf_defaults.iterations <= max_iterations:
        raise ValueError(f"max_iterations ({max_iterations}) is below the default CRF's iterations "
                         f"({crf_defaults.iterations})")
    meta = engine_meta.read_sidecar(plan)  # warns when there is none: then class names must be given
    num_classes = None
    if meta is not None:
        out = next(t for t in meta.io if t["name"] == NETWORK_OUTPUT)
        num_classes = int(out["shape"][1]) if int(out["shape"][1]) > 0 else None
        if class_names is None and meta.class_names is not None:
            class_names = meta.class_names
        if palette is None and meta.palette is not None:
            palette = meta.palette
    if num_classes is None:
        if class_names is None:
            raise ValueError(f"{plan}: the class count is unknown (no sidecar {engine_meta.sidecar_path(plan).name} "
                             "with it): give class_names")
        num_classes = len(class_names)
    if class_names is None:
        class_names = list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class engine")
    pal = check_palette(voc_palette(num_classes) if palette is None else palette, num_classes)
    profile = meta.profile if meta is not None else None
    batch = _batch_limit(int(max_batch), profile, plan)

    root = Path(out_dir)
    models = (MODEL_NAME, PAD_MODEL, NETWORK_MODEL, CRF_MODEL)
    existing = [m for m in models if (root / m).exists()]
    if existing and not force:
        raise FileExistsError(f"{root} already holds {', '.join(existing)}; pass force=True to replace them")
    for m in existing:
        shutil.rmtree(root / m)
    root.mkdir(parents=True, exist_ok=True)
    params = config_parameters(class_names, pal.tolist(), crf_defaults)
    c = num_classes
    image_in = _tensor(INPUT_IMAGE, "TYPE_UINT8", [-1, -1, 3])
    outputs = [_tensor(OUTPUT_LABELS, "TYPE_UINT8", [-1, -1])]
    if probabilities:
        outputs.append(_tensor(OUTPUT_PROBABILITIES, "TYPE_FP32", [c, -1, -1]))

    # deeplab_pad
    _python_model(root / PAD_MODEL, "pad_model.py")
    (root / PAD_MODEL / "config.pbtxt").write_text(
        _header(PAD_MODEL, batch, backend="python")
        + _tensors("input", [image_in]) + _tensors("output", [_tensor(PADDED_IMAGE, "TYPE_UINT8", [-1, -1, 3])])
        + _instances("KIND_CPU", instances)
        + _parameters({CONFIG_PROFILE: json.dumps(profile), CONFIG_MAX_SIZE: str(int(max_size))}))

    # deeplab_network: the plan as it is, with its sidecar beside it for engine_meta.check_compatible
    version = root / NETWORK_MODEL / "1"
    version.mkdir(parents=True)
    shutil.copyfile(plan, version / "model.plan")
    if meta is not None:
        shutil.copyfile(engine_meta.sidecar_path(plan), engine_meta.sidecar_path(version / "model.plan"))
    (root / NETWORK_MODEL / "config.pbtxt").write_text(
        _header(NETWORK_MODEL, batch, platform="tensorrt_plan")
        + _tensors("input", [_tensor(NETWORK_INPUT, "TYPE_UINT8", [-1, -1, 3])])
        + _tensors("output", [_tensor(NETWORK_OUTPUT, "TYPE_FP32", [c, -1, -1])])
        + _instances("KIND_GPU", instances) + "dynamic_batching { }\n")

    # deeplab_crf: GPU inputs stay on the GPU (the Python backend copies them to the host otherwise)
    _python_model(root / CRF_MODEL, "crf_model.py")
    (root / CRF_MODEL / "config.pbtxt").write_text(
        _header(CRF_MODEL, batch, backend="python")
        + _tensors("input", [_tensor(SCORES, "TYPE_FP32", [c, -1, -1]), image_in])
        + _tensors("output", outputs) + _instances("KIND_GPU", instances)
        + _parameters({"FORCE_CPU_ONLY_INPUT_TENSORS": "no", **params,
                       CONFIG_MAX_ITERATIONS: str(int(max_iterations))}))

    # deeplab: the ensemble (its parameters are the ones clients read: class names, palette, CRF defaults)
    (root / MODEL_NAME / "1").mkdir(parents=True)
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
    (root / MODEL_NAME / "config.pbtxt").write_text(
        _header(MODEL_NAME, batch, platform="ensemble")
        + _tensors("input", [image_in]) + _tensors("output", outputs) + _parameters(params)
        + "ensemble_scheduling {\n  step [\n" + step_text + "\n  ]\n}\n")
    return root
