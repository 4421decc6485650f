"""Run the CPU benchmark suite and write bench/results/cpu.md (table) and cpu.png (plot).

    python bench/cpu_report.py            # B = 64 .. 2048 (about 25 minutes on 2 cores)
    python bench/cpu_report.py --quick    # B = 64, 128, 256
    python bench/cpu_report.py --sizes 512,1024,2048 --select "clean or embedding" --out big.json
    python bench/cpu_report.py --json bench/results/cpu.json big.json   # one table from several runs
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
IMPLS = ("cpu", "reference", "pml")
MIXUPS = ("clean", "embedding", "feature", "input")


def run_suite(sizes: str, select: str, out_json: str) -> None:
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_bench_cpu.py"), "-q", "-p", "no:cacheprovider",
           f"--cpu-sizes={sizes}", f"--benchmark-json={out_json}", "--benchmark-columns=median,rounds"]
    subprocess.run(cmd + (["-k", select] if select else []), check=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def load(paths: list[str]) -> dict:
    rows = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            x = b["extra_info"]
            rows[(x["loss"], x["mixup"], x["batch"], x["impl"])] = (b["stats"]["median"], x["peak_bytes"], x["threads"])
    return rows


def fmt_ms(v):
    return "-" if v is None else (f"{v * 1e3:.1f}" if v < 10 else f"{v:.1f} s")


def fmt_mib(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.1f}x"


def table(rows: dict) -> list[str]:
    lines = []
    keys = sorted({k[:3] for k in rows}, key=lambda k: (k[0], MIXUPS.index(k[1]), k[2]))
    lines.append("| loss | mixup | B | cpu ms | ref ms | PML ms | ref / cpu | PML / cpu | cpu MiB | ref MiB | PML MiB | ref / cpu mem |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for loss, mixup, batch in keys:
        t = {i: rows.get((loss, mixup, batch, i), (None, None, None))[0] for i in IMPLS}
        m = {i: rows.get((loss, mixup, batch, i), (None, None, None))[1] for i in IMPLS}
        lines.append(
            f"| {loss} | {mixup} | {batch} | {fmt_ms(t['cpu'])} | {fmt_ms(t['reference'])} | {fmt_ms(t['pml'])} "
            f"| {ratio(t['reference'], t['cpu'])} | {ratio(t['pml'], t['cpu'])} | {fmt_mib(m['cpu'])} "
            f"| {fmt_mib(m['reference'])} | {fmt_mib(m['pml'])} | {ratio(m['reference'], m['cpu'])} |"
        )
    return lines


def plot(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8), sharex=True)
    series = defaultdict(list)
    for (loss, mixup, batch, impl), (t, mem, _) in sorted(rows.items(), key=lambda kv: kv[0][2]):
        series[(loss, mixup, impl)].append((batch, t, mem))
    style = {"cpu": ("tab:green", "-"), "reference": ("tab:red", "--"), "pml": ("tab:blue", ":")}
    for col, mixup in enumerate(MIXUPS):
        for (loss, mx, impl), pts in series.items():
            if mx != mixup:
                continue
            main = loss == "multi_similarity"
            color, ls = style[impl]
            b = [p[0] for p in pts]
            kw = dict(color=color, ls=ls, lw=2 if main else 0.6, alpha=1 if main else 0.35,
                      label=f"{impl} (multi-similarity)" if main else None, marker="o" if main else None)
            axes[0, col].plot(b, [p[1] * 1e3 for p in pts], **kw)
            axes[1, col].plot(b, [max(p[2], 1) / 2**20 for p in pts], **kw)
        axes[0, col].set_title(f"{mixup} (thin: other losses)")
        axes[1, col].set_xlabel("batch size B")
    axes[0, 0].set_ylabel("fwd+bwd time [ms]")
    axes[1, 0].set_ylabel("peak memory [MiB]")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B = 64, 128, 256 only")
    parser.add_argument("--sizes", default=None, help="comma-separated batch sizes (overrides --quick)")
    parser.add_argument("--select", default=None, help="pytest -k expression, e.g. 'clean or embedding'")
    parser.add_argument("--out", default=os.path.join(RESULTS, "cpu.json"), help="where the suite writes its JSON")
    parser.add_argument("--json", nargs="+", default=None,
                        help="make the table from these pytest-benchmark JSON files instead of running the suite")
    args = parser.parse_args()
    sizes = args.sizes or ("64,128,256" if args.quick else "64,128,256,512,1024,2048")
    os.makedirs(RESULTS, exist_ok=True)
    if not args.json:
        run_suite(sizes, args.select, args.out)
    rows = load(args.json or [args.out])

    import pytorch_metric_learning
    import torch

    threads = sorted({v[2] for v in rows.values()})
    command = " ".join(["python bench/cpu_report.py"] + sys.argv[1:])
    header = [
        "# CPU benchmark: fwd+bwd time and peak memory",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores visible, torch threads {threads}, {platform.platform()}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"pytorch-metric-learning {pytorch_metric_learning.__version__}",
        f"- date: {datetime.date.today().isoformat()}; command: `{command}`",
        "- batches: B / 8 classes x 8 examples, d = 512, float32; proxy losses: one proxy per class; mixup over "
        "all pos-neg pairs, lam = 0.4 (feature: maps [B, 64, 7, 7] + linear head; input: inputs [B, 512] + "
        "linear model, 3 hard negatives per anchor); loss hyperparameters: the rows' defaults (PML's)",
        "- time: median over rounds (5 for B <= 256, else 2) after a warm-up; the machine is shared, so "
        "compare ratios within a row rather than across runs",
        "- memory: growth of the resident set during one step (see bench/cpu_cases.py); `-` = not run "
        "(PML lacks the loss or mixup, or the run would need more than 4 GiB: see the suite's skip reasons)",
        "",
    ]
    with open(os.path.join(RESULTS, "cpu.md"), "w") as f:
        f.write("\n".join(header + table(rows)) + "\n\n![time and memory against B](cpu.png)\n")
    plot(rows, os.path.join(RESULTS, "cpu.png"))
    print(f"wrote {os.path.join(RESULTS, 'cpu.md')} and cpu.png")


if __name__ == "__main__":
    main()
