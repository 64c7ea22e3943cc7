"""The demo's table and plot."""

from __future__ import annotations

import math
from pathlib import Path

from psft_plugin.demo.runs import History

COLUMNS = (
    ("in_domain_nll", "in-domain NLL"),
    ("in_domain_entropy", "entropy"),
    ("ood_nll", "OOD prose NLL"),
    ("clipfrac", "mean clipfrac"),
)


def table(rows: dict[str, dict[str, float]]) -> str:
    """Fixed-width table: one row per model (base, SFT, PSFT, ...), NLL/entropy in nats per token."""
    lines = [f"{'model':8s}" + "".join(f"{title:>16s}" for _, title in COLUMNS)]
    for name, values in rows.items():
        cells = [values.get(key, float("nan")) for key, _ in COLUMNS]
        lines.append(f"{name:8s}" + "".join(f"{'-' if math.isnan(v) else f'{v:.4f}':>16s}" for v in cells))
    return "\n".join(lines)


def verdict(sft: dict[str, float], other: dict[str, float], name: str = "PSFT") -> str:
    """Plain words on who did better, ``name`` (PSFT, DFT) or SFT, metric by metric (lower NLL is better,
    higher entropy is kept)."""
    parts = []
    for key, title, better in (
        ("in_domain_nll", "in-domain NLL", "lower"),
        ("ood_nll", "out-of-domain NLL", "lower"),
        ("in_domain_entropy", "entropy", "higher"),
    ):
        diff = other[key] - sft[key]
        wins = diff < 0 if better == "lower" else diff > 0
        parts.append(f"{title}: {name} {other[key]:.4f} vs SFT {sft[key]:.4f} ({name if wins else 'SFT'} {better})")
    return "At the same number of steps — " + "; ".join(parts) + "."


def _entropy_at_evals(history: History) -> tuple[list[float], list[float]]:
    """(eval NLL, train entropy logged at the same step) pairs, for the 'same NLL' view."""
    entropy = dict(history.series.get("entropy", []))
    pairs = [(nll, entropy[step]) for step, nll in history.series.get("eval_nll", []) if step in entropy]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(histories: dict[str, History], path: Path, title: str) -> Path:
    """PNG with held-out NLL, entropy and clip fraction over steps, and entropy against held-out NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (
        ("eval_nll", "held-out in-domain NLL (nats/token)"),
        ("entropy", "token entropy, training batches (nats)"),
        ("clipfrac", "clip fraction (PSFT)"),
    )  # runs without an old policy log none: no line
    for ax, (metric, label) in zip(axes.flat, panels):
        for name, history in histories.items():
            points = history.series.get(metric, [])
            if points:
                ax.plot(*zip(*points), marker="." if metric == "eval_nll" else None, label=name)
        ax.set(xlabel="optimizer step", ylabel=label)
        ax.legend()
    ax = axes.flat[3]
    for name, history in histories.items():
        nll, entropy = _entropy_at_evals(history)
        ax.plot(nll, entropy, marker="o", label=name)
    ax.set(xlabel="held-out in-domain NLL", ylabel="token entropy", title="at the same held-out NLL")
    ax.invert_xaxis()
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
