"""fwd+bwd time and peak memory of every loss, clean and with each mixup type: backend "cpu" vs
the reference vs pytorch-metric-learning. Run through bench/cpu_report.py, which writes the table
and the plot; see bench/cpu_cases.py for what is measured and how."""
from __future__ import annotations

import pytest
import torch

from cpu_cases import Case, peak_bytes, pin_malloc, runnable
from metrix_kernels import FAMILY

pin_malloc()
MIXUPS = (None, "embedding", "feature", "input")


@pytest.mark.parametrize("impl", ["cpu", "reference", "pml"])
@pytest.mark.parametrize("mixup", MIXUPS, ids=lambda m: m or "clean")
@pytest.mark.parametrize("loss", sorted(FAMILY))
def test_fwd_bwd(benchmark, loss, mixup, impl, batch):
    why = runnable(impl, loss, mixup, batch)
    if why:
        pytest.skip(why)
    case = Case(loss, mixup, batch)
    step = case.step(impl)
    step()  # warm-up: thread pools, first-call dispatch
    benchmark.extra_info.update(
        loss=loss, mixup=mixup or "clean", impl=impl, batch=batch, peak_bytes=peak_bytes(step),
        threads=torch.get_num_threads(),
    )
    rounds = 5 if batch <= 256 else 2
    benchmark.pedantic(step, rounds=rounds, iterations=1)
