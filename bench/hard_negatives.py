"""Time and peak memory of input mixup's pair plan (pairs.hard_negative_plan: each anchor's k = 3
hardest negatives), one fresh process per batch size so that the peak resident set is the plan's.

    python bench/hard_negatives.py [--batches 256,1024,2048] [--pair-set pos-neg]

Batches: B / 8 classes x 8 examples, d = 64, seed 0. Run it against two checkouts (PYTHONPATH) to
compare them side by side.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def one(batch: int, pair_set: str) -> str:
    import torch

    from metrix_kernels.pairs import hard_negative_plan

    torch.manual_seed(0)
    emb, labels = torch.randn(batch, 64), torch.arange(batch) % max(batch // 8, 1)
    hard_negative_plan(emb[:16], labels[:16], pair_set, 0.5, "interpolate", 3)  # first-call costs
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    begin = time.perf_counter()
    plan = hard_negative_plan(emb, labels, pair_set, 0.5, "interpolate", 3)
    seconds = time.perf_counter() - begin
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return f"| {batch} | {pair_set} | {plan.i.shape[0]} | {seconds * 1e3:.0f} | {grown:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="256,1024,2048")
    parser.add_argument("--pair-set", default="pos-neg")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process's batch size
    args = parser.parse_args()
    if args.one:
        print(one(args.one, args.pair_set))
        return
    print("| B | pairs | M | ms | peak RSS growth, MiB |\n|---|---|---|---|---|")
    for batch in args.batches.split(","):
        subprocess.run([sys.executable, __file__, "--one", batch, "--pair-set", args.pair_set], check=True)


if __name__ == "__main__":
    main()
