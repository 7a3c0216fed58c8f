"""Weight import and export: PyTorch state dicts, safetensors, released Caffe models, ImageNet VGG-16.

Every loader returns a state dict in *our* naming (caffemodel layer names, ``conv1_1.weight``) and
every path into a model goes through :func:`load_into`, which checks names and shapes and names
what is missing, unexpected or mis-shaped instead of loading half a network.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Mapping

import torch

from .model import DeepLabV1, ModelConfig


class WeightsError(ValueError):
    """Weights that do not fit the model, with the layers concerned named."""


# Prefixes that training wrappers commonly add (DataParallel, our export wrapper, Lightning).
_PREFIXES = ("module.", "net.", "model.")


def _canonical_name(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    layer, _, param = key.partition(".")
    if layer.startswith("fc8"):  # fc8_voc12, fc8_pascal, ... : the classifier, whatever its dataset
        layer = "fc8"
    return f"{layer}.{param}" if param else layer


def normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_canonical_name(k): v for k, v in state.items()}


def load_into(model: DeepLabV1, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Copy ``state`` into ``model`` after checking that every layer is present with its shape."""
    state = normalise_keys(state)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = []
    for k, v in expected.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            wrong.append(f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}")
    problems = []
    if wrong:
        hint = ""
        if any(w.startswith("fc8.") for w in wrong):
            n = state["fc8.weight"].shape[0]
            hint = f" (the file has {n} classes, the model {model.config.num_classes}: pass --num-classes {n})"
        problems.append("shape mismatch: " + "; ".join(wrong) + hint)
    if missing:
        problems.append("missing layers: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected layers: " + ", ".join(unexpected))
    if problems:
        raise WeightsError(f"{source} does not fit DeepLab {model.config}: " + " | ".join(problems))
    check_finite(state, source)
    model.load_state_dict({k: torch.as_tensor(state[k]) for k in expected}, strict=True)


def check_finite(state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Refuse NaN/inf weights, naming the layers (they would give NaN scores for every image)."""
    bad = []
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point():
            n = int((~torch.isfinite(v)).sum())
            if n:
                bad.append(f"{k} ({n} of {v.numel()})")
    if bad:
        raise WeightsError(f"{source} has NaN/inf weights: " + ", ".join(bad))


# ---------------------------------------------------------------------------------------------
# Our checkpoint format: safetensors (or .pt/.pth) + metadata describing the model.

def save_checkpoint(model: DeepLabV1, path: str | Path, class_names=None, palette=None) -> None:
    """Save weights plus the config, class names and palette needed to rebuild and label them.
    Written whole or not at all, with the umask's permissions (safetensors' own save_file writes
    in place, owner-only)."""
    from safetensors.torch import save

    from runtime.output_files import write_bytes_atomically

    meta = {"deeplab_config": json.dumps(model.config.to_dict())}
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    if palette is not None:
        meta["palette"] = json.dumps([list(map(int, c)) for c in palette])
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_bytes_atomically(path, save(tensors, metadata=meta))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a .safetensors / .pt / .pth file: (state dict, metadata dict possibly empty)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                raw = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"cannot read safetensors file {p}: {e}") from e
        return state, _checked_metadata(raw, p)
    with open(p, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (PyTorch >= 1.6) or, before that, a pickle (protocol 2+ opens
    # with 0x80). Anything else is not a checkpoint: torch.load's own message for it is about pickle
    # opcodes and weights_only, which misleads.
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):
        raise WeightsError(f"{p} is not a PyTorch checkpoint (neither the zip archive nor the pickle that "
                           "torch.save writes); weights are read from .safetensors, .pt/.pth and .caffemodel files")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses objects other than tensors and plain containers; its long advice
        # (load with weights_only=False) would run code from the file.
        raise WeightsError(f"cannot read PyTorch checkpoint {p}: it holds Python objects other than tensors, "
                           "which are not loaded (that would run code from the file): save the model's "
                           f"state_dict() instead{_unpickler_reason(e)}") from e
    except Exception as e:
        raise WeightsError(f"cannot read PyTorch checkpoint {p}: {e}") from e
    meta = {}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        encoded = {}
        for k in METADATA_KEYS:
            if k in obj:
                try:  # as a safetensors file holds them (tuples become lists): one check for both
                    encoded[k] = json.dumps(obj[k])
                except (TypeError, ValueError) as e:
                    raise WeightsError(f"{p}: metadata '{k}' is not JSON-compatible ({e})") from e
        meta = _checked_metadata(encoded, p)
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p} is not a state dict (a mapping of names to tensors)")
    return obj, meta


METADATA_KEYS = ("deeplab_config", "class_names", "palette")


def _checked_metadata(raw: Mapping[str, str], source: Path) -> dict:
    """The checkpoint's deeplab_config, class_names and palette decoded from their JSON strings;
    WeightsError naming the file and the key for one that is not JSON or not of its type (the
    checks an exported ONNX's metadata gets: runtime.onnx_backend.parse_metadata)."""
    from runtime.errors import ModelFormatError
    from runtime.onnx_backend import parse_metadata

    raw = {k: v for k, v in raw.items() if k in METADATA_KEYS}
    try:
        parse_metadata(raw, source)
    except ModelFormatError as e:
        raise WeightsError(str(e)) from e
    return {k: json.loads(v) for k, v in raw.items()}


def _unpickler_reason(e: Exception) -> str:
    """The part of torch's weights_only refusal that names what was refused ("Unsupported global:
    GLOBAL __main__.A was not an allowed global by default."), as ": ..." or ""."""
    for line in str(e).splitlines():
        _, found, reason = line.partition("WeightsUnpickler error:")
        if found and reason.strip():
            return ": " + reason.strip().split(". ")[0]
    return ""


def infer_config(state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Guess variant, width and class count from the tensor shapes of a DeepLab state dict."""
    state = normalise_keys(state)
    for needed in ("conv1_1.weight", "fc6.weight", "fc8.weight"):
        if needed not in state:
            raise WeightsError(f"not a DeepLab v1 state dict: no {needed}")
    width = state["conv1_1.weight"].shape[0] / 64
    k = state["fc6.weight"].shape[-1]
    variant = {3: "largefov", 7: "7x7", 4: "4x4"}.get(k)
    if variant is None:
        raise WeightsError(f"fc6 has a {k}x{k} kernel: not a DeepLab v1 head (3, 4 or 7)")
    return ModelConfig(num_classes=int(state["fc8.weight"].shape[0]), variant=variant, width=width)


def load_model(path: str | Path, config: ModelConfig | None = None) -> tuple[DeepLabV1, dict]:
    """Build a DeepLabV1 from any supported weights file; returns (model in eval mode, metadata)."""
    p = Path(path)
    if p.suffix == ".caffemodel":
        from .caffe import read_caffemodel

        state, meta = read_caffemodel(p, config or ModelConfig()), {}
    else:
        state, meta = read_checkpoint(p)
    if config is None and "deeplab_config" in meta:
        try:
            config = ModelConfig(**meta["deeplab_config"])
        except (TypeError, ValueError) as e:  # unknown keys, values of the wrong type or range
            raise WeightsError(f"{p}: metadata 'deeplab_config' is not a DeepLab model config: {e}") from e
    if config is None:
        config = infer_config(state)
    model = DeepLabV1(config)
    load_into(model, state, source=str(p))
    return model.eval(), meta


# ---------------------------------------------------------------------------------------------
# ImageNet VGG-16 (torchvision layout) -> DeepLab initialisation, as the paper did.

_TV_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision vgg16().features indices


def vgg16_to_deeplab(vgg: Mapping[str, torch.Tensor], config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Map a torchvision VGG-16 state dict onto DeepLab (LargeFOV or a 4x4/7x7 head).

    Convolutions map one to one. fc6 (4096 x 25088 = 4096 x 512 x 7 x 7) is spatially decimated to
    the head's kernel and its filters subsampled to the head's channel count; fc7 is subsampled on
    both axes likewise (the paper: LargeFOV keeps 1,024 of 4,096 filters, 3x3 of 7x7). fc8 is new:
    Gaussian std 0.01, bias 0, as in the DeepLab prototxt.
    """
    from .model import HEADS, VGG_BLOCKS

    if config.width != 1.0:
        raise WeightsError("ImageNet VGG-16 weights only fit width 1.0")
    names = [n for block in VGG_BLOCKS for n, _ in block]
    out: dict[str, torch.Tensor] = {}
    for name, idx in zip(names, _TV_CONVS):
        for param in ("weight", "bias"):
            key = f"features.{idx}.{param}"
            if key not in vgg:
                raise WeightsError(f"not a torchvision VGG-16 state dict: no {key}")
            out[f"{name}.{param}"] = vgg[key]
    for key in ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"):
        if key not in vgg:
            raise WeightsError(f"not a torchvision VGG-16 state dict: no {key}")
    head = HEADS[config.variant]
    k, c = head["kernel"], head["channels"]
    fc6 = vgg["classifier.0.weight"].reshape(4096, 512, 7, 7)
    keep = torch.arange(0, 4096, 4096 // c)[:c]
    taps = torch.round(torch.linspace(0, 6, k)).long()  # 3x3: rows/cols 0, 3, 6
    out["fc6.weight"] = fc6[keep][:, :, taps][:, :, :, taps].contiguous()
    out["fc6.bias"] = vgg["classifier.0.bias"][keep].clone()
    out["fc7.weight"] = vgg["classifier.3.weight"][keep][:, keep].reshape(c, c, 1, 1).contiguous()
    out["fc7.bias"] = vgg["classifier.3.bias"][keep].clone()
    g = torch.Generator().manual_seed(seed)
    out["fc8.weight"] = torch.randn(config.num_classes, c, 1, 1, generator=g) * 0.01
    out["fc8.bias"] = torch.zeros(config.num_classes)
    return out


def load_model_as(path: str | Path, num_classes: int | None = None, variant: str | None = None,
                  width: float | None = None, from_vgg16: bool = False) -> tuple[DeepLabV1, dict]:
    """load_model with the config overridden where given (what the export command's --num-classes,
    --variant, --width do): the rest from the weights (a .caffemodel carries none: the defaults).
    from_vgg16: ``path`` is a torchvision ImageNet VGG-16 state dict, turned into a fresh DeepLab
    (fc6/fc7 decimated, a new fc8; 21 classes, LargeFOV, width 1 unless given); no metadata."""
    src = Path(path)
    if from_vgg16:
        config = ModelConfig(num_classes=num_classes or 21, variant=variant or "largefov", width=width or 1.0)
        vgg, _ = read_checkpoint(src)
        model = DeepLabV1(config)
        load_into(model, vgg16_to_deeplab(vgg, config), source=str(src))
        return model.eval(), {}
    config = None
    if num_classes or variant or width or src.suffix == ".caffemodel":
        base = ModelConfig() if src.suffix == ".caffemodel" else infer_config(read_checkpoint(src)[0])
        config = ModelConfig(num_classes=num_classes or base.num_classes, variant=variant or base.variant,
                             width=width or base.width)
    return load_model(src, config)
