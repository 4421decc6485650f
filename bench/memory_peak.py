"""Peak loss memory of one forward + backward, counted on the CPU as a GPU's allocator would see it.

    python bench/memory_peak.py [--batch 8192] [--dim 512] [--json PATH]

The triton path's host code runs as on a GPU (its GPU tile and chunk sizes) on CPU tensors, with
every Triton launch a no-op: the kernels allocate nothing themselves, so the tensors the call
allocates, and when it frees them, are those of a GPU run. The peak is the highest total the
profiler's allocation record (profile_memory) reaches during the call, above what was allocated
before it: the quantity gpu_bench.py reads as max_memory_allocated above the inputs. As there, the
embeddings already hold a gradient from an earlier call, so a call's new gradient is counted and
then added into it. PML and the reference run for real.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import torch  # noqa: E402
import triton  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from metrix_kernels import metrix_loss  # noqa: E402
from metrix_kernels.backends.triton import common, gram, pairwise  # noqa: E402

LAM = 0.4


def peak_mib(step) -> float:
    """MiB above the allocations before the call, at the call's highest point (second call: the first
    fills caches and leaves the gradient that later calls add into)."""
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**20


def gpu_sizes_no_launches():
    """The triton backend's GPU tile and chunk sizes, and Triton launches that do nothing."""
    for module in (common, gram, pairwise):
        module.INTERPRET = False
    triton.runtime.interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--json", help="also write the rows here, peaks in [B, d] float32 buffers")
    args = parser.parse_args()
    gpu_sizes_no_launches()
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(args.batch, args.dim, generator=gen).requires_grad_(True)
    labels = torch.arange(args.batch) // 4

    def call(fn):
        return lambda: fn().backward()

    try:
        from pytorch_metric_learning import losses
    except ImportError:
        losses = None
    rows = []
    for name in ("multi_similarity", "contrastive"):
        pml = None
        if losses is not None:
            pml_loss = {"multi_similarity": losses.MultiSimilarityLoss, "contrastive": losses.ContrastiveLoss}[name]()
            pml = peak_mib(call(lambda: pml_loss(emb, labels)))
        for mode in ("clean", "embedding"):
            mixup = None if mode == "clean" else "embedding"
            mib = peak_mib(call(lambda: metrix_loss(emb, labels, loss=name, mixup=mixup, pairs="pos-neg", lam=LAM,
                                                    backend="triton")))
            rows.append((name, mode, mib, pml))
        emb.grad = None
    buffer = args.batch * args.dim * 4 / 2**20
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(loss=name, mode=mode, buffers=mib / buffer, pml_mib=pml) for name, mode, mib, pml in rows], f)
    print(f"B = {args.batch}, d = {args.dim}, float32; one [B, d] float32 buffer = {buffer:.1f} MiB; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print("| loss | mode | triton peak, MiB | in [B, d] buffers | PML clean peak, MiB | triton / PML, % |")
    print("|---|---|---|---|---|---|")
    for name, mode, mib, pml in rows:
        ratio = f"{100 * mib / pml:.2f}" if pml else "n/a"
        print(f"| {name} | {mode} | {mib:.1f} | {mib / buffer:.2f} | {pml:.1f} | {ratio} |" if pml else
              f"| {name} | {mode} | {mib:.1f} | {mib / buffer:.2f} | n/a | n/a |")


if __name__ == "__main__":
    main()
