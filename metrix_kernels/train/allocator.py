"""metrix-train's malloc settings: freed step buffers stay in the process for the next step.

A training step allocates and frees the same large buffers every step (activations, and under
Metrix the [M, C] / [M, d] buffers of the M mixed examples). glibc's default serves blocks from
128 KiB up to an adaptive threshold by mmap and returns the top of its heap to the system once
more than twice that threshold is free, so on the CPU each step faults the pages of its buffers
in again: on the 2-core test machine 300-510 page faults per Metrix/feature step of the digits
model, 60-180 per clean step, about none with the settings below. There a fault costs
microseconds, and over ten alternating pairs of runs the settings took the feature step from
1.25x-1.28x of the clean step to 1.21x-1.25x (bench/results/reproduction-digits.md).
Fixed thresholds keep those pages mapped and reused, as a caching allocator does: the process
keeps up to TRIM_THRESHOLD of freed heap instead of shrinking between steps. Used by metrix-train
and the scripts that time its steps, never by the library itself: a process-wide setting is the
application's choice.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the most glibc's own adaptive threshold reaches; larger blocks still come from mmap
TRIM_THRESHOLD = 64 << 20


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; False off glibc, or where mallopt refuses one."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the process runs on
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
