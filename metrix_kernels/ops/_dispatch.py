"""What the op modules share: the backend module behind a name, KernelConfig as flat op arguments, and
row normalization for the pair ops' inputs.

torch.library ops take only tensors and scalars, so a KernelConfig travels as (forms, inputs,
scales, shifts, member, label_mode, mixed_rows, count_nonzero) and is rebuilt on the other side.
"""
from __future__ import annotations

import importlib
from functools import lru_cache, wraps
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..backends import UNIT_ROWS_BACKENDS, KernelConfig
from ..family import Sigma

FORMS = ("exp", "hinge", "softplus")
INPUTS = ("s", "d", "d2")


@lru_cache(maxsize=None)
def backend_module(name: str):
    return importlib.import_module(f"metrix_kernels.backends.{name}")


def flatten(cfg: KernelConfig) -> tuple:
    p, n = cfg.sigma_pos, cfg.sigma_neg
    return (
        [FORMS.index(p.form), INPUTS.index(p.of), FORMS.index(n.form), INPUTS.index(n.of)],
        [float(p.scale), float(p.shift), float(n.scale), float(n.shift)],
        [int(cfg.member), int(cfg.label_mode), int(cfg.mixed_rows), int(cfg.count_nonzero)],
    )


def unflatten(codes: list[int], scalars: list[float], flags: list[int]) -> KernelConfig:
    return KernelConfig(
        Sigma(FORMS[codes[0]], INPUTS[codes[1]], scalars[0], scalars[1]),
        Sigma(FORMS[codes[2]], INPUTS[codes[3]], scalars[2], scalars[3]),
        member=flags[0],
        label_mode=flags[1],
        mixed_rows=bool(flags[2]),
        count_nonzero=bool(flags[3]),
    )


def _dense(kernel: Callable) -> Callable:
    """kernel with its outputs made dense, as its fake implementation declares them: a backward may
    return memory-free expanded zeros for the second side of an op whose two sides are one tensor,
    which compiled code must not read with the fake's strides."""

    def run(*args):
        out = kernel(*args)
        return out.contiguous() if isinstance(out, torch.Tensor) else tuple(x.contiguous() for x in out)

    return run


def none_if_free_zeros(grad: Tensor) -> Optional[Tensor]:
    """None for the memory-free expanded zeros a backend returns for the second side of an op whose
    two sides are one tensor (every stride 0): autograd then adds nothing where it would add zeros."""
    return None if grad.dim() and not any(grad.stride()) else grad


def autocast_off(kernel: Callable) -> Callable:
    """kernel run with autocast off on its tensors' device. The kernels compute in the dtypes they are
    given (half inputs accumulate in float32); under a caller's autocast region their own torch ops
    (products, norms) would be recast to half, which the cpu extension refuses and which would change
    the numbers."""

    @wraps(kernel)
    def run(*args):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), None)
        if device is None or not torch.is_autocast_enabled(device):
            return kernel(*args)
        with torch.autocast(device, enabled=False):
            return kernel(*args)

    return run


def first_order(backward: Callable) -> Callable:
    """backward of kernels whose gradients are not differentiable again. A double backward
    (create_graph=True) raises: autograd would otherwise take the gradient for a constant, since it
    flows from the loss's own gradient, which needs none (torch's once_differentiable lets that pass)."""

    @wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("the fused backends compute first-order gradients only: for a double backward "
                               "(create_graph=True) use backend='reference'")
        return backward(ctx, *grads)

    return run


class Kernels(NamedTuple):
    forward: Callable
    backward: Callable


def fused_op(name: str, forward: Callable, forward_fake: Callable, backward_kernel: Callable, backward_fake: Callable,
             setup_context: Callable, backward: Callable) -> Callable:
    """Registers forward and backward_kernel as the custom ops ``name`` and ``name``_backward (with
    their fake implementations) and (backward, setup_context) as the first one's autograd formula,
    whose backward reaches its kernel as ctx.kernels.backward. Returns how to call the op.

    torch.compile traces the registered ops. Eager calls run the same functions directly, inside an
    autograd.Function with the same formula: the custom-op dispatch costs about 0.1 ms per call and
    direction (its autograd wrapper rebuilds the schema's argument list once per argument), and dynamo
    cannot trace that autograd.Function itself when one tensor is given twice (rows is cols).
    """
    schemas = [torch.library.infer_schema(f, mutates_args=()) for f in (forward, backward_kernel)]
    forward, backward_kernel = autocast_off(forward), autocast_off(backward_kernel)
    ops = Kernels(torch.library.custom_op(name, forward, mutates_args=(), schema=schemas[0]),
                  torch.library.custom_op(f"{name}_backward", _dense(backward_kernel), mutates_args=(),
                                          schema=schemas[1]))
    ops.forward.register_fake(forward_fake)
    ops.backward.register_fake(backward_fake)
    direct = Kernels(forward, backward_kernel)

    def setup(kernels: Kernels) -> Callable:
        def run(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.kernels = kernels

        return run

    ops.forward.register_autograd(backward, setup_context=setup(ops))
    eager_setup = setup(direct)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            eager_setup(ctx, inputs, output)
            return output

    Eager.backward = staticmethod(first_order(backward))

    def call(*inputs):
        return ops.forward(*inputs) if torch.compiler.is_compiling() else Eager.apply(*inputs)

    return call


class UnitRows(torch.autograd.Function):
    """F.normalize(x, dim=-1), eps 1e-12, by the backend's own kernels where it has them
    (unit_rows_forward / unit_rows_backward: one pass each way), else with a backward of two passes
    over x (autograd through F.normalize takes about eight, a cost that shows on the [M, d] mixed rows)."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, kernels):
        if kernels is not None:
            y, norm = kernels.unit_rows_forward(x)
        else:
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
            y = x / norm
        ctx.save_for_backward(y, norm)
        ctx.kernels = kernels
        return y

    @staticmethod
    @autocast_off
    def backward(ctx, grad):
        y, norm = ctx.saved_tensors
        if ctx.kernels is not None:
            return ctx.kernels.unit_rows_backward(grad, y, norm), None
        # d y / d x = (I - y y^T) / |x|, or I / eps where the norm is clamped (as torch's clamp_min)
        along = torch.linalg.vecdot(grad, y, dim=-1).unsqueeze(-1) * (norm > 1e-12)
        return torch.addcmul(grad, y, along, value=-1).div_(norm), None


def normalize(x: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    # compiled code traces the torch formula: the backend's kernels are not ops it can trace
    kernels = None if torch.compiler.is_compiling() else backend_module(backend)
    return UnitRows.apply(x.to(dtype), kernels if hasattr(kernels, "unit_rows_forward") else None)


def row_norms(x: Tensor) -> Tensor:
    """[N] |x| in float32 (the kernels clamp it at F.normalize's 1e-12)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)


def pair_inputs(backend: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(a, b, a's norms, b's norms) as the backend's pair ops take them: contiguous raw rows and their
    norms where the backend normalizes rows itself (UNIT_ROWS_BACKENDS: no [N, d] unit rows are
    written), else rows normalized here and no norms; one tensor for both when b is a."""
    a = a.contiguous()
    b = a if b is a else b.contiguous()
    if backend in UNIT_ROWS_BACKENDS:
        a_norm = row_norms(a)
        return a, b, a_norm, a_norm if b is a else row_norms(b)
    unit_a = normalize(a, a.dtype, backend)
    return unit_a, unit_a if b is a else normalize(b, b.dtype, backend), None, None


def unit_kwargs(first: Optional[Tensor], second: Optional[Tensor], order: Optional[Tensor] = None) -> dict:
    """The keywords the pair functions of UNIT_ROWS_BACKENDS take the norms (and the Gram op's order)
    by (backends contract); none for other backends, whose rows come normalized (and permuted)."""
    kwargs = {} if first is None else {"norms": (first, second)}
    if order is not None:
        kwargs["order"] = order
    return kwargs
