"""Validation curves: every player's training objective on held-out data, next to its training curve.

At ``eval.every`` steps and at the end the trainer computes each player's loss terms (the family's
``validation_terms``) on the first ``eval.validation_batches`` batches of ``eval.batch_size`` samples of
the held-out split: ``validation`` when the shard set has one, else ``eval.split`` (``test``). They are
logged as ``val/<player>/<term>`` beside ``<player>/<term>``, and ``gensuite report`` draws both on one
axes.

- Networks: the raw ones the training curve is computed with (not the EMA copies), in eval mode, so
  dropout is off and BatchNorm uses its running statistics instead of updating them: the value the
  model computes at inference, and no training state changes.
- Noise (a diffusion model's timesteps, a VAE's reparameterisation, a GAN's z): batch j at step s is
  drawn from every RNG seeded with ``batch_seed(eval.seed, s, j)``; the RNG states are restored
  afterwards, so training continues bit for bit as without validation, and a resumed run computes the
  same values.
- Ranks: batch j goes to rank j mod world size (as the metrics' batches), every term is summed in
  float64 weighted by its batch's size, and the sums are added across ranks: the same batches and the
  same noise on any number of ranks.
- Batches are full (a partial last one is left out), as the training batches are: a loss may need them
  whole (PacGAN packs consecutive samples).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from gensuite.config import EvalConfig
from gensuite.data.pipeline import iterate_split
from gensuite.distributed import rng_state, seed_everything, set_rng_state
from gensuite.evaluation import EvalContext

PREFIX = "val"  # val/<player>/<term>, beside the training curve's <player>/<term>


def tag(player: str, term: str) -> str:
    return f"{PREFIX}/{player}/{term}"


@dataclass(frozen=True)
class ValidationPlan:
    """Which samples the validation curves use: ``batches`` full batches of ``batch_size`` from the
    start of ``split``."""

    split: str
    batch_size: int
    batches: int

    @property
    def samples(self) -> int:
        return self.batch_size * self.batches

    @classmethod
    def of(cls, cfg: EvalConfig, samples: Mapping[str, int]) -> ValidationPlan | None:
        """From the eval section and the shard set's samples per split; None when validation is off
        (``eval.validation_batches: 0``) or there is no held-out split."""
        split = "validation" if "validation" in samples else cfg.split if cfg.split in samples else None
        if cfg.validation_batches == 0 or split is None or samples[split] < 1:
            return None
        available = min(samples[split], cfg.max_samples or samples[split])
        size = min(cfg.batch_size, available)
        return cls(split, size, min(cfg.validation_batches, available // size))

    def describe(self) -> str:
        return (f"validation: every player's training objective (its loss terms) on the first {self.samples} "
                f"samples of the {self.split} split in {self.batches} batch(es) of {self.batch_size}, with the raw "
                f"(not EMA) networks in eval mode (dropout off, BatchNorm running statistics); batch j at step s "
                f"draws its noise from seed (eval.seed, s, j)")


def batch_seed(seed: int, step: int, batch: int) -> int:
    """The seed of validation batch ``batch`` at ``step``: independent of the rank that computes it."""
    return ((seed * 1_000_003 + step) * 1_000_003 + batch) % 2**63


@contextlib.contextmanager
def rng_restored():
    """Every RNG this process has (python, numpy, torch, each CUDA device) as it was before the block."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def validation_values(ctx: EvalContext, plan: ValidationPlan, step: int,
                      autocast: Callable[[], Any] = contextlib.nullcontext,
                      gather_object: Callable[[Any], list[Any]] = lambda obj: [obj]) -> dict[str, float]:
    """``{"<player>/<term>": value}`` on the plan's batches (see the module docstring). ``ctx.nets``
    should be the raw networks in eval mode with frozen parameters (the trainer's
    ``eval_mode(frozen=True)``); ``autocast``: the training forward's mixed precision;
    ``gather_object``: a collective that returns every rank's object (the term names of ranks
    without a batch are not known otherwise)."""
    family, sums, counts = ctx.family, {}, {}
    with rng_restored():
        for indices, batch in iterate_split(ctx.shard_dir, plan.split, plan.batch_size, ctx.rank, ctx.world_size,
                                            plan.samples):
            seed_everything(batch_seed(ctx.cfg.seed, step, int(indices[0]) // plan.batch_size))
            batch = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with autocast():
                terms = family.validation_terms(ctx.nets, batch, step)
            for player, values in terms.items():
                for term, value in values.items():
                    key = f"{player}/{term}"
                    sums[key] = sums.get(key, 0.0) + float(value) * len(indices)
                    counts[key] = counts.get(key, 0) + len(indices)
    names = sorted(set().union(*gather_object(sorted(sums))))
    totals = ctx.sum_across_ranks(torch.tensor([sums.get(k, 0.0) for k in names] + [counts.get(k, 0) for k in names],
                                               dtype=torch.float64))
    return {k: (totals[i] / totals[len(names) + i]).item() for i, k in enumerate(names) if totals[len(names) + i] > 0}
