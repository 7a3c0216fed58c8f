#!/usr/bin/env bash
# The aarch64 CRF libraries a wheel ships, run: cross-compiled here with zig (crf/build_kernels.py
# --machine aarch64), loaded by an arm64 Debian Python 3.11 + numpy under user-mode emulation
# (qemu-aarch64-static -L ROOT; no binfmt_misc needed), on a small image (40x50, 5 labels,
# DeepLab's CRFParams, 10 iterations) through crf.driver.DenseCRFDriver(CPUKernels(library, threads))
# for each aarch64 library at 1 and 4 threads, and through the numpy port in the same emulated
# Python. The host runs the same inputs (a .npz written here) through the x86_64 libraries
# (zig-built, every level this CPU runs) and compares:
#   aarch64 vs numpy port  max |dQ| <= 1e-5
#   aarch64 vs x86_64      max |dQ| <= 1e-6 (float rounding)
#   1 vs 4 threads         bit-identical (each library, both machines)
# Needs qemu-user-static and debootstrap (apt) and network access to the Debian mirror and PyPI
# (ziglang, numpy). Nothing is mounted or chrooted.
#   bash tests/aarch64_emulated.sh
# Caches: ~/.cache/deeplab-v1-toolkit/arm64-root/ (the arm64 .debs), .../build-venv-zig* (zig, numpy;
# shared with tests/wheel_in_debian_root.sh), zig's own ~/.cache/zig.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
t_start=$(date +%s.%N)
PYTHON=${PYTHON:-python3}
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/deeplab-v1-toolkit
deb_cache=$cache/arm64-root/$SUITE-arm64
mkdir -p "$deb_cache"

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
fail() { echo "FAIL: $*"; echo "aarch64_emulated: FAIL ($*)"; exit 1; }
qemu=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
[ -n "$qemu" ] || fail "no qemu-aarch64-static: apt-get install qemu-user-static"
command -v debootstrap >/dev/null || fail "debootstrap missing: apt-get install debootstrap"
if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    echo "binfmt_misc has an aarch64 handler (not relied on: running through $qemu -L)"
else
    echo "binfmt_misc: no aarch64 handler here; running through $qemu -L ROOT"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. the host's Python: zig (the build requirement) and numpy (tests/zig_python.sh)
. tests/zig_python.sh
py=$zig_py

# 2. the libraries: aarch64 (under test) and x86_64 (the reference), exactly as a wheel builds them
t0=$(date +%s.%N)
for machine in aarch64 x86_64; do
    "$py" crf/build_kernels.py --machine "$machine" --out "$tmp/lib-$machine" || fail "building the $machine libraries"
done
t_build=$(since "$t0")
"$py" - "$tmp" <<'EOF' || fail "the aarch64 libraries are not aarch64 ELF files"
import sys, struct
from pathlib import Path
for lib in sorted(Path(sys.argv[1], "lib-aarch64").glob("*.so")):
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and struct.unpack("<H", head[18:20])[0] == 183, lib  # EM_AARCH64
    print(f"{lib.name}: ELF aarch64, {lib.stat().st_size // 1024} KB")
EOF

# 3. an arm64 Python with numpy: debootstrap downloads bookworm's arm64 minbase + python3-numpy
#    (dependencies resolved), every .deb is unpacked with dpkg-deb -x; nothing is configured or run
#    natively, so no binfmt_misc and no second stage.
echo "== arm64 root ($SUITE minbase + python3-numpy, unpacked)"
t0=$(date +%s.%N)
debootstrap --download-only --variant=minbase --arch=arm64 --cache-dir="$deb_cache" \
    --include=python3-minimal,python3-numpy "$SUITE" "$tmp/dl" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 \
    || { tail -20 "$tmp/debootstrap.log"; fail "debootstrap --download-only (arm64)"; }
root=$tmp/arm64
mkdir -p "$root"
n=0
for deb in "$tmp"/dl/var/cache/apt/archives/*.deb; do  # this run's packages (the cache may hold older ones)
    dpkg-deb -x "$deb" "$root"
    n=$((n + 1))
done
[ "$n" -gt 50 ] || fail "debootstrap left only $n packages in $tmp/dl/var/cache/apt/archives"
# the BLAS/LAPACK alternatives dpkg would set up (numpy links libblas.so.3 and liblapack.so.3)
for lib in libblas.so.3 liblapack.so.3; do
    if [ ! -e "$root/usr/lib/aarch64-linux-gnu/$lib" ]; then
        # relative: qemu -L resolves the guest's paths under ROOT, an absolute link would leave it
        impl=$(cd "$root/usr/lib/aarch64-linux-gnu" && ls -d */"$lib" 2>/dev/null | head -1)
        [ -n "$impl" ] || fail "no $lib in the arm64 root"
        ln -sf "$impl" "$root/usr/lib/aarch64-linux-gnu/$lib"
    fi
done
t_root=$(since "$t0")
echo "unpacked $n packages in ${t_root} s ($(du -sm "$root" | cut -f1) MB)"
arm_py() {  # arm_py ARGS...: the arm64 Python 3.11, emulated, with the repo importable
    env -i PATH=/usr/bin:/bin LANG=C.UTF-8 PYTHONPATH="$repo" PYTHONDONTWRITEBYTECODE=1 PYTHONNOUSERSITE=1 \
        OPENBLAS_NUM_THREADS=1 "$qemu" -L "$root" "$root/usr/bin/python3.11" "$@"
}
arm_py -c 'import platform, sys, numpy; print("emulated:", platform.machine(), "Python", sys.version.split()[0],
"numpy", numpy.__version__); assert platform.machine() == "aarch64"' || fail "the emulated arm64 Python does not start"

# 4. the inputs, written once on the host
"$py" - "$tmp/inputs.npz" <<'EOF'
import sys
import numpy as np
rng = np.random.default_rng(2011)
h, w, c = 40, 50, 5
# coloured blocks with noise (so the bilateral kernel has edges) and logits favouring each block's label
blocks = rng.integers(0, c, (4, 5))
labels = np.kron(blocks, np.ones((10, 10), dtype=np.int64))
palette = rng.integers(0, 256, (c, 3))
image = np.clip(palette[labels] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
scores = rng.normal(0, 1.5, (c, h, w)).astype(np.float32)
scores[labels, np.arange(h)[:, None], np.arange(w)[None, :]] += 1.0
np.savez(sys.argv[1], scores=scores, image=image)
EOF

# 5. the CRF: the same program in the emulated arm64 Python and on the host
cat >"$tmp/run_crf.py" <<'EOF'
import platform, sys, time
from pathlib import Path
import numpy as np
import crf
import crf.cpu_kernels as b
from crf.driver import DenseCRFDriver
from crf.params import CRFParams

inputs, libdir, out = sys.argv[1:4]
d = np.load(inputs)
scores, image = d["scores"], d["image"]
c, h, w = scores.shape
params = CRFParams()  # DeepLab's: bi_w 5, bi_xy_std 50, bi_rgb_std 10, pos_w 3, pos_xy_std 3, 10 iterations
assert params.iterations == 10, params
try:
    from crf.build_kernels import cpu_features, targets_for
    runs_here = {t.filename for t in targets_for(platform.machine()) if t.needs <= cpu_features()}
except Exception:
    runs_here = None
results = {}
for lib in sorted(Path(libdir).glob("libdensecrf_*.so")):
    if platform.machine() == "x86_64" and runs_here is not None and lib.name not in runs_here:
        print(f"{lib.name}: this CPU lacks its level, skipped")
        continue
    for threads in (1, 4):
        t0 = time.perf_counter()
        k = b.CPUKernels(library=lib, threads=threads)
        assert k.threads == threads, (k.threads, threads)
        q, _ = DenseCRFDriver(k).run(scores, image, h, w, c, params, is_logits=True)
        results[f"{lib.name}|{threads}"] = q
        print(f"{platform.machine()} {lib.name} threads={threads}: {time.perf_counter() - t0:.2f} s")
if "--numpy" in sys.argv:
    t0 = time.perf_counter()
    results["numpy"] = crf.refine(scores, image, params, backend="numpy")
    print(f"{platform.machine()} numpy port: {time.perf_counter() - t0:.2f} s")
np.savez(out, **results)
EOF
echo "== the CRF in the emulated arm64 Python"
t0=$(date +%s.%N)
arm_py "$tmp/run_crf.py" "$tmp/inputs.npz" "$tmp/lib-aarch64" "$tmp/arm64.npz" --numpy \
    || fail "the CRF in the emulated arm64 Python (see the traceback above)"
t_emu=$(since "$t0")
echo "== the CRF on the host (x86_64)"
PYTHONPATH=$repo PYTHONDONTWRITEBYTECODE=1 "$py" "$tmp/run_crf.py" "$tmp/inputs.npz" "$tmp/lib-x86_64" "$tmp/x86.npz" \
    || fail "the CRF on the host"

# 6. compare
"$py" - "$tmp/arm64.npz" "$tmp/x86.npz" >"$tmp/compare.out" <<'EOF'
import sys
import numpy as np
arm, x86 = dict(np.load(sys.argv[1])), dict(np.load(sys.argv[2]))
ok = True
def check(name, good, detail):
    global ok
    ok &= bool(good)
    print(f"{'PASS' if good else 'FAIL'}: {name}: {detail}")
def dq(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
numpy_port = arm.pop("numpy")
check("marginals sum to 1 (numpy port)", abs(numpy_port.sum(0) - 1).max() < 1e-5, f"{abs(numpy_port.sum(0) - 1).max():.1e}")
worst = {"numpy": 0.0, "x86": 0.0}
for machine, res in (("aarch64", arm), ("x86_64", x86)):
    for key in sorted(k for k in res if k.endswith("|1")):
        lib = key[:-2]
        same = np.array_equal(res[key], res[lib + "|4"])
        check(f"{machine} {lib}: 1 vs 4 threads bit-identical", same, f"max |dQ| {dq(res[key], res[lib + '|4']):.1e}")
for key in sorted(k for k in arm if k.endswith("|1")):
    lib = key[:-2]
    d = dq(arm[key], numpy_port)
    worst["numpy"] = max(worst["numpy"], d)
    check(f"aarch64 {lib} vs numpy port (aarch64)", d <= 1e-5, f"max |dQ| {d:.2e} (<= 1e-5)")
    for xkey in sorted(k for k in x86 if k.endswith("|1")):
        d = dq(arm[key], x86[xkey])
        worst["x86"] = max(worst["x86"], d)
        check(f"aarch64 {lib} vs x86_64 {xkey[:-2]}", d <= 1e-6, f"max |dQ| {d:.2e} (<= 1e-6)")
check("libraries compared", len([k for k in arm if k.endswith("|1")]) >= 2 and len(x86) >= 2,
      f"aarch64: {len(arm) // 2}, x86_64: {len(x86) // 2}")
print(f"SUMMARY {'PASS' if ok else 'FAIL'} {worst['numpy']:.2e} {worst['x86']:.2e}")
EOF
cat "$tmp/compare.out"
read -r _ verdict d_numpy d_x86 < <(grep '^SUMMARY' "$tmp/compare.out")
t_total=$(since "$t_start")
if [ "$verdict" != PASS ]; then
    echo "aarch64_emulated: FAIL (max |dQ| vs numpy port $d_numpy, vs x86_64 $d_x86; see FAIL lines above)"
    exit 1
fi
echo "aarch64_emulated: PASS (max |dQ| aarch64 vs numpy port $d_numpy, vs x86_64 $d_x86; 1 = 4 threads;" \
    "build ${t_build%.*} s, arm64 root ${t_root%.*} s, emulated CRF ${t_emu%.*} s, total ${t_total%.*} s)"
