#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer (issue 18), in its own
# build directory build-asan/ (CPU only, no CUDA). Not part of scripts/test.sh: the build is a
# separate full compile and the tests run 2-5x slower. Any ASan or UBSan report fails the test
# that triggers it (halt_on_error, abort_on_error).
#   bash scripts/sanitize.sh [extra ctest arguments, e.g. -R Fault]
# Run scripts/setup.sh once before (dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
start=$SECONDS
# -O1 -g without NDEBUG: asserts stay on; unity batches as in scripts/test.sh.
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Release -DNHA_CUDA=OFF \
      -DCMAKE_UNITY_BUILD=ON -DCMAKE_UNITY_BUILD_BATCH_SIZE=12 \
      -DCMAKE_CXX_FLAGS="$san" -DCMAKE_CXX_FLAGS_RELEASE="-O1 -g" \
      -DCMAKE_EXE_LINKER_FLAGS="$san" "${launcher[@]}"
cmake --build build-asan -j "$(nproc)" --target nha_cli nha_tests_cpu
echo "sanitize.sh: configure + build took $((SECONDS - start)) s"
export ASAN_OPTIONS="abort_on_error=1:halt_on_error=1:detect_leaks=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
start=$SECONDS
ctest --test-dir build-asan -L cpu --output-on-failure -j "$(nproc)" --timeout 1800 "$@"
echo "sanitize.sh: ctest -L cpu took $((SECONDS - start)) s"
