#!/usr/bin/env bash
# MQAR recall of the four mixers: trains configs/mqar-{transformer,swa,gsa,nha}.yaml (2 layers,
# d 128, the Zoology "train" preset) and evaluates each on the "test" preset up to (L 1024, K 256)
# with `nha eval --tasks mqar`; writes bench/results/mqar.json (or $OUT/mqar.json) and prints a
# Markdown table of accuracy per setting.
#
#   scripts/mqar-bench.sh [--parallel] [--steps N] [--build DIR]
# --parallel trains the four models at the same time on one GPU (they are small; the numbers do
# not depend on it, only the wall time does).
set -uo pipefail
cd "$(dirname "$0")/.."
build=build parallel=0 steps=""
while (( $# )); do
  case $1 in
    --parallel) parallel=1 ;;
    --steps) steps=$2; shift ;;
    --build) build=$2; shift ;;
    *) echo "mqar-bench: unknown option '$1'. HINT: --parallel, --steps N, --build DIR" >&2; exit 2 ;;
  esac
  shift
done
nha=$build/nha
[[ -x $nha ]] || { echo "mqar-bench: $nha not found. HINT: build first (cmake --build $build)" >&2; exit 1; }
out=${OUT:-bench/results}
mkdir -p "$out" runs
models=(transformer swa gsa nha)

train() {
  local m=$1
  rm -rf "runs/mqar-$m"
  "$nha" train "configs/mqar-$m.yaml" ${steps:+--set train.steps=$steps} > "runs/mqar-$m.train.log" 2>&1
  echo "mqar-bench: trained mqar-$m (exit $?): $(grep -E '^val' "runs/mqar-$m.train.log" | tail -1)"
}
start=$SECONDS
if (( parallel )); then
  for m in "${models[@]}"; do train "$m" & done
  wait
else
  for m in "${models[@]}"; do train "$m"; done
fi
echo "mqar-bench: training took $((SECONDS - start)) s"

for m in "${models[@]}"; do
  "$nha" eval "runs/mqar-$m" --tasks mqar > "runs/mqar-$m.eval.log" 2>&1 ||
    { echo "mqar-bench: eval of mqar-$m failed:"; tail -5 "runs/mqar-$m.eval.log"; }
done

python3 - "$out/mqar.json" "${models[@]}" <<'EOF'
import json, os, subprocess, sys
path, models = sys.argv[1], sys.argv[2:]
rows = {}
for m in models:
    f = f"runs/mqar-{m}/eval/eval.json"
    if os.path.exists(f):
        mqar = json.load(open(f))["results"].get("mqar", {})
        rows[m] = {k: v for k, v in mqar.items() if k.startswith("acc")}
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                     text=True).stdout.strip().splitlines()
result = {"bench": "mqar", "commit": commit, "gpu": gpu[0] if gpu else "cpu",
          "configs": {m: f"configs/mqar-{m}.yaml" for m in models}, "accuracy": rows}
with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
os.replace(path + ".tmp", path)
names = sorted({k for r in rows.values() for k in r if k.startswith("acc")},
               key=lambda k: (k != "acc", len(k), k))
print("| model | " + " | ".join(names) + " |")
print("|---|" + "---|" * len(names))
for m, r in rows.items():
    print(f"| {m} | " + " | ".join(f"{100 * r[n]:.1f}" if n in r else "-" for n in names) + " |")
print(f"mqar-bench: wrote {path}")
EOF
