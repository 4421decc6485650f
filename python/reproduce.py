"""Reproduce the paper's Table 2 grid through the trainer: baseline vs Metrix (input, feature,
embedding) per loss, several seeds, mean and spread, beside the published numbers (SPEC 2).

Our machines have no image datasets, so the default is the digits-scale version:

    python python/reproduce.py                        # digits, 3 losses x 4 methods x 3 seeds
    python python/reproduce.py --dataset cub200 --data-root /data --epochs 60

Text below a "## Reading" heading of an existing table file is kept when the table is rewritten.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metrix_kernels.train import Trainer
from metrix_kernels.train.allocator import keep_freed_memory
from metrix_kernels.train.cli import parser as train_parser
from metrix_kernels.train.cli import resolve

METHODS = {"baseline": ["--mixup", "none"], "metrix/input": ["--mixup", "input"],
           "metrix/feature": ["--mixup", "feature"], "metrix/embedding": ["--mixup", "embedding"]}
LOSS_NAMES = {"contrastive": "Contrastive", "multi_similarity": "Multi-similarity", "proxy_anchor": "Proxy anchor",
              "proxy_nca_pp": "ProxyNCA++"}
# Published Recall@1 (ResNet-50, d = 512), baseline -> Metrix/feature (SPEC 2).
PUBLISHED = {
    "contrastive": {"cub200": (64.7, 67.4), "cars196": (81.6, 85.1), "sop": (74.9, 77.5), "inshop": (86.4, 89.1)},
    "multi_similarity": {"cub200": (67.8, 71.4), "cars196": (87.8, 89.6), "sop": (76.9, 81.0), "inshop": (90.1, 92.2)},
    "proxy_anchor": {"cub200": (69.5, 71.0), "cars196": (87.6, 89.1), "sop": (79.1, 81.3), "inshop": (90.0, 91.9)},
    "proxy_nca_pp": {"cub200": (69.1, 70.4), "cars196": (86.6, 88.5), "sop": (80.4, 81.3), "inshop": (90.2, 91.9)},
}


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root")
    p.add_argument("--losses", default="contrastive,multi_similarity,proxy_anchor")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--extra", default="", help="more metrix-train flags for every run, quoted")
    p.add_argument("--runs", default="runs/reproduce", help="folder of the individual runs")
    p.add_argument("--table", help="the table's file (default bench/results/reproduction-<dataset>.md)")
    args = p.parse_args()
    args.table = args.table or f"bench/results/reproduction-{args.dataset}.md"
    return args


def run_one(args, loss: str, method: str, seed: int) -> dict:
    flags = ["--dataset", args.dataset, "--loss", loss, *METHODS[method], "--seed", str(seed), "--no-progress",
             "--out", f"{args.runs}/{args.dataset}-{loss}-{method.replace('/', '-')}-s{seed}", *shlex.split(args.extra)]
    if args.data_root:
        flags += ["--data-root", args.data_root]
    if args.epochs:
        flags += ["--epochs", str(args.epochs)]
    return Trainer(resolve(train_parser().parse_args(flags)), overwrite=True).fit()  # a rerun replaces its runs


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.2f}"


def table(args, results: dict, seconds: float, loads: tuple[float, float]) -> str:
    """loads: the host's 1-minute load average when the grid started and now (other jobs skew step times)."""
    losses, methods = args.losses.split(","), args.methods.split(",")
    first_cell = next(iter(results.values()))
    first = first_cell[0]
    cfg = first["config"]
    lines = [
        f"# Reproduction of Table 2 on {args.dataset}",
        "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads "
        f"({first['device']}), torch {torch.__version__}, Python {platform.python_version()}; "
        f"load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end.",
        f"Command: `python python/reproduce.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` "
        f"({seconds / 60:.1f} min for {sum(len(v) for v in results.values())} runs).",
        f"Setting: {cfg['backbone']} backbone, embedding {cfg['embedding_size']}, batch {cfg['batch_size']} "
        f"({cfg['sampler']}), {cfg['epochs']} epochs, lr {cfg['lr']}, Metrix w = {cfg['weight']}, "
        f"lam ~ Beta({cfg['mix_alpha']}, {cfg['mix_alpha']}), pairs {cfg['pairs']}, loss backend {cfg['backend']}.",
        "",
        f"Recall@1 (%) on the test classes, mean ± standard deviation over seeds "
        f"{', '.join(args.seeds.split(',')[:len(first_cell)])}:",
        "",
        "| loss | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for loss in losses:
        cells = [_cell([r["final"]["recall"]["1"] for r in results[(loss, m)]]) for m in methods]
        lines.append(f"| {LOSS_NAMES.get(loss, loss)} | " + " | ".join(cells) + " |")
    untrained = {}  # per seed: its runs share one initial network, whatever the loss and method
    for rs in results.values():
        for seed, r in zip(args.seeds.split(","), rs):
            if r.get("untrained_recall"):
                untrained.setdefault(seed, r["untrained_recall"]["1"])
    if untrained:
        lines += ["", f"The same networks before training (seeds {', '.join(untrained)}): R@1 "
                      f"{_cell(list(untrained.values()))}."]
    lines += ["", "Test-set alignment / uniformity / utilization (clean train; with mixed train embeddings), means:", "",
              "| loss | method | alignment | uniformity | utilization | utilization (+mixed) | step ms |",
              "|---|---|---|---|---|---|---|"]
    for loss in losses:
        for m in methods:
            rs = results[(loss, m)]
            mixed = [r["final"]["utilization_mixed"] for r in rs if r["final"]["utilization_mixed"] is not None]
            mean = {k: np.mean([r["final"][k] for r in rs]) for k in ("alignment", "uniformity", "utilization")}
            lines.append(f"| {LOSS_NAMES.get(loss, loss)} | {m} | {mean['alignment']:.3f} | {mean['uniformity']:.3f} | "
                         f"{mean['utilization']:.3f} | {f'{np.mean(mixed):.3f}' if mixed else '-'} | "
                         f"{np.mean([r['step_ms'] for r in rs]):.0f} |")
    lines += ["", "Published Recall@1 (ResNet-50, d = 512), baseline -> Metrix/feature, for reference:", "",
              "| loss | CUB200 | Cars196 | SOP | In-Shop |", "|---|---|---|---|---|"]
    for loss in losses:
        if loss in PUBLISHED:
            cells = [f"{a} -> {b}" for a, b in PUBLISHED[loss].values()]
            lines.append(f"| {LOSS_NAMES[loss]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(args, results: dict, seconds: float, start_load: float) -> str:
    text = table(args, results, seconds, (start_load, os.getloadavg()[0]))
    path = Path(args.table)
    path.parent.mkdir(parents=True, exist_ok=True)
    reading = ""
    if path.is_file() and "## Reading" in path.read_text():
        reading = "\n" + path.read_text()[path.read_text().index("## Reading"):]
    path.write_text(text + reading)
    return text


def main() -> None:
    args = arguments()
    keep_freed_memory()  # as metrix-train runs
    start, start_load = time.time(), os.getloadavg()[0]
    results = {}
    for seed in args.seeds.split(","):  # seed-major: a cut-short grid still covers every cell
        for loss in args.losses.split(","):
            for method in args.methods.split(","):
                results.setdefault((loss, method), []).append(run_one(args, loss, method, int(seed)))
        write(args, results, time.time() - start, start_load)
    print(write(args, results, time.time() - start, start_load))


if __name__ == "__main__":
    main()
