#!/usr/bin/env bash
# Data-parallel checks on a 2- or 4-GPU host, one call (docs/distributed.md):
#   1. configure + build nha, nha_tests_cpu and nha_tests_multigpu with every core
#   2. the CPU tests of the distributed code (bucket plan, launch environment, batch split, hook)
#      and of the trainer/config/checkpoint (their single-process behaviour must not change)
#   3. ctest -L multigpu: `nha train --gpus N` vs one GPU (fp32 within 1e-5 per step, bf16 close),
#      resume on the same and on another GPU count, a rank that exits or hangs ends the job
#   4. the benchmark bench/ddp_bench.py: tokens/s and scaling efficiency of transformer-125m and
#      nha-125m at T 2048 on 1..N GPUs next to PyTorch DDP (bench/ddp_peer.py) -> $OUT/ddp.json
#      (copy it to bench/results/ddp.json). Data: token shards made here from the first text of
#      .peer/data/text/, else tests/data/tinyshakespeare.txt.zst, with a 2048-token tokenizer.
# Every stage runs even when an earlier one failed (except after a failed build), logs to $OUT
# and records its exit code; the last lines printed are a summary.
#
# Usage: scripts/gpu-multi.sh [--no-tests] [--no-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-multi-out}
mkdir -p "$OUT"
tests=1 bench=1
for a in "$@"; do
  case $a in
    --no-tests) tests=0 ;;
    --no-bench) bench=0 ;;
    *) echo "unknown option $a"; exit 2 ;;
  esac
done
summary=()
note() { summary+=("$1"); echo "== $1"; }
export NHA_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
jobs=$(nproc)
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
build=build-multi

{ nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  nvidia-smi topo -m; } >"$OUT/gpus.log" 2>&1
note "$gpus GPU(s) visible: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

t0=$SECONDS
cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a-real \
  >"$OUT/build.log" 2>&1
rc=$?
if [[ $rc == 0 ]]; then
  timeout 420 cmake --build $build -j"$jobs" --target nha_cli nha_tests_multigpu >>"$OUT/build.log" 2>&1
  rc=$?
fi
grep -E "NHA: (CUDA|NCCL)" "$OUT/build.log"
note "build of nha and nha_tests_multigpu (rc=$rc, $((SECONDS - t0)) s)"
if [[ $rc != 0 ]]; then
  grep -E "error|Error" "$OUT/build.log" | head -30
  printf '%s\n' "${summary[@]}"
  exit 1
fi
# The CPU tests are a separate target: a break in an unrelated test file must not stop the rest.
t0=$SECONDS
echo "---- nha_tests_cpu" >>"$OUT/build.log"
timeout 240 cmake --build $build -j"$jobs" --target nha_tests_cpu >>"$OUT/build.log" 2>&1
cpu_tests_built=$?
note "build of nha_tests_cpu (rc=$cpu_tests_built, $((SECONDS - t0)) s)"
[[ $cpu_tests_built == 0 ]] || sed -n '/^---- nha_tests_cpu/,$p' "$OUT/build.log" | grep -E "error" | head -10

if [[ $tests == 1 && $cpu_tests_built == 0 ]]; then
  t0=$SECONDS
  timeout 300 $build/tests/nha_tests_cpu \
    --gtest_filter='GradReadyHook.*:BucketPlan.*:LaunchEnv.*:BatchSplit.*:Trainer*:Config.*:Checkpoint*:Optim*:AdamW*' \
    >"$OUT/tests_cpu.log" 2>&1
  rc=$?
  note "CPU tests of distributed/trainer/config/checkpoint (rc=$rc, $((SECONDS - t0)) s): $(grep -E '^\[  (PASSED|FAILED)' "$OUT/tests_cpu.log" | tr '\n' ' ')"
  [[ $rc == 0 ]] || grep -E "Failure|Expected|Which is|FAILED" "$OUT/tests_cpu.log" | head -20
fi

if [[ $tests == 1 ]]; then
  t0=$SECONDS
  timeout 420 ctest --test-dir $build -L multigpu -V >"$OUT/tests_multigpu.log" 2>&1
  rc=$?
  note "ctest -L multigpu (rc=$rc, $((SECONDS - t0)) s): $(grep -E 'tests passed|tests failed' "$OUT/tests_multigpu.log")"
  grep -E "largest relative loss difference" "$OUT/tests_multigpu.log" | sort -u
  [[ $rc == 0 ]] || grep -E "Failure|Expected|Which is|\(Failed\)|Timeout|error:" "$OUT/tests_multigpu.log" | head -30
fi

if [[ $bench == 1 ]]; then
  t0=$SECONDS
  data=runs/data/ddp-bench
  text=$(ls .peer/data/text/*.txt tests/data/tinyshakespeare.txt.zst 2>/dev/null | head -1)
  rc=0
  if [[ ! -s $data/shards/manifest.json ]]; then
    if [[ -z $text ]]; then
      echo "no text under .peer/data/text nor tests/data/tinyshakespeare.txt.zst for the benchmark's shards" | tee "$OUT/bench.log"
      rc=1
    else
      mkdir -p $data
      { $build/nha tokenizer train --input "$text" --vocab 2048 --out $data/tok.model &&
        $build/nha prepare --tokenizer $data/tok.model --input "$text" --out $data/shards; } >"$OUT/bench.log" 2>&1
      rc=$?
    fi
  fi
  note "benchmark data from ${text:-nothing} (rc=$rc, $((SECONDS - t0)) s)"
  if [[ $rc == 0 ]]; then
    t0=$SECONDS
    counts="1 2"
    [[ $gpus -ge 4 ]] && counts="1 2 4"
    timeout 540 python3 bench/ddp_bench.py --nha $build/nha --shards $data/shards --gpus $counts \
      --out "$OUT/ddp.json" 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    note "ddp benchmark on $counts GPUs (rc=$rc, $((SECONDS - t0)) s): $OUT/ddp.json"
  fi
fi

echo
echo "==== summary ===="
printf '%s\n' "${summary[@]}"
