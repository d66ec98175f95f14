"""Mode coverage on the Gaussian-mixture datasets (``ring``, ``grid``), the mode-collapse measures of
VEEGAN (Srivastava et al., 2017, section 5.1) and PacGAN (Lin et al., 2018, section 3.1).

The data are K isotropic Gaussians N(mu_k, sigma^2 I_2) with equal weights (``sources.mixture_modes``):
ring K = 8, mu_k on a circle of radius 2, sigma 0.02 (the unrolled-GAN setting of Metz et al.);
grid K = 25, mu_k on {-4, -2, 0, 2, 4}^2, sigma 0.05 (PacGAN's). sigma is the one the shards were built
with: the ``std`` the shard manifest records among its build options (``shards/build.py --std``).

Registered as the ``modes`` metric for every generating family whose data is ``ring`` or ``grid``. Over
``eval.n_samples`` generated samples x_1..x_N:

* nearest mode: k(x) = argmin_k ||x - mu_k|| (Euclidean; the modes are isotropic with one sigma, so this
  is also the nearest mode in standard deviations, as PacGAN's code measures it);
* *high quality*: ||x - k(x)'s centre|| <= 3 sigma ("within three standard deviations of the nearest
  mode", VEEGAN; PacGAN uses the same threshold);
* ``modes_covered``: the number of modes k with at least one high-quality sample assigned to it
  (VEEGAN: "the number of mixture components whose mean is nearest to at least one high quality
  sample"; PacGAN's code counts the modes with a non-zero count the same way: threshold 1 sample);
* ``modes_total``: K;
* ``high_quality``: (number of high-quality samples) / N. For samples from the data itself it is
  P(||N(0, sigma^2 I_2)|| <= 3 sigma) = 1 - exp(-9/2) = 0.98889 (the squared radius over sigma^2 is
  chi-square with 2 degrees of freedom);
* ``mode_kl``: KL(p_hat || u) = sum_k p_hat_k log(K p_hat_k) in nats, where p_hat_k = c_k / sum_j c_j is
  the histogram c of the high-quality samples over their modes and u is uniform over the K modes (the
  data's distribution over modes): the reverse KL, generated distribution first, that PacGAN reports.
  Empty modes contribute 0 (0 log 0 = 0), so it stays finite: 0 for a perfectly balanced histogram,
  log K when every high-quality sample is on one mode. With no high-quality sample at all it is log K
  too (by convention: the value of total collapse, its largest possible one).

modes_covered and high_quality: higher is better; mode_kl: lower is better. The counts are float64 sums
over ranks (exact), so any number of ranks gives the values of one. Rank 0 also returns the figure
``mode_samples``: the first 10,000 samples over the mode centres with their 3 sigma circles.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gensuite.data.shards import read_manifest
from gensuite.data.sources import mixture_modes
from gensuite.errors import GensuiteError
from gensuite.evaluation import EvalContext, Metric, generated_samples, register_metric

MIXTURES = ("ring", "grid")
THRESHOLD = 3.0  # high quality: within this many standard deviations of the nearest mode centre
FIGURE_SAMPLES = 10_000  # at most this many samples (the first ones) in the figure
VALUES = {"modes_covered": True, "modes_total": True, "high_quality": True, "mode_kl": False}


def shard_geometry(shard_dir: str | Path) -> tuple[str, torch.Tensor, float]:
    """(dataset, centres (K, 2), std) of the mixture shard set in ``shard_dir``: std as recorded in its
    manifest's build options (the dataset's default for a manifest without one)."""
    manifest = read_manifest(shard_dir)
    dataset = manifest.get("dataset")
    if dataset not in MIXTURES:
        raise GensuiteError(f"{Path(shard_dir) / 'manifest.json'}: dataset {dataset!r} is not a Gaussian "
                            f"mixture ({', '.join(MIXTURES)})")
    centres, std = mixture_modes(dataset, manifest.get("params", {}).get("std"))
    return dataset, centres, std


def assign_modes(points: torch.Tensor, centres: torch.Tensor, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest mode index (N,), high quality (N,) bool) of points (N, 2); non-finite points are never
    high quality."""
    x = points.detach().reshape(len(points), -1).double().cpu()
    if x.shape[1] != centres.shape[1]:
        raise GensuiteError(f"modes: samples have {x.shape[1]} coordinates; the mixture's modes have "
                            f"{centres.shape[1]}")
    distance = torch.cdist(x, centres.double(), compute_mode="donot_use_mm_for_euclid_dist")  # (N, K), exact
    closest, nearest = distance.min(1)
    return nearest, torch.isfinite(x).all(1) & (closest <= THRESHOLD * std)


def mode_histogram(points: torch.Tensor, centres: torch.Tensor, std: float) -> torch.Tensor:
    """float64 (K,): the number of high-quality points assigned to each mode."""
    nearest, good = assign_modes(points, centres, std)
    return torch.bincount(nearest[good], minlength=len(centres)).double()


def mode_values(histogram: torch.Tensor, n: float) -> dict[str, float]:
    """The four values from the high-quality histogram (K,) over modes and the number of samples n."""
    k = len(histogram)
    total = float(histogram.sum())
    if total > 0:
        p = histogram.double() / total
        p = p[p > 0]
        kl = float((p * torch.log(p * k)).sum().clamp(min=0.0))
    else:
        kl = math.log(k)  # no high-quality sample: counted as total collapse
    return {"modes_covered": float((histogram > 0).sum()), "modes_total": float(k),
            "high_quality": total / n if n else 0.0, "mode_kl": kl}


def mode_statistics(points: torch.Tensor, centres: torch.Tensor, std: float) -> dict[str, float]:
    """``modes_covered``, ``modes_total``, ``high_quality`` and ``mode_kl`` of a set of points (N, 2)."""
    return mode_values(mode_histogram(points, centres, std), len(points))


def mode_figure(points: torch.Tensor, centres: torch.Tensor, std: float, values: dict[str, float], title: str):
    """Samples (high quality in black, the others in red) over the mode centres and their 3 sigma circles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    points = points.double().cpu()
    _, good = assign_modes(points, centres, std)
    extent = float(centres.abs().max()) + max(1.0, 10 * std)
    fig, ax = plt.subplots(figsize=(5, 5.3))
    xy = points.numpy()
    ax.scatter(xy[~good.numpy(), 0], xy[~good.numpy(), 1], s=3, alpha=0.4, color="tab:red", linewidths=0,
               label="other samples")
    ax.scatter(xy[good.numpy(), 0], xy[good.numpy(), 1], s=3, alpha=0.4, color="black", linewidths=0,
               label="high quality")
    for centre in centres.tolist():
        ax.add_patch(Circle(centre, THRESHOLD * std, fill=False, color="tab:blue", linewidth=0.8))
    ax.scatter(centres[:, 0].numpy(), centres[:, 1].numpy(), marker="+", s=30, color="tab:blue",
               linewidths=0.8, label=f"mode centres, {THRESHOLD:g}σ circles")
    outside = int((~(torch.isfinite(points).all(1) & (points.abs() <= extent).all(1))).sum())
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3, fontsize=7, markerscale=3, frameon=False)
    ax.set_title(f"{title}\nmodes {values['modes_covered']:.0f}/{values['modes_total']:.0f}, high quality "
                 f"{values['high_quality']:.3f}, mode KL {values['mode_kl']:.3f}"
                 + (f"; {outside} outside the view" if outside else ""), fontsize=8)
    fig.tight_layout()
    return fig


# -- the registered metric ---------------------------------------------------------------------------
def _applies(family) -> bool:
    return family.data.dataset in MIXTURES and bool(family.fixed_inputs(2, torch.Generator().manual_seed(0)))


@torch.no_grad()
def compute(ctx: EvalContext) -> dict:
    """Per-mode high-quality counts and the sample count, plus the first ``FIGURE_SAMPLES`` samples at
    their indices (zeros elsewhere), summed over ranks in one float64 all-reduce: every rank draws its
    own chunks of the sample stream."""
    dataset, centres, std = shard_geometry(ctx.shard_dir)
    if dataset != ctx.family.data.dataset:
        raise GensuiteError(f"modes: the shards in {ctx.shard_dir} hold {dataset}; the family was built for "
                            f"{ctx.family.data.dataset}")
    k = len(centres)
    shown = min(ctx.cfg.n_samples, FIGURE_SAMPLES)
    counts = torch.zeros(k + 1, dtype=torch.float64)
    kept = torch.zeros(shown, 2, dtype=torch.float64)
    for start, samples, _ in generated_samples(ctx):
        points = samples.detach().reshape(len(samples), -1).double().cpu()
        counts[:k] += mode_histogram(points, centres, std)
        counts[k] += len(points)
        if start < shown:
            part = points[: shown - start]
            kept[start:start + len(part)] = part
    total = ctx.sum_across_ranks(torch.cat([counts, kept.flatten()]).to(ctx.device)).cpu()
    values = mode_values(total[:k], float(total[k]))
    if ctx.rank == 0:  # only rank 0 logs: a figure elsewhere would never be closed
        values["mode_samples"] = mode_figure(total[k + 1:].view(shown, 2), centres, std, values,
                                             f"{dataset}: {shown} of {ctx.cfg.n_samples} samples "
                                             f"(seed {ctx.cfg.seed}), σ = {std:g}")
    return values


def describe(ctx: EvalContext) -> str:
    dataset, centres, std = shard_geometry(ctx.shard_dir)
    k = len(centres)
    return (f"modes: {ctx.cfg.n_samples} generated samples (seed {ctx.cfg.seed}) of the {dataset} mixture of {k} "
            f"Gaussians (std {std:g}, as the shards were built); a sample is high quality within {THRESHOLD:g} std "
            f"= {THRESHOLD * std:g} of its nearest mode centre (VEEGAN, PacGAN); modes_covered: modes with at least "
            f"one high-quality sample (of modes_total = {k}); high_quality: their fraction of all samples (data: "
            f"1 - exp(-9/2) = 0.98889); mode_kl: KL(p || uniform) in nats of the high-quality samples' histogram p "
            f"over the modes (0 log 0 = 0; log {k} = {math.log(k):.4f} when all are on one mode or none is high "
            f"quality)")


register_metric(Metric("modes", VALUES, applies=_applies, compute=compute, describe=describe))
