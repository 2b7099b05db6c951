#!/usr/bin/env bash
# The test command of README.md (and of CI): install dependencies, build everything (the CUDA
# backend too when nvcc is present, so CUDA code is compiled even where it cannot run), run the
# CPU test suite. GPU tests: `ctest --test-dir build-test -L gpu` on a machine with a GPU.
#
# A test build, in its own directory (build-test/; the main job's build/ keeps full optimization).
# Build time matters on small CI machines (2 cores, and slow ones): the C++ sources are compiled
# as unity batches (each batch parses the common headers once), the hot library code (tensors,
# autograd, kernels, layers) at -O1, the cold code and the nha command at -O0 (NHA_COLD_FLAGS), the
# CUDA files as one unit, and without a GPU only as a check (below). docs/architecture.md has the
# measured costs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-mpi  # Open MPI: the CPU data-parallel tests run 2 ranks
# Every library import points down the layers (docs/architecture.md); seconds, before the build.
python3 scripts/check-imports.py
# Where no GPU can run the CUDA code (CI), it is compiled as a check only: to compute_90a PTX
# (ptxas is skipped) with nvcc's optimizers off (-O0 host code, -Xcicc -O0 device code: NVVM's
# optimizer was half of a kernel file's compile time). With a GPU, the CUDA build is the normal one.
cuda_check_only=()
if ! nvidia-smi -L >/dev/null 2>&1; then
  cuda_check_only=(-DCMAKE_CUDA_ARCHITECTURES=90a-virtual
                   "-DCMAKE_CUDA_FLAGS_RELEASE=-O0 -Xcicc -O0 -DNDEBUG")
fi
start=$SECONDS
cmake -S . -B build-test -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_UNITY_BUILD=ON \
      -DCMAKE_UNITY_BUILD_BATCH_SIZE=12 -DCMAKE_CXX_FLAGS_RELEASE="-O1 -DNDEBUG" \
      -DNHA_COLD_FLAGS=-O0 "${cuda_check_only[@]}"
# Only what the CPU tests need, plus the GPU test executable (it compiles the CUDA code paths the
# tests use); the benchmarks and the multi-GPU tests are built by scripts/gpu-check.sh and
# scripts/gpu-multi.sh on GPU machines.
cmake --build build-test -j "$(nproc)" --target nha_cli nha_tests_cpu \
  $(grep -q '^build nha_tests_gpu' build-test/build.ninja 2>/dev/null && echo nha_tests_gpu)
echo "test.sh: configure + build took $((SECONDS - start)) s"
start=$SECONDS
ctest --test-dir build-test -L cpu --output-on-failure -j "$(nproc)" --timeout 900
echo "test.sh: ctest -L cpu took $((SECONDS - start)) s"
