"""What a Triton-served DeepLab model takes and gives: the one place that names its tensors and
request parameters (the repository writer, the served model code and the client all read it).

    model "deeplab" (max_batch_size > 0: every tensor has a leading batch axis)
      input  IMAGE          UINT8  [-1, -1, 3]   BGR, 0..255, as everywhere else in the toolkit
      output LABELS         UINT8  [-1, -1]      class ids
      output PROBABILITIES  FP32   [C, -1, -1]   optional: CRF marginals, or the softmax without CRF

Request parameters (all optional; the model's defaults are the CRFParams in its config):
    "crf": bool (false: the network alone), and any CRFParams field by name
    ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std", "iterations", "normalization"),
    each within its per-request bound (REQUEST_MAX, "max_iterations"); any other name is refused.
Config parameters of the model: "class_names" and "palette" (JSON lists), "crf_defaults" (JSON object),
"max_pixels" (the most pixels, N x H x W, of one request's images; more are refused),
"max_iterations" (the most CRF iterations a request may ask for), "compute_timeout_s" (the most
seconds one batch of requests may compute: past it, its CRF stops and the requests get UNAVAILABLE, 503).
The GPU ensemble (serving.repository.write_gpu_repository) passes PADDED_IMAGE and SCORES between its steps; its pad
step's config parameters are "profile" (the engine's, JSON) and "max_size".
Never imports torch or tritonclient.
"""
from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any, Mapping

import numpy as np

from crf import CRFParams
from crf.params import NORMALIZATIONS

MODEL_NAME = "deeplab"
INPUT_IMAGE = "IMAGE"
OUTPUT_LABELS = "LABELS"
OUTPUT_PROBABILITIES = "PROBABILITIES"
#: Request parameter switching the CRF on or off.
PARAM_CRF = "crf"
#: Config parameter names (string values holding JSON).
CONFIG_CLASS_NAMES = "class_names"
CONFIG_PALETTE = "palette"
CONFIG_CRF_DEFAULTS = "crf_defaults"
CONFIG_MAX_PIXELS = "max_pixels"
CONFIG_MAX_ITERATIONS = "max_iterations"
CONFIG_COMPUTE_TIMEOUT = "compute_timeout_s"
#: The GPU ensemble's step tensors: the pad step's output, the CRF step's input of engine scores.
PADDED_IMAGE = "PADDED_IMAGE"
SCORES = "SCORES"
#: Config parameters of the GPU ensemble's pad step.
CONFIG_PROFILE = "profile"
CONFIG_MAX_SIZE = "max_size"
#: Default of max_pixels: 4096 x 4096 (the input alone is 48 MB, the CRF then runs on a shrunken copy).
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Default of max_iterations: 5x DeepLab's 10 (the marginals settle within ~20). Iterations are what
#: a request can multiply its cost by; the pixels are bounded by max_pixels.
DEFAULT_MAX_ITERATIONS = 50
#: Per-request upper bounds of the CRFParams number fields (each must also be > 0). Beyond them a
#: value changes nothing: a weight of 1000 already makes the pairwise term absolute (DeepLab's are
#: 3..5), a colour bandwidth of 1000 is flat over 0..255 colours, an xy bandwidth of 10000 pixels flat
#: over the largest image (4096 x 4096) by default. Iterations: the model's max_iterations.
REQUEST_MAX = {"bi_w": 1e3, "pos_w": 1e3, "bi_xy_std": 1e4, "pos_xy_std": 1e4, "bi_rgb_std": 1e3}
#: Every request parameter a model takes; any other name is refused (a typo must not silently leave
#: a default in place).
REQUEST_PARAMETERS = (PARAM_CRF,) + tuple(f.name for f in fields(CRFParams))
#: Response parameters the served model sets with its own stage times (milliseconds).
TIMING_PARAMETERS = ("preprocess_ms", "network_ms", "crf_ms", "postprocess_ms")


class RequestError(ValueError):
    """A request the model refuses (the server answers it with an error status)."""


def request_parameters(text: str | None) -> dict:
    """A request's parameters from the JSON object text the Python backend hands a model
    (InferenceRequest.parameters()); RequestError when the text is not one."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise RequestError(f"request parameters are not JSON: {e}") from e
    if not isinstance(value, dict):
        raise RequestError(f"request parameters must be a JSON object, got {text!r}")
    return value


def _request_value(name: str, value: Any, max_iterations: int) -> Any:
    """One CRF field of a request, checked against its per-request bound (RequestError naming both)."""
    if name == "normalization":
        if value not in NORMALIZATIONS:
            raise RequestError(f"request parameter 'normalization' must be one of {NORMALIZATIONS}, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "iterations":
        if number and isinstance(value, float) and value.is_integer():
            value = int(value)  # a JSON client may send 5.0
        if not (number and isinstance(value, int) and 0 <= value <= max_iterations):
            raise RequestError(f"request parameter 'iterations' must be a whole number in 0..{max_iterations} "
                               f"(the model's max_iterations), got {value!r}")
        return value
    bound = REQUEST_MAX[name]
    if not (number and math.isfinite(value) and 0 < value <= bound):
        raise RequestError(f"request parameter {name!r} must be a number in (0, {bound:g}], got {value!r}")
    return value


def crf_params_from_request(parameters: Mapping[str, Any], defaults: CRFParams | None,
                            max_iterations: int = DEFAULT_MAX_ITERATIONS) -> CRFParams | None:
    """The CRF to run for one request: None when the request (or the model's defaults) turns it
    off, else the defaults with the request's fields replaced. RequestError naming the parameter
    for a name not in REQUEST_PARAMETERS, and for a value of the wrong type or beyond its
    per-request bound (REQUEST_MAX; iterations: ``max_iterations``), even with the CRF off. The
    defaults are the operator's (the repository's) and are not held to these bounds."""
    params = dict(parameters)
    unknown = sorted(set(params) - set(REQUEST_PARAMETERS))
    if unknown:
        raise RequestError(f"unknown request parameter(s) {', '.join(map(repr, unknown))}; "
                           f"known: {', '.join(REQUEST_PARAMETERS)}")
    crf_on = params.pop(PARAM_CRF, defaults is not None)
    if isinstance(crf_on, str) and crf_on.lower() in ("true", "false", "1", "0", "on", "off"):
        crf_on = crf_on.lower() in ("true", "1", "on")
    if not isinstance(crf_on, bool):
        raise RequestError(f"request parameter {PARAM_CRF!r} must be a bool, got {crf_on!r}")
    values = {name: _request_value(name, value, max_iterations) for name, value in params.items()}
    if not crf_on:
        return None
    try:
        return CRFParams.from_dict({**(defaults or CRFParams()).to_dict(), **values})
    except (TypeError, ValueError) as e:
        raise RequestError(f"CRF request parameters: {e}") from e


def config_parameters(class_names, palette, crf_defaults: CRFParams | None) -> dict[str, str]:
    """The model config's ``parameters`` (string values), as the repository writer stores them."""
    return {
        CONFIG_CLASS_NAMES: json.dumps(list(class_names)),
        CONFIG_PALETTE: json.dumps([[int(v) for v in row] for row in palette]),
        CONFIG_CRF_DEFAULTS: json.dumps(None if crf_defaults is None else crf_defaults.to_dict()),
    }


def read_config_parameters(parameters: Mapping[str, Any]) -> tuple[list, list, CRFParams | None]:
    """(class_names, palette, crf_defaults) from a config's parameters, as Triton hands them to a
    model ({name: {"string_value": text}}) or as plain strings."""
    def text(name: str) -> str:
        value = parameters[name]
        return value["string_value"] if isinstance(value, Mapping) else value

    defaults = json.loads(text(CONFIG_CRF_DEFAULTS))
    return (json.loads(text(CONFIG_CLASS_NAMES)), json.loads(text(CONFIG_PALETTE)),
            None if defaults is None else CRFParams.from_dict(defaults))


def check_image_batch(batch: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The IMAGE tensor of one request as the model gets it (N x H x W x 3 uint8), or RequestError
    saying what is wrong. Triton checks dtype and rank against the config first; this is the
    model's own check, for what the config cannot say (empty images, more than ``max_pixels``
    pixels in all the request's images together: a request's cost grows with each). The served
    model and the GPU ensemble's pad step both call it; ``max_pixels=None``: no size cap here (the
    pad step checks sizes against the engine's profile itself)."""
    a = np.asarray(batch)
    if a.dtype != np.uint8:
        raise RequestError(f"{INPUT_IMAGE} must be UINT8, got {a.dtype}")
    if a.ndim != 4 or a.shape[3] != 3:
        raise RequestError(f"{INPUT_IMAGE} must be N x H x W x 3 (BGR), got shape {list(a.shape)}")
    n, h, w = a.shape[:3]
    if n == 0 or h == 0 or w == 0:
        raise RequestError(f"{INPUT_IMAGE} is empty: shape {list(a.shape)}")
    if max_pixels is not None and n * h * w > max_pixels:
        raise RequestError(f"{INPUT_IMAGE}: {n} image(s) of {h}x{w} = {n * h * w} pixels, more than the model's "
                           f"max_pixels ({max_pixels}) per request")
    return a
