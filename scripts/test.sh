#!/usr/bin/env bash
# The test command of README.md (and of CI): install dependencies, build everything (the CUDA
# backend too when nvcc is present, so CUDA code is compiled even where it cannot run), run the
# CPU test suite. GPU tests: `ctest --test-dir build -L gpu` on a machine with a GPU.
#
# Build time matters on small CI machines (2 cores): the C++ sources are compiled as unity
# batches (each batch parses the common headers once) and CUDA code for sm_90a only (the
# PTX for newer GPUs is built by the default configuration, see docs/architecture.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$SECONDS
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_UNITY_BUILD=ON \
      -DCMAKE_UNITY_BUILD_BATCH_SIZE=12 -DCMAKE_CUDA_ARCHITECTURES=90a-real
cmake --build build -j "$(nproc)"
echo "test.sh: configure + build took $((SECONDS - start)) s"
start=$SECONDS
ctest --test-dir build -L cpu --output-on-failure -j "$(nproc)" --timeout 900
echo "test.sh: ctest -L cpu took $((SECONDS - start)) s"
