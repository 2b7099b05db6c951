#!/usr/bin/env bash
# The README's main job, one command on a fresh Debian machine:
#   set up and build; build the quick corpus from Debian packages; train a tokenizer; prepare HDF5
#   token shards; train a small NHA model and a same-size Transformer++ (on the GPU when there is
#   one, else on the CPU); evaluate both; print a comparison table and the loss plot's path.
#
#   scripts/quickstart.sh                 everything (timed on 2 CPU cores: docs/training.md)
#   NHA_CORPUS=path/corpus.txt[.zst] scripts/quickstart.sh    use this text instead of get-corpus
#   NHA_EVAL_DATA=dir scripts/quickstart.sh   commonsense sets from dir instead of data/eval
#   NHA_EVAL_LIMIT=500 (rows per task; CPU default 50), NHA_SKIP_SETUP=1 (no apt-get: offline)
# Re-running reuses the corpus, tokenizer and shards; the two training runs start afresh.
# Each stage prints its start time since the job began, and the job its total wall time at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
stage() {
  printf '\n== [%d:%02d] %s\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$*"
}
stage "setup"
[[ -n ${NHA_SKIP_SETUP:-} ]] || bash scripts/setup.sh
# Only the nha command (the tests and benchmarks are scripts/test.sh's). Without a GPU the CUDA
# backend is left out even where nvcc is installed: it could not run, and on 2 cores compiling it
# takes longer than the whole CPU job.
stage "build"
gpu=1
nvidia-smi -L >/dev/null 2>&1 || gpu=0
cuda=()
(( gpu )) || cuda=(-DNHA_CUDA=OFF)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${cuda[@]}"
cmake --build build -j "$(nproc)" --target nha_cli

work=runs/data/quick
mkdir -p "$work"
# 1. Text: the quick Debian corpus (or $NHA_CORPUS); the last 2000 lines are held out for eval.
stage "corpus"
if [[ ! -s $work/text.txt ]]; then
  if [[ -n ${NHA_CORPUS:-} ]]; then
    if [[ $NHA_CORPUS == *.zst ]]; then zstd -dc "$NHA_CORPUS" > "$work/all.txt"; else cp "$NHA_CORPUS" "$work/all.txt"; fi
  else
    [[ -s $work/corpus/corpus.txt ]] || bash scripts/get-corpus.sh --quick --out "$work/corpus"
    cp "$work/corpus/corpus.txt" "$work/all.txt"
  fi
  head -n -2000 "$work/all.txt" > "$work/text.txt.tmp" && mv "$work/text.txt.tmp" "$work/text.txt"
  tail -n 2000 "$work/all.txt" > "$work/heldout.txt"
  rm -f "$work/all.txt"
fi
# 2. Tokenizer and shards.
stage "tokenizer and shards"
[[ -s $work/tok.model ]] || ./build/nha tokenizer train --input "$work/text.txt" --vocab 2048 \
  --max-sentences 200000 --out "$work/tok.model"
[[ -s $work/shards/manifest.json ]] || ./build/nha prepare --tokenizer "$work/tok.model" \
  --input "$work/text.txt" --out "$work/shards"

# 3. Train both models (same width, depth, data and schedule; configs/tiny-*.yaml). On the CPU
#    150 steps of 4096 tokens instead of the configs' 300 (GPU): about a minute per model on 2
#    cores, and both learn well past the unigram baseline in it (docs/training.md, CPU main job).
runs=(tiny-nha-cpu tiny-cpu)
cpu_set=()
(( gpu )) || cpu_set=(--set train.steps=150 --set train.warmup_steps=15)
for name in "${runs[@]}"; do
  stage "train $name"
  rm -rf "runs/$name"
  ./build/nha train "configs/$name.yaml" "${cpu_set[@]}" ${NHA_TRAIN_SET:+--set $NHA_TRAIN_SET}
done

# 4. Evaluate both: held-out text (perplexity, bits per byte), recall from context (passkey in the
#    held-out prose, fields of this machine's package records; short contexts to suit the tiny
#    models' 128 tokens, docs/eval.md), and the commonsense tasks (vendored in data/eval, which
#    nha eval reads by default; NHA_EVAL_DATA=dir points it elsewhere).
stage "evaluate"
recall=runs/data/recall
python3 scripts/make-recall-tasks.py --prose "$work/heldout.txt" --out "$recall" --rows 200 \
  --context-words 60 --records-per-row 2
tasks="heldout=$work/heldout.txt:text,passkey=$recall/passkey.jsonl:contains"
tasks="$tasks,fields=$recall/debian_fields.jsonl:contains"
tasks="$tasks,piqa,hellaswag,winogrande,arc_easy,arc_challenge,lambada"
# On the CPU every task takes at most 50 rows (NHA_EVAL_LIMIT overrides): the recall tasks are
# generation, one forward per new token, and their 200 rows took most of the CPU job's time.
limit=${NHA_EVAL_LIMIT:-}
(( gpu )) || limit=${limit:-50}
for name in "${runs[@]}"; do
  ./build/nha eval "runs/$name" --tasks "$tasks" ${limit:+--limit $limit}
done

# 5. Compare.
echo
echo "== NHA vs Transformer++ (same size, same data) =="
./build/nha compare "${runs[@]/#/runs/}"
./build/nha plot "${runs[@]/#/runs/}" --out runs/quickstart-loss.svg
echo "loss plot: runs/quickstart-loss.svg"
echo "quickstart: total wall time $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
