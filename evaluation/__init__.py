"""Accuracy of a model, with and without the dense CRF, and the CRF parameter search.

    accuracy.py     evaluate() (every contender on the same images), search(), the held-out scenes
                    as a dataset, the printed tables
    contenders.py   the networks compared: ONNX exports, TensorRT plans, PyTorch checkpoints
    voc.py          VOC-format datasets: ids, checks of what is missing, label PNGs as class ids
    metrics.py      confusion matrix, IoU, pixel accuracy
    crf_search.py   the coarse-to-fine CRF parameter search
    failures.py     one line saying why an item failed

The command is tools/evaluate.py (deeplab-evaluate). Importing this package imports nothing else:
each module loads what it needs.
"""
