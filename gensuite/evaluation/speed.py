"""Sampling speed: generated samples per second, drawn the way the evaluation draws them (with
``eval.sampler`` where the family has several), so a leaderboard can set quality against cost."""

from __future__ import annotations

import time

import torch

from gensuite.evaluation import EvalContext, Metric, register_metric
from gensuite.registry import sampling_mode


def _draw(ctx: EvalContext, seed: int) -> int:
    fixed = ctx.family.fixed_inputs(min(ctx.cfg.batch_size, ctx.cfg.n_samples), torch.Generator().manual_seed(seed))
    fixed = {k: v.to(ctx.device) for k, v in fixed.items()}
    with sampling_mode(ctx.family):
        samples = ctx.family.sample(ctx.nets, fixed)
    return len(samples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute(ctx: EvalContext) -> dict[str, float]:
    """One warm-up batch, then one timed batch of ``eval.batch_size`` samples per rank; the ranks' mean rate."""
    _draw(ctx, ctx.cfg.seed * 7919 + 1)  # kernels chosen, caches filled
    _sync(ctx.device)
    began = time.perf_counter()
    n = _draw(ctx, ctx.cfg.seed * 7919 + 2)
    _sync(ctx.device)
    rate = torch.tensor([n / max(time.perf_counter() - began, 1e-9)], dtype=torch.float64)
    return {"sampling_samples_per_sec": float(ctx.sum_across_ranks(rate)[0]) / ctx.world_size}


def describe(ctx: EvalContext) -> str:
    return (f"sampling_speed: generated samples per second per rank, one timed batch of "
            f"{min(ctx.cfg.batch_size, ctx.cfg.n_samples)} after a warm-up batch, on {ctx.device.type}")


def _generates(family) -> bool:
    return bool(family.fixed_inputs(2, torch.Generator().manual_seed(0)))


register_metric(Metric("sampling_speed", {"sampling_samples_per_sec": True}, applies=_generates, compute=compute,
                       describe=describe, default=False))
