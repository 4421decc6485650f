"""Compile every Triton kernel the triton backend launches, as it launches it, for a GPU (sm_90) on a
machine without one: Triton's own compiler down to ptxas (shipped with triton) catches what the
interpreter (TRITON_INTERPRET=1, which runs the tests) never compiles. Run without TRITON_INTERPRET.

    python tests/triton_compile_check.py

Every launch is intercepted: its arguments give the kernel's signature and compile-time constants
(the block sizes of a GPU run, as the host code picks them with the interpreter off), the kernel is
compiled for the target, and nothing runs; the host code goes on with unwritten outputs. The calls
cover every loss clean and under each mixup (embedding mixup over every pair set and label mode for
multi-similarity, over pos-neg for the others), float16 and bfloat16 inputs, proxy sides, and the
Gram kernels both with and without their Gram matrices (GRAM_WIDTHS). Prints one line per distinct
compiled kernel and "triton_compile_check: OK" at the end.
"""
from __future__ import annotations

import inspect
import os
import sys
import time
from unittest import mock

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the interpreter compiles nothing")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from metrix_kernels import FAMILY, ops  # noqa: E402
from metrix_kernels.backends.triton import gram as triton_gram  # noqa: E402
from metrix_kernels.family import resolve  # noqa: E402
from metrix_kernels.pairs import PAIR_SETS, MixPlan, batch_pairs, hard_negative_plan  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
            torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}
COMPILED: dict[tuple, float] = {}


def _signature(kernel: JITFunction, args, kwargs):
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constants = {}, {}
    for param in kernel.params:
        value = bound.arguments[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constants[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTERS[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {param.name} of type {type(value).__name__}")
    return signature, constants


def _compile_instead(self, *args, grid=None, warmup=False, **kwargs):
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    signature, constants = _signature(self, args, kwargs)
    key = (self.fn.__module__, self.fn.__name__, tuple(signature.items()),
           tuple(sorted((k, repr(v)) for k, v in constants.items())), tuple(sorted(options.items())))
    if key not in COMPILED:
        begin = time.perf_counter()
        triton.compile(ASTSource(self, signature, constants), target=TARGET, options=options)
        COMPILED[key] = time.perf_counter() - begin
        shown = ", ".join(f"{k}={v}" for k, v in constants.items() if v is not None)
        print(f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__} ({shown}): {COMPILED[key]:.1f} s",
              flush=True)


def _fwd_bwd(loss: torch.Tensor, *leaves) -> None:
    torch.autograd.grad(loss, [x for x in leaves if x is not None])


def main():
    JITFunction.run = _compile_instead
    gen = torch.Generator().manual_seed(0)
    b, d = 24, 40
    labels = torch.arange(b) // 4
    for name in sorted(FAMILY):
        row, terms, _ = resolve(name, {})
        for dtype in (torch.float32, torch.float16, torch.bfloat16) if name == "multi_similarity" else (torch.float32,):
            emb = torch.randn(b, d, generator=gen).to(dtype).requires_grad_(True)
            proxies = torch.randn(8, d, generator=gen).to(dtype).requires_grad_(True) if row.uses_proxies else None
            _fwd_bwd(ops.clean_loss(row, terms, emb, labels, proxies, "triton"), emb, proxies)
            # every pair set and label mode for one loss; the others' sigmas under pos-neg
            full = name == "multi_similarity" and dtype == torch.float32
            for pair_set in PAIR_SETS if full else ("pos-neg",):
                for mode in ("interpolate", "negative") if full else ("interpolate",):
                    plan = MixPlan(*batch_pairs(labels, pair_set), 0.3, pair_set, mode)
                    _fwd_bwd(ops.error_function(row, terms, emb, labels, proxies, plan, "embedding", weight=0.4,
                                                backend="triton"), emb, proxies)
        emb = torch.randn(b, d, generator=gen).requires_grad_(True)
        proxies = torch.randn(8, d, generator=gen).requires_grad_(True) if row.uses_proxies else None
        features = torch.randn(b, 16, 7, 7, generator=gen).requires_grad_(True)
        head = torch.nn.Linear(16, d)
        plan = MixPlan(*batch_pairs(labels, "pos-neg"), 0.3, "pos-neg", "dominant")
        _fwd_bwd(ops.error_function(row, terms, emb, labels, proxies, plan, "feature", features, head,
                                    backend="triton"), emb, proxies, features)
        inputs = torch.randn(b, 5, generator=gen)
        model = torch.nn.Linear(5, d)
        plan = hard_negative_plan(emb.detach(), labels, "pos-neg", 0.3, "interpolate", 3)
        _fwd_bwd(ops.error_function(row, terms, emb, labels, proxies, plan, "input", inputs=inputs, model=model,
                                    backend="triton"), emb, proxies)
    # past GRAM_WIDTHS the Gram kernels recompute their similarity tiles: that variant too
    row, terms, _ = resolve("multi_similarity", {})
    with mock.patch.object(triton_gram, "GRAM_WIDTHS", 0):
        for dtype in (torch.float32, torch.float16):
            emb = torch.randn(b, d, generator=gen).to(dtype).requires_grad_(True)
            plan = MixPlan(*batch_pairs(labels, "pos-neg"), 0.3, "pos-neg", "interpolate")
            _fwd_bwd(ops.error_function(row, terms, emb, labels, None, plan, "embedding", backend="triton"), emb)
    total = sum(COMPILED.values())
    print(f"{len(COMPILED)} kernels compiled for {TARGET.backend} sm_{TARGET.arch} in {total:.0f} s")
    print("triton_compile_check: OK")


if __name__ == "__main__":
    main()
