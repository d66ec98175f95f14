"""Sharpness of generated images: the variance of the Laplacian (Pech-Pacheco et al. 2000), against the data.

For one image (pixels in [0, 1]) and each of its channels, the 3×3 discrete Laplacian
[[0, 1, 0], [1, −4, 1], [0, 1, 0]] is applied with ``F.conv2d`` at every position where it fits (no
padding, so borders add nothing); the image's value is the population variance of those responses,
averaged over its channels (grey: one). Blur flattens edges and lowers it, noise raises it.

Registered as the ``sharpness`` metric for image generators, opt-in (list it in ``eval.metrics``: it
draws ``eval.n_samples`` samples, as ``clf_fid`` does, with the same seeds):

* ``sharpness``: the mean over ``eval.n_samples`` generated samples;
* ``sharpness_real``: the same over the ``eval.split`` samples (first ``eval.max_samples``);
* ``sharpness_ratio``: sharpness / sharpness_real; below 1 the samples are blurrier than the data.

Per-image values are float64 and summed across ranks, so any number of ranks gives the single-process
result up to float64 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gensuite.data.pipeline import iterate_split
from gensuite.evaluation import EvalContext, Metric, generated_samples, register_metric
from gensuite.evaluation.judged import _generates_images

LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """(N,) float64: per image of ``images`` (N, C, H, W), H, W ≥ 3, the variance over positions of
    each channel's 3×3 Laplacian (valid positions only), averaged over the channels."""
    if images.dim() != 4 or images.shape[-1] < 3 or images.shape[-2] < 3:
        raise ValueError(f"laplacian_variance needs images (N, C, H, W) with H, W >= 3, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    kernel = torch.tensor(LAPLACIAN, dtype=torch.float64, device=images.device).view(1, 1, 3, 3)
    responses = F.conv2d(images.double().reshape(n * c, 1, h, w), kernel)  # (N·C, 1, H − 2, W − 2)
    return responses.flatten(1).var(dim=1, correction=0).view(n, c).mean(dim=1)


def sharpness(images: torch.Tensor) -> float:
    """The mean over images of ``laplacian_variance``."""
    return float(laplacian_variance(images).mean())


@torch.no_grad()
def compute(ctx: EvalContext) -> dict:
    cfg = ctx.cfg
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # Σ generated, count, Σ real, count
    for _, samples, _ in generated_samples(ctx):
        values = laplacian_variance(samples.float().clamp(0, 1))
        sums[0] += values.sum()
        sums[1] += len(values)
    for _, batch in iterate_split(ctx.shard_dir, cfg.split, cfg.batch_size, ctx.rank, ctx.world_size,
                                  cfg.max_samples, fields=set()):
        values = laplacian_variance(batch["x"].to(ctx.device))
        sums[2] += values.sum()
        sums[3] += len(values)
    sums = ctx.sum_across_ranks(sums).cpu()
    generated, real = (sums[0] / sums[1]).item(), (sums[2] / sums[3]).item()
    return {"sharpness": generated, "sharpness_real": real, "sharpness_ratio": generated / real}


def describe(ctx: EvalContext) -> str:
    cfg = ctx.cfg
    first = f"first {cfg.max_samples}" if cfg.max_samples else "all"
    return (f"sharpness: variance of the 3x3 Laplacian [[0,1,0],[1,-4,1],[0,1,0]] (valid positions, per channel, "
            f"pixels in [0,1]), averaged over channels and images: sharpness over {cfg.n_samples} generated samples "
            f"(seed {cfg.seed}), sharpness_real over the {first} samples of the {cfg.split} split, sharpness_ratio "
            f"= sharpness / sharpness_real (below 1: blurrier than the data)")


# Higher is sharper; a ratio near 1 is the goal, so eval.best on these rarely makes sense.
register_metric(Metric("sharpness", {"sharpness": True, "sharpness_real": True, "sharpness_ratio": True},
                       applies=_generates_images, compute=compute, describe=describe, default=False))
