"""The demo's figures: a sample grid per stage and every run's loss curve side by side."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import Concept, to_unit


def write_grid(
    images: torch.Tensor, concepts: list[Concept], path: Path, title: str, columns: int = 8
) -> Path:
    """A PNG grid: one row per prompt, ``columns`` samples each, prompts written on the left."""
    from ..figures import pyplot, save_figure

    plt = pyplot()
    cols = min(columns, images.shape[1])
    rows = len(concepts)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols + 1.6, 1.0 * rows + 0.5), dpi=80, squeeze=False)
    for r, concept in enumerate(concepts):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(
                to_unit(images[r, c]).reshape(images.shape[-2], images.shape[-1]).numpy(),
                cmap="gray",
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(concept.name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_all_losses(curves: dict[str, list[float]], path: Path) -> Path:
    """All stages' loss curves side by side in one PNG."""
    from ..figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), dpi=90, squeeze=False)
    for ax, (name, losses) in zip(axes[0], curves.items(), strict=True):
        ax.plot(range(1, len(losses) + 1), losses, lw=0.7, alpha=0.5)
        window = max(1, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(range(1, len(losses) + 1), smooth, lw=1.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("flow-matching loss")
    fig.tight_layout()
    return save_figure(fig, path)
