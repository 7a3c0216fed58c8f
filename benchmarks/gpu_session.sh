#!/usr/bin/env bash
# Everything the lent GPU machine should run, in one device call (see ../shared/GPU.md):
#   bash ../shared/gpu/prepare.sh                    # on the build machine: fills .whl/
#   device run (carry .whl):  bash benchmarks/gpu_session.sh
# Writes logs and JSON under $OUT (default ./out/gpu).
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
nvidia-smi | tee "$OUT/nvidia-smi.txt"
bash .whl/device-install.sh 2>&1 | tee "$OUT/pycuda-install.log"
export PYTHONPATH=/tmp/site:$PWD
python3 -m pytest -q -m gpu tests/test_crf_kernels.py 2>&1 | tee "$OUT/gpu-tests.log"
# memcheck / racecheck over a small refine on the GPU backend
cat > /tmp/crf_once.py <<'PY'
import numpy as np
from crf import CRFParams, refine
from tools.testdata import smooth_logits
rng = np.random.default_rng(0)
img = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
q = refine(smooth_logits(61, 97, 21), img, CRFParams(iterations=2), backend="gpu")
print("ok", q.shape, float(q.sum(0).mean()))
PY
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 3 python3 /tmp/crf_once.py 2>&1 | tail -20 | tee "$OUT/sanitizer-$tool.log"
done
python3 benchmarks/crf_bench.py --backends gpu cpu --json "$OUT/crf_bench_gpu.json" 2>&1 | tee "$OUT/crf_bench.log"
