"""Triton model repositories checked against Triton's own model-config protobuf, before a server sees them.

``parse_config(text)`` parses a ``config.pbtxt`` into ``ModelConfig`` (the message tritonclient ships,
generated from Triton's model_config.proto): an unknown field, a wrong enum or a syntax error is a
``ConfigError`` naming the line. ``validate_repository(dir)`` checks a whole repository, whatever
its models are (Python backend, TensorRT plan, ONNX, ensemble):

- every model directory has a ``config.pbtxt`` that parses, whose ``name`` is the directory's;
- version directories (numbers) exist and hold the file the model's platform/backend loads;
- ensemble steps name models of the repository, inputs and outputs those models declare, and
  tensors that exist (an ensemble input or an earlier step's output) with equal data types and
  compatible dims; every ensemble output is produced by exactly one step with its data type; a
  batching ensemble's composing models batch at least as much.

tritonclient is imported only here and only when called: ``pip install 'tritonclient[grpc]'``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

# The file a version directory must hold, by platform or backend (Triton's defaults).
DEFAULT_FILENAMES = {
    "tensorrt_plan": "model.plan", "tensorrt": "model.plan",
    "onnxruntime_onnx": "model.onnx", "onnxruntime": "model.onnx",
    "pytorch_libtorch": "model.pt", "pytorch": "model.pt",
    "python": "model.py",
}


class ConfigError(ValueError):
    """A model config or repository Triton would refuse; the message names the file and the problem."""


def model_config_pb2():
    """Triton's model-config protobuf module, from tritonclient."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ImportError("checking Triton model configs needs Triton's model-config protobuf, shipped with "
                          f"tritonclient: pip install 'tritonclient[grpc]' ({e})") from e
    return model_config_pb2


def parse_config(text: str, source: str = "config.pbtxt") -> Any:
    """``text`` (protobuf text format) as a ModelConfig; ConfigError on unknown fields or bad syntax."""
    pb2 = model_config_pb2()
    from google.protobuf import text_format

    config = pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ConfigError(f"{source}: {e}") from e
    return config


def dtype_name(config_dtype: int) -> str:
    """'TYPE_FP32' for a DataType enum value."""
    return model_config_pb2().DataType.Name(config_dtype)


@dataclass
class _Model:
    config: Any
    path: Path
    inputs: Dict[str, Any] = field(default_factory=dict)
    outputs: Dict[str, Any] = field(default_factory=dict)


def _dims_compatible(a, b) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _load(model_dir: Path) -> _Model:
    cfg_path = model_dir / "config.pbtxt"
    if not cfg_path.is_file():
        raise ConfigError(f"{model_dir}: no config.pbtxt")
    config = parse_config(cfg_path.read_text(), str(cfg_path))
    if config.name and config.name != model_dir.name:
        raise ConfigError(f"{cfg_path}: name '{config.name}' differs from its directory '{model_dir.name}'")
    m = _Model(config, model_dir)
    for kind, target in (("input", m.inputs), ("output", m.outputs)):
        for t in getattr(config, kind):
            if t.name in target:
                raise ConfigError(f"{cfg_path}: {kind} '{t.name}' declared twice")
            target[t.name] = t
    return m


def _check_versions(m: _Model) -> None:
    c = m.config
    versions = sorted(p for p in m.path.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ConfigError(f"{m.path}: no version directory (e.g. {m.path.name}/1/)")
    if c.platform == "ensemble":
        return
    kind = c.backend or c.platform
    wanted = c.default_model_filename or DEFAULT_FILENAMES.get(kind)
    if wanted is None:
        return  # a backend whose file this checker does not know
    for v in versions:
        if not (v / wanted).exists():
            raise ConfigError(f"{m.path.name}: version {v.name} has no {wanted} (needed by {kind})")


def _check_ensemble(m: _Model, models: Dict[str, _Model]) -> None:
    c, name = m.config, m.path.name
    steps = c.ensemble_scheduling.step
    if not steps:
        raise ConfigError(f"{name}: platform 'ensemble' without ensemble_scheduling steps")
    # tensor name -> (dtype, dims, where it comes from)
    available: Dict[str, tuple] = {t: (spec.data_type, list(spec.dims), "ensemble input")
                                   for t, spec in m.inputs.items()}
    produced: Dict[str, str] = {}
    for i, step in enumerate(steps):
        where = f"{name}: step {i} ({step.model_name})"
        target = models.get(step.model_name)
        if target is None:
            raise ConfigError(f"{where}: no model '{step.model_name}' in the repository "
                              f"(models: {', '.join(sorted(models))})")
        if target.config.platform == "ensemble":
            raise ConfigError(f"{where}: nested ensembles are not checked here")
        if c.max_batch_size > 0 and target.config.max_batch_size < c.max_batch_size:
            raise ConfigError(f"{where}: max_batch_size {target.config.max_batch_size} is below the "
                              f"ensemble's {c.max_batch_size}")
        for model_input, tensor in step.input_map.items():
            spec = target.inputs.get(model_input)
            if spec is None:
                raise ConfigError(f"{where}: '{step.model_name}' has no input '{model_input}' "
                                  f"(inputs: {', '.join(sorted(target.inputs))})")
            if tensor not in available:
                raise ConfigError(f"{where}: tensor '{tensor}' for input '{model_input}' is neither an ensemble "
                                  "input nor an output of an earlier step")
            dtype, dims, origin = available[tensor]
            if dtype != spec.data_type:
                raise ConfigError(f"{where}: tensor '{tensor}' ({origin}) is {dtype_name(dtype)}, but input "
                                  f"'{model_input}' of '{step.model_name}' is {dtype_name(spec.data_type)}")
            if not _dims_compatible(dims, list(spec.dims)):
                raise ConfigError(f"{where}: tensor '{tensor}' ({origin}) has dims {dims}, input '{model_input}' "
                                  f"of '{step.model_name}' takes {list(spec.dims)}")
        missing = sorted(set(target.inputs) - set(step.input_map)
                         - {n for n, s in target.inputs.items() if s.optional})
        if missing:
            raise ConfigError(f"{where}: inputs {missing} of '{step.model_name}' are not mapped")
        for model_output, tensor in step.output_map.items():
            spec = target.outputs.get(model_output)
            if spec is None:
                raise ConfigError(f"{where}: '{step.model_name}' has no output '{model_output}' "
                                  f"(outputs: {', '.join(sorted(target.outputs))})")
            if tensor in available:
                raise ConfigError(f"{where}: tensor '{tensor}' is produced twice "
                                  f"({available[tensor][2]} and output '{model_output}')")
            available[tensor] = (spec.data_type, list(spec.dims), f"output '{model_output}' of {step.model_name}")
            produced[tensor] = step.model_name
    for t, spec in m.outputs.items():
        if t not in produced:
            raise ConfigError(f"{name}: ensemble output '{t}' is not produced by any step")
        dtype, dims, origin = available[t]
        if dtype != spec.data_type:
            raise ConfigError(f"{name}: ensemble output '{t}' is {dtype_name(spec.data_type)}, but {origin} "
                              f"is {dtype_name(dtype)}")
        if not _dims_compatible(dims, list(spec.dims)):
            raise ConfigError(f"{name}: ensemble output '{t}' has dims {list(spec.dims)}, {origin} has {dims}")


def validate_repository(repo: str | Path) -> Dict[str, Any]:
    """Check every model of a Triton repository (see the module doc); returns name -> ModelConfig.
    Raises ConfigError naming the first problem found."""
    root = Path(repo)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory")
    models = {d.name: _load(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not models:
        raise ConfigError(f"{root}: no model directories")
    for m in models.values():
        _check_versions(m)
        if m.config.platform == "ensemble":
            _check_ensemble(m, models)
    return {n: m.config for n, m in models.items()}


def string_parameters(config: Any) -> Dict[str, str]:
    """A parsed config's ``parameters`` as {name: string_value}."""
    return {k: v.string_value for k, v in config.parameters.items()}


def ensemble_steps(config: Any) -> List[Dict[str, Any]]:
    """An ensemble's steps as plain dicts (model, input_map, output_map), in order."""
    return [{"model": s.model_name, "input_map": dict(s.input_map), "output_map": dict(s.output_map)}
            for s in config.ensemble_scheduling.step]


def instance_kinds(config: Any) -> List[str]:
    pb2 = model_config_pb2()
    return [pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group]
