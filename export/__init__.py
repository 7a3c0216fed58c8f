"""Export side of the toolkit: the PyTorch DeepLab v1 model, weight import, ONNX and TensorRT export.

This package needs torch (``pip install .[export]``); the runtime never imports it.
"""
