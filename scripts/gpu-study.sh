#!/usr/bin/env bash
# The GPU studies of docs/eval.md ("Comparisons") on one machine, each fitted into one call of a
# lent GPU (10 minutes): build `nha`, run many small runs at once through scripts/sweep.py, pack the
# small result files (no checkpoints) into $OUT/study-MODE.tar.gz.
#
#   scripts/gpu-study.sh calibrate        throughput of 1 vs 12 MQAR runs at once, with and
#                                         without MPS, and of each ~20M model alone
#   scripts/gpu-study.sh mqar STEPS       MQAR: 5 mixers x d 64/128/256 x 4 learning rates
#   scripts/gpu-study.sh lm TOKENS        ~20M language models: 5 mixers x 3 seeds, then evals
#   scripts/gpu-study.sh lm-ablate TOKENS why NHA trails (docs/eval.md): NHA with plain-attention
#                                         full layers, GSA-H with NHA full layers (3 seeds each),
#                                         and the five models at lr 7.5e-4 and 3e-3 (seed 0)
#
# Data for `lm` (NHA_STUDY_DATA, default .peer/study; docs/eval.md says how it was made):
# tok.model (16k BPE), train.txt.zst (the Debian corpus without its first 2000 lines),
# heldout.txt (those lines), recall/*.jsonl, eval/*.jsonl (the commonsense sets).
# Several processes share the GPU through MPS when nvidia-cuda-mps-control exists (kernels of
# different runs then overlap instead of taking turns); NHA_STUDY_MPS=0 turns it off.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: scripts/gpu-study.sh calibrate|mqar STEPS|lm TOKENS}
out=${OUT:-runs/study-out}
data=${NHA_STUDY_DATA:-.peer/study}
jobs=${NHA_STUDY_JOBS:-12}
mkdir -p "$out"
log() { echo "[gpu-study $(date +%T)] $*"; }

cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
ninja -C build-gpu nha >/dev/null
nha=build-gpu/nha
log "built $nha; $(nvidia-smi --query-gpu=name,memory.used --format=csv,noheader)"

mps_on=0
mps_start() {
  [[ ${NHA_STUDY_MPS:-1} == 1 ]] && command -v nvidia-cuda-mps-control >/dev/null || return 0
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then mps_on=1; log "MPS on"; fi
}
mps_stop() {
  if [[ $mps_on == 1 ]]; then echo quit | nvidia-cuda-mps-control || true; mps_on=0; sleep 1; fi
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
trap mps_stop EXIT

mqar_configs=(--config configs/mqar-transformer.yaml --config configs/mqar-swa.yaml
              --config configs/mqar-gsa.yaml --config configs/mqar-gsa-h.yaml
              --config configs/mqar-nha.yaml)
lm_configs=()
for c in ${NHA_STUDY_LM:-transformer swa gsa gsa-h nha}; do lm_configs+=(--config configs/$c-20m.yaml); done

# N copies of the d 128 MQAR attention model for STEPS steps at once: prints aggregate steps/s.
time_mqar() {
  local n=$1 steps=$2 tag=$3 t0=$SECONDS
  for i in $(seq "$n"); do
    $nha train configs/mqar-transformer.yaml --quiet --set train.steps="$steps" --set data.val= \
      --set checkpoint.interval=0 --set logging.run_dir="runs/cal/$tag-$i" > "runs/cal/$tag-$i.log" 2>&1 &
  done
  wait
  local s=$((SECONDS - t0))
  log "calibrate: $n x $steps MQAR steps ($tag) in $s s: $(( n * steps / (s > 0 ? s : 1) )) steps/s"
}

prepare_lm_data() {
  local work=runs/data/study
  mkdir -p $work
  [[ -s $work/shards/manifest.json ]] && return
  local zstd=zstd  # a carried binary (with its libraries) where the machine has none
  command -v zstd >/dev/null || zstd="env LD_LIBRARY_PATH=$data/bin $data/bin/zstd"
  $zstd -dc "$data/train.txt.zst" > $work/train.txt
  $nha prepare --tokenizer "$data/tok.model" --input $work/train.txt --out $work/shards
}
lm_sets=(--set data.train=runs/data/study/shards --set data.val=runs/data/study/shards)

case $mode in
calibrate)
  mkdir -p runs/cal
  time_mqar 1 300 alone
  time_mqar 12 300 x12
  mps_start
  [[ $mps_on == 1 ]] && time_mqar 12 300 x12-mps
  mps_stop
  prepare_lm_data
  for c in transformer swa gsa gsa-h nha; do
    $nha train configs/$c-20m.yaml --quiet "${lm_sets[@]}" --set train.tokens=0 --set train.steps=12 \
      --set train.global_batch_tokens=32768 --set eval.interval=0 --set checkpoint.interval=0 \
      --set logging.interval=1 --set logging.run_dir=runs/cal/lm-$c > runs/cal/lm-$c.log 2>&1
    python3 -c "import json,statistics as s; r=[json.loads(l) for l in open('runs/cal/lm-$c/metrics.jsonl')]; \
t=[x['tokens_per_s'] for x in r if x.get('type')=='train' and x['step']>4]; print('[gpu-study] $c-20m alone:', round(s.median(t)), 'tok/s')"
  done
  tar czf "$out/study-calibrate.tar.gz" runs/cal --exclude='*.h5'
  ;;
mqar)
  steps=${2:?steps}
  mps_start
  sweep=(python3 scripts/sweep.py --nha $nha --out runs/mqar-study --results runs/mqar-study/mqar)
  timeout "${NHA_STUDY_LIMIT_S:-480}" "${sweep[@]}" --jobs "$jobs" "${mqar_configs[@]}" --grid model.d_model=64,128,256 --grid train.lr=1e-3,3e-3,1e-2,3e-2 \
    --set train.steps="$steps" --set data.val= --set checkpoint.interval=0 \
    --eval mqar --x model.d_model --y mqar.acc || log "sweep stopped (rc $?): collecting what finished"
  "${sweep[@]}" "${mqar_configs[@]}" --grid model.d_model=64,128,256 --grid train.lr=1e-3,3e-3,1e-2,3e-2 \
    --collect --x model.d_model --y mqar.acc
  tar czf "$out/study-mqar.tar.gz" --exclude='*.h5' runs/mqar-study
  ;;
lm)
  tokens=${2:?tokens}
  prepare_lm_data
  mps_start
  tasks="passkey=$data/recall/passkey.jsonl:contains,fields=$data/recall/debian_fields.jsonl:contains"
  tasks="$tasks,heldout=$data/heldout.txt:text,piqa,hellaswag,winogrande,arc_easy,arc_challenge,lambada"
  sweep=(python3 scripts/sweep.py --nha $nha --out runs/lm-study --results runs/lm-study/lm-20m
         "${lm_configs[@]}" --grid train.seed=0,1,2 --x train.seed --y val_bpb --seeds train.seed)
  timeout "${NHA_STUDY_LIMIT_S:-470}" "${sweep[@]}" --jobs "$jobs" "${lm_sets[@]}" \
    --set train.tokens="$tokens" --set train.global_batch_tokens=65536 --set train.warmup_steps=50 \
    --set eval.interval=50 --set eval.val_tokens=262144 --set checkpoint.interval=0 \
    --eval "$tasks" --eval-args "--data-dir $data/eval --limit ${NHA_STUDY_EVAL_LIMIT:-500}" \
    || log "sweep stopped (rc $?): collecting what finished"
  "${sweep[@]}" --collect
  tar czf "$out/study-lm.tar.gz" --exclude='*.h5' runs/lm-study
  ;;
lm-ablate)
  tokens=${2:?tokens}
  prepare_lm_data
  mps_start
  common=("${lm_sets[@]}" --set train.tokens="$tokens" --set train.global_batch_tokens=65536
          --set train.warmup_steps=50 --set eval.interval=50 --set eval.val_tokens=262144
          --set checkpoint.interval=0 --y val_bpb)
  ablate() {  # NAME CONFIG --set OVERRIDE: 3 seeds in runs/lm-ablate/NAME, in the background
    python3 scripts/sweep.py --nha $nha --out runs/lm-ablate/$1 --results runs/lm-ablate/$1/result \
      --config "$2" --grid train.seed=0,1,2 --jobs 3 --x train.seed --seeds train.seed \
      "${common[@]}" "${@:3}" > runs/lm-ablate-$1.log 2>&1 &
  }
  mkdir -p runs/lm-ablate
  ablate nha-attention-full configs/nha-20m.yaml --set "model.full_attention.mixer={type: attention}"
  ablate gsa-h-nha-full configs/gsa-h-20m.yaml \
    --set "model.full_attention.mixer={type: nha, window: 1048576, slots: 64}"
  python3 scripts/sweep.py --nha $nha --out runs/lm-ablate/lr --results runs/lm-ablate/lr/result \
    "${lm_configs[@]}" --grid train.lr=7.5e-4,3e-3 --jobs 10 --x train.lr "${common[@]}" \
    > runs/lm-ablate-lr.log 2>&1 &
  deadline=$((SECONDS + ${NHA_STUDY_LIMIT_S:-470}))
  while [[ -n $(jobs -rp) ]] && (( SECONDS < deadline )); do sleep 5; done
  if [[ -n $(jobs -rp) ]]; then log "time limit: stopping the sweeps"; kill $(jobs -rp); fi
  wait || true
  tail -n 12 runs/lm-ablate-*.log
  tar czf "$out/study-lm-ablate.tar.gz" --exclude='*.h5' runs/lm-ablate runs/lm-ablate-*.log
  ;;
*) echo "gpu-study: unknown mode '$mode'" >&2; exit 2 ;;
esac
log "done"
