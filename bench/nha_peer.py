# PyTorch SDPA (causal, flash backend) at the shapes of bench/bench_nha.cpp: bf16, B*T = 65536,
# H = 8, head dim 128, T = 1k .. 64k. Forward and forward+backward median times (triton do_bench,
# or CUDA events when triton is missing). Writes $OUT/nha_peer.json (default ./nha_peer.json).
# Run it in the same GPU session as bench_nha (scripts/gpu-check.sh does).
#
# `python3 nha_peer.py --report DIR` (no GPU needed) merges DIR/bench_nha.json and DIR/nha_peer.json
# into DIR/nha.json, adds the time ratios when T doubles at a fixed token count (x2T_*: 1 = linear
# cost per token, 2 = quadratic), prints a table, and plots DIR/nha.svg when matplotlib is there.
import json
import os
import sys



def bench(fn, iters=10):
    import torch
    try:
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    except ImportError:
        for _ in range(3):
            fn()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def report(out):
    ours = json.load(open(os.path.join(out, "bench_nha.json")))
    try:
        peer_doc = json.load(open(os.path.join(out, "nha_peer.json")))
        peer = {r["T"]: r for r in peer_doc["results"]}
        ours["peer"] = peer_doc["peer"]
    except Exception as e:
        peer = {}
        print("no peer figures:", e)
    keys = ("nha_fwd_ms", "nha_fwdbwd_ms", "mem_fwd_ms", "mem_fwdbwd_ms", "flash_fwd_ms",
            "flash_fwdbwd_ms", "sdpa_fwd_ms", "sdpa_fwdbwd_ms")
    rows, prev = [], None
    print(f"{'T':>6} | {'nha fwd':>8} {'nha f+b':>8} | {'mem f+b':>8} | {'flash fwd':>9} {'flash f+b':>9} | "
          f"{'sdpa fwd':>8} {'sdpa f+b':>8} | x2T f+b: nha, flash, sdpa   (ms)")
    for r in ours["results"]:
        row = dict(r)
        p = peer.get(r["T"])
        if p:
            row["sdpa_fwd_ms"], row["sdpa_fwdbwd_ms"] = p["sdpa_fwd_ms"], p["sdpa_fwdbwd_ms"]
        if prev:
            for key in keys:
                if key in row and key in prev:
                    row["x2T_" + key[:-3]] = round(row[key] / prev[key], 2)
        rows.append(row)
        print(f"{r['T']:>6} | {r['nha_fwd_ms']:>8} {r['nha_fwdbwd_ms']:>8} | {r['mem_fwdbwd_ms']:>8} | "
              f"{r['flash_fwd_ms']:>9} {r['flash_fwdbwd_ms']:>9} | {row.get('sdpa_fwd_ms', '-'):>8} "
              f"{row.get('sdpa_fwdbwd_ms', '-'):>8} | {row.get('x2T_nha_fwdbwd', '-')}, "
              f"{row.get('x2T_flash_fwdbwd', '-')}, {row.get('x2T_sdpa_fwdbwd', '-')}")
        prev = row
    ours["results"] = rows
    json.dump(ours, open(os.path.join(out, "nha.json"), "w"), indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        Ts = [r["T"] for r in rows]
        for key, label in (("nha_fwdbwd_ms", "NHA core (w 64, m 64), ours"),
                           ("mem_fwdbwd_ms", "NHA memory only (w 0), ours"),
                           ("flash_fwdbwd_ms", "flash attention, ours"),
                           ("sdpa_fwdbwd_ms", "PyTorch SDPA")):
            if rows and all(key in r for r in rows):
                ax.plot(Ts, [r[key] for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (B*T = 65536)")
        ax.set_ylabel("forward + backward, ms")
        ax.set_title(f"{ours['gpu']}: bf16, 8 heads of 128")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "nha.svg"))
        print("wrote nha.svg")
    except Exception as e:
        print("no plot:", e)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--report":
        report(sys.argv[2])
        return
    import torch
    import torch.nn.functional as F
    max_t = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    res = []
    T = 1024
    while T <= max_t:
        B, H, D = max(1, 65536 // T), 8, 128
        q, k, v = [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3)]
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = fwd()
        g = torch.randn_like(o)
        tf = bench(fwd)
        tb = bench(lambda: torch.autograd.grad(fwd(), (q, k, v), g))
        r = dict(T=T, B=B, sdpa_fwd_ms=round(tf, 3), sdpa_fwdbwd_ms=round(tb, 3))
        print(json.dumps(r), flush=True)
        res.append(r)
        del q, k, v, o, g
        torch.cuda.empty_cache()
        T *= 2
        # after every T: a timeout keeps what was measured
        out = dict(peer="PyTorch %s SDPA causal (flash backend), %s" % (torch.__version__, torch.cuda.get_device_name()),
                   config=dict(dtype="bf16", H=8, D=128, tokens=65536), results=res)
        json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "nha_peer.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
