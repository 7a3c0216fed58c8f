#!/usr/bin/env bash
# The runtime and CRF tests once more on numpy 1.x, as a Jetson runs them: JetPack 6 pairs Python 3.10
# with numpy 1.26. A second virtualenv, no torch: numpy 1.26.4, the newest OpenCV wheel that still
# accepts numpy 1.x (4.12 and later require numpy 2 on Python >= 3.9), ONNX Runtime 1.20.1 and onnx 1.17
# (IR version 10, the newest that ONNX Runtime 1.20 reads; the tests write small ONNX models with it). The floor itself, numpy 1.21, has no wheels for the
# Python 3.11 CI runs on; where Python 3.8 exists: PYTHON=python3.8 NUMPY=1.21.6 ORT=1.19.2 bash tests/numpy_floor.sh
# Tests that need torch or pydensecrf skip here; nvcc's compile checks and the REQUIRE_GPU switch do not
# depend on numpy and are left to the main run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NUMPY=${NUMPY:-1.26.4}
ORT=${ORT:-1.20.1}
ONNX=${ONNX:-1.17.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install -q "numpy==$NUMPY" opencv-python-headless==4.11.0.86 "onnxruntime==$ORT" "onnx==$ONNX" \
    tqdm pytest hypothesis scikit-image
# no prebuilt kernels (DEEPLAB_WHEEL_KERNELS=0): these tests run the checkout's code, which
# compiles them at run time, and zig in pip's build environment would rebuild its runtime each time
DEEPLAB_WHEEL_KERNELS=0 "$py" -m pip install -q --no-deps .
"$py" -c 'import sys, numpy, cv2, onnxruntime; print("numpy floor run: Python", sys.version.split()[0], "numpy",
numpy.__version__, "OpenCV", cv2.__version__, "ONNX Runtime", onnxruntime.__version__)'
"$py" -c "import numpy; assert numpy.__version__ == '$NUMPY', numpy.__version__"
"$py" -m pytest -q -p no:cacheprovider -k "not nvcc_compiles and not require_gpu" \
    tests/test_crf.py tests/test_crf_properties.py tests/test_crf_safety.py tests/test_crf_kernels.py \
    tests/test_runtime.py tests/test_model_outputs.py tests/test_image_files.py tests/test_output_files.py \
    tests/test_tensorrt_build.py tests/test_triton_contract.py tests/test_large_images.py tests/test_crf_params.py
