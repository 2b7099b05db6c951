#!/usr/bin/env python3
"""CPU training speed of the two tiny models (issue 20): tokens/s and GFLOP/s of `nha train`.

    python3 bench/cpu_speed.py --shards /tmp/cpu/shards [--nha build/nha] [--steps 20]

Runs configs/tiny-cpu.yaml (Transformer++) and configs/tiny-nha-cpu.yaml (NHA) for a fixed number
of steps with evaluation and checkpoints off, reads tokens_per_s from each run's metrics.jsonl
(the first logged interval is dropped: it holds the first step's allocations and warm-up) and the
trainer's FLOP count from its "flops/token" log line, and writes bench/results/cpu_speed.json.
Threads: OMP_NUM_THREADS if set, else every core (what OpenMP and OpenBLAS use by default).
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"transformer++": "configs/tiny-cpu.yaml", "nha": "configs/tiny-nha-cpu.yaml"}
SCALE = {"k": 1e3, "M": 1e6, "G": 1e9}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_one(nha, config, shards, steps, run_dir):
    cmd = [nha, "train", config, "--set", f"data.train={shards}", "--set", f"data.val={shards}",
           "--set", f"train.steps={steps}", "--set", "eval.interval=0", "--set",
           "checkpoint.interval=0", "--set", "logging.interval=2", "--set",
           f"logging.run_dir={run_dir}", "--set", "train.device=cpu"]
    start = time.time()
    log = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    wall = time.time() - start
    m = re.search(r"flops/token ([0-9.]+)([kMG]?)", log)
    flops_per_token = float(m.group(1)) * SCALE.get(m.group(2), 1) if m else None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tps = [r["tokens_per_s"] for r in rows if r.get("type") == "train"][1:]
    tokens_per_s = statistics.median(tps)
    return {
        "config": config,
        "steps": steps,
        "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": flops_per_token,
        "gflop_per_s": round(flops_per_token * tokens_per_s / 1e9, 2) if flops_per_token else None,
        "wall_s": round(wall, 1),  # the whole command: startup, steps, the final eval and checkpoint
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", required=True, help="token shards (nha prepare --out)")
    p.add_argument("--nha", default=os.path.join(ROOT, "build", "nha"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cpu_speed.json"))
    p.add_argument("--label", default="", help="free text stored with the results (e.g. a commit)")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CONFIGS.items():
            results[name] = run_one(a.nha, config, os.path.abspath(a.shards), a.steps,
                                    os.path.join(tmp, name))
            print(f"{name}: {results[name]['tokens_per_s']:.0f} tok/s, "
                  f"{results[name]['gflop_per_s']} GFLOP/s", flush=True)
    report = {
        "label": a.label,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "system": platform.platform()},
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
        "results": results,
    }
    if results["transformer++"]["tokens_per_s"]:
        report["nha_over_transformer"] = round(
            results["nha"]["tokens_per_s"] / results["transformer++"]["tokens_per_s"], 3)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
