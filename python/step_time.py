"""Training step time of Metrix vs the clean loss (issue 6 targets: Metrix/feature at most 1.25x
the clean step on the digits model on the CPU, 1.10x with ResNet-50, B = 100, 224 px on a GPU).

Runs the trainer's own step on the same batches, the methods interleaved round-robin so machine
load affects them alike, and prints median milliseconds, the ratio to the clean step and the
mean number of page faults the process took per step (pages the allocator had returned to the
system and the step touched again).

    python python/step_time.py [--steps 30] [--batch-size 60] [--loss multi_similarity] [--backend auto]
    python python/step_time.py --model resnet50 --batch-size 100 --image-size 224 --device cuda
      (synthetic images, labels drawn from 100 classes like a random CUB batch; needs no dataset)

The process takes metrix-train's malloc settings (train/allocator.py) unless --default-malloc.
"""
from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time

import numpy as np
import torch

from metrix_kernels import MetrixLoss
from metrix_kernels.train import Config, Trainer
from metrix_kernels.train.allocator import keep_freed_memory
from metrix_kernels.train.loop import deterministic_kernels, train_step
from metrix_kernels.train.model import build_model


def _digits_steppers(args, mixups, out):
    trainers = {m: Trainer(Config(out=f"{out}/{m}", loss=args.loss, mixup=m, batch_size=args.batch_size,
                                  backend=args.backend, device=args.device, progress=False)) for m in mixups}
    first = next(iter(trainers.values()))
    first.sampler.set_epoch(0)
    batches = [(x, y) for x, y, _ in first.loader][: max(1, args.steps // 3)]
    return {m: (lambda x, y, t=t: t.step(x, y)) for m, t in trainers.items()}, batches


def _resnet_steppers(args, mixups):
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device),
                torch.randint(100, (args.batch_size,), generator=g).to(device)) for _ in range(2)]
    steppers = {}
    for m in mixups:
        model = build_model("resnet50", 512, None, freeze_bn=True).to(device).train()
        criterion = MetrixLoss(args.loss, mixup=m, backend=args.backend)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(1)
        steppers[m] = lambda x, y, a=(model, criterion, optimizer, generator): train_step(*a[:3], x, y, a[1].mixup, a[3], 10.0)
    return steppers, batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--loss", default="multi_similarity")
    p.add_argument("--backend", default="auto")
    p.add_argument("--mixups", default="none,feature,embedding,input")
    p.add_argument("--model", default="digits", choices=["digits", "resnet50"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--default-malloc", action="store_true", help="glibc's default thresholds, not metrix-train's")
    args = p.parse_args()
    malloc = "default malloc" if args.default_malloc or not keep_freed_memory() else "metrix-train's malloc settings"
    if args.threads:
        torch.set_num_threads(args.threads)
    mixups = [None if m == "none" else m for m in args.mixups.split(",")]
    with tempfile.TemporaryDirectory() as out:
        if args.model == "digits":
            steppers, batches = _digits_steppers(args, mixups, out)
        else:
            steppers, batches = _resnet_steppers(args, mixups)
        times = {m: [] for m in mixups}
        faults = {m: [] for m in mixups}
        with deterministic_kernels():  # as the trainer runs by default
            for step in range(args.steps + 3):
                x, y = batches[step % len(batches)]
                for m, run in steppers.items():
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    run(x, y)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if step >= 3:  # the first steps warm up allocators and caches
                        times[m].append(time.perf_counter() - start)
                        faults[m].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
    clean = np.median(times[None]) if None in times else None
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    print(f"{where}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; {args.model}, "
          f"batch {args.batch_size}, loss {args.loss}, backend {args.backend}, {args.steps} steps, {malloc}")
    for m, t in times.items():
        ratio = f"  {np.median(t) / clean:.2f}x clean" if clean else ""
        print(f"  {str(m or 'clean'):10s} median {1000 * np.median(t):7.1f} ms  (p25 {1000 * np.percentile(t, 25):.1f}, "
              f"p75 {1000 * np.percentile(t, 75):.1f}){ratio}  {np.mean(faults[m]):.0f} page faults/step")


if __name__ == "__main__":
    main()
