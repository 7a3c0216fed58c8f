#!/usr/bin/env bash
# Runs on a GPU machine, from the project root, with .whl/ holding pycuda's source and its dependencies' wheels.
# Installs pycuda, built from source against that machine's CUDA toolkit and driver, into /tmp/site.
# Exits non-zero (and says why) if pycuda cannot be imported afterwards: a GPU run must never
# mistake a failed install for "no GPU tests to run".
# Afterwards: export PYTHONPATH=/tmp/site:$PWD
# The libcuda.so.1 search never ends the script silently under `set -e` (a fallback `ls` of a
# missing path would); a driver library outside the loader's cache is put on LD_LIBRARY_PATH (the
# line to export is printed); the build time and pycuda's version are printed.
set -euo pipefail
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
export PYTHONPATH=$site

# The toolkit root: nvcc may be a wrapper script outside the toolkit, so ask nvcc itself.
probe=$(mktemp -d)
echo '__global__ void k(){}' > "$probe/k.cu"
cuda_root=$(nvcc --dryrun -c "$probe/k.cu" -o "$probe/k.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
cuda_root=$(cd "${cuda_root:-${CUDA_HOME:-/usr/local/cuda}}" && pwd -P)
[[ -f $cuda_root/include/cuda.h ]] || { echo "device-install: no include/cuda.h under $cuda_root"; exit 1; }

# The driver library: the linker needs libcuda.so; the machine may only have libcuda.so.1 outside
# the linker's search path (e.g. /usr/local/nvidia/lib64), so link against a symlink to it.
libcuda=${LIBCUDA:-}
# the 64-bit entry (x86-64, AArch64): a machine with 32-bit driver libraries lists both
[[ -n $libcuda ]] || libcuda=$( (ldconfig -p 2>/dev/null || true) | sed -n 's/.*libcuda\.so\.1 ([^)]*64[^)]*) => //p' | head -1)
if [[ -z $libcuda ]]; then
  for f in /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 /usr/lib64/libcuda.so.1; do
    [[ -e $f ]] && { libcuda=$f; break; }
  done
fi
[[ -n $libcuda ]] || { echo "device-install: no libcuda.so.1 found (is this a GPU machine?)"; exit 1; }
# found outside the loader's cache: pycuda's extension must find it at run time too (the caller
# gets the same line to export)
if ! (ldconfig -p 2>/dev/null || true) | grep -q 'libcuda\.so\.1 '; then
  export LD_LIBRARY_PATH=$(dirname "$libcuda")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "device-install: export LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
mkdir -p "$probe/lib" && ln -sf "$libcuda" "$probe/lib/libcuda.so"

t0=$SECONDS
rm -rf /tmp/pycuda-src && mkdir -p /tmp/pycuda-src
tar xzf .whl/pycuda-*.tar.gz -C /tmp/pycuda-src --strip-components=1
(
  cd /tmp/pycuda-src
  # curand is not used by the CRF; a pip-installed curand header without its library breaks the link.
  python3 configure.py --cuda-root="$cuda_root" --cudadrv-lib-dir="$probe/lib" --no-cuda-enable-curand >/dev/null
  python3 -m pip install -q --no-build-isolation --no-deps --target "$site" .
)
python3 -c "import pycuda, pycuda.autoprimaryctx, pycuda.driver as d; print('pycuda', pycuda.VERSION_TEXT, 'built against CUDA', d.get_version(), 'on', d.Device(0).name())" \
  || { echo "device-install: pycuda was built but cannot start a context"; exit 1; }
echo "device-install: pycuda built in $(( SECONDS - t0 )) s; cuda root $cuda_root, driver library $libcuda"
