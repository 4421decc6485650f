"""metrix_loss on N gloo processes with a slice of the batch each equals one process on the whole batch.

Each configuration spawns its processes once and runs every case; the parent compares the saved
results with a single-process run. Checked: the loss on every rank, each owner's embedding
gradient (world_size times the single-process one, by the convention of
metrix_kernels.distributed), proxy gradients, and model parameter gradients after averaging over
ranks as DistributedDataParallel does (one case runs under DDP itself).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metrix_kernels import MetrixLoss, distributed, metrix_loss
from metrix_kernels.distributed import gather
from metrix_kernels.reference import pool

B, CLASSES, CHANNELS, DIM = 12, 4, 5, 4
SEED = 100  # rank r draws lam and the pair set from a generator seeded SEED + r; rank 0's must win

CASES = {
    "multi_similarity/embedding": dict(loss="multi_similarity", mixup="embedding"),
    "multi_similarity/clean": dict(loss="multi_similarity", mixup=None),
    "contrastive/feature": dict(loss="contrastive", mixup="feature", pairs="pos-neg", lam=0.3, neg_margin=0.5),
    "proxy_anchor/embedding": dict(loss="proxy_anchor", mixup="embedding", pairs="anc-neg"),
    "proxy_anchor/feature": dict(loss="proxy_anchor", mixup="feature"),
    "nca/input": dict(loss="nca", mixup="input", hard_negatives=2),
    "lifted_structure/neg-neg": dict(loss="lifted_structure", mixup="embedding", pairs="neg-neg"),
    "proxy_nca_pp/module": dict(loss="proxy_nca_pp", mixup="feature", module=True),
    "multi_similarity/input/ddp": dict(loss="multi_similarity", mixup="input", ddp=True),
}
CONFIGS = {"2-even": [6, 6], "3-uneven": [5, 1, 6]}


class Net(nn.Module):
    """A backbone to [N, C, H, W] feature maps and a head from pooled features to embeddings."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, CHANNELS, 3, padding=1)
        self.fc = nn.Linear(CHANNELS, DIM)

    def head(self, pooled):
        return self.fc(pooled)

    def forward(self, x):
        features = torch.tanh(self.conv(x))
        return self.head(pool(features)), features


def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.arange(B) % CLASSES
    return x, y[torch.randperm(B, generator=gen)]


def run_case(name, x, y, rank, group):
    """Loss and gradients of one case on this process's slice (the whole batch when group is None)."""
    case = dict(CASES[name])
    module, ddp = case.pop("module", False), case.pop("ddp", False)
    torch.manual_seed(1)  # the same initial parameters on every process
    net = Net().double()
    proxies = nn.Parameter(torch.randn(CLASSES, DIM, dtype=torch.float64))
    world = "world" if group is not None and group is dist.group.WORLD else group  # the lazy default group
    criterion = MetrixLoss(num_classes=CLASSES, embedding_size=DIM, process_group=world, **case).double()
    inner, rows = net, []

    def counted(fn):  # records how many mixed examples this process pushes through the network
        return lambda batch: rows.append(batch.shape[0]) or fn(batch)

    if ddp and group is not None:
        net = nn.parallel.DistributedDataParallel(net, process_group=group)
    embeddings, features = net(x)
    embeddings.retain_grad()
    mixup = case["mixup"]
    extra = {
        "feature": dict(features=features, head=counted(inner.head)),
        "input": dict(inputs=x, model=counted(lambda inputs: inner(inputs)[0])),
    }.get(mixup, {})
    generator = torch.Generator().manual_seed(SEED + rank)
    if module:
        loss = criterion(embeddings, y, generator=generator, **extra)
        proxies = criterion.proxies
    else:
        uses_proxies = case["loss"].startswith("proxy")
        loss = metrix_loss(
            embeddings, y, generator=generator, process_group=group,
            proxies=proxies if uses_proxies else None, **case, **extra,
        )
    loss.backward()
    grads = {k: p.grad.clone() for k, p in inner.named_parameters()}
    if group is not None and not ddp:
        world = dist.get_world_size(group)
        for g in grads.values():  # what DistributedDataParallel does
            dist.all_reduce(g, group=group)
            g /= world
    return {
        "loss": loss.detach(),
        "embeddings": embeddings.grad,
        "proxies": None if proxies.grad is None else proxies.grad.clone(),
        "params": grads,
        "mixed_rows": sum(rows),
    }


def _worker(rank, sizes, rendezvous, out):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=len(sizes))
    torch.set_num_threads(1)
    x, y = batch()
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    results = {name: run_case(name, x[mine], y[mine], rank, dist.group.WORLD) for name in CASES}
    # slices of 0 rows, as when there are fewer mixed examples than ranks; gloo sums gradients
    # with all_reduce, so the reduce_scatter that other backends use is forced for a second run
    backend_choice = distributed._reduce_scatter_ok
    for key, reduce_scatter in (("gather", False), ("gather/reduce_scatter", True)):
        distributed._reduce_scatter_ok = lambda group: reduce_scatter
        mine_rows = torch.arange(float(rank + 1) * (rank != 1), dtype=torch.float64).repeat(2, 1).T.requires_grad_()
        whole = gather(mine_rows, dist.group.WORLD)
        (whole * torch.arange(whole.numel(), dtype=torch.float64).view_as(whole)).sum().backward()
        results[key] = (whole.detach(), mine_rows.grad)
    distributed._reduce_scatter_ok = backend_choice
    # an explicit subgroup without rank 0: its first member (global rank 1) draws lam and the pairs
    sub = dist.new_group([1, len(sizes) - 1]) if len(sizes) > 2 else None
    if sub is not None and rank > 0:
        results["subgroup"] = run_case("multi_similarity/embedding", x[mine], y[mine], rank, sub)
    torch.save(results, f"{out}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ranks(request, tmp_path_factory):
    """(slice sizes, per-rank results) of one spawned configuration."""
    sizes = CONFIGS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    mp.spawn(_worker, args=(sizes, out / "rendezvous", out), nprocs=len(sizes), join=True)
    return sizes, [torch.load(out / f"{r}.pt") for r in range(len(sizes))]


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def _check(results, reference, sizes, world):
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    for rank, got in enumerate(results):
        _close(got["loss"], reference["loss"])
        owned = reference["embeddings"][starts[rank] : starts[rank] + sizes[rank]]
        _close(got["embeddings"], world * owned)
        if reference["proxies"] is not None:
            _close(got["proxies"], reference["proxies"])
        for key, grad in reference["params"].items():
            _close(got["params"][key], grad)
        # the mixed forward through the network is split across ranks, not repeated on each
        assert got["mixed_rows"] <= -(-reference["mixed_rows"] // world)
    assert sum(got["mixed_rows"] for got in results) == reference["mixed_rows"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradients_equal_one_process(ranks, name):
    sizes, results = ranks
    x, y = batch()
    _check([r[name] for r in results], run_case(name, x, y, 0, None), sizes, len(sizes))


@pytest.mark.parametrize("key", ["gather", "gather/reduce_scatter"])
def test_gather_with_empty_slices(ranks, key):
    sizes, results = ranks
    world = len(sizes)
    counts = [(r + 1) * (r != 1) for r in range(world)]
    expected = torch.cat([torch.arange(float(n), dtype=torch.float64) for n in counts]).repeat(2, 1).T
    weights = torch.arange(expected.numel(), dtype=torch.float64).view_as(expected)
    for rank, (whole, grad) in enumerate(results[r][key] for r in range(world)):
        _close(whole, expected)
        start = sum(counts[:rank])
        _close(grad, world * weights[start : start + counts[rank]])


def test_subgroup_broadcasts_from_its_first_rank(ranks):
    sizes, results = ranks
    if len(sizes) < 3:
        pytest.skip("needs a group that leaves rank 0 out")
    x, y = batch()
    members = [1, len(sizes) - 1]
    keep = torch.cat([torch.arange(sum(sizes[:r]), sum(sizes[: r + 1])) for r in members])
    reference = run_case("multi_similarity/embedding", x[keep], y[keep], 1, None)
    _check([results[r]["subgroup"] for r in members], reference, [sizes[r] for r in members], 2)


def test_no_group_changes_nothing():
    x, y = batch()
    e = torch.randn(B, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kwargs = dict(loss="multi_similarity", pairs="pos-neg", lam=0.4)
    assert torch.equal(metrix_loss(e, y, **kwargs), metrix_loss(e, y, process_group=None, **kwargs))


def test_bad_group_arguments():
    e, y = torch.randn(4, DIM), torch.tensor([0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="init_process_group"):
        metrix_loss(e, y, process_group="world")
    with pytest.raises(ValueError, match="process_group"):
        MetrixLoss(process_group="everyone")
    with pytest.raises(TypeError, match="process_group"):
        MetrixLoss(process_group=3)
