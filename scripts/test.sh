#!/usr/bin/env bash
# The test command of README.md (and of CI): install dependencies, build everything (the CUDA
# backend too when nvcc is present, so CUDA code is compiled even where it cannot run), run the
# CPU test suite. GPU tests: `ctest --test-dir build -L gpu` on a machine with a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
ctest --test-dir build -L cpu --output-on-failure -j "$(nproc)" --timeout 900
