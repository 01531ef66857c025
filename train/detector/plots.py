"""Training plots: loss/mAP curves per epoch and per-class AP50 bars (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from d3n.artifacts import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], path: Path, title: str = "") -> Path:
    plt = _plt()
    keys = [k for k in history[0] if k not in ("epoch", "seconds", "lr")] if history else []
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3 * max(len(keys), 1), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=False):
        pts = [(r["epoch"], r[k]) for r in history if k in r and r[k] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def plot_per_class(per_class: dict[str, float], path: Path, title: str = "AP50 per class") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(per_class), list(per_class.values()), color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
