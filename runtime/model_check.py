"""What a network must give before the Segmenter trusts it: checked once when a model is loaded
(``check_network_output``), and the shape of every batch's scores (``shape_problems``)."""
from __future__ import annotations

import numpy as np

from .contract import pad_image
from .errors import ModelFormatError
from .network import Network
from .onnx_backend import parse_metadata

#: Side of the padded image the network is tried on when a model is loaded (8k+1, tiny).
PROBE_SIZE = 17


def shape_problems(shape: tuple, n: int, c: int, h: int, w: int) -> list:
    """What is off in a network output of ``shape`` for n images of h x w with c classes."""
    if len(shape) != 4:
        return [f"scores of shape {shape}, not N x C x H x W"]
    problems = []
    if shape[0] != n:
        problems.append(f"{shape[0]} score maps for a batch of {n}")
    if shape[1] != c:
        problems.append(f"{shape[1]} class channels for a {c}-class model")
    if tuple(shape[2:]) != (h, w):
        problems.append(f"{shape[2]}x{shape[3]} scores for a {h}x{w} input (the graph must upsample them to the input size)")
    return problems


def check_network_output(network: Network, source: str) -> None:
    """Run the network once on a small image padded as the Segmenter pads and refuse a model
    whose scores are not N x C x H x W at the input size, whose class count disagrees with its
    metadata, or which gives NaN/inf there (raises ModelFormatError naming what is off)."""
    fixed_n, fixed_h, fixed_w = network.fixed_input_dims[:3]
    n, h, w, bounds = fixed_n or 1, fixed_h or PROBE_SIZE, fixed_w or PROBE_SIZE, network.size_bounds
    if bounds is not None:  # a TensorRT profile: probe at its smallest size from PROBE_SIZE up
        h = fixed_h or min(max(PROBE_SIZE, bounds.min_h), bounds.max_h)
        w = fixed_w or min(max(PROBE_SIZE, bounds.min_w), bounds.max_w)
    batch = np.stack([pad_image(np.full((max(1, h - 4), max(1, w - 6), 3), 128, np.uint8), h, w)] * n)
    try:
        scores = np.asarray(network(batch))
    except Exception as e:  # the backend's own error types
        raise ModelFormatError(f"{source}: the network fails on a {h}x{w} probe image: {e}") from e
    c = network.num_classes
    problems = shape_problems(scores.shape, n, c, h, w)
    # Checked here, so that the Segmenter reads class_names and palette only once they are known good.
    labels = parse_metadata(network.metadata, source)
    if labels.num_classes is not None and labels.num_classes != c:
        problems.append(f"its metadata's config says {labels.num_classes} classes, its output shape {c}")
    if labels.class_names is not None and scores.ndim == 4 and len(labels.class_names) != scores.shape[1]:
        problems.append(f"its metadata lists {len(labels.class_names)} class names for {scores.shape[1]} class channels")
    if labels.palette is not None and len(labels.palette) < c:
        problems.append(f"its metadata's palette has {len(labels.palette)} colours for {c} classes")
    with np.errstate(over="ignore"):
        finite = np.isfinite(scores.astype(np.float32)).all()  # as the runtime casts them
    if not problems and not finite:
        problems.append(f"NaN/inf scores on a uniform {h}x{w} image (broken weights?)")
    if problems:
        raise ModelFormatError(f"{source}: " + "; ".join(problems))
