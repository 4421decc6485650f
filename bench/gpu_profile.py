"""Where the GPU time goes: the CUDA kernels of a few fused calls, by total time (torch.profiler).

    python bench/gpu_profile.py [--backend triton] > profile.txt

Cases: Metrix multi-similarity (clean + embedding mixup over pos-neg pairs, lam = 0.4) at B = 256 and
B = 8192, d = 512 (at B = 256 also the host-side ops by CPU time); one ResNet-50 training step
(B = 100, 224 px, synthetic batch), clean and with Metrix/feature mixup, kernels by self time so the
two can be set side by side. Each case runs twice to warm up, then once under the profiler.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from metrix_kernels import MetrixLoss, metrix_loss
from metrix_kernels.train.loop import train_step
from metrix_kernels.train.model import build_model


def loss_case(b, backend):
    gen = torch.Generator().manual_seed(b)
    emb = torch.randn(b, 512, generator=gen).cuda().requires_grad_(True)
    labels = (torch.arange(b) // 4).cuda()
    return lambda: metrix_loss(emb, labels, loss="multi_similarity", mixup="embedding", pairs="pos-neg", lam=0.4,
                               backend=backend).backward()


def step_case(backend, mixup):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, 224, 224, generator=gen).cuda()
    y = torch.randint(100, (100,), generator=gen).cuda()
    model = build_model("resnet50", 512, None, freeze_bn=True).cuda().train()
    criterion = MetrixLoss("multi_similarity", mixup=mixup, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    return lambda: train_step(model, criterion, optimizer, x, y, mixup, generator, 10.0)


def report(name, fn, rows=12, host=False, sort_by="cuda_time_total"):
    """The call's CUDA kernels by time; with host, also its host-side ops by CPU time (where a
    launch-bound call spends its time)."""
    fn()
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n## {name}\n")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60))
    if host:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=2 * rows, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "backend", args.backend)
    for b in (256, 8192):
        report(f"multi_similarity clean + embedding mixup, B = {b}", loss_case(b, args.backend), host=b == 256)
    for mixup in (None, "feature"):
        report(f"ResNet-50 step, {mixup or 'clean'}, B = 100", step_case(args.backend, mixup), rows=25,
               sort_by="self_cuda_time_total")


if __name__ == "__main__":
    main()
