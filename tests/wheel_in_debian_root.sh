#!/usr/bin/env bash
# The x86_64 wheel on a machine with no C/C++ compiler: a fresh minimal Debian root (debootstrap
# bookworm, variant minbase, Python 3.11), checked to hold no gcc/g++/cc/c++/clang/nvcc, gets the
# wheel pip-installed into a venv (dependencies as binary wheels from PyPI) and segments a sample
# with the deeplab-segment console script. The CRF must run on the wheel's prebuilt CPU library
# ("cpu prebuilt libdensecrf_<level>.so", nothing "compiling"). Prints the install time and the
# first-segmentation time. Needs root (debootstrap, chroot, mount), debootstrap and network access
# to the Debian mirror and PyPI.
#   bash tests/wheel_in_debian_root.sh
# Caches (reruns skip the downloads): ~/.cache/deeplab-v1-toolkit/debian-root/ (the .debs
# debootstrap fetched), .../debian-root-pip/ (pip's cache in the root), .../build-venv-zig*/ (the
# wheel's build requirements, shared with tests/aarch64_emulated.sh) and zig's ~/.cache/zig.
set -euo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s.%N)
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}
# The wheel's dependencies in the root, pinned (binary wheels for CPython 3.11 on x86_64)
PINS=(numpy==2.2.6 opencv-python-headless==4.12.0.88 onnxruntime==1.22.1 tqdm==4.67.1)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/deeplab-v1-toolkit
deb_cache=$cache/debian-root/$SUITE-amd64
pip_cache=$cache/debian-root-pip
mkdir -p "$deb_cache" "$pip_cache"

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
fail() { echo "FAIL: $*"; echo "wheel_in_debian_root: FAIL ($*)"; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (debootstrap, chroot, mount)"
command -v debootstrap >/dev/null || fail "debootstrap missing: apt-get install debootstrap"

tmp=$(mktemp -d)
root=$tmp/root
mounts=()
cleanup() {
    local m i
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        m=${mounts[i]}
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    # never rm -rf through a mount that is still there (/dev, the pip cache)
    if grep -q " $tmp/" /proc/mounts; then
        echo "warning: mounts left under $tmp; not removing it" >&2
        grep " $tmp/" /proc/mounts >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
mnt() {  # mnt ARGS... TARGET: mount and remember TARGET for the trap
    mkdir -p "${*: -1}"
    mount "$@"
    mounts+=("${*: -1}")
}

# 1. the wheel (no CUDA fatbin: this run only tests the CPU path), built without isolation by a
#    Python with the build requirements at a fixed path (tests/zig_python.sh says why)
. tests/zig_python.sh
echo "== building the x86_64 wheel"
t0=$(date +%s.%N)
DEEPLAB_WHEEL_FATBIN=0 DEEPLAB_WHEEL_MACHINE=x86_64 "$zig_py" -m pip wheel --no-deps --no-build-isolation \
    --disable-pip-version-check -q -w "$tmp/wheel" . || fail "building the wheel"
wheel=$(ls "$tmp"/wheel/deeplab_v1_toolkit-*.whl)
t_wheel=$(since "$t0")
echo "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KB) in ${t_wheel%.*} s"
python3 - "$wheel" <<'EOF' || fail "the wheel lacks the prebuilt x86_64 libraries"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = sorted(n for n in names if "/prebuilt/libdensecrf_" in n)
print("wheel holds:", ", ".join(n.rsplit("/", 1)[1] for n in libs))
assert any("x86-64-v2" in n for n in libs), libs
EOF

# 2. the minimal Debian root
echo "== debootstrap $SUITE minbase"
t0=$(date +%s.%N)
debootstrap --variant=minbase --arch=amd64 --cache-dir="$deb_cache" \
    --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 \
    || { tail -20 "$tmp/debootstrap.log"; fail "debootstrap"; }
t_root=$(since "$t0")
echo "root made in ${t_root%.*} s ($(du -sm "$root" | cut -f1) MB)"

pip_cert=
in_root() {  # in_root COMMAND: run bash -c COMMAND inside the root with a clean environment
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_CACHE_DIR=/var/cache/pip ${pip_cert:+PIP_CERT=$pip_cert} \
        chroot "$root" /bin/bash -c "$1"
}

# 3. no compiler in the root
found=$(in_root 'for c in gcc g++ cc c++ clang clang++ nvcc x86_64-linux-gnu-gcc x86_64-linux-gnu-g++ zig; do
    command -v "$c" || true; done; ls /usr/bin/*gcc* /usr/bin/*clang* 2>/dev/null || true')
[ -z "$found" ] || fail "the root has a compiler: $found"
echo "PASS: no C/C++ compiler in the root (gcc g++ cc c++ clang clang++ nvcc zig: none on PATH)"

# 4. into the root: DNS, /proc, /dev, the pip cache; the wheel, the model and a sample
cp /etc/resolv.conf "$root/etc/resolv.conf"
# a host whose pip trusts an extra CA (PIP_CERT: a proxy's) passes that bundle on; else the root's own
pip_cert=
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    cp "$PIP_CERT" "$root/etc/ssl/certs/host-pip-cert.pem"
    pip_cert=/etc/ssl/certs/host-pip-cert.pem
fi
mnt -t proc proc "$root/proc"
mnt --bind /dev "$root/dev"
mnt -t tmpfs tmpfs "$root/dev/shm"
mnt --bind /sys "$root/sys"
mnt --bind "$pip_cache" "$root/var/cache/pip"
mkdir -p "$root/work"
cp "$wheel" models/deeplab_shapes.onnx samples/scene_0.png "$root/work/"
printf '%s\n' "${PINS[@]}" >"$root/work/constraints.txt"
in_root 'python3 -m venv /opt/venv' || fail "python3 -m venv"

# 5. install: binary wheels only (nothing may build from source here)
echo "== pip install $(basename "$wheel")"
t0=$(date +%s.%N)
in_root "cd /work && /opt/venv/bin/pip install -q --only-binary=:all: -c constraints.txt ./$(basename "$wheel")" \
    || fail "pip install of the wheel"
t1=$(date +%s.%N)
t_install=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')

# 6. the first segmentation, with the console script
in_root 'cd /work && /opt/venv/bin/deeplab-segment scene_0.png --model deeplab_shapes.onnx --out out' \
    >"$tmp/segment.out" 2>"$tmp/segment.err" || { cat "$tmp/segment.out" "$tmp/segment.err"; fail "deeplab-segment exited nonzero"; }
t_seg=$(since "$t1")
[ -s "$root/work/out/scene_0_mask.png" ] || { cat "$tmp/segment.err"; fail "no out/scene_0_mask.png"; }
! grep -qi compiling "$tmp/segment.err" || { cat "$tmp/segment.err"; fail "deeplab-segment compiled the kernels"; }
echo "PASS: deeplab-segment exit 0, wrote out/scene_0_mask.png, no compiling"

# 7. which CRF library ran
in_root "cd /work && /opt/venv/bin/python -c \"from runtime import Segmenter; import crf.cpu_library as b; \
s = Segmenter('deeplab_shapes.onnx'); s('scene_0.png'); print(s.crf_backend, b.cpu_library_source)\"" \
    >"$tmp/which.out" 2>"$tmp/which.err" || { cat "$tmp/which.out" "$tmp/which.err"; fail "Segmenter in the root"; }
which=$(tail -1 "$tmp/which.out")
echo "Segmenter says: $which"
[[ $which =~ ^cpu\ prebuilt\ libdensecrf_[a-z0-9.-]+\.so$ ]] || { cat "$tmp/which.err"; fail "not the prebuilt library: $which"; }
! grep -qi compiling "$tmp/which.err" || { cat "$tmp/which.err"; fail "the Segmenter compiled the kernels"; }
echo "PASS: the CRF ran on the wheel's prebuilt library, stderr has no compiling"

t_total=$(since "$t_start")
printf 'wheel_in_debian_root: PASS (no compiler; install %.1f s, first segmentation %.1f s; %s; wheel %.0f s, root %.0f s, total %.0f s)\n' \
    "$t_install" "$t_seg" "${which#cpu prebuilt }" "$t_wheel" "$t_root" "$t_total"
