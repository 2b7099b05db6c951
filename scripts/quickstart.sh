#!/usr/bin/env bash
# The README's main job, as far as the framework goes today: set up, build, build the quick corpus
# from Debian packages, train a tokenizer, prepare HDF5 shards, then train a tiny Transformer++ on a
# fixed batch (the overfit check). `nha train` / `nha eval` (issues 6 and 7) will replace the last
# step with a real training run and evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
work=runs/data/quick
mkdir -p "$work"
[[ -s $work/corpus/corpus.txt ]] || bash scripts/get-corpus.sh --quick --out "$work/corpus"
[[ -s $work/tok.model ]] || ./build/nha tokenizer train --input "$work/corpus/corpus.txt" \
  --vocab 2048 --out "$work/tok.model"
[[ -d $work/shards ]] || ./build/nha prepare --tokenizer "$work/tok.model" \
  --input "$work/corpus/corpus.txt" --out "$work/shards"
./build/tests/nha_tests_cpu --gtest_filter='Overfit*'
echo "quickstart: data in $work; training from a config arrives with issue 6"
