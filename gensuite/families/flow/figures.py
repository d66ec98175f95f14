"""Matplotlib figure of a 2-D flow: its density on a grid beside its samples over the data."""

from __future__ import annotations

import torch


def density_and_samples(log_density: torch.Tensor, lo: float, hi: float, samples: torch.Tensor,
                        data: torch.Tensor, mass: float):
    """Left: p(x) on the grid (its own colour scale; the grid's mass in the title). Right: the samples
    (blue) over held-out data (grey), on the same square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.6))
    image = axes[0].imshow(log_density.exp().float().cpu().numpy(), origin="lower", extent=(lo, hi, lo, hi),
                           cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=axes[0], fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    axes[0].set_title(f"model density (mass on the square {mass:.3f})", fontsize=8)
    d, s = data.detach().float().cpu().numpy(), samples.detach().float().cpu().numpy()
    axes[1].scatter(d[:, 0], d[:, 1], s=3, c="0.7", label="data")
    axes[1].scatter(s[:, 0], s[:, 1], s=3, c="tab:blue", alpha=0.6, label="samples")
    axes[1].set_xlim(lo, hi)
    axes[1].set_ylim(lo, hi)
    axes[1].set_aspect("equal")
    axes[1].legend(fontsize=7, loc="upper right", markerscale=3)
    axes[1].set_title(f"{len(s)} samples", fontsize=8)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig
