"""Training step time of Metrix vs the clean loss on the digits model (issue 6 target: feature <= 1.25x).

Runs the trainer's own step on the same batches, the methods interleaved round-robin so machine
load affects them alike, and prints median milliseconds and the ratio to the clean step.

    python python/step_time.py [--steps 30] [--batch-size 100] [--loss multi_similarity] [--backend auto]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch

from metrix_kernels.train import Config, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--loss", default="multi_similarity")
    p.add_argument("--backend", default="auto")
    p.add_argument("--mixups", default="none,feature,embedding,input")
    args = p.parse_args()
    mixups = [None if m == "none" else m for m in args.mixups.split(",")]
    with tempfile.TemporaryDirectory() as out:
        trainers = {m: Trainer(Config(out=f"{out}/{m}", loss=args.loss, mixup=m, batch_size=args.batch_size,
                                      backend=args.backend, progress=False)) for m in mixups}
        first = next(iter(trainers.values()))
        first.sampler.set_epoch(0)
        batches = [(x, y) for x, y, _ in first.loader][: max(1, args.steps // 3)]
        times = {m: [] for m in mixups}
        torch.use_deterministic_algorithms(True, warn_only=True)  # as the trainer runs by default
        for step in range(args.steps + 3):
            x, y = batches[step % len(batches)]
            for m, trainer in trainers.items():
                trainer.model.train()
                start = time.perf_counter()
                trainer.step(x, y)
                if step >= 3:  # the first steps warm up allocators and caches
                    times[m].append(time.perf_counter() - start)
    clean = np.median(times[None]) if None in times else None
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; batch {args.batch_size}, loss {args.loss}, backend {args.backend}, {args.steps} steps")
    for m, t in times.items():
        ratio = f"  {np.median(t) / clean:.2f}x clean" if clean else ""
        print(f"  {str(m or 'clean'):10s} median {1000 * np.median(t):7.1f} ms  (p25 {1000 * np.percentile(t, 25):.1f}, "
              f"p75 {1000 * np.percentile(t, 75):.1f}){ratio}")


if __name__ == "__main__":
    main()
