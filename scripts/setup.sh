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
# Install speed on small machines (CI: 2 cores, slow disk; measured on a 2-core VM like it: unpacking 2 min, man-db's
# trigger 2 min 17 s): dpkg skips its per-file fsync (--force-unsafe-io: only a crash during the
# install could leave a package half-written, and apt-get would then reinstall it), and man-db does
# not rebuild its whole index inside the install (its flag file is put back afterwards, so its
# daily job indexes the new manual pages).
mandb_flag=/var/lib/man-db/auto-update
if [[ -e $mandb_flag ]]; then
  $sudo mv "$mandb_flag" "$mandb_flag.nha-setup"
  trap '$sudo mv "$mandb_flag.nha-setup" "$mandb_flag"' EXIT
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-unsafe-io "${missing[@]}"
