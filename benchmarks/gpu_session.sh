#!/usr/bin/env bash
# The one script a GPU machine runs: pycuda build, GPU tests, compute-sanitizer, GPU report.
usage() {
  cat <<'EOF'
usage: bash benchmarks/gpu_session.sh [--help]

Runs on a machine with an NVIDIA GPU, the CUDA toolkit (nvcc, compute-sanitizer) and PyTorch with CUDA,
from the project root, with .whl/ filled by benchmarks/gpu_prepare.sh (pycuda's source, wheels of its
dependencies and of safetensors; see docs/gpu.md).
Takes about 5-9 minutes.

Steps, each logged under $OUT (default out/gpu):
  1. nvidia-smi                                   -> nvidia-smi.txt
  2. build pycuda from source (benchmarks/device-install.sh, sources from .whl/)  -> pycuda-install.log
     (failure stops the run); the Python packages the run imports are checked  -> same log
  3. the GPU tests, REQUIRE_GPU=1: a skipped GPU test is a failure  -> gpu-tests.log
  4. compute-sanitizer memcheck and initcheck over a small CRF call  -> sanitizer.log
     ("Device not supported", as on gVisor machines, is recorded as refused, not as a failure)
  5. benchmarks/gpu_report.py (CRF timings with CUDA events, launches, memory, the device-resident
     pipeline)                                    -> gpu_<date>_<gpu>.json, gpu-report.log
Each step's line is appended to $OUT/summary.txt as it ends (it comes back even if the run is cut
short). Ends with a one-screen summary; exits non-zero if any step failed.
EOF
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) usage >&2; exit 2 ;;
esac
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1
declare -a SUMMARY=()
failed=0
t_start=$SECONDS
step() {  # step NAME STATUS DETAIL
  SUMMARY+=("$(printf '%-22s %-8s %s' "$1" "$2" "$3")")
  printf '%-22s %-8s %s\n' "$1" "$2" "$3" >> "$OUT/summary.txt"
  [[ $2 == FAIL ]] && failed=1
  echo "== $1: $2 $3"
}
summary() {
  echo
  echo "================ GPU session summary ($(( SECONDS - t_start )) s) ================"
  printf '%s\n' "${SUMMARY[@]}"
  [[ $failed == 0 ]] && echo "RESULT: all steps passed" || echo "RESULT: FAILED (see the logs in $OUT)"
}

# 1. the machine
if nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then
  step "nvidia-smi" ok "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
else
  step "nvidia-smi" FAIL "no GPU visible (see nvidia-smi.txt)"
fi

# 2. pycuda: without it every GPU test would skip, so a failed build ends the run here.
t=$SECONDS
# What .whl/ must carry, checked before the build's minutes are spent.
if ! ls .whl/pycuda-*.tar.gz > /dev/null 2>&1; then
  step "pycuda build" FAIL ".whl/pycuda-*.tar.gz missing: run benchmarks/gpu_prepare.sh and carry .whl"
  summary; exit 1
fi
if ! ls .whl/safetensors-*.whl > /dev/null 2>&1 && ! python3 -c "import safetensors" 2> /dev/null; then
  step "python packages" FAIL "safetensors neither installed nor in .whl/: run benchmarks/gpu_prepare.sh and carry .whl"
  summary; exit 1
fi
if bash benchmarks/device-install.sh > "$OUT/pycuda-install.log" 2>&1; then
  step "pycuda build" ok "$(( SECONDS - t )) s; $(tail -2 "$OUT/pycuda-install.log" | head -1)"
else
  step "pycuda build" FAIL "$(( SECONDS - t )) s; $(tail -1 "$OUT/pycuda-install.log")"
  summary; exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# the CPU kernels (the GPU results' reference) are compiled here: a cache that surely works
export DEEPLAB_CACHE=/tmp/deeplab-cache
# a driver library outside the loader's cache: the install said what to export
ld=$(sed -n 's/^device-install: export LD_LIBRARY_PATH=//p' "$OUT/pycuda-install.log" | tail -1)
[[ -n $ld ]] && export LD_LIBRARY_PATH=$ld

# What this run imports besides pycuda, and nothing else (a package it never imports must not fail
# the run). safetensors reads the bundled model: the machine's image lists it, and its wheel travels
# in .whl/ too (installed into /tmp/site with pycuda's dependencies). A missing one is named.
# (Logged at the end of pycuda-install.log: the device tool brings back at most 8 files from $OUT,
# and this run writes 7.)
echo "### python packages" >> "$OUT/pycuda-install.log"
if python3 -c "import numpy, cv2, onnx, onnxruntime, safetensors, torch, pytest" >> "$OUT/pycuda-install.log" 2>&1 \
   && python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" >> "$OUT/pycuda-install.log" 2>&1; then
  step "python packages" ok "numpy cv2 onnx onnxruntime safetensors torch(cuda) pytest"
else
  step "python packages" FAIL "$(tail -1 "$OUT/pycuda-install.log")"
fi

# The CRF kernels' fatbin as a wheel ships it (built by gpu_prepare.sh, carried in .whl): every GPU
# step below loads it; the report (5) runs with nvcc hidden from PATH.
fatbin="no fatbin carried: kernels compiled by nvcc"
if [[ -f .whl/densecrf.fatbin ]]; then
  cp .whl/densecrf.fatbin crf/kernels/densecrf.fatbin && fatbin="shipped fatbin, nvcc hidden"
  # a fatbin built from another revision of the .cu is never loaded (its stamp): say so now, not as
  # a report failing later for want of nvcc
  stale=$(python3 -c "from crf.gpu_module import fatbin_problem; print(fatbin_problem() or '')" 2>&1)
  if [[ -n $stale ]]; then
    rm -f crf/kernels/densecrf.fatbin
    fatbin="carried fatbin unusable ($stale): rerun benchmarks/gpu_prepare.sh; kernels compiled by nvcc"
    step "fatbin" FAIL "$stale"
  fi
fi

# 3. GPU tests (all of them: files without GPU tests are deselected by -m gpu)
t=$SECONDS
REQUIRE_GPU=1 timeout 300 python3 -m pytest -q -rA -m gpu -p no:cacheprovider \
  tests/test_crf_kernels.py tests/test_crf_safety.py tests/test_device_pipeline.py tests/test_gpu_fatbin.py \
  > "$OUT/gpu-tests.log" 2>&1
rc=$?
counts=$(grep -E '^[0-9]+ (passed|failed)|[0-9]+ (passed|failed|error|skipped)' "$OUT/gpu-tests.log" | tail -1)
if [[ $rc == 0 ]] && ! grep -q "skipped" <<<"$counts"; then
  step "GPU tests" ok "$counts ($(( SECONDS - t )) s)"
else
  step "GPU tests" FAIL "exit $rc: $counts"
fi

# 4. compute-sanitizer over a small CRF call on the GPU backend (no shared memory: no racecheck)
cat > /tmp/crf_once.py <<'PY'
import numpy as np
from crf import CRFParams, refine
from benchmarking.inputs import smooth_logits
rng = np.random.default_rng(0)
img = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
q = refine(smooth_logits(61, 97, 21), img, CRFParams(iterations=3), backend="gpu")
assert np.isfinite(q).all() and abs(float(q.sum(0).mean()) - 1) < 1e-4
print("crf ok", q.shape)
PY
: > "$OUT/sanitizer.log"
for tool in memcheck initcheck; do
  t=$SECONDS
  echo "### compute-sanitizer --tool $tool" >> "$OUT/sanitizer.log"
  timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 /tmp/crf_once.py > /tmp/san.log 2>&1
  rc=$?
  tail -40 /tmp/san.log >> "$OUT/sanitizer.log"
  if grep -qi "device not supported\|not supported on this device" /tmp/san.log; then
    step "sanitizer $tool" refused "the device refused compute-sanitizer ($(grep -im1 'not supported' /tmp/san.log | cut -c1-80))"
  elif [[ $rc == 0 ]] && grep -q "ERROR SUMMARY: 0 errors" /tmp/san.log; then
    step "sanitizer $tool" ok "0 errors ($(( SECONDS - t )) s)"
  else
    step "sanitizer $tool" FAIL "exit $rc: $(grep -m1 'ERROR SUMMARY' /tmp/san.log || tail -1 /tmp/san.log)"
  fi
done

# 5. the report, named after the date and the GPU, with the shipped fatbin (built by gpu_prepare.sh,
# carried in .whl) and nvcc hidden from PATH: the kernels must load without a compiler
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
report="$OUT/gpu_$(date +%Y-%m-%d)_${gpu:-unknown}.json"
nonvcc=$(tr ':' '\n' <<<"$PATH" | while read -r d; do [[ -n $d && ! -x $d/nvcc ]] && printf '%s:' "$d"; done)
t=$SECONDS
if PATH=${nonvcc%:} "$(command -v timeout)" 240 "$(command -v python3)" benchmarks/gpu_report.py --json "$report" \
    > "$OUT/gpu-report.log" 2>&1; then
  step "GPU report" ok "$(basename "$report") ($(( SECONDS - t )) s; $fatbin)"
else
  step "GPU report" FAIL "exit $?: $(tail -1 "$OUT/gpu-report.log")"
fi
grep -E '^(crf|pipeline) ' "$OUT/gpu-report.log" | cut -c1-400

summary
exit $failed
