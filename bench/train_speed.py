#!/usr/bin/env python3
"""Training speed against sequence length, on one GPU, all in one run:

  ours  `nha train` of configs/transformer-FAMILY.yaml and configs/nha-FAMILY.yaml (--family 125m:
        d 768, 14 layers, 6 heads; 20m: d 256, 12 layers, 4 heads; NHA w 64, m 64, every 4th layer
        w >= T)
  peer  the same Transformer++ shape in PyTorch (bench/peer/peer_torch.py: eager and
        torch.compile, SDPA flash attention, fused AdamW), when --peer is given

at every sequence length T (the peer at --peer-seq-lens) with B*T = --tokens-per-step tokens per
optimizer step (one micro-batch).
Our figure is the median tokens/s of the progress records after --warmup steps (logging every step);
the peer's is its own timed loop. Writes JSON and, when matplotlib is there, an SVG plot next to it.

  bench/train_speed.py --nha build-gpu/nha --data runs/data/quick/shards \
      --peer bench/peer/peer_torch.py --out bench/results/train_speed.json

The token ids of --data must be below the configs' vocab (16384): any shards of this project's
tokenizers are (docs/data.md). The data's content does not matter for speed, but every run ends
with a validation pass, so the validation shards must hold a window of the largest T + 1 tokens
(`nha prepare --val-fraction`).
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

# Per model family: our two configs and the peer at the Transformer++ config's shape (vocab, d,
# layers, heads, mlp hidden).
FAMILIES = {
    "125m": {"models": {"transformer++": "configs/transformer-125m.yaml",
                        "nha": "configs/nha-125m.yaml"},
             "peer_shape": dict(V=16384, d=768, L=14, h=6, ff=2048)},
    "20m": {"models": {"transformer++": "configs/transformer-20m.yaml",
                       "nha": "configs/nha-20m.yaml"},
            "peer_shape": dict(V=16384, d=256, L=12, h=4, ff=768)},
}


def run_ours(args, name, config, T, B):
    run_dir = os.path.join(args.work_dir, f"{name.replace('+', 'p')}-T{T}")
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = args.warmup + args.steps
    sets = {"train.seq_len": T, "train.micro_batch": B, "train.global_batch_tokens": B * T,
            "train.tokens": steps * B * T, "train.warmup_steps": 1, "train.precision": "bf16",
            "data.train": args.data, "data.val": args.data, "eval.interval": 0,
            "eval.val_tokens": B * T, "checkpoint.interval": 0, "logging.interval": 1,
            "logging.run_dir": run_dir}
    cmd = [args.nha, "train", config] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        print(f"train_speed: {name} T={T} failed (rc {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"error": f"rc {proc.returncode}", "log_tail": tail}
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [r for r in records if r.get("type") == "train" and r["step"] > args.warmup]
    if not train:
        return {"error": "no progress records after the warm-up"}
    return {"tok_s": round(statistics.median(r["tokens_per_s"] for r in train)),
            "mfu": round(statistics.median(r.get("mfu", 0.0) for r in train), 4),
            "peak_GiB": round(max(r["mem_peak_bytes"] for r in train) / 2**30, 2),
            "steps_timed": len(train), "wall_s": round(time.time() - t0, 1)}


def load_peer(path):
    spec = importlib.util.spec_from_file_location("peer_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_peer(peer, family, T, B, compile_):
    s = FAMILIES[family]["peer_shape"]
    try:
        r = peer.run(f"transformer-{family}-T{T}", s["V"], s["d"], s["L"], s["h"], s["ff"], T, B,
                     compile_, steps=10)
        return {"tok_s": r["tok_s"], "mfu": r["mfu"], "peak_GiB": r["mem_GiB"]}
    except Exception as e:  # an out-of-memory at long T is a result, not a crash of the bench
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    Ts = [row["T"] for row in result["results"]]
    for key, label in [("transformer++", "ours Transformer++"), ("nha", "ours NHA"),
                       ("peer_eager", "PyTorch eager"), ("peer_compile", "PyTorch compile")]:
        ys = [row.get(key, {}).get("tok_s") for row in result["results"]]
        pts = [(t, y) for t, y in zip(Ts, ys) if y]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T (B*T fixed)")
    ax.set_ylabel("training k tokens/s")
    ax.set_title(f"~{result['family'].upper()} models, {result['gpu']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nha", required=True, help="the nha binary")
    ap.add_argument("--data", required=True, help="token shards directory (train and val)")
    ap.add_argument("--peer", help="bench/peer/peer_torch.py; omitted: no peer")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="125m",
                    help="which configs (configs/{transformer,nha}-FAMILY.yaml)")
    ap.add_argument("--seq-lens", default="2048,8192,32768")
    ap.add_argument("--peer-seq-lens", default="2048",
                    help="where the peer runs too (torch.compile costs about a minute per shape)")
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--warmup", type=int, default=4, help="steps not timed")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per training run")
    ap.add_argument("--work-dir", default="runs/train-speed")
    ap.add_argument("--out", required=True, help="JSON output (an .svg plot goes next to it)")
    args = ap.parse_args()
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    for T in seq_lens:
        if args.tokens_per_step % T:
            sys.exit(f"train_speed: --tokens-per-step {args.tokens_per_step} is not a multiple of "
                     f"T={T}. HINT: use a multiple of the largest --seq-lens")
    peer = load_peer(args.peer) if args.peer else None
    gpu = "unknown"
    if peer is not None:
        import torch
        gpu = torch.cuda.get_device_name()
    else:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True)
        gpu = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else gpu
    models = FAMILIES[args.family]["models"]
    result = {"what": f"training tokens/s against sequence length, ~{args.family.upper()} models, "
                      f"bf16, one micro-batch of {args.tokens_per_step} tokens per optimizer step",
              "family": args.family,
              "gpu": gpu, "commit": os.environ.get("NHA_COMMIT", "unknown"),
              "date": time.strftime("%Y-%m-%d"), "configs": models,
              "peer_shape": FAMILIES[args.family]["peer_shape"],
              "method": f"ours: median progress-record tok/s of steps {args.warmup + 1}.."
                        f"{args.warmup + args.steps}; peer: peer_torch.run(), 10 timed steps",
              "results": []}
    for T in seq_lens:
        B = args.tokens_per_step // T
        row = {"T": T, "B": B}
        for name, config in models.items():
            row[name] = run_ours(args, name, config, T, B)
            print(f"train_speed: T={T} B={B} ours {name}: {row[name]}", flush=True)
        if peer is not None and str(T) in args.peer_seq_lens.split(","):
            for key, comp in (("peer_eager", False), ("peer_compile", True)):
                row[key] = run_peer(peer, args.family, T, B, comp)
                print(f"train_speed: T={T} B={B} {key}: {row[key]}", flush=True)
        ours_t, ours_n = row["transformer++"].get("tok_s"), row["nha"].get("tok_s")
        if ours_t and ours_n:
            row["nha_over_transformer"] = round(ours_n / ours_t, 3)
        for key in ("peer_eager", "peer_compile"):
            if ours_t and row.get(key, {}).get("tok_s"):
                row[f"transformer_over_{key}"] = round(ours_t / row[key]["tok_s"], 3)
        result["results"].append(row)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    svg = os.path.splitext(args.out)[0] + ".svg"
    print(f"train_speed: wrote {args.out}" + (f" and {svg}" if plot(result, svg) else ""))


if __name__ == "__main__":
    main()
