"""Log-likelihood on held-out data, for every family that declares it (``registry.HasLikelihood``):
exact values or named bounds in nats per sample, and each in bits/dim."""

from __future__ import annotations

import math

import torch

from gensuite.data.pipeline import iterate_split
from gensuite.evaluation import EvalContext, Metric, register_metric
from gensuite.registry import HasLikelihood


@torch.no_grad()
def compute(ctx: EvalContext) -> dict[str, float]:
    cfg, family = ctx.cfg, ctx.family
    names = family.likelihood_values
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # each value, samples
    for indices, batch in iterate_split(ctx.shard_dir, cfg.split, cfg.batch_size, ctx.rank, ctx.world_size,
                                        cfg.max_samples):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        seeds = cfg.seed * 1_000_003 + indices  # each sample's noise: the same on any rank, in any batch
        values = family.log_likelihood(ctx.nets, batch, cfg.importance_samples, seeds)
        sums += torch.stack([*(values[n].double().sum().cpu() for n in names),
                             torch.tensor(float(len(indices)), dtype=torch.float64)])
    sums = ctx.sum_across_ranks(sums)
    means = (sums[:-1] / sums[-1]).tolist()
    nats_per_bit = family.data.dim * math.log(2)
    return {**dict(zip(names, means)), **{f"{n}_bpd": -v / nats_per_bit for n, v in zip(names, means)}}


def values(family) -> dict[str, bool]:
    names = family.likelihood_values
    return {**{n: True for n in names}, **{f"{n}_bpd": False for n in names}}


def describe(ctx: EvalContext) -> str:
    n = ctx.family.data.samples.get(ctx.cfg.split, 0)
    n = min(n, ctx.cfg.max_samples) if ctx.cfg.max_samples else n
    names = ", ".join(ctx.family.likelihood_values)
    return (f"likelihood: {names} (k={ctx.cfg.importance_samples} where the bound takes samples) of log p(x) in "
            f"nats per sample and bits/dim, EMA weights, {n} samples of the {ctx.cfg.split} split, noise seed "
            f"{ctx.cfg.seed}")


register_metric(Metric("likelihood", values, applies=lambda family: isinstance(family, HasLikelihood) and bool(family.likelihood_values),
                       compute=compute, describe=describe))
