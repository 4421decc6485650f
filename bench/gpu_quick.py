"""The direct timing table of bench/results/gpu-h200.md, section 2 (run there as an inline script).

    python bench/gpu_quick.py        # on a GPU machine, pytorch-metric-learning importable

Multi-similarity, d = 512, labels 4 per class: PML clean vs metrix_loss clean and clean + 0.4 x
embedding mixup over all pos-neg pairs (lam = 0.4) for each GPU backend and, up to B = 1024, the
reference. Per cell: (ms per fwd+bwd, mean of n calls after a warm-up; peak MB above the inputs).
"""
import torch
from pytorch_metric_learning import losses as L

from metrix_kernels import metrix_loss


def timed(fn, n):
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / n, 3), round(peak, 1)


def main():
    for b in (256, 1024, 4096, 8192):
        x = torch.randn(b, 512, device="cuda", requires_grad=True)
        y = torch.arange(b, device="cuda") // 4
        pml = L.MultiSimilarityLoss()
        row = {"pml_clean": timed(lambda: pml(x, y).backward(), 5)}
        backends = ("triton", "cuda") + (("reference",) if b <= 1024 else ())
        for backend in backends:
            for mixup in (None, "embedding"):
                try:
                    row[f"{backend}_{mixup}"] = timed(lambda: metrix_loss(
                        x, y, mixup=mixup, pairs="pos-neg", lam=0.4, backend=backend).backward(), 3)
                except Exception as err:  # a backend missing on this machine: say so in the row
                    row[f"{backend}_{mixup}"] = repr(err)[:100]
        print("ROW", b, row, flush=True)


if __name__ == "__main__":
    main()
