"""Sampling speed: generated samples per second, timed on the evaluation's own draw of ``eval.n_samples``
(with ``eval.sampler`` where the family has several), so a leaderboard can set quality against cost."""

from __future__ import annotations

import torch

from gensuite.evaluation import EvalContext, Metric, generated_samples, register_metric


def compute(ctx: EvalContext) -> dict[str, float]:
    """The rate of the evaluation's own draw (``generated_samples``, shared with the other metrics): this
    rank's chunks after its first (the warm-up: kernels chosen, caches filled), or the one chunk it drew;
    the ranks' mean rate."""
    chunks = [(len(samples), seconds) for _, samples, _, seconds in generated_samples(ctx, timed=True)]
    timed = chunks[1:] or chunks
    n, seconds = sum(c[0] for c in timed), sum(c[1] for c in timed)
    rate = torch.tensor([n / max(seconds, 1e-9)], dtype=torch.float64)
    return {"sampling_samples_per_sec": float(ctx.sum_across_ranks(rate)[0]) / ctx.world_size}


def describe(ctx: EvalContext) -> str:
    return (f"sampling_speed: generated samples per second per rank while drawing the evaluation's "
            f"{ctx.cfg.n_samples} samples in chunks of {min(ctx.cfg.batch_size, ctx.cfg.n_samples)} "
            f"(the first chunk of each rank a warm-up, not timed), on {ctx.device.type}")


def _generates(family) -> bool:
    return bool(family.fixed_inputs(2, torch.Generator().manual_seed(0)))


register_metric(Metric("sampling_speed", {"sampling_samples_per_sec": True}, applies=_generates, compute=compute,
                       describe=describe, default=False))
