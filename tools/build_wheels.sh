#!/usr/bin/env bash
# Build the x86_64 and the aarch64 wheel of this project into OUTDIR, from this machine:
#   bash tools/build_wheels.sh OUTDIR
# zig's C++ compiler (the ziglang build requirement, fetched by pip) cross-compiles the CRF's CPU
# libraries for each platform's oldest supported glibc; nvcc, where found, builds the CUDA fatbin
# (the same file serves both). Each wheel is tagged py3-none-manylinux_<glibc>_<machine>.
set -euo pipefail
out=${1:?usage: bash tools/build_wheels.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python3 -c 'import sys; sys.exit(sys.version_info < (3, 8))' || { echo "error: needs Python >= 3.8" >&2; exit 2; }
for machine in x86_64 aarch64; do
    echo "== $machine"
    DEEPLAB_WHEEL_MACHINE=$machine python3 -m pip wheel --no-deps -q -w "$out" .
done
ls -l "$out"/*.whl
