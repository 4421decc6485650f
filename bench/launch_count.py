"""What one loss call (forward + backward) asks of a GPU: torch ops that launch work, Triton kernel
launches, and the dispatches that launch nothing (views, detach). At small batches every launch
costs the host some 10-30 us whatever its size, so these counts bound the fixed cost of a call.

    python bench/launch_count.py [--batch 16] [--dim 16]

Counted on CPU tensors with the Triton kernels interpreted (TRITON_INTERPRET=1): the host code is
the one a GPU runs; ops called by the interpreter itself are left out. Allocations (torch.empty) count
as dispatches without a launch. The batch is one tile and one
backward chunk under the interpreter, as B = 256, d = 512 is on a GPU.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import time
import traceback

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from metrix_kernels import metrix_loss  # noqa: E402

NO_LAUNCH = {"detach", "select", "slice", "permute", "expand", "unsqueeze", "t", "unbind", "view", "alias",
             "scalar_tensor", "_unsafe_view", "as_strided", "empty", "empty_like", "new_empty", "empty_strided"}


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any("triton/runtime" in frame.filename for frame in traceback.extract_stack()):
            name = func.__name__.split(".")[0]
            self.counts["dispatches without a launch" if name in NO_LAUNCH else "torch launches"] += 1
        return func(*args, **(kwargs or {}))


def count(step) -> dict:
    step()  # first call: compilation, caches
    launches = [0]
    run = triton.runtime.interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches[0] += 1
        return run(self, *args, **kwargs)

    triton.runtime.interpreter.InterpretedFunction.run = counted
    try:
        with Counter() as counter:
            step()
    finally:
        triton.runtime.interpreter.InterpretedFunction.run = run
    return {**counter.counts, "triton launches": launches[0]}


def host_time(step, calls=300) -> float:
    """Median microseconds per call with every Triton launch a no-op: the Python, dispatch and torch-op
    cost of the call on this CPU (the torch ops run on tiny CPU tensors), without the launches'."""
    run = triton.runtime.interpreter.InterpretedFunction.run
    triton.runtime.interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        for _ in range(20):
            step()
        times = []
        for _ in range(calls):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    finally:
        triton.runtime.interpreter.InterpretedFunction.run = run
    return 1e6 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(args.batch, args.dim, generator=gen).requires_grad_(True)
    labels = torch.arange(args.batch) // 4

    def fwd_bwd(loss):
        def step():
            emb.grad = None  # every counted call starts as the first: no gradient to accumulate into
            loss().backward()
        return step

    cases = {
        "Metrix multi_similarity, clean": fwd_bwd(lambda: metrix_loss(emb, labels, mixup=None, backend="triton")),
        "Metrix multi_similarity, embedding mixup (pos-neg)": fwd_bwd(lambda: metrix_loss(
            emb, labels, mixup="embedding", pairs="pos-neg", lam=0.4, backend="triton")),
    }
    try:
        from pytorch_metric_learning import losses

        pml = losses.MultiSimilarityLoss()
        cases["PML MultiSimilarityLoss, clean"] = fwd_bwd(lambda: pml(emb, labels))
    except ImportError:
        print("pytorch-metric-learning not importable: its row is left out")
    keys = ["torch launches", "triton launches", "dispatches without a launch"]
    print(f"B = {args.batch}, d = {args.dim}, one forward + backward, torch {torch.__version__}, "
          f"triton {triton.__version__}, {torch.get_num_threads()} threads")
    print("| call | " + " | ".join(keys) + " | launches in all | host us per call, Triton launches left out |")
    print("|---|" + "---|" * (len(keys) + 2))
    for name, step in cases.items():
        c = count(step)
        print(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in keys)
              + f" | {c.get('torch launches', 0) + c.get('triton launches', 0)} | {host_time(step):.0f} |")


if __name__ == "__main__":
    main()
