"""Serving DeepLab on NVIDIA Triton Inference Server.

    contract.py        the tensor, request and config parameter names, and the model's input checks
    repository.py      the model repository writer: CPU form (.onnx) and GPU form (TensorRT plan)
    models.py          the Python-backend models Triton runs (copied into the repository with this package)
    ensemble_steps.py  the work of the GPU ensemble's Python steps, free of Triton's API
    config_check.py    a repository checked as Triton checks it
    launcher.py        starting and stopping a local tritonserver
    client.py          TritonSegmenter: the Segmenter's call, answered by a server

Nothing is imported here up front: inside Triton only contract, models and ensemble_steps load
(the others need tritonclient or the launcher's machinery); the names below load on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TritonSegmenter": "client", "TritonServerError": "client",
    "write_repository": "repository", "write_gpu_repository": "repository", "RepositoryError": "repository",
    "validate_repository": "config_check", "ConfigError": "config_check",
    "start_server": "launcher", "stop_server": "launcher", "ServerError": "launcher",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
