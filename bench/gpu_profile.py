"""Where the GPU time goes: the CUDA kernels of a few fused calls, by total time (torch.profiler).

    python bench/gpu_profile.py [--backend triton] > profile.txt

Cases: Metrix multi-similarity (clean + embedding mixup over pos-neg pairs, lam = 0.4) at B = 256 and
B = 8192, d = 512 (at B = 256 also the host-side ops by CPU time); one ResNet-50 training step
(B = 100, 224 px, synthetic batch), clean and with Metrix/feature mixup, kernels by self time so the
two can be set side by side. Each case runs twice to warm up, then once under the profiler.
First, without the profiler: the host's cost per launch (a torch op, Triton kernels with few and with
as many arguments as ours) and per Metrix call, and the mixed pooling alone at the ResNet-50 shape.
"""
from __future__ import annotations

import argparse
import time

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

from metrix_kernels import MetrixLoss, metrix_loss
from metrix_kernels.ops import mixpool
from metrix_kernels.train.loop import train_step
from metrix_kernels.train.model import build_model


def loss_case(b, backend, mixup="embedding"):
    gen = torch.Generator().manual_seed(b)
    emb = torch.randn(b, 512, generator=gen).cuda().requires_grad_(True)
    labels = (torch.arange(b) // 4).cuda()

    def call():
        emb.grad = None
        metrix_loss(emb, labels, loss="multi_similarity", mixup=mixup, pairs="pos-neg", lam=0.4,
                    backend=backend).backward()
    return call


def step_case(backend, mixup):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, 224, 224, generator=gen).cuda()
    y = torch.randint(100, (100,), generator=gen).cuda()
    model = build_model("resnet50", 512, None, freeze_bn=True).cuda().train()
    criterion = MetrixLoss("multi_similarity", mixup=mixup, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    return lambda: train_step(model, criterion, optimizer, x, y, mixup, generator, 10.0)


@triton.jit
def _narrow(out, value):
    tl.store(out, value)


@triton.jit
def _wide(out, p1, p2, p3, p4, p5, p6, p7, n0, n1, n2, n3, x0, x1, x2, x3, x4, x5, C0: tl.constexpr,
          C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr, C5: tl.constexpr,
          C6: tl.constexpr, C7: tl.constexpr, C8: tl.constexpr, C9: tl.constexpr):
    """As many arguments as the Gram kernels take (pointers, sizes, floats, compile-time codes)."""
    tl.store(out, x0 + n0 + C0)


def host_us(fn, calls):
    """Host microseconds per call of fn, back to back, with one sync at the end."""
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - begin) / calls


def host_costs(backend):
    x = torch.zeros(16, device="cuda")
    codes = dict(C0=0, C1=1, C2=2, C3=0, C4=1, C5=2, C6=0, C7=1, C8=2, C9=16)
    cases = {
        "torch op (x.add_(1))": (lambda: x.add_(1), 2000),
        "Triton kernel, 2 arguments": (lambda: _narrow[(1,)](x, 1.0), 2000),
        "Triton kernel, 28 arguments (10 compile-time)": (
            lambda: _wide[(1,)](x, x, x, x, x, x, x, x, 256, 256, 512, 16, 0.4, 0.4, 2.0, 0.5, 40.0, 0.5, **codes),
            2000),
    }
    cases["Metrix call (fwd+bwd), B = 256"] = (loss_case(256, backend), 200)
    cases["clean call (fwd+bwd), B = 256"] = (loss_case(256, backend, mixup=None), 200)
    print("\n## Host time per call, no profiler (back to back, one sync at the end)\n")
    for name, (fn, calls) in cases.items():
        print(f"- {name}: {host_us(fn, calls):.1f} us")


def mixpool_alone(backend):
    """The mixed pooling's forward and backward at the ResNet-50 feature step's shape, all 9900 pairs."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(100, 2048, 7, 7, generator=gen).cuda().requires_grad_(True)
    i, j = (torch.ones(100, 100) - torch.eye(100)).nonzero().unbind(1)
    i, j = i.cuda(), j.cuda()
    grad = torch.randn(i.shape[0], 2048, generator=gen).cuda()
    reads = 2 * i.shape[0] * features[0].numel() * 4

    def forward():
        return mixpool(features, i, j, 0.4, backend)

    def both():
        torch.autograd.backward(forward(), grad)

    times = {}
    for name, fn in (("forward", forward), ("forward + backward", both)):
        fn()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        times[name] = begin.elapsed_time(end) / 10
    print("\n## Mixed pooling alone: B = 100, C = 2048, 7 x 7, M = 9900 pairs, float32\n")
    print(f"- forward: {times['forward']:.2f} ms, {reads / times['forward'] / 1e9:.0f} GB/s of map reads "
          f"({reads / 1e9:.1f} GB)")
    print(f"- backward: {times['forward + backward'] - times['forward']:.2f} ms")


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
    host_costs(args.backend)
    mixpool_alone(args.backend)
    for b in (256, 8192):
        report(f"multi_similarity clean + embedding mixup, B = {b}", loss_case(b, args.backend), host=b == 256)
    for mixup in (None, "feature"):
        report(f"ResNet-50 step, {mixup or 'clean'}, B = 100", step_case(args.backend, mixup), rows=25,
               sort_by="self_cuda_time_total")


if __name__ == "__main__":
    main()
