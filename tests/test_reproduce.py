"""python/reproduce.py end to end on a tiny grid: one table of mean ± spread per cell, beside the
published numbers, and the reading of an existing table file kept when it is rewritten."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_reproduce_writes_the_grid_and_keeps_the_reading(tmp_path):
    table = tmp_path / "table.md"
    table.write_text("# old table\n\n| stale | row |\n\n## Reading\n\nThe reading stays.\n")
    extra = "--backend reference --max-steps-per-epoch 2 --reservoir-size 50 --positivity-batches 1"
    subprocess.run([sys.executable, str(ROOT / "python" / "reproduce.py"), "--losses", "multi_similarity,contrastive",
                    "--methods", "baseline,metrix/embedding", "--seeds", "0,1", "--epochs", "1",
                    "--runs", str(tmp_path / "runs"), "--table", str(table), "--extra", extra],
                   check=True, timeout=600, cwd=ROOT)
    text = table.read_text()
    assert "stale" not in text and text.endswith("## Reading\n\nThe reading stays.\n")
    assert re.search(r"load average \d+\.\d at the start, \d+\.\d at the end", text)
    cell = r"\d+\.\d\d ± \d+\.\d\d"
    for name in ("Multi-similarity", "Contrastive"):
        assert re.search(rf"^\| {name} \| {cell} \| {cell} \|$", text, re.MULTILINE), name
        assert re.search(rf"^\| {name} \| \d+\.\d -> \d+\.\d \|", text, re.MULTILINE), name  # published
    runs = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*/results.json")]
    assert len(runs) == 8
    assert re.search(rf"^The same networks before training \(seeds 0, 1\): R@1 {cell}\.$", text, re.MULTILINE)
    for seed in (0, 1):  # one network per seed, whatever the loss and method
        assert len({json.dumps(r["untrained_recall"]) for r in runs if r["config"]["seed"] == seed}) == 1
