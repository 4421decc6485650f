"""Results of a run: JSON, a markdown table, PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    cfg, final = results["config"], results["final"]
    ks = list(final["recall"])
    head = ["dataset", "loss", "method", *[f"R@{k}" for k in ks], "alignment", "uniformity",
            "utilization", "utilization (+mixed)", "step ms"]
    row = [cfg["dataset"], cfg["loss"], results["method"], *[f"{final['recall'][k]:.1f}" for k in ks],
           _fmt(final["alignment"]), _fmt(final["uniformity"]), _fmt(final["utilization"]),
           _fmt(final["utilization_mixed"]), _fmt(results["step_ms"], 1)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", ""]
    if results.get("untrained_recall"):
        before = "  ".join(f"R@{k} {v:.1f}" for k, v in results["untrained_recall"].items())
        lines += [f"The network before training: {before}.", ""]
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    points = [(h["epoch"], h["recall"]["1"]) for h in results["history"] if "recall" in h]
    if results.get("untrained_recall"):
        points.insert(0, (0, results["untrained_recall"]["1"]))
    epochs, r1 = [e for e, _ in points], [r for _, r in points]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, r1, marker="o")
    ax.set(xlabel="epoch", ylabel="Recall@1 (%)", title=f"{results['config']['dataset']}: {results['method']}")
    written.append(_save(fig, out / "recall.png"))

    pos = results["final"]["positivity"]
    if pos:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        lams = [p["lam"] for p in pos]
        ax.plot(lams, [p["empirical"] for p in pos], marker="o", label="empirical: dl~/ds <= 0")
        if any(p["cdf"] == p["cdf"] for p in pos):  # NaN-free: the loss has the eq. 25 estimate
            ax.plot(lams, [p["cdf"] for p in pos], marker="s", label="CDF estimate (eq. 25)")
        ax.set(xlabel="lam", ylabel="P(positive)", ylim=(-0.02, 1.02), title="positivity of pos-neg mixed embeddings")
        ax.legend()
        written.append(_save(fig, out / "positivity.png"))

    final = results["final"]
    bars = {"clean train": final["utilization"]}
    if final["utilization_mixed"] is not None:
        bars["clean + mixed"] = final["utilization_mixed"]
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.bar(list(bars), list(bars.values()), color=["tab:blue", "tab:orange"][: len(bars)])
    ax.set(ylabel="utilization (lower is better)", title="test-to-train nearest distance")
    written.append(_save(fig, out / "utilization.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# what write puts in a run's folder
OUTPUTS = ("results.json", "results.md", "recall.png", "positivity.png", "utilization.png")


def _json_ready(value):
    """value with NaN and infinities as null: JSON has no NaN (strict parsers refuse Python's)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(_json_ready(results), indent=2, allow_nan=False))
    (out / "results.md").write_text(markdown(results))
    plots(results, out)
