"""PNG plots for the report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lmdistill.metrics import FidelityMetrics, RunMetrics


def loss_curves(metrics: RunMetrics, path: Path) -> None:
    """Training loss of the KD student (and the CE-only baseline's CE) per step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    kd = metrics.kd.history
    ax.plot([r["step"] for r in kd], [r["loss"] for r in kd], label="KD student: loss")
    ax.plot([r["step"] for r in kd], [r["ce"] for r in kd], ":", label="KD student: CE")
    if metrics.baseline is not None:
        base = metrics.baseline.history
        ax.plot([r["step"] for r in base], [r["ce"] for r in base], label="CE-only student: CE")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("per-token loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fidelity_bars(metrics: RunMetrics, path: Path) -> None:
    """Held-out KL(teacher || student) and top-1 agreement: before, KD, CE-only."""
    arms: list[tuple[str, FidelityMetrics]] = [
        (name, values.fidelity)
        for name, values in metrics.arms()
        if values is not None and values.fidelity is not None
    ]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    for ax, key, title in (
        (axes[0], "kl", "KL(teacher || student)  (lower is better)"),
        (axes[1], "top1_agreement", "top-1 agreement  (higher is better)"),
    ):
        values = [getattr(v, key) for _, v in arms]
        bars = ax.bar(
            [name for name, _ in arms], values, color=["#999", "#2a7", "#c63"][: len(arms)]
        )
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
