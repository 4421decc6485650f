"""What the op modules share: the backend module behind a name, and KernelConfig as flat op arguments.

torch.library ops take only tensors and scalars, so a KernelConfig travels as (forms, inputs,
scales, shifts, member, label_mode, mixed_rows, count_nonzero) and is rebuilt on the other side.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from ..backends import KernelConfig
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


def with_autograd(op, backward, setup_context):
    """Registers (backward, setup_context) as op's autograd formula and returns how to call op.

    Eager calls go through an autograd.Function with that same formula: torch's wrapper for a
    custom op's registered formula costs about 0.1 ms per call here (it rebuilds the schema's
    argument list once per argument). torch.compile traces the registered formula instead, as
    dynamo cannot trace an autograd.Function given one tensor twice (rows is cols in a clean loss).
    """
    op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = op(*inputs)
            setup_context(ctx, inputs, output)
            return output

    Eager.backward = staticmethod(backward)

    def call(*inputs):
        return op(*inputs) if torch.compiler.is_compiling() else Eager.apply(*inputs)

    return call
