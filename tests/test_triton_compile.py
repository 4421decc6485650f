"""CI: every Triton kernel the triton backend launches compiles for sm_90 (tests/triton_compile_check.py),
which the interpreter that runs the other tests never checks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "triton_compile_check.py"


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "triton_compile_check: OK" in done.stdout
