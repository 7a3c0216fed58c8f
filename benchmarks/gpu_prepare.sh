#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, what the GPU machine (no network, Python 3.12) needs for
# benchmarks/gpu_session.sh, in <repo>/.whl/ (git-ignored): pycuda's source and its dependencies'
# wheels, and safetensors (the bundled model is read with it; the GPU machine's image lists it, and
# carrying it keeps the run from depending on that), with benchmarks/device-install.sh copied beside
# them. Usage, from the project root:
#   bash benchmarks/gpu_prepare.sh            # then carry ".whl" in the device run
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
python3 -m pip download -q --no-deps --no-binary=pycuda -d .whl "pycuda==2026.1"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pytools platformdirs mako markupsafe typing_extensions siphash24 setuptools wheel safetensors
cp benchmarks/device-install.sh .whl/
# the CRF kernels' CUDA fatbin, as a wheel ships it: the GPU run loads it with nvcc hidden
python3 -c "import subprocess, sys; sys.path.insert(0, '.'); from crf.gpu_module import fatbin_command; \
subprocess.run(fatbin_command('nvcc', 'crf/kernels/densecrf.cu', '.whl/densecrf.fatbin'), check=True)"
ls -la .whl
