#!/usr/bin/env bash
# The wheels' prebuilt CRF kernels where they run: the x86_64 wheel in a minimal Debian root with no
# compiler (tests/wheel_in_debian_root.sh) and the aarch64 libraries under user-mode emulation
# (tests/aarch64_emulated.sh). Installs what they need from Debian (debootstrap, qemu-user-static)
# when run as root; elsewhere says what is missing and stops (exit 2).
#   bash tests/platform_proofs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
if (( ${#need[@]} )); then
    if [ "$(id -u)" != 0 ]; then
        echo "platform_proofs: needs root and ${need[*]} (apt-get install ${need[*]})" >&2
        exit 2
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
bash tests/wheel_in_debian_root.sh
bash tests/aarch64_emulated.sh
