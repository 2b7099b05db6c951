#!/usr/bin/env bash
# Installs the Debian packages the NHA framework builds against. Safe to run again.
# Usage: scripts/setup.sh [--with-mpi]
set -euo pipefail
packages=(build-essential cmake ninja-build pkg-config zstd
          libopenblas-dev libhdf5-dev libsentencepiece-dev sentencepiece
          libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libgtest-dev)
[[ "${1:-}" == "--with-mpi" ]] && packages+=(libopenmpi-dev openmpi-bin)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if (( ${#missing[@]} == 0 )); then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
echo "setup: installing ${missing[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
