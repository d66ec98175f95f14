"""Likelihood bounds on held-out data: the ELBO and the k-sample importance-weighted bound."""

from __future__ import annotations

import math

import torch

from gensuite.data.pipeline import iterate_split
from gensuite.evaluation import EvalContext, Metric, register_metric


def _noise(indices: torch.Tensor, k: int, dim: int, seed: int) -> torch.Tensor:
    """(k, B, dim) standard normals, each sample's from its own seed: independent of rank and batch."""
    return torch.stack([torch.randn(k, dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices], dim=1)


@torch.no_grad()
def compute(ctx: EvalContext) -> dict[str, float]:
    cfg, family = ctx.cfg, ctx.family
    latent = family.cfg.latent_dim
    sums = torch.zeros(3, dtype=torch.float64)  # elbo, iwae, samples
    for indices, batch in iterate_split(ctx.shard_dir, cfg.split, cfg.batch_size, ctx.rank, ctx.world_size,
                                        cfg.max_samples):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        eps = _noise(indices, cfg.importance_samples, latent, cfg.seed)
        bounds = family.log_likelihood_bounds(ctx.nets, batch, cfg.importance_samples, eps=eps)
        sums += torch.stack([bounds["elbo"].double().sum().cpu(), bounds["iwae"].double().sum().cpu(),
                             torch.tensor(float(len(indices)), dtype=torch.float64)])
    sums = ctx.sum_across_ranks(sums)
    elbo, iwae = (sums[:2] / sums[2]).tolist()
    nats_per_bit = family.data.dim * math.log(2)
    return {"elbo": elbo, "iwae": iwae, "elbo_bpd": -elbo / nats_per_bit, "iwae_bpd": -iwae / nats_per_bit}


def describe(ctx: EvalContext) -> str:
    n = ctx.family.data.samples.get(ctx.cfg.split, 0)
    n = min(n, ctx.cfg.max_samples) if ctx.cfg.max_samples else n
    return (f"likelihood: ELBO and IWAE (k={ctx.cfg.importance_samples}) lower bounds on log p(x) in nats per "
            f"sample and bits/dim, EMA weights, {n} samples of the {ctx.cfg.split} split, noise seed {ctx.cfg.seed}")


register_metric(Metric("likelihood", {"elbo": True, "iwae": True, "elbo_bpd": False, "iwae_bpd": False},
                       applies=lambda family: hasattr(family, "log_likelihood_bounds"),
                       compute=compute, describe=describe))
