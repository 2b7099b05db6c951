#!/usr/bin/env bash
# One GPU session's worth of checks, in the order that matters if time runs out:
#   1. configure + build the GPU targets (nha_tests_gpu, bench_attention) with every core
#   2. ctest -L gpu (every CUDA op vs the CPU reference, determinism, Philox CPU == GPU), and
#      where torch + transformers exist, the Hugging Face LlamaForCausalLM interop test
#   3. compute-sanitizer memcheck over a smaller filtered set of the GPU tests
#   4. benchmarks: bench_attention and, in the same run, the PyTorch SDPA peer (bench/peer/attn_sdpa.py),
#      merged into attention.json with our/SDPA ratios; bench_nha (NHA core vs our flash attention)
#      and bench/nha_peer.py (SDPA at the same shapes), merged into nha.json (+ nha.svg when
#      matplotlib is there)
#   5. the rest of the build (ninja -C build-gpu), so a break elsewhere cannot hide GPU results
# Logs and JSON go to $OUT (default ./gpu-check-out); the last lines printed are a summary.
#
# Usage: scripts/gpu-check.sh [--no-sanitizer] [--no-bench] [--no-full-build]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
sanitizer=1 bench=1 full=1
for a in "$@"; do
  case $a in
    --no-sanitizer) sanitizer=0 ;;
    --no-bench) bench=0 ;;
    --no-full-build) full=0 ;;
    *) echo "unknown option $a"; exit 2 ;;
  esac
done
summary=()
note() { summary+=("$1"); echo "== $1"; }
export NHA_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
jobs=$(nproc)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | head -2

t0=$SECONDS
if cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -B build-gpu >"$OUT/build.log" 2>&1 &&
   timeout 300 ninja -C build-gpu -k 0 -j"$jobs" nha_tests_gpu bench_attention bench_nha >>"$OUT/build.log" 2>&1; then
  note "build of GPU targets: ok ($((SECONDS - t0)) s)"
else
  note "build of GPU targets: FAILED ($((SECONDS - t0)) s), see build.log"
  grep -E "error|Error" "$OUT/build.log" | head -30
  printf '%s\n' "${summary[@]}"
  exit 1
fi

t0=$SECONDS
if timeout 120 ctest --test-dir build-gpu -L gpu --output-on-failure -j4 >"$OUT/tests.log" 2>&1; then
  note "ctest -L gpu: ok ($((SECONDS - t0)) s): $(grep -E 'tests passed' "$OUT/tests.log")"
else
  note "ctest -L gpu: FAILED ($((SECONDS - t0)) s): $(grep -E 'tests passed|tests failed' "$OUT/tests.log")"
  grep -E "Failure|Expected|Which is|error|rel_rms|Error|FAILED|\(Failed\)|Timeout" "$OUT/tests.log" | head -60
fi

tests_bin=build-gpu/tests/nha_tests_gpu
# The flash kernels' alternative tile shapes (NHA_FLASH_VARIANT=1) must pass the attention tests too.
t0=$SECONDS
if NHA_FLASH_VARIANT=1 timeout 60 $tests_bin --gtest_filter='CudaAttention.*' >>"$OUT/tests.log" 2>&1; then
  note "attention tests with NHA_FLASH_VARIANT=1: ok ($((SECONDS - t0)) s)"
else
  note "attention tests with NHA_FLASH_VARIANT=1: FAILED ($((SECONDS - t0)) s)"
  tail -40 "$OUT/tests.log" | grep -E "Failure|Expected|Which is|rel_rms|FAILED|error" | head -20
fi

# Hugging Face interop where transformers is installed (this machine's PyTorch image): the
# exported tiny Transformer++ loaded by LlamaForCausalLM gives the pure-Python forward's logits
# (tests/cpu/test_interop.cpp; on CI it skips that part).
if python3 -c "import torch, transformers" 2>/dev/null; then
  t0=$SECONDS
  if timeout 240 ninja -C build-gpu -j"$jobs" nha_tests_cpu >>"$OUT/build.log" 2>&1 &&
     timeout 60 build-gpu/tests/nha_tests_cpu --gtest_filter='Interop.LogitsEqual*' >"$OUT/interop.log" 2>&1; then
    note "HF LlamaForCausalLM interop: ok ($((SECONDS - t0)) s): $(grep -m1 '^transformers:' "$OUT/interop.log")"
  else
    note "HF LlamaForCausalLM interop: FAILED ($((SECONDS - t0)) s)"
    grep -E "transformers:|Failure|Expected|error" "$OUT/interop.log" | head -10
  fi
fi

if [[ $sanitizer == 1 ]] && command -v compute-sanitizer >/dev/null; then
  t0=$SECONDS
  # The short tests of every op family (the long attention cases only change sizes), with
  # exact-size allocations (no caching) so every out-of-bounds access lands outside a block.
  # NHA: only its small cases (the long ones only change sizes).
  filter='Cuda*:-CudaAttention.FlashBf16LongSequenceManyTiles:CudaAttention.SimplePathF32AndOddHeadDims:CudaReduce.SumDimMatchesCpu'
  filter+=':CudaNha.F32OddLengthsAllWindows:CudaNha.F32HeadDim128Slots64:CudaNha.F32ForcedSmallChunksOddSlots'
  filter+=':CudaNha.F32StrongDecayIsStable:CudaNha.Bf16OddLengthsAllWindows:CudaNha.Bf16WithF32GatesAndOtherHeadDims'
  filter+=':CudaNha.Bf16StrongDecayIsStable:CudaNha.Bf16CudaCoreKernels'
  if NHA_CUDA_NO_CACHE=1 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
       $tests_bin --gtest_filter="$filter" >"$OUT/sanitizer.log" 2>&1; then
    note "compute-sanitizer memcheck: ok ($((SECONDS - t0)) s): $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
  else
    note "compute-sanitizer memcheck: FAILED or timed out ($((SECONDS - t0)) s): $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
    grep -E "Invalid|ERROR|FAILED|at 0x|by thread|Target" "$OUT/sanitizer.log" | head -30
  fi
  # Shared-memory races in the flash kernels' cp.async / ldmatrix pipeline.
  t0=$SECONDS
  if timeout 120 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 \
       $tests_bin --gtest_filter='CudaAttention.SmallFlashCases' >>"$OUT/sanitizer.log" 2>&1; then
    note "compute-sanitizer racecheck (flash attention): ok ($((SECONDS - t0)) s): $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
  else
    note "compute-sanitizer racecheck (flash attention): FAILED or timed out ($((SECONDS - t0)) s): $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
    grep -E "hazard|Race|ERROR" "$OUT/sanitizer.log" | head -20
  fi
  # Shared-memory races in the NHA chunk kernels (one small case: racecheck is slow).
  t0=$SECONDS
  if timeout 150 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 \
       $tests_bin --gtest_filter='CudaNha.TinyForRacecheck' >>"$OUT/sanitizer.log" 2>&1; then
    note "compute-sanitizer racecheck (NHA): ok ($((SECONDS - t0)) s): $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
  else
    note "compute-sanitizer racecheck (NHA): FAILED or timed out ($((SECONDS - t0)) s): $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
    grep -E "hazard|Race|ERROR" "$OUT/sanitizer.log" | tail -20
  fi
fi

if [[ $bench == 1 ]]; then
  t0=$SECONDS
  timeout 90 build-gpu/bench_attention "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench.log"
  echo "-- NHA_FLASH_VARIANT=1 (8 warps per block)" | tee -a "$OUT/bench.log"
  NHA_FLASH_VARIANT=1 timeout 90 build-gpu/bench_attention "$OUT/bench_attention_variant.json" 2>&1 | tee -a "$OUT/bench.log"
  if python3 -c "import torch, triton" 2>/dev/null; then
    (cd "$OUT" && PYTHONUNBUFFERED=1 timeout 90 python3 "$OLDPWD/bench/peer/attn_sdpa.py") 2>&1 | tee -a "$OUT/bench.log"
  else
    echo "no PyTorch with Triton here: no SDPA peer figures" | tee -a "$OUT/bench.log"
  fi
  python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/bench.log"
import json, os, sys
out = sys.argv[1]
ours = json.load(open(os.path.join(out, "bench_attention.json")))
try:
    peer = {r["T"]: r for r in json.load(open(os.path.join(out, "attn_sdpa.json")))}
except Exception as e:
    peer = {}
    print("no peer figures:", e)
rows = []
print(f"{'T':>6} {'ours fwd':>9} {'sdpa fwd':>9} {'ratio':>6} {'ours f+b':>9} {'sdpa f+b':>9} {'ratio':>6}  (TFLOP/s)")
for r in ours["results"]:
    p = peer.get(r["T"])
    row = dict(r)
    if p:
        row["sdpa_fwd_tflops"] = p["fwd_tflops"]; row["sdpa_fwdbwd_tflops"] = p["fwdbwd_tflops"]
        row["ratio_fwd"] = round(r["fwd_tflops"] / p["fwd_tflops"], 3)
        row["ratio_fwdbwd"] = round(r["fwdbwd_tflops"] / p["fwdbwd_tflops"], 3)
    rows.append(row)
    print(f"{r['T']:>6} {r['fwd_tflops']:>9} {row.get('sdpa_fwd_tflops', '-'):>9} {row.get('ratio_fwd', '-'):>6} "
          f"{r['fwdbwd_tflops']:>9} {row.get('sdpa_fwdbwd_tflops', '-'):>9} {row.get('ratio_fwdbwd', '-'):>6}")
ours["results"] = rows
try:
    var = json.load(open(os.path.join(out, "bench_attention_variant.json")))
    ours["variant_8warps"] = var["results"]
    print("variant (8 warps/block):", " ".join(f"T={r['T']}: fwd {r['fwd_tflops']} f+b {r['fwdbwd_tflops']}" for r in var["results"]))
except Exception as e:
    print("no variant figures:", e)
ours["peer"] = "PyTorch SDPA (flash backend), bench/peer/attn_sdpa.py, same run"
json.dump(ours, open(os.path.join(out, "attention.json"), "w"), indent=1)
EOF
  note "benchmarks: done ($((SECONDS - t0)) s), see bench.log / attention.json"
  t0=$SECONDS
  timeout 150 build-gpu/bench_nha "$OUT/bench_nha.json" 2>&1 | tee -a "$OUT/bench.log"
  (cd "$OUT" && PYTHONUNBUFFERED=1 timeout 90 python3 "$OLDPWD/bench/nha_peer.py") 2>&1 | tee -a "$OUT/bench.log"
  python3 bench/nha_peer.py --report "$OUT" 2>&1 | tee -a "$OUT/bench.log"
  note "NHA benchmark: done ($((SECONDS - t0)) s), see bench.log / nha.json"
fi

if [[ $full == 1 ]]; then
  t0=$SECONDS
  if timeout 240 ninja -C build-gpu -j"$jobs" >>"$OUT/build.log" 2>&1; then
    note "full build: ok ($((SECONDS - t0)) s)"
  else
    note "full build: FAILED or timed out ($((SECONDS - t0)) s), see build.log"
  fi
fi

echo
echo "==== summary ===="
printf '%s\n' "${summary[@]}"
grep -E "^\s+[0-9]+ +[0-9.]+ " "$OUT/bench.log" 2>/dev/null | head -8
