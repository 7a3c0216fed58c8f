"""Triton model repositories checked as Triton checks them, before a server sees them.

``parse_config(text)`` parses a ``config.pbtxt`` into ``ModelConfig`` (the message tritonclient ships,
generated from Triton's model_config.proto): an unknown field, a wrong enum or a syntax error is a
``ConfigError`` naming the line. ``validate_repository(dir)`` checks a whole repository, whatever
its models are (Python backend, TensorRT plan, ONNX, ensemble):

- every model directory has a ``config.pbtxt`` that parses, whose ``name`` is the directory's;
- version directories (numbers) exist and hold the file the model's platform/backend loads;
- ensemble steps, as Triton core checks them: they name models of the repository, inputs and
  outputs those models declare, and tensors that exist (an ensemble input or a step's output, the
  steps in any order but without a cycle) with equal data types and compatible dims (as declared,
  or with the batch dimension of batching models); every ensemble output is produced by exactly
  one step; every ensemble input and step output is used; a batching ensemble's composing models
  batch at least as much, or not at all (max_batch_size 0); an ensemble has no instance_group.

The protobuf checks the fields, their types and enums; the rest is what Triton core checks when it
loads a repository. tritonclient is imported only here and only when called:
``pip install 'tritonclient[grpc]'``.
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


@dataclass
class _Tensor:
    """An ensemble tensor as Triton core's ensemble check sees it (ensemble_utils.cc TensorNode)."""
    dtype: int
    dims: List[int]
    batching: bool  # the declaring model batches: its full shape has a leading -1
    origin: str

    def full_dims(self) -> List[int]:
        return ([-1] if self.batching else []) + self.dims

    def fits(self, other: "_Tensor") -> bool:
        """Dims equal up to -1, either as declared or as full shapes: a tensor may pass between a
        batching model ([d0, ...]) and a non-batching one ([-1, d0, ...])."""
        return _dims_compatible(self.dims, other.dims) or _dims_compatible(self.full_dims(), other.full_dims())


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


def _io_dims(spec) -> List[int]:
    """An ensemble input's or output's dims as Triton reads them: its reshape when it has one."""
    return list(spec.reshape.shape) if spec.HasField("reshape") else list(spec.dims)


def _check_ensemble(m: _Model, models: Dict[str, _Model]) -> None:
    """Triton core's checks of an ensemble (model_config_utils.cc ValidateEnsembleSchedulingConfig,
    ensemble_utils.cc ValidateEnsembleConfig): the steps form a graph, in any order, from the
    ensemble's inputs to its outputs, and every tensor in it is used."""
    c, name = m.config, m.path.name
    steps = c.ensemble_scheduling.step
    if not steps:
        raise ConfigError(f"{name}: platform 'ensemble' without ensemble_scheduling steps")
    for forbidden in ("instance_group", "model_warmup"):
        if len(getattr(c, forbidden)):
            raise ConfigError(f"{name}: an ensemble takes no {forbidden} (its steps' models have their own)")
    if c.HasField("optimization"):
        raise ConfigError(f"{name}: an ensemble takes no optimization (its steps' models have their own)")
    batching = c.max_batch_size > 0
    tensors: Dict[str, _Tensor] = {t: _Tensor(spec.data_type, _io_dims(spec), batching, "ensemble input")
                                   for t, spec in m.inputs.items()}
    # First the models and what each step produces: a step may consume a tensor of a step listed after it.
    targets = []
    for i, step in enumerate(steps):
        where = f"{name}: step {i} ({step.model_name})"
        target = models.get(step.model_name)
        if target is None:
            raise ConfigError(f"{where}: no model '{step.model_name}' in the repository "
                              f"(models: {', '.join(sorted(models))})")
        if target.config.platform == "ensemble":
            raise ConfigError(f"{where}: nested ensembles are not checked here")
        # A non-batching model (max_batch_size 0) may sit in a batching ensemble (its dims then hold the batch).
        if batching and 0 < target.config.max_batch_size < c.max_batch_size:
            raise ConfigError(f"{where}: max_batch_size {target.config.max_batch_size} is below the "
                              f"ensemble's {c.max_batch_size}")
        if not step.input_map or not step.output_map:
            raise ConfigError(f"{where}: a step needs both an input_map and an output_map")
        step_batching = target.config.max_batch_size > 0
        for model_output, tensor in step.output_map.items():
            spec = target.outputs.get(model_output)
            if spec is None:
                raise ConfigError(f"{where}: '{step.model_name}' has no output '{model_output}' "
                                  f"(outputs: {', '.join(sorted(target.outputs))})")
            if tensor in tensors:
                raise ConfigError(f"{where}: tensor '{tensor}' is produced twice "
                                  f"({tensors[tensor].origin} and output '{model_output}')")
            tensors[tensor] = _Tensor(spec.data_type, list(spec.dims), step_batching,
                                      f"output '{model_output}' of {step.model_name}")
        targets.append((where, step, target, step_batching))
    consumed = set()
    for where, step, target, step_batching in targets:
        for model_input, tensor in step.input_map.items():
            spec = target.inputs.get(model_input)
            if spec is None:
                raise ConfigError(f"{where}: '{step.model_name}' has no input '{model_input}' "
                                  f"(inputs: {', '.join(sorted(target.inputs))})")
            if tensor not in tensors:
                raise ConfigError(f"{where}: tensor '{tensor}' for input '{model_input}' is neither an ensemble "
                                  "input nor any step's output")
            have = tensors[tensor]
            wanted = _Tensor(spec.data_type, list(spec.dims), step_batching, f"input '{model_input}'")
            if have.dtype != wanted.dtype:
                raise ConfigError(f"{where}: tensor '{tensor}' ({have.origin}) is {dtype_name(have.dtype)}, but input "
                                  f"'{model_input}' of '{step.model_name}' is {dtype_name(wanted.dtype)}")
            if not have.fits(wanted):
                raise ConfigError(f"{where}: tensor '{tensor}' ({have.origin}) has dims {have.dims}, input "
                                  f"'{model_input}' of '{step.model_name}' takes {wanted.dims}")
            consumed.add(tensor)
        missing = sorted(set(target.inputs) - set(step.input_map)
                         - {n for n, s in target.inputs.items() if s.optional})
        if missing:
            raise ConfigError(f"{where}: inputs {missing} of '{step.model_name}' are not mapped")
    # Data flow: a step runs once all its input tensors are ready (no cycle may hold one back).
    ready = set(m.inputs)
    pending = list(targets)
    while pending:
        runnable = [t for t in pending if set(t[1].input_map.values()) <= ready]
        if not runnable:
            where, step = pending[0][:2]
            waiting = sorted(set(step.input_map.values()) - ready)
            raise ConfigError(f"{where}: never runs: tensors {waiting} wait on each other (a cycle)")
        for t in runnable:
            ready |= set(t[1].output_map.values())
            pending.remove(t)
    for t, spec in m.outputs.items():
        if t not in tensors or t in m.inputs:
            raise ConfigError(f"{name}: ensemble output '{t}' is not produced by any step")
        have = tensors[t]
        wanted = _Tensor(spec.data_type, _io_dims(spec), batching, f"ensemble output '{t}'")
        if have.dtype != wanted.dtype:
            raise ConfigError(f"{name}: ensemble output '{t}' is {dtype_name(wanted.dtype)}, but {have.origin} "
                              f"is {dtype_name(have.dtype)}")
        if not have.fits(wanted):
            raise ConfigError(f"{name}: ensemble output '{t}' has dims {wanted.dims}, {have.origin} has {have.dims}")
    # Triton refuses a repository with a tensor no step or output uses.
    for t in m.inputs:
        if t not in consumed:
            raise ConfigError(f"{name}: ensemble input '{t}' is not used by any step")
    for t, have in tensors.items():
        if t not in consumed and t not in m.outputs and t not in m.inputs:
            raise ConfigError(f"{name}: tensor '{t}' ({have.origin}) is unused: no step takes it and it is "
                              "no ensemble output")


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
