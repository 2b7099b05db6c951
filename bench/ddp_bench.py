# Data-parallel scaling benchmark: tokens/s and scaling efficiency of `nha train --gpus N` for the
# ~125M Transformer++ and NHA configs at T = 2048, next to PyTorch DDP (bench/ddp_peer.py) on the
# Transformer's shape, all in one GPU session (scripts/gpu-multi.sh runs it).
#
#   python3 bench/ddp_bench.py --nha build-multi/nha --shards runs/data/ddp-bench/shards \
#       --gpus 1 2 --out $OUT/ddp.json
#
# Ours: `nha train configs/X.yaml --gpus N` for --steps steps (the configs' global batch of
# 262144 tokens, micro-batch 16; validation off), tokens/s = the median of the per-step
# "tokens_per_s" records of metrics.jsonl (logging.interval 1) after --warmup steps. Peer: the same
# global batch, micro-batch and step count under torchrun. Scaling efficiency at N GPUs =
# tok/s(N) / (N x tok/s(1)), the global batch fixed (strong scaling). Run directories (with their
# ~1.5 GB final checkpoints) go to a temporary directory, in /dev/shm when there is one.
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(cmd, log, timeout):
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        print(f"  failed ({rc}), see {log}", flush=True)
    return rc


def ours(nha, config, gpus, shards, steps, warmup, tmp, log, timeout):
    run_dir = os.path.join(tmp, f"{os.path.basename(config)[:-5]}-{gpus}gpu")
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [nha, "train", config, "--gpus", str(gpus), "--quiet",
           "--set", f"train.steps={steps}", "--set", "train.tokens=0",
           "--set", f"data.train={shards}", "--set", 'data.val=""', "--set", "eval.interval=0",
           "--set", "logging.interval=1", "--set", f"logging.run_dir={run_dir}",
           "--set", "checkpoint.keep_last=1"]
    rc = run(cmd, log, timeout)
    recs = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            recs = [json.loads(l) for l in f if '"type":"train"' in l.replace(" ", "")]
    except OSError:
        pass
    shutil.rmtree(run_dir, ignore_errors=True)
    timed = [r["tokens_per_s"] for r in recs if r["step"] > warmup]
    if rc != 0 or not timed:
        return {"error": f"exit {rc}, {len(timed)} timed steps"}
    tps = statistics.median(timed)
    out = {"tok_s": round(tps), "step_ms": round(recs[-1]["tokens"] / recs[-1]["step"] / tps * 1e3, 1),
           "timed_steps": len(timed)}
    mfu = [r["mfu"] for r in recs if r["step"] > warmup and "mfu" in r]
    if mfu:
        out["mfu_per_gpu"] = round(statistics.median(mfu), 3)
    return out


def peer(gpus, steps, warmup, tmp, log, timeout):
    path = os.path.join(tmp, f"peer-{gpus}.json")
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={gpus}", os.path.join(HERE, "ddp_peer.py"),
           "--steps", str(steps), "--warmup", str(warmup), "--json", path]
    rc = run(cmd, log, timeout)
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {"error": f"exit {rc}"}


def efficiency(by_n):
    base = by_n.get("1", {}).get("tok_s")
    return {n: round(r["tok_s"] / (int(n) * base), 3)
            for n, r in by_n.items() if n != "1" and base and "tok_s" in r}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nha", default=os.path.join(ROOT, "build", "nha"))
    p.add_argument("--shards", required=True, help="token shards (vocab <= 16384) from `nha prepare`")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--timeout", type=int, default=240, help="seconds per run")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "ddp.json"))
    a = p.parse_args()
    log = os.path.splitext(a.out)[0] + ".log"
    tmp = tempfile.mkdtemp(prefix="nha-ddp-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)

    configs = {"transformer-125m": "configs/transformer-125m.yaml", "nha-125m": "configs/nha-125m.yaml"}
    result = {
        "what": "data-parallel training tokens/s (all GPUs) and strong-scaling efficiency, ~125M models, "
                "T 2048, global batch 262144 tokens, micro-batch 16, bf16 autocast, fp32 gradient all-reduce",
        "gpu": (subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip().splitlines() or ["?"])[0],
        "commit": os.environ.get("NHA_COMMIT", "unknown"),
        "date": datetime.date.today().isoformat(),
        "method": f"{a.steps} steps per run, median of the per-step tokens/s after {a.warmup} warm-up steps; "
                  "ours: nha train CONFIG --gpus N (metrics.jsonl); peer: torchrun bench/ddp_peer.py "
                  "(PyTorch DDP, eager, Llama-style model of transformer-125m's shape) in the same session; "
                  "efficiency(N) = tok_s(N) / (N tok_s(1))",
        "ours": {}, "scaling_efficiency": {},
    }
    for name, cfg in configs.items():
        by_n = {}
        for n in a.gpus:
            by_n[str(n)] = ours(a.nha, cfg, n, a.shards, a.steps, a.warmup, tmp, log, a.timeout)
            print(f"{name} x{n}: {by_n[str(n)]}", flush=True)
        result["ours"][name] = by_n
        result["scaling_efficiency"][name] = efficiency(by_n)
    if not a.no_peer:
        by_n = {}
        for n in a.gpus:
            by_n[str(n)] = peer(n, a.steps, a.warmup, tmp, log, a.timeout)
            print(f"pytorch ddp x{n}: {by_n[str(n)]}", flush=True)
        result["peer_pytorch_ddp"] = by_n
        result["scaling_efficiency"]["peer_pytorch_ddp"] = efficiency(by_n)
        result["ratio_transformer_vs_peer"] = {
            n: round(r["tok_s"] / by_n[n]["tok_s"], 3)
            for n, r in result["ours"]["transformer-125m"].items()
            if "tok_s" in r and "tok_s" in by_n.get(n, {})}
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("scaling_efficiency",)} | {
        "tok_s": {k: {n: r.get("tok_s") for n, r in v.items()} for k, v in result["ours"].items()}}, indent=1))
    print("wrote", a.out)
    ok = all("tok_s" in r for v in result["ours"].values() for r in v.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
