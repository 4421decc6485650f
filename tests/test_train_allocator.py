"""metrix-train's malloc settings (train/allocator.py): on glibc, buffers freed by one step stay
in the process for the next one instead of going back to the system; elsewhere nothing changes."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# In a fresh process (the settings are process-wide): rounds of five 8 MiB buffers, allocated,
# touched and freed; prints by how many MiB the process's data segment (VmData) shrank after each
# free. Virtual size, so unaffected by the machine reclaiming resident pages.
_ROUNDS = """
import json, sys, torch
from metrix_kernels.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def data_mib():
    return next(int(line.split()[1]) >> 10 for line in open("/proc/self/status") if line.startswith("VmData:"))
shrunk = []
for _ in range(3):
    buffers = [torch.empty(2 << 20).fill_(1.0) for _ in range(5)]
    peak = data_mib()
    del buffers
    shrunk.append(peak - data_mib())
print(json.dumps(shrunk))
"""


def _shrunk(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's mallopt")
def test_freed_buffers_stay_in_the_process():
    # glibc's defaults serve 8 MiB blocks by mmap at first and unmap them on free (the next step
    # faults their pages in again); kept, nothing is given back
    assert _shrunk("default")[0] >= 30
    assert _shrunk("keep") == [0, 0, 0]


@pytest.mark.skipif(platform.libc_ver()[0] == "glibc", reason="off glibc only")
def test_nothing_is_changed_off_glibc():
    from metrix_kernels.train.allocator import keep_freed_memory

    assert keep_freed_memory() is False
