"""Posterior-collapse diagnostics of a VAE on held-out data, layer by layer: the KL term of each latent
unit and the active units of Burda et al. (2016, section 5.2): unit u of layer l is active when
A_u = Cov_x(E_q[z_u | x]) > 0.01, the variance over the data of the posterior mean.

Registered as the ``active_units`` metric for every VAE with Gaussian latents. Over the ``eval.split`` samples x_1..x_N
(``eval.max_samples`` of them at most), with ``VAE.latent_statistics``:

* ``au_z<l>``: the number of active units of layer l;
* ``kl_z<l>``: the mean over the data of layer l's KL term in the ELBO, in nats (``objective.layer_kl_units``:
  closed form on top, closed-form entropy and Monte-Carlo cross-entropy below; for a single layer
  KL(q(z|x) || p(z)) exactly).

E_q[z_1|x] is the encoder's mean; for l ≥ 2 it is estimated by averaging the mean of q(z_l|z_{l-1}) over
k = ``eval.importance_samples`` draws of the layers below, each sample's noise from its own seed (the
same on any number of ranks). A_u is the population variance (1/N) from float64 sums over ranks. Rank 0
also returns the figure ``latent_units``: each unit's KL and A_u, layer by layer.
"""

from __future__ import annotations

import torch

from gensuite.data.pipeline import iterate_split
from gensuite.evaluation import EvalContext, Metric, register_metric

THRESHOLD = 0.01  # Burda et al.: active when the posterior mean varies over the data by more than this


def unit_statistics(sums: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (A_u, mean KL_u) from the sums [Σ E_q[z], Σ E_q[z]², Σ KL, N] over the data."""
    total = sum(sizes)
    n = sums[-1]
    mean, square, kl = sums[:total] / n, sums[total:2 * total] / n, sums[2 * total:3 * total] / n
    activity = (square - mean.pow(2)).clamp(min=0)
    return list(zip(activity.split(sizes), kl.split(sizes)))


def layer_values(stats: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    out = {}
    for l, (activity, kl) in enumerate(stats, 1):
        out[f"au_z{l}"] = float((activity > THRESHOLD).sum())
        out[f"kl_z{l}"] = float(kl.sum())
    return out


@torch.no_grad()
def compute(ctx: EvalContext) -> dict:
    family, cfg = ctx.family, ctx.cfg
    sizes = family.sizes
    sums = torch.zeros(3 * sum(sizes) + 1, dtype=torch.float64)
    for indices, batch in iterate_split(ctx.shard_dir, cfg.split, cfg.batch_size, ctx.rank, ctx.world_size,
                                        cfg.max_samples):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        seeds = cfg.seed * 1_000_003 + indices  # the likelihood metric's seeds: the same draws of z_1
        layers = family.latent_statistics(ctx.nets, batch, cfg.importance_samples, seeds)
        mean = torch.cat([m for m, _ in layers], dim=1).double().cpu()
        kl = torch.cat([k for _, k in layers], dim=1).double().cpu()
        sums += torch.cat([mean.sum(0), mean.pow(2).sum(0), kl.sum(0), torch.tensor([float(len(indices))],
                                                                                    dtype=torch.float64)])
    sums = ctx.sum_across_ranks(sums.to(ctx.device)).cpu()
    stats = unit_statistics(sums, sizes)
    values: dict = layer_values(stats)
    if ctx.rank == 0:  # only rank 0 logs: a figure elsewhere would never be closed
        values["latent_units"] = unit_figure(stats, family.cfg.free_bits, f"{int(sums[-1])} {cfg.split} samples")
    return values


def unit_figure(stats: list[tuple[torch.Tensor, torch.Tensor]], free_bits: float, title: str):
    """One row per layer: each unit's KL term (left) and A_u on a log scale (right), with the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(stats), 2, figsize=(9, 2.4 * len(stats)), squeeze=False)
    for l, (activity, kl) in enumerate(stats, 1):
        units = range(1, len(kl) + 1)
        left, right = axes[l - 1]
        left.bar(units, kl.numpy(), color="tab:blue")
        if free_bits > 0:
            left.axhline(free_bits, color="tab:red", linewidth=0.8, label=f"free bits λ = {free_bits:g}")
            left.legend(fontsize=7)
        left.set_ylabel(f"z{l}: KL (nats)")
        active = activity > THRESHOLD
        right.bar(units, activity.clamp(min=1e-6).numpy(), color=["tab:green" if a else "tab:gray" for a in active])
        right.axhline(THRESHOLD, color="tab:red", linewidth=0.8)
        right.set_yscale("log")
        right.set_ylabel("Cov_x(E_q[z_u])")
        right.set_title(f"z{l}: {int(active.sum())}/{len(kl)} active, KL {float(kl.sum()):.2f} nats", fontsize=8)
        for ax in (left, right):
            ax.set_xlabel("unit")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def values(family) -> dict[str, bool]:
    # higher is "better" only in the sense of fewer collapsed units; eval.best on these rarely makes sense
    return {name: True for l in range(1, len(family.sizes) + 1) for name in (f"au_z{l}", f"kl_z{l}")}


def applies(family) -> bool:
    from . import VAE  # imported here: this module is imported by the family's own __init__

    # Gaussian latents only: a categorical latent's units are one-hot codes, not Burda's Gaussian units.
    return isinstance(family, VAE) and not family.categorical


def describe(ctx: EvalContext) -> str:
    n = ctx.family.data.samples.get(ctx.cfg.split, 0)
    n = min(n, ctx.cfg.max_samples) if ctx.cfg.max_samples else n
    return (f"active_units: per latent layer l, au_z<l> = units with Cov_x(E_q[z_u|x]) > {THRESHOLD:g} (Burda et al. "
            f"2016) and kl_z<l> = the layer's KL term in nats, over {n} samples of the {ctx.cfg.split} split, EMA "
            f"weights; E_q of layers above z1 and the KL terms averaged over k={ctx.cfg.importance_samples} draws "
            f"of the layers below (noise seed {ctx.cfg.seed})")


register_metric(Metric("active_units", values, applies=applies, compute=compute, describe=describe))
