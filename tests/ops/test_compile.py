"""torch.compile traces the custom ops through their fake implementations (no graph breaks), and the
fakes declare what the kernels return (torch.library.opcheck)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from metrix_kernels import metrix_loss, ops
from metrix_kernels.backends import MEMBER_ALL_BUT_SELF, MEMBER_RULES, KernelConfig
from metrix_kernels.ops._dispatch import flatten, pair_inputs
from metrix_kernels.pairs import MixPlan, batch_pairs

from .conftest import DEVICE
from .helpers import close, grads, leaves, loss, skip_unless_usable


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_compiled_ops_match_eager(device, backend):
    skip_unless_usable(backend)
    row, terms = loss("multi_similarity")
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(3, (9,), generator=gen).to(device)
    i, j = batch_pairs(labels, "pos-neg")
    plan = MixPlan(i, j, 0.3, "pos-neg", "interpolate")
    features = torch.randn(9, 4, 2, 2, generator=gen).to(device)
    head = torch.randn(5, 4, generator=gen).to(device)

    def total(emb, feats):
        clean = ops.clean_loss(row, terms, emb, labels, None, backend)
        mixed = ops.mixed_loss(row, terms, emb, labels, None, plan, "embedding", backend=backend)
        pooled = ops.mixpool(feats, plan.i, plan.j, plan.lam, backend)
        return clean + mixed + (pooled @ head.T).square().mean()

    compiled = torch.compile(total, backend="aot_eager", fullgraph=True)
    emb = torch.randn(9, 5, generator=gen).to(device)
    a = leaves(emb, features)
    b = leaves(emb, features)
    got, want = compiled(*a), total(*b)
    close(got, want)
    for x, y in zip(grads(got, a), grads(want, b)):
        close(x, y)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_fakes_match_kernels(device, backend):
    skip_unless_usable(backend)
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(3, (7,), generator=gen).to(device)
    index = torch.arange(7, device=device)
    emb = torch.nn.functional.normalize(torch.randn(7, 5, generator=gen), dim=1).to(device).requires_grad_(True)
    i, j = batch_pairs(labels, "pos-neg")
    _, terms = loss("multi_similarity")
    flat = flatten(KernelConfig(terms.sigma_pos, terms.sigma_neg, MEMBER_ALL_BUT_SELF))
    mixed = flatten(KernelConfig(terms.sigma_pos, terms.sigma_neg, MEMBER_RULES["pos-neg"]))
    rows, _, norm, _ = pair_inputs(backend, emb, emb)  # as the ops hand them to this backend
    torch.library.opcheck(torch.ops.metrix.pairwise.default,
                          (rows, labels, labels, index, rows, labels, labels, index, None, norm, norm, 1.0, *flat,
                           backend))
    torch.library.opcheck(torch.ops.metrix.gram_mixed.default,
                          (rows, labels, index, rows, labels, norm, norm, None, 0.3, *mixed, backend))
    if backend == "triton":  # the backends that have it
        order = torch.argsort(labels, stable=True)
        torch.library.opcheck(torch.ops.metrix.clean_and_gram.default,
                              (rows, labels, labels[order], norm, order, 0.3, *flat, *mixed, backend))
    for positions in ((2, 2), (16, 17)):  # the cpu backend's uint8 and int32 argmax
        features = torch.randn(7, 3, *positions, generator=gen).to(device).requires_grad_(True)
        torch.library.opcheck(torch.ops.metrix.mixpool.default, (features, i, j, 0.3, backend))


def test_metrix_loss_compiles_whole_on_first_call(device):
    """torch.compile(fullgraph=True) around metrix_loss before any eager call (a fresh process, where
    the library has imported no backend yet): one graph, fused ops included, no graph break; also for
    a proxy loss, whose mixed rows have a data-dependent count."""
    script = textwrap.dedent(f"""
        import torch
        from metrix_kernels import metrix_loss

        emb = torch.randn(12, 5, device="{device}", requires_grad=True)
        labels = torch.arange(12, device="{device}") // 3
        proxies = torch.randn(4, 5, device="{device}")
        for loss, extra in (("multi_similarity", {{}}), ("proxy_nca", {{"proxies": proxies}})):
            torch._dynamo.reset()
            step = torch.compile(lambda e, y: metrix_loss(e, y, loss=loss, pairs="pos-neg", lam=0.4, **extra),
                                 backend="aot_eager", fullgraph=True)
            step(emb, labels).backward()
            assert torch.isfinite(emb.grad).all()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mixup", [None, "embedding"])
def test_reduce_overhead_training_loop(mixup):
    """torch.compile(mode="reduce-overhead") (CUDA graphs) around metrix_loss, its gradients set to None
    before each step as optimizer.zero_grad does (a graph's replay rewrites the memory of the last
    step's outputs, the stolen gradient included): every replayed step gives the eager gradient."""
    torch._dynamo.reset()
    emb = torch.randn(64, 32, device="cuda", requires_grad=True)
    labels = torch.arange(64, device="cuda") // 4

    def objective(e, y):
        return metrix_loss(e, y, loss="multi_similarity", mixup=mixup, pairs="pos-neg", lam=0.4, backend="triton")

    want = torch.autograd.grad(objective(emb, labels), emb)[0]
    step = torch.compile(objective, mode="reduce-overhead")
    for _ in range(4):  # warm-up, recording, replays
        emb.grad = None
        step(emb, labels).backward()
        close(emb.grad, want)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_whole_call_captures_in_a_cuda_graph():
    """The eager fused call, forward and backward, captured in one CUDA graph (a pair-based loss with
    embedding mixup makes no host sync): replays on new data copied into the captured inputs give the
    eager gradients."""
    gen = torch.Generator().manual_seed(11)
    batches = [(torch.randn(48, 32, generator=gen).cuda(), (torch.randperm(48, generator=gen) // 4).cuda())
               for _ in range(3)]
    emb = batches[0][0].clone().requires_grad_(True)
    labels = batches[0][1].clone()

    def step():
        metrix_loss(emb, labels, loss="multi_similarity", mixup="embedding", pairs="pos-neg", lam=0.4,
                    backend="triton").backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) off the capturing stream
        step()
    torch.cuda.current_stream().wait_stream(side)
    emb.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for x, y in batches[1:]:
        with torch.no_grad():
            emb.copy_(x)
        labels.copy_(y)
        graph.replay()
        leaf = x.clone().requires_grad_(True)
        want = torch.autograd.grad(metrix_loss(leaf, y, loss="multi_similarity", mixup="embedding", pairs="pos-neg",
                                               lam=0.4, backend="triton"), leaf)[0]
        close(emb.grad, want)
