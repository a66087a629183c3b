"""Pictures people would rather look at than read: loss curves, heatmap overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; inspection boxes and CI have no screen

import matplotlib.pyplot as plt  # noqa: E402

from .files import atomic_write  # noqa: E402


def plot_loss_curve(history: list[dict], path: str | Path, best_epoch: int | None = None) -> Path:
    """Training (and validation) loss per epoch, the kept epoch marked; written as PNG."""
    epochs = [record["epoch"] for record in history]
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    axis.plot(epochs, [record["loss"] for record in history], marker="o", label="training loss")
    if history and "validation_loss" in history[0]:
        validation = [record["validation_loss"] for record in history]
        axis.plot(epochs, validation, marker="s", label="validation loss (held-out good)")
    if best_epoch:
        axis.axvline(best_epoch, color="grey", linestyle="--", label=f"kept epoch {best_epoch}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss (sum over levels of mean 1 - cosine)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)
    return Path(path)
