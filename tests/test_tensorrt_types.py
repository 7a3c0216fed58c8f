"""Static type check of the TensorRT code against NVIDIA's 10.x bindings (tensorrt-stubs).

TensorRT cannot be installed on the project's machines, so this is the check its builder code
gets here: mypy against stubs generated from the real 10.13 bindings. The stubs need three fixes
to be usable (reference/tensorrt.md): py.typed markers, parameters named ``in``/``out`` renamed,
and a non-default parameter after defaults in ``add_scale_nd``. They are patched in a copy.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import ROOT

TRT_FILES = ["export/tensorrt_build.py", "runtime/trt_compat.py", "runtime/engine_meta.py", "runtime/trt_backend.py"]
# The modules that drive pycuda and the CUDA driver (pycuda ships no annotations: its calls are
# checked as Any, the project's own code around them is checked in full).
PYCUDA_FILES = ["crf/gpu_kernels.py", "crf/cuda_graph.py", "crf/driver.py", "export/torch_pipeline.py",
                "runtime/onnx_backend.py", "runtime/network.py", "runtime/device_pipeline.py",
                "runtime/backend_choice.py", "runtime/segmenter.py"]


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory) -> Path:
    try:
        dist = metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs not installed (pip install --no-deps tensorrt-stubs)")
    pytest.importorskip("mypy")
    out = tmp_path_factory.mktemp("trt-stubs")
    for pkg in ("tensorrt", "tensorrt_bindings"):
        src = Path(dist.locate_file(pkg))
        shutil.copytree(src, out / pkg)
        (out / pkg / "py.typed").write_text("partial\n" if pkg == "tensorrt" else "")
        for f in (out / pkg).glob("*.pyi"):
            text = f.read_text()
            text = re.sub(r"\b(in|out): ", r"\1_: ", text)
            text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = 0)")
            f.write_text(text)
    # Errors inside the generated stubs themselves are the stubs' business, not ours.
    (out / "mypy.ini").write_text("[mypy]\n[mypy-tensorrt_bindings.*]\nignore_errors = True\n"
                                  "[mypy-tensorrt.*]\nignore_errors = True\n")
    return out


def mypy(stub_dir: Path, *targets: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(stub_dir / "mypy.ini"), "--no-incremental", "--ignore-missing-imports", "--follow-imports=silent",
         "--python-version", "3.10", "--cache-dir", str(stub_dir / ".mypy_cache"), *targets],
        cwd=ROOT, capture_output=True, text=True, env={"MYPYPATH": str(stub_dir), "PATH": "/usr/bin:/bin"})


def test_tensorrt_code_type_checks_against_the_10x_bindings(stub_dir):
    res = mypy(stub_dir, *TRT_FILES, *PYCUDA_FILES)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_check_catches_a_removed_api(stub_dir, tmp_path):
    """The same check flags TensorRT 8-only code: proof that it reads the stubs."""
    bad = tmp_path / "old_api.py"
    bad.write_text(
        "import tensorrt as trt\n"
        "def run(context: trt.IExecutionContext, bindings: list[int], stream: int) -> None:\n"
        "    context.execute_async_v2(bindings, stream)\n")
    res = mypy(stub_dir, str(bad))
    assert res.returncode != 0 and "execute_async_v2" in res.stdout, res.stdout + res.stderr
