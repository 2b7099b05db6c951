#!/usr/bin/env python3
"""Runs a grid of `nha train` runs (configs x --set overrides), several at a time, and collects
their final metrics into one JSON, a Markdown table and an SVG plot (stdlib only).

    scripts/sweep.py --out runs/sweep-mqar --jobs 8 \\
        --config configs/mqar-transformer.yaml --config configs/mqar-nha.yaml \\
        --grid model.d_model=64,128,256 --grid train.lr=1e-3,3e-3 \\
        --set train.steps=2000 --eval mqar --x model.d_model --y mqar.acc

Every combination of one --config and one value of each --grid key is one run, trained in
OUT/<config stem>/<key=value,...> with `nha train CONFIG --set ... --quiet`; --set applies to all.
Runs are small (the MQAR models are 2-layer, d <= 256), so --jobs N of them share one GPU (or the
CPU); --devices cuda:0,cuda:1 spreads them over GPUs (run i gets device i mod count). A run that
finished (its OUT/.../done.json exists) is skipped, so an interrupted sweep restarts where it
stopped; a run with checkpoints but no done.json continues with --resume.

After training, --eval TASKS runs `nha eval RUN --tasks TASKS` (its eval.json is in the run dir).
Collected per run: the last train loss, the last validation record (loss, accuracy, bpb) of
metrics.jsonl, and every eval metric as TASK.METRIC (e.g. mqar.acc, mqar.acc@L64-K4).
Writes OUT/sweep.json (all runs), OUT/sweep.md (one row per run) and OUT/sweep.svg (or --results
PREFIX.json/.md/.svg, e.g. bench/results/mqar): --y against
--x, one line per config, each point the best --y over the other grid keys at that x (e.g. the
best learning rate, as in Zoology's plots; lower is better for loss, bpb and ppl metrics).
--seeds KEY names a grid key whose values are repeats (e.g. train.seed=0,1,2): the Markdown then
adds a table of the mean and sample standard deviation over them for --y and every eval metric,
and the SVG shows the mean validation curve (--y over training tokens) per config instead.
--collect only re-reads finished runs and rewrites the three files.
Each of the --jobs processes gets OMP_NUM_THREADS = cores / jobs (unless it is set): an OpenMP
thread per core in every process oversubscribes the host's cores.
"""
import argparse
import itertools
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def parse_grid(items):
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            sys.exit(f"sweep: --grid '{item}' is not KEY=V1,V2,... HINT: --grid train.lr=1e-3,3e-3")
        grid.append((key, values.split(",")))
    return grid


def plan(args):
    """[(config, {key: value}, run_dir)] in a fixed order: configs, then the grid's product."""
    grid = parse_grid(args.grid)
    runs = []
    # Grid points outer, configs inner: a sweep stopped early has every config at the same points.
    for values in itertools.product(*[v for _, v in grid]):
        point = dict(zip([k for k, _ in grid], values))
        for config in args.config:
            stem = os.path.splitext(os.path.basename(config))[0]
            name = ",".join(f"{k}={v}" for k, v in point.items()) or "default"
            runs.append((config, point, os.path.join(args.out, stem, name)))
    return runs


def train_command(args, config, point, run_dir, device):
    sets = list(args.set) + [f"{k}={v}" for k, v in point.items()]
    sets.append(f"logging.run_dir={run_dir}")
    if device:
        sets.append(f"train.device={device}")
    cmd = [args.nha, "train", config, "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    if os.path.isdir(os.path.join(run_dir, "checkpoints")) and any(
            f.endswith(".h5") for f in os.listdir(os.path.join(run_dir, "checkpoints"))):
        cmd.append("--resume")
    return cmd


def start_run(args, config, point, run_dir, device):
    """Starts one run (train, then eval if asked) in the background: (process, its log file)."""
    os.makedirs(run_dir, exist_ok=True)
    steps = [train_command(args, config, point, run_dir, device)]
    if args.eval:
        steps.append([args.nha, "eval", run_dir, "--tasks", args.eval] + shlex.split(args.eval_args) +
                     (["--device", device] if device else []))
    script = " && ".join(" ".join(shlex.quote(c) for c in cmd) for cmd in steps)
    log = open(os.path.join(run_dir, "sweep.log"), "a")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    return subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env), log


def read_run(run_dir):
    """The collected metrics of one finished run (None when it is not finished)."""
    done_path = os.path.join(run_dir, "done.json")
    if not os.path.exists(done_path):
        return None
    with open(done_path) as f:
        rec = json.load(f)
    metrics, curve = {}, []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                if r.get("type") == "train" and r.get("loss") is not None:
                    metrics["train_loss"] = r["loss"]
                    metrics["step"] = r["step"]
                    metrics["tokens"] = r["tokens"]
                elif r.get("type") == "val":
                    point = {"step": r["step"], "tokens": r.get("tokens")}
                    for k in ("loss", "accuracy", "bpb"):
                        if k in r:
                            metrics["val_" + k] = point["val_" + k] = r[k]
                    curve.append(point)
    except FileNotFoundError:
        pass
    eval_path = os.path.join(run_dir, "eval", "eval.json")
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            for task, r in json.load(f)["results"].items():
                for k, v in r.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        metrics[f"{task}.{k}"] = v
    rec["run_dir"] = run_dir
    rec["metrics"] = metrics
    rec["val_curve"] = curve
    return rec


def lower_is_better(metric):
    return any(metric.endswith(s) for s in ("loss", "bpb", "ppl"))


def number(v):
    try:
        return float(v)
    except ValueError:
        return v


def best_points(records, x_key, y):
    """{config: [(x, best y over the other overrides)]} sorted by x."""
    pick = min if lower_is_better(y) else max
    series = {}
    for r in records:
        if y not in r["metrics"] or x_key not in r["overrides"]:
            continue
        by_x = series.setdefault(r["config"], {})
        x = number(r["overrides"][x_key])
        v = r["metrics"][y]
        by_x[x] = pick(by_x[x], v) if x in by_x else v
    return {c: sorted(p.items()) for c, p in series.items()}


def svg_plot(series, x_key, y, title):
    """A small line plot (log2 x axis when every x is a positive number)."""
    W, H, L, R, T, B = 640, 400, 70, 170, 40, 50
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ys = [v for pts in series.values() for _, v in pts]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{esc(title)}</text>']
    if not xs or not ys:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no finished runs with {esc(y)}</text>')
        return "\n".join(out + ["</svg>"])
    numeric = all(isinstance(x, float) and x > 0 for x in xs)
    if numeric:
        fx = [math.log2(x) for x in xs]
        pos = dict(zip(xs, fx))
    else:
        pos = {x: float(i) for i, x in enumerate(xs)}
    x0, x1 = min(pos.values()), max(pos.values())
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    if 0 <= y0 and y1 <= 1:  # accuracies: the full range
        y0, y1 = 0.0, 1.0
    elif y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    px = lambda x: L + (pos[x] - x0) / (x1 - x0) * (W - L - R)
    py = lambda v: H - B - (v - y0) / (y1 - y0) * (H - T - B)
    out.append(f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>')
    out.append(f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>')
    for x in xs:
        label = (f"{x / 1e6:.3g}M" if x >= 1e5 else f"{x:g}") if isinstance(x, float) else str(x)
        out.append(f'<text x="{px(x):.1f}" y="{H - B + 16}" text-anchor="middle">{esc(label)}</text>')
    for i in range(6):
        v = y0 + (y1 - y0) * i / 5
        out.append(f'<line x1="{L}" y1="{py(v):.1f}" x2="{W - R}" y2="{py(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">{esc(x_key)}</text>')
    out.append(f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(T + H - B) / 2})">{esc(y)}</text>')
    for i, (config, pts) in enumerate(sorted(series.items())):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, v in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{color}"/>')
        ly = T + 10 + 18 * i
        out.append(f'<line x1="{W - R + 10}" y1="{ly}" x2="{W - R + 30}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2"/>')
        name = os.path.splitext(os.path.basename(config))[0]
        out.append(f'<text x="{W - R + 36}" y="{ly + 4}">{esc(name)}</text>')
    return "\n".join(out + ["</svg>"])


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def config_name(config):
    return os.path.splitext(os.path.basename(config))[0]


def seed_groups(records, keys, seeds):
    """{(config, other overrides): [records]} over the repeats of the --seeds key, in order."""
    groups = {}
    for r in records:
        other = tuple((k, r["overrides"].get(k, "")) for k in keys if k != seeds)
        groups.setdefault((r["config"], other), []).append(r)
    return groups


def group_label(config, other):
    return " ".join([config_name(config)] + [f"{k}={v}" for k, v in other])


def mean_sd(values):
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def seeds_table(groups, seeds, metrics):
    """Markdown: per group, mean +- sample sd over the repeats of every metric."""
    lines = ["", f"mean ± sample standard deviation over {seeds}:", "",
             "| run | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for (config, other), recs in groups.items():
        cells = []
        for m in metrics:
            vals = [r["metrics"][m] for r in recs if m in r["metrics"]]
            if not vals:
                cells.append("-")
                continue
            mean, sd = mean_sd(vals)
            scale, unit = (100, "%") if "acc" in m or m.endswith("contains") else (1, "")
            cells.append(f"{scale * mean:.4g}{unit} ± {scale * sd:.2g}{unit}")
        lines.append(f"| {group_label(config, other)} | {len(recs)} | " + " | ".join(cells) + " |")
    return lines


def mean_curves(groups, y):
    """{label: [(tokens, mean of y)]} at the validation points every repeat of a group has."""
    series = {}
    for (config, other), recs in groups.items():
        at = {}
        for r in recs:
            for p in r.get("val_curve", []):
                if y in p and p.get("tokens"):
                    at.setdefault(float(p["tokens"]), []).append(p[y])
        series[group_label(config, other)] = sorted(
            (t, statistics.fmean(v)) for t, v in at.items() if len(v) == len(recs))
    return series


def collect(args, runs):
    records = [r for r in (read_run(d) for _, _, d in runs) if r is not None]
    keys = [k for k, _ in parse_grid(args.grid)]
    metric_names = sorted({m for r in records for m in r["metrics"]})
    y = args.y or next((m for m in ("mqar.acc", "val_accuracy", "val_bpb", "val_loss")
                        if m in metric_names), "train_loss")
    prefix = args.results or os.path.join(args.out, "sweep")
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.split("\n") \
        if shutil.which("nvidia-smi") else []
    write_atomic(prefix + ".json", json.dumps(
        {"sweep": args.out, "commit": commit, "gpu": gpus[0] if gpus and gpus[0] else "none",
         "set": args.set, "grid": dict(parse_grid(args.grid)), "eval": args.eval,
         "eval_args": args.eval_args, "runs": records}, indent=2) + "\n")
    shown = [m for m in metric_names if m in (y, "step", "train_loss", "val_loss", "val_accuracy", "val_bpb")
             or ("." in m and m.rsplit(".", 1)[1] not in ("rows", "seconds"))]  # eval metrics
    lines = ["| config | " + " | ".join(keys + shown) + " |", "|---|" + "---|" * len(keys + shown)]
    for r in records:
        cells = [str(r["overrides"].get(k, "")) for k in keys]
        for m in shown:
            v = r["metrics"].get(m)
            cells.append("-" if v is None else f"{100 * v:.1f}%" if "acc" in m else
                         str(v) if m == "step" else f"{v:.4f}")
        lines.append(f"| {os.path.basename(r['config'])} | " + " | ".join(cells) + " |")
    x_key = args.x or (keys[0] if keys else "")
    best = best_points(records, x_key, y)
    xs = sorted({x for pts in best.values() for x, _ in pts}, key=lambda x: (isinstance(x, str), x))
    lines += ["", f"{y}, the best over the other grid keys:", "",
              f"| config | " + " | ".join(f"{x_key}={x:g}" if isinstance(x, float) else f"{x_key}={x}"
                                          for x in xs) + " |",
              "|---|" + "---|" * len(xs)]
    for config, pts in sorted(best.items()):
        at = dict(pts)
        lines.append(f"| {os.path.basename(config)} | " + " | ".join(
            "-" if x not in at else f"{100 * at[x]:.1f}%" if "acc" in y else f"{at[x]:.4f}"
            for x in xs) + " |")
    if args.seeds:
        groups = seed_groups(records, keys, args.seeds)
        lines += seeds_table(groups, args.seeds, [m for m in shown if m != "step"])
        plot = svg_plot(mean_curves(groups, y), "training tokens", y,
                        f"{y} vs training tokens (mean over {args.seeds})")
    else:
        plot = svg_plot(best, x_key, y, f"{y} vs {x_key} (best over the other grid keys)")
    write_atomic(prefix + ".md", "\n".join(lines) + "\n")
    write_atomic(prefix + ".svg", plot + "\n")
    print(f"sweep: {len(records)}/{len(runs)} runs finished; wrote {prefix}.json, .md, .svg "
          f"({y} vs {x_key})")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="a run config (repeatable)")
    p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
    p.add_argument("--out", required=True, help="sweep directory (one run dir per grid point)")
    p.add_argument("--results", default="", help="path prefix of the collected .json/.md/.svg "
                                                 "(default OUT/sweep)")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    p.add_argument("--devices", default="", help="comma-separated train.device values, round robin")
    p.add_argument("--nha", default="build/nha", help="the nha binary")
    p.add_argument("--eval", default="", help="tasks for `nha eval` after training (e.g. mqar)")
    p.add_argument("--eval-args", default="", help="more `nha eval` options, e.g. '--limit 200'")
    p.add_argument("--x", default="", help="the grid key on the plot's x axis (default: the first)")
    p.add_argument("--y", default="", help="the plotted metric (default: mqar.acc, val_accuracy, "
                                           "val_bpb or val_loss, whichever the runs have)")
    p.add_argument("--seeds", default="", help="a grid key whose values are repeats (e.g. train.seed): "
                                               "mean and sd over them, mean validation curves")
    p.add_argument("--collect", action="store_true", help="only collect finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args()
    if args.jobs < 1:
        sys.exit("sweep: --jobs must be >= 1")
    runs = plan(args)
    devices = [d for d in args.devices.split(",") if d]
    todo = []
    for i, (config, point, run_dir) in enumerate(runs):
        done_path = os.path.join(run_dir, "done.json")
        if not os.path.exists(done_path):
            todo.append((i, (config, point, run_dir)))
            continue
        with open(done_path) as f:
            before = json.load(f).get("set")
        if before != args.set:
            print(f"sweep: note: {run_dir} finished with --set {before}, not {args.set}; kept "
                  f"(delete its done.json to run it again)", flush=True)
    print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run, "
          f"{args.jobs} at a time", flush=True)
    if args.dry_run:
        for i, (config, point, run_dir) in todo:
            device = devices[i % len(devices)] if devices else ""
            print(" ".join(shlex.quote(c) for c in train_command(args, config, point, run_dir, device)))
        return
    failed = []
    if not args.collect:
        if not os.access(args.nha, os.X_OK):
            sys.exit(f"sweep: {args.nha} not found. HINT: build first, or pass --nha PATH")
        running, start = {}, time.time()
        while todo or running:
            while todo and len(running) < args.jobs:
                i, (config, point, run_dir) = todo.pop(0)
                device = devices[i % len(devices)] if devices else ""
                proc, log = start_run(args, config, point, run_dir, device)
                done = {"config": config, "overrides": point, "set": args.set,
                        "device": device or "auto"}
                running[proc] = (run_dir, done, log, time.time())
            time.sleep(0.5)
            for proc in [q for q in running if q.poll() is not None]:
                run_dir, done, log, t0 = running.pop(proc)
                log.close()
                if proc.returncode == 0:
                    done["seconds"] = round(time.time() - t0, 1)
                    write_atomic(os.path.join(run_dir, "done.json"), json.dumps(done, indent=2) + "\n")
                    print(f"sweep: finished {run_dir} ({done['seconds']} s)", flush=True)
                else:
                    failed.append(run_dir)
                    print(f"sweep: FAILED {run_dir} (exit {proc.returncode}); see {run_dir}/sweep.log",
                          flush=True)
        print(f"sweep: {time.time() - start:.0f} s, {len(failed)} failed", flush=True)
    collect(args, runs)
    if not args.collect and failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
