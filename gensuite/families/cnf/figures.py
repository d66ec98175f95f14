"""Matplotlib figures of a 2-D flow's density: heat maps over time (b3) and the histogram of samples
beside the grid density (b1 against b3)."""

from __future__ import annotations

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def density_heatmaps(log_densities: list[torch.Tensor], times: list[float], lo: float, hi: float,
                     title: str = "density p_t on the grid"):
    """One heat map of p_t = exp(log p_t) per time, side by side, each with its own colour scale."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(times), figsize=(2.6 * len(times), 2.8), squeeze=False)
    for ax, log_p, t in zip(axes[0], log_densities, times):
        image = ax.imshow(log_p.exp().float().cpu().numpy(), origin="lower", extent=(lo, hi, lo, hi),
                          cmap="viridis", interpolation="nearest")
        ax.set_title(f"t = {t:g}", fontsize=9)
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def histogram_vs_grid(result: dict, t: float, lo: float, hi: float, n_samples: int):
    """Left: the n-sample histogram as a density (fraction / bin area); right: the grid density's bin
    averages; the total variation between them in the title."""
    plt = _plt()
    bins = result["histogram"].shape[0]
    area = ((hi - lo) / bins) ** 2
    hist, grid = result["histogram"] / area, result["bins"] / area
    vmax = float(torch.maximum(hist.max(), grid.max()))
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.0))
    for ax, values, name in ((axes[0], hist, f"histogram of {n_samples:,} samples"),
                             (axes[1], grid, "grid density (bin averages)")):
        image = ax.imshow(values.float().cpu().numpy(), origin="lower", extent=(lo, hi, lo, hi), cmap="viridis",
                          vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=list(axes), fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(f"t = {t:g}: TV = {result['tv']:.4f} (expected from sampling noise ≤ {result['tv_noise']:.4f}), "
                 f"grid mass {result['grid_mass']:.4f}", fontsize=8)
    return fig
