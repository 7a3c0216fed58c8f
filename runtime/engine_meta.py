"""The metadata sidecar of a TensorRT plan (``model.engine`` -> ``model.engine.json``).

A plan runs only with the TensorRT version and on the GPU it was built for (unless built
version- or hardware-compatible), and its bytes cannot be inspected without TensorRT. The sidecar
records what it was built from and for, so that a loader can say what differs and how to rebuild
before TensorRT fails with "version tag does not match", and so that a build can be skipped when
an identical plan exists (the engine cache key). No torch, no TensorRT.
"""
from __future__ import annotations

import json
import shlex
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from crf.cpu_library import file_sha256

from . import trt_compat
from .errors import EngineMismatch, SidecarError
from .onnx_backend import INPUT_NAME, OUTPUT_NAME, class_names_problem, palette_problem
from .output_files import write_bytes_atomically


SCHEMA = 1
# What our graph's plans must expose (the pre/post contract): name -> (mode, dtype, rank, last dim).
EXPECTED_IO = {INPUT_NAME: ("input", "uint8", 4, 3), OUTPUT_NAME: ("output", "float32", 4, None)}


@dataclass(frozen=True)
class EngineMeta:
    tensorrt_version: str              # exact, e.g. "10.3.0.30"
    gpu_name: Optional[str]            # None: the build machine could not tell (no pycuda)
    compute_capability: Optional[str]  # "8.7"
    precision: str                     # the ONNX's "fp32" / "fp16" / "int8", "+fp16" with the FP16 flag (trt_compat.precision_name)
    profile: Dict[str, List[int]]      # "min" / "opt" / "max" -> N, H, W, 3
    hardware_compatible: bool
    version_compatible: bool
    dla_core: Optional[int]
    onnx_sha256: str
    plan_sha256: str
    io: List[Dict[str, Any]]           # name, mode ("input"/"output"), dtype, shape (-1 = dynamic)
    class_names: Optional[List[str]]
    palette: Optional[List[List[int]]]
    onnx_path: str                     # where the ONNX and the weights were (for the rebuild command)
    weights_path: Optional[str]
    engine_path: str
    schema: int = SCHEMA

    def key(self) -> Dict[str, Any]:
        return engine_key(self.onnx_sha256, self.tensorrt_version, self.gpu_name, self.compute_capability,
                          self.precision, self.profile, self.hardware_compatible, self.version_compatible,
                          self.dla_core)


def engine_key(onnx_sha256: str, tensorrt_version: str, gpu_name: Optional[str],
               compute_capability: Optional[str], precision: str, profile: Dict[str, List[int]],
               hardware_compatible: bool, version_compatible: bool, dla_core: Optional[int]) -> Dict[str, Any]:
    """Everything that decides a plan's content: a plan whose key equals a new build's need not be rebuilt."""
    return {"onnx_sha256": onnx_sha256, "tensorrt_version": tensorrt_version, "gpu_name": gpu_name,
            "compute_capability": compute_capability, "precision": precision,
            "profile": {k: [int(x) for x in v] for k, v in sorted(profile.items())},
            "hardware_compatible": bool(hardware_compatible), "version_compatible": bool(version_compatible),
            "dla_core": dla_core}


def sidecar_path(plan_path: str | Path) -> Path:
    return Path(str(plan_path) + ".json")


def check_io(io: List[Dict[str, Any]], source: str) -> None:
    """Refuse I/O tensors that are not our graph's: input 'image' uint8 N x H x W x 3, output 'scores'
    float32 N x C x H x W, nothing else."""
    found = {str(t.get("name")): t for t in io}
    problems = []
    for name, (mode, dtype, rank, last) in EXPECTED_IO.items():
        t = found.get(name)
        if t is None:
            problems.append(f"no {mode} '{name}'")
            continue
        shape = list(t.get("shape") or [])
        if t.get("mode") != mode or t.get("dtype") != dtype or len(shape) != rank or (last and shape[-1] != last):
            problems.append(f"'{name}' is {t.get('mode')} {t.get('dtype')} {shape}, expected {mode} {dtype} "
                            f"of rank {rank}" + (f" ending in {last}" if last else ""))
    extra = sorted(set(found) - set(EXPECTED_IO))
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if problems:
        listed = ", ".join(f"{t.get('name')} ({t.get('mode')} {t.get('dtype')})" for t in io)
        raise SidecarError(f"{source}: not a plan of this toolkit's DeepLab graph: {'; '.join(problems)} "
                           f"(its tensors: {listed}); build it from an ONNX exported by deeplab-export")


def write_sidecar(plan_path: str | Path, meta: EngineMeta) -> Path:
    check_io(meta.io, str(plan_path))
    out = sidecar_path(plan_path)
    # Written atomically: a loader or a concurrent build's up-to-date check sees the old sidecar or
    # the new one, never half of one.
    write_bytes_atomically(out, (json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n").encode())
    return out


# key -> accepted JSON types (None allowed where the field is Optional)
_FIELDS: Dict[str, tuple] = {
    "tensorrt_version": (str,), "gpu_name": (str, type(None)), "compute_capability": (str, type(None)),
    "precision": (str,), "profile": (dict,), "hardware_compatible": (bool,), "version_compatible": (bool,),
    "dla_core": (int, type(None)), "onnx_sha256": (str,), "plan_sha256": (str,), "io": (list,),
    "class_names": (list, type(None)), "palette": (list, type(None)), "onnx_path": (str,),
    "weights_path": (str, type(None)), "engine_path": (str,), "schema": (int,),
}


def read_sidecar(plan_path: str | Path) -> Optional[EngineMeta]:
    """The plan's metadata, or None (with a warning) when it has no sidecar: nothing can be checked
    then. Raises SidecarError for a sidecar that is not valid JSON, misses keys, or names I/O that
    is not our graph's."""
    path = sidecar_path(plan_path)
    if not path.is_file():
        warnings.warn(f"{plan_path} has no metadata sidecar ({path.name}): its TensorRT version, GPU and "
                      "I/O cannot be checked before loading; rebuild it with deeplab-export ... --engine "
                      f"{plan_path} to get one", RuntimeWarning, stacklevel=2)
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SidecarError(f"{path} is not valid JSON ({e}); rebuild the plan with deeplab-export ... "
                           f"--engine {plan_path}") from e
    if not isinstance(data, dict):
        raise SidecarError(f"{path}: expected a JSON object, found {type(data).__name__}")
    missing = sorted(set(_FIELDS) - set(data))
    if missing:
        raise SidecarError(f"{path} misses {', '.join(missing)}; rebuild the plan with deeplab-export ... "
                           f"--engine {plan_path}")
    wrong = [k for k, types in _FIELDS.items()
             if not isinstance(data[k], types) or (isinstance(data[k], bool) and bool not in types)]
    if wrong:
        raise SidecarError(f"{path}: wrong types for {', '.join(f'{k}={data[k]!r}' for k in wrong)}")
    if data["schema"] > SCHEMA:
        raise SidecarError(f"{path} has schema {data['schema']}, newer than this toolkit reads ({SCHEMA})")
    prof = data["profile"]
    if sorted(prof) != ["max", "min", "opt"] or not all(
            isinstance(v, list) and len(v) == 4 and all(type(x) is int for x in v) for v in prof.values()):
        raise SidecarError(f"{path}: 'profile' must map min, opt and max to N, H, W, 3 shapes, got {prof!r}")
    if not all(isinstance(t, dict) for t in data["io"]):
        raise SidecarError(f"{path}: 'io' must be a list of objects, got {data['io']!r}")
    bad_io = next((t for t in data["io"] if not all(isinstance(t.get(k), str) for k in ("name", "mode", "dtype"))
                   or not isinstance(t.get("shape"), list)
                   or not all(type(x) is int for x in t["shape"])), None)
    if bad_io is not None:
        raise SidecarError(f"{path}: 'io' entries need a string name, mode and dtype and a list of whole "
                           f"numbers as shape, got {bad_io!r}")
    for key, problem_of in (("class_names", class_names_problem), ("palette", palette_problem)):
        problem = problem_of(data[key]) if data[key] is not None else None
        if problem:
            raise SidecarError(f"{path}: '{key}' {problem}")
    check_io(data["io"], str(path))
    return EngineMeta(**{k: data[k] for k in _FIELDS})


def rebuild_command(meta: EngineMeta, plan_path: str | Path | None = None) -> str:
    """The deeplab-export command that builds this plan again, on the machine that runs it."""
    def hw(shape: List[int]) -> str:
        return f"{shape[1]}x{shape[2]}"

    p = meta.profile
    args = ["deeplab-export", meta.weights_path or "WEIGHTS", "--out", meta.onnx_path,
            "--engine", str(plan_path or meta.engine_path), "--min-size", hw(p["min"]), "--opt-size", hw(p["opt"]),
            "--max-size", hw(p["max"]), "--max-batch", str(p["max"][0])]
    from_onnx = str(meta.weights_path or "").endswith(".onnx")  # the ONNX already holds its precision
    graph, _, flag = meta.precision.partition("+")
    if graph == "int8" and not from_onnx:
        args += ["--precision", "int8", "--calibration", "CALIBRATION_DIR"]
    if (graph == "fp16" and trt_compat.parse_version(meta.tensorrt_version)[0] < 11) or flag == "fp16":
        args.append("--fp16")
    elif graph == "fp16" and not from_onnx:
        args += ["--precision", "fp16"]
    if meta.hardware_compatible:
        args.append("--hardware-compatible")
    if meta.version_compatible:
        args.append("--version-compatible")
    if meta.dla_core is not None:
        args += ["--dla-core", str(meta.dla_core)]
    return " ".join(shlex.quote(a) for a in args)


def _gpu_text(name: Optional[str], cc: Optional[str]) -> str:
    return f"{name or 'an unknown GPU'} (compute capability {cc or '?'})"


def check_compatible(meta: EngineMeta, trt_version: str, gpu_name: Optional[str], cc: Optional[str],
                     plan_path: str | Path | None = None) -> List[str]:
    """Raise EngineMismatch when this TensorRT (``trt_version``) or this GPU cannot run the plan,
    naming both sides and the command that rebuilds it. A version-compatible plan accepts a newer
    TensorRT of a supported major version; a hardware-compatible one any Ampere or newer GPU.
    Returns warnings for what could not be checked (a GPU unknown on either side) and for another
    GPU model of the same compute capability (TensorRT runs the plan then, and warns too: its
    tactics were timed on the build GPU)."""
    problems, notes = [], []
    if trt_version != meta.tensorrt_version and not (
            meta.version_compatible and trt_compat.runs_version_compatible_plan(meta.tensorrt_version, trt_version)):
        why = " (version-compatible plans run on the same or a newer TensorRT only)" if meta.version_compatible else ""
        problems.append(f"it was built by TensorRT {meta.tensorrt_version}, this is TensorRT {trt_version}{why}")
    if meta.gpu_name is None or gpu_name is None or meta.compute_capability is None or cc is None:
        notes.append(f"GPU not checked: the plan was built on {_gpu_text(meta.gpu_name, meta.compute_capability)}, "
                     f"this is {_gpu_text(gpu_name, cc)} (pycuda tells the GPU)")
    elif cc != meta.compute_capability:
        if not (meta.hardware_compatible and trt_compat.runs_hardware_compatible_plan(cc)):
            why = " (hardware-compatible plans need compute capability 8.0 or newer)" if meta.hardware_compatible else ""
            problems.append(f"it was built for {_gpu_text(meta.gpu_name, meta.compute_capability)}, this GPU is "
                            f"{_gpu_text(gpu_name, cc)}{why}")
    elif gpu_name != meta.gpu_name and not meta.hardware_compatible:
        notes.append(f"built on {_gpu_text(meta.gpu_name, meta.compute_capability)}, running on {gpu_name}: the same "
                     "compute capability, so TensorRT runs it, but its kernels were chosen on the other model; "
                     f"rebuild for the best speed: {rebuild_command(meta, plan_path or meta.engine_path)}")
    if problems:
        plan = plan_path or meta.engine_path
        raise EngineMismatch(f"TensorRT plan {plan} cannot run here: {'; '.join(problems)}. Rebuild it on this "
                             f"machine: {rebuild_command(meta, plan)}")
    return notes


def check_dla_core(meta: EngineMeta, num_dla_cores: int, plan_path: str | Path | None = None) -> None:
    """Raise EngineMismatch when the plan was built for a DLA core this machine does not have."""
    if meta.dla_core is not None and meta.dla_core >= num_dla_cores:
        plan = plan_path or meta.engine_path
        raise EngineMismatch(f"TensorRT plan {plan} runs on DLA core {meta.dla_core}, this machine has "
                             f"{num_dla_cores} DLA core(s). Rebuild it without --dla-core or for an existing "
                             f"core: {rebuild_command(meta, plan)}")


def undeserializable_message(meta: Optional[EngineMeta], trt_version: str, plan_path: str | Path) -> str:
    """What to say when TensorRT cannot deserialize a plan (its own reason is in its log)."""
    text = (f"{plan_path}: TensorRT {trt_version} cannot deserialize it: a corrupt or truncated plan, or one built "
            "for another TensorRT/GPU (TensorRT's message is in the log above)")
    if meta is not None:
        return f"{text}; rebuild it: {rebuild_command(meta, plan_path)}"
    # Without the sidecar the loader cannot tell what the plan needs from the runtime.
    return (f"{text}. A version-compatible plan also needs its sidecar ({sidecar_path(plan_path).name}) so that "
            "its embedded runtime may be loaded, and a DLA plan so that its core is set; rebuild it with "
            "deeplab-export ... --engine")


def up_to_date(plan_path: str | Path, key: Dict[str, Any]) -> bool:
    """Whether the plan at ``plan_path`` was built with exactly ``key`` (and is the plan its sidecar
    describes): then a new build would make the same plan."""
    plan = Path(plan_path)
    if not plan.is_file() or not sidecar_path(plan).is_file():
        return False
    try:
        meta = read_sidecar(plan)
    except SidecarError:
        return False  # unreadable or foreign metadata: build afresh
    return meta is not None and meta.key() == key and meta.plan_sha256 == file_sha256(plan)
