from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import pytest

from benchmarking.inputs import photo, smooth_logits  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]

BUNDLED = ROOT / "models" / "deeplab_shapes.safetensors"
SAMPLES = ROOT / "samples"


def realistic_init(net, seed: int = 0, logit_std: float = 5.0):
    """He-initialise a network (as training starts) and scale fc8 so that logits have a spread like
    a trained model's: with PyTorch's default init the logits of a deep plain net are ~1e-2 and any
    numerical comparison of them is vacuous."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
        # Calibrate on what the tests feed: uniform 0..255 pixels minus the DeepLab mean.
        x = torch.rand((1, 3, 129, 129), generator=g) * 255 - 115
        std = float(net.eval()(x).std())
        net.fc8.weight.mul_(logit_std / max(std, 1e-12))
        net.fc8.bias.zero_()
    return net.eval()


def png_declaring(width: int, height: int, colour_type: int = 0, idat: bytes = b"not pixel data") -> bytes:
    """A complete PNG file (through IEND) whose header declares width x height 8-bit pixels of
    ``colour_type`` (0 grey, 2 RGB) and whose image data is ``idat``: a decompression bomb's header,
    for the checks made before any decoder runs."""
    from runtime.image_headers import PNG_SIGNATURE
    from runtime.palette import png_chunk

    return (PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def bundled_onnx(tmp_path_factory) -> Path:
    """The bundled model exported once per test session. Without torch (the runtime-only run on
    numpy 1.x, tests/numpy_floor.sh): the shipped export, which test_packaging checks against a fresh one."""
    if importlib.util.find_spec("torch") is None:
        return ROOT / "models" / "deeplab_shapes.onnx"
    from export.onnx_export import export_onnx
    from export.weights import load_model

    model, meta = load_model(BUNDLED)
    out = tmp_path_factory.mktemp("bundled") / "deeplab_shapes.onnx"
    return export_onnx(model, out, class_names=meta.get("class_names"), palette=meta.get("palette"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """REQUIRE_GPU=1 (the GPU machine's run): a skipped GPU test is a failure, so that a broken
    pycuda install can never pass as "no GPU tests to run"."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("REQUIRE_GPU") == "1" and report.skipped and item.get_closest_marker("gpu"):
        report.outcome = "failed"
        report.longrepr = f"REQUIRE_GPU=1 but this GPU test was skipped: {report.longrepr}"
