"""The loss over the global batch of a torch.distributed job (``metrix_loss(..., process_group=...)``).

Every rank gathers the embeddings and labels of all ranks (and the feature maps or inputs that
feature or input mixup mixes), agrees on rank 0's random choices of the call (pair set and lam),
and computes the same loss over the whole batch: anchors, candidates and mixed pairs range over
all ranks. Proxies are replicated parameters and are not gathered.

The mixed forward through ``head`` (feature mixup) or ``model`` (input mixup) is the one
expensive part that is not repeated on every rank: ``split_calls`` makes each rank run it on its
share of the mixed examples and gathers the results.

Gradient convention. ``gather``'s backward returns to each rank the SUM over ranks of the
gradients of its own slice (a reduce-scatter; an all-reduce on gloo). Every rank computes the
same global loss L, so whatever a rank computed before a gather (its embeddings, feature maps,
its share of the mixed forward) receives world_size * dL/d(it). DistributedDataParallel AVERAGES
parameter gradients over ranks, which cancels the factor: the model's parameter gradients equal
those of one process that computes L on the whole batch. Proxies are used after the gather,
identically on every rank, so they receive dL/dproxies on every rank, which averaging leaves
unchanged. In general the rule is DDP's own: parameter gradients are those of the mean over
ranks of the losses the ranks compute.

Every call is a collective: all ranks of the group must call the loss, and its backward, together.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

GroupArg = Union[None, str, "dist.ProcessGroup"]


def resolve_group(process_group: GroupArg):
    """None (single process), "world" (the default group, looked up at call time) or a ProcessGroup."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "world":
            raise ValueError(f"process_group must be None, 'world' or a ProcessGroup, got {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group='world' needs torch.distributed.init_process_group() first")
        return dist.group.WORLD
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be None, 'world' or a ProcessGroup, got {type(process_group).__name__}")
    return process_group


def check_group(process_group: GroupArg) -> None:
    """Validate a process_group argument without needing torch.distributed to be initialized yet."""
    if isinstance(process_group, str) and process_group == "world":
        return
    resolve_group(process_group)


def _sizes(x: torch.Tensor, group) -> list[int]:
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    out = [torch.empty_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, n, group=group)
    return [int(s) for s in out]


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _all_gather(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    # all_gather needs equal shapes on every rank: pad to the largest slice, then cut.
    rows = max(sizes)
    parts = [x.new_empty((rows, *x.shape[1:])) for _ in sizes]
    dist.all_gather(parts, _pad(x, rows), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _all_gather(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        rank, rows = dist.get_rank(ctx.group), max(ctx.sizes)
        chunks = [_pad(g, rows) for g in grad.split(ctx.sizes)]
        return _sum_over_ranks(chunks, rank, ctx.group)[: ctx.sizes[rank]], None, None


def _reduce_scatter_ok(group) -> bool:
    # gloo lacks reduce_scatter in older torch releases, and its newer one is an all_reduce per rank
    return dist.get_backend(group) != "gloo"


def _sum_over_ranks(chunks: list[torch.Tensor], rank: int, group) -> torch.Tensor:
    """This rank's chunk of the sum over ranks of ``chunks`` (equal shapes)."""
    if _reduce_scatter_ok(group):
        out = torch.empty_like(chunks[rank])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    total = torch.stack(chunks)
    dist.all_reduce(total, group=group)
    return total[rank]


def gather(x: torch.Tensor, group, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate ``x`` of every rank of ``group`` along dim 0, in rank order; slices may differ in
    length (``sizes``, exchanged when not given). Differentiable: the backward is a reduce-scatter
    (see the module docstring)."""
    sizes = list(sizes) if sizes is not None else _sizes(x, group)
    if not (x.dtype.is_floating_point or x.dtype.is_complex):
        return _all_gather(x, group, sizes)  # labels, token ids: nothing to differentiate
    return _Gather.apply(x, group, sizes)


def agree(pair_set: str, lam: float, group, device: torch.device) -> tuple[str, float]:
    """Rank 0's pair set and lam on every rank, so that all ranks mix the same pairs."""
    choice = torch.tensor([float(pair_set == "anc-neg"), lam], dtype=torch.float64, device=device)
    dist.broadcast(choice, src=dist.get_global_rank(group, 0), group=group)
    if pair_set in ("pos-neg", "anc-neg"):
        pair_set = "anc-neg" if choice[0].item() else "pos-neg"
    return pair_set, choice[1].item()


def split_calls(fn: Callable[[torch.Tensor], torch.Tensor], group) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` applied to a batch that every rank holds identically, each rank computing one contiguous
    share of its rows; the results are gathered, so every rank gets fn of the whole batch."""

    def split(x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        share, extra = divmod(x.shape[0], world)
        sizes = [share + (r < extra) for r in range(world)]
        start = sum(sizes[:rank])
        return gather(fn(x[start : start + sizes[rank]]), group, sizes)

    return split


def gather_batch(group, mixup, embeddings, labels, features, head, inputs, model):
    """The global batch: embeddings, labels and what the mixup type mixes, from every rank."""
    sizes = _sizes(embeddings, group)
    embeddings, labels = gather(embeddings, group, sizes), gather(labels, group, sizes)
    if mixup == "feature":
        features, head = gather(features, group, sizes), split_calls(head, group)
    if mixup == "input":
        inputs, model = gather(inputs, group, sizes), split_calls(model, group)
    return embeddings, labels, features, head, inputs, model
