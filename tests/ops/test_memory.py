"""Peak loss memory of the triton path at a GPU's tile and chunk sizes, as bench/memory_peak.py counts
it (the allocations a GPU run makes, on CPU tensors with the Triton launches as no-ops)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parents[2] / "bench" / "memory_peak.py"


def test_peak_memory_in_batch_buffers(tmp_path):
    """At B = 8 d (the Gram op recomputes its tiles there, as at B = 8192, d = 512), in [B, d] float32
    buffers above the inputs: the clean loss and Metrix each hold their new gradient and half a buffer
    of derivatives, under 2 (3 and 4 when the pair ops took normalized copies, Metrix a class-sorted
    copy too, and its clean and mixed ops made a gradient each)."""
    out = tmp_path / "peak.json"
    subprocess.run([sys.executable, str(SCRIPT), "--batch", "2048", "--dim", "256", "--json", str(out)], check=True,
                   capture_output=True)
    peaks = {(row["loss"], row["mode"]): row["buffers"] for row in json.loads(out.read_text())}
    for loss in ("multi_similarity", "contrastive"):
        assert peaks[loss, "clean"] < 2.0
        assert peaks[loss, "embedding"] < 2.0
