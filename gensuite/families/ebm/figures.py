"""The EBM's figures: energies of data, buffer and noise side by side, and Langevin chains as a strip."""

from __future__ import annotations

import torch


def energy_histogram(energies: dict[str, torch.Tensor], title: str = "", apart: tuple[str, ...] = ()):
    """Overlaid histograms (as densities, on shared bins) of each named set of energies: all of them on
    the left, and on the right the sets not named in ``apart`` (e.g. uniform noise, which a trained model
    puts far above the rest) on bins of their own range. A trained model puts data low and noise
    high; the buffer's samples should overlap the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = {k: v.detach().float().cpu() for k, v in energies.items() if len(v)}
    close = {k: v for k, v in values.items() if k not in apart}
    panels = [(values, "all")] + ([(close, "without " + ", ".join(apart))] if apart and close else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    for ax, (shown, label) in zip(axes[0], panels):
        everything = torch.cat(list(shown.values()))
        low, high = float(everything.min()), float(everything.max())
        if high - low < 1e-6:  # an untrained net can give one value everywhere
            low, high = low - 0.5, high + 0.5
        bins = torch.linspace(low, high, 41).numpy()
        for name, v in shown.items():
            ax.hist(v.numpy(), bins=bins, density=True, alpha=0.5, label=f"{name} (mean {v.mean():.3g}, n={len(v)})")
        ax.set_xlabel("energy E(x)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
        ax.set_title(label, fontsize=8)
    fig.suptitle(title or "energies: low = likely", fontsize=9)
    fig.tight_layout()
    return fig


def chain_strip(frames: list[torch.Tensor]) -> torch.Tensor:
    """Frames (each (R, C, H, W), the chains' states at successive recorded steps) as one image
    (1, C, H', W'): a row per chain, a column per recorded step, left to right."""
    from torchvision.utils import make_grid

    columns = len(frames)
    tiles = torch.stack(frames, 1).flatten(0, 1)  # chain-major: row r holds chain r's frames
    return make_grid(tiles.float().cpu(), nrow=columns, padding=2, pad_value=1.0).unsqueeze(0)

