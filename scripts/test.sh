#!/usr/bin/env bash
# The test command of README.md (and of CI): install dependencies, build everything (the CUDA
# backend too when nvcc is present, so CUDA code is compiled even where it cannot run), run the
# CPU test suite. GPU tests: `ctest --test-dir build -L gpu` on a machine with a GPU.
#
# Build time matters on small CI machines (2 cores, and slow ones): the C++ sources are compiled
# as unity batches (each batch parses the common headers once) at -O2, and the CUDA code only to
# PTX for compute_90a (nvcc's front end and code generator check it, ptxas is skipped: the
# machine-code step runs where a GPU is, scripts/gpu-check.sh). docs/architecture.md has the
# measured costs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$SECONDS
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_UNITY_BUILD=ON \
      -DCMAKE_UNITY_BUILD_BATCH_SIZE=12 -DCMAKE_CUDA_ARCHITECTURES=90a-virtual \
      -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG"
# Only what the CPU tests need, plus the GPU test executable (it compiles the CUDA code paths the
# tests use); the benchmarks and the multi-GPU tests are built by scripts/gpu-check.sh and
# scripts/gpu-multi.sh on GPU machines.
cmake --build build -j "$(nproc)" --target nha_cli nha_tests_cpu \
  $(grep -q '^build nha_tests_gpu' build/build.ninja 2>/dev/null && echo nha_tests_gpu)
echo "test.sh: configure + build took $((SECONDS - start)) s"
start=$SECONDS
ctest --test-dir build -L cpu --output-on-failure -j "$(nproc)" --timeout 900
echo "test.sh: ctest -L cpu took $((SECONDS - start)) s"
