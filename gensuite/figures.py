"""Figures and grids that several families draw: 2-D point sets side by side, a density on a grid of
the square [lo, hi]² (cells, midpoint-rule mass) beside samples over data.

Families import them from here, never from each other's folders."""

from __future__ import annotations

import torch


def grid_points(lo: float, hi: float, n: int, dtype=torch.float32) -> torch.Tensor:
    """(n², 2) cell centres of [lo, hi]², row-major with y outer: reshaped to (n, n), row r is y index r
    and column c is x index c (what ``imshow(origin="lower")`` expects)."""
    h = (hi - lo) / n
    axis = lo + h * (torch.arange(n, dtype=dtype) + 0.5)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], 1)


def grid_mass(log_density: torch.Tensor, lo: float, hi: float) -> float:
    """∫ p over [lo, hi]² by the midpoint rule on the grid, in float64."""
    n = log_density.shape[0]
    return float(log_density.double().exp().sum() * ((hi - lo) / n) ** 2)


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


def scatter_strip(frames: list[torch.Tensor], labels: list[str], title: str):
    """Point sets (N, D) side by side as scatter plots of their first two coordinates, on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(frames), figsize=(1.8 * len(frames), 2.1), squeeze=False,
                             sharex=True, sharey=True)
    for ax, points, label in zip(axes[0], frames, labels):
        xy = points.detach().float().cpu().numpy()
        ax.scatter(xy[:, 0], xy[:, 1], s=1, alpha=0.5)
        ax.set_title(label, fontsize=7)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=5)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
