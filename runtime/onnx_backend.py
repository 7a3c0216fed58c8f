"""The ONNX Runtime network backend: runs an exported DeepLab graph on the CPU (or CUDA EP)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "scores"


class ModelFormatError(ValueError):
    """A model file that is not a DeepLab graph exported by this toolkit."""


class NetworkOutputError(ValueError):
    """Scores from the network that cannot be segmented (NaN/inf), naming the image."""


class OnnxRuntimeNetwork:
    """uint8 N x H x W x 3 BGR batch -> float32 N x C x H x W upsampled class scores."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"model file not found: {p}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(p), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for invalid files
            raise ModelFormatError(f"{p} is not a loadable ONNX model: {e}") from e
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if (len(ins) != 1 or ins[0].name != INPUT_NAME or ins[0].type != "tensor(uint8)"
                or len(ins[0].shape) != 4 or ins[0].shape[3] != 3):
            found = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in ins)
            raise ModelFormatError(
                f"{p} is not a DeepLab graph from this toolkit: expected one input "
                f"'{INPUT_NAME}' uint8 [N, H, W, 3] (BGR), found {found}; export it with tools/export.py")
        if len(outs) != 1 or len(outs[0].shape) != 4:
            found = ", ".join(f"{o.name}: {o.type} {o.shape}" for o in outs)
            raise ModelFormatError(f"{p}: expected one output N x C x H x W, found {found}")
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        c = outs[0].shape[1]
        if not isinstance(c, int):
            cfg = json.loads(self.metadata.get("deeplab_config", "{}"))
            c = cfg.get("num_classes")
        if not isinstance(c, int):
            raise ModelFormatError(f"{p}: cannot tell the number of classes")
        self.num_classes = c
        #: (N, H, W) of the input where the graph fixes them, else None per axis.
        self.fixed_input_dims = tuple(d if isinstance(d, int) else None for d in ins[0].shape[:3])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
