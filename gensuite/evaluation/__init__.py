"""One evaluation protocol for every family: named metrics over a held-out split, split across ranks.

A metric declares the values it produces (and whether higher is better), which families it applies
to, and how to compute them from an ``EvalContext``. The trainer runs the job's metrics every
``eval.every`` steps and at the end and logs them as ``eval/<value>``; ``eval.best`` keeps the best
checkpoint. Each rank evaluates its share of the split (batch j of ``eval.batch_size`` consecutive
samples goes to rank j mod world size, so every sample is computed in the same batch on any number of
ranks) and the float64 partial sums are added across ranks: any number of ranks gives the
single-process result up to float64 rounding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import math
import time

import torch

from gensuite.config import EvalConfig
from gensuite.errors import ConfigError, GensuiteError
from gensuite.registry import Family, HasSamplers, Networks, SamplerChoice, sampling_mode


@dataclass
class EvalContext:
    family: Family
    nets: Networks  # EMA copies where the run keeps them
    shard_dir: Path
    cfg: EvalConfig
    device: torch.device
    rank: int = 0
    world_size: int = 1
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # this evaluation's generated chunks (first index, samples, fixed inputs, seconds to draw), drawn once
    # and shared by its metrics (clf_fid, precision/recall, cond_acc, sampling_speed read the same samples)
    drawn: list[tuple[int, torch.Tensor, dict[str, torch.Tensor], float]] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Metric:
    name: str
    # value name -> higher is better; or a function of the family (a likelihood's named bounds)
    values: dict[str, bool] | Callable[[Family], dict[str, bool]]
    applies: Callable[[Family], bool]  # the family can be measured this way
    compute: Callable[[EvalContext], dict[str, Any]]  # the values (floats) and any figures
    describe: Callable[[EvalContext], str]  # the protocol, logged with the values
    needs: Callable[[EvalConfig], str | None] = lambda cfg: None  # what the config lacks, or None
    default: bool = True  # run when eval.metrics is unset; False: only when listed (opt-in)
    # raises a ConfigError when an input from outside the job (another run) is missing; the trainer calls
    # it before the first step, so a run does not fail at its last step for want of it
    check_inputs: Callable[[EvalConfig], None] = lambda cfg: None

    def values_for(self, family: Family) -> dict[str, bool]:
        return self.values(family) if callable(self.values) else self.values


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


def _load_builtin() -> None:
    # imported for their side effect: each module registers its metrics
    from gensuite.evaluation import (classification, inception, judged, likelihood, mmd, modes,  # noqa: F401
                                     sharpness, speed)


@contextlib.contextmanager
def evaluation_sampler(cfg: EvalConfig, family: Family):
    """The family draws with ``eval.sampler`` (steps, eta) inside, and with its own sampler again after."""
    choice = SamplerChoice.given(cfg.sampler, cfg.sampler_steps, cfg.sampler_eta)
    if choice is None:
        yield
        return
    if not isinstance(family, HasSamplers):
        raise ConfigError("eval.sampler", f"the {family.name} family has one sampler; remove eval.sampler, "
                                          f"eval.sampler_steps and eval.sampler_eta")
    before = family.sampler
    try:
        family.use_sampler(choice)
    except GensuiteError as e:
        raise ConfigError("eval.sampler", str(e).removeprefix("--sampler: ").removeprefix("--steps: ")) from None
    try:
        yield
    finally:
        family.sampler = before


def resolve(cfg: EvalConfig, family: Family) -> list[Metric]:
    """The job's metrics (or every metric that applies to the family), checked against the family."""
    _load_builtin()
    with evaluation_sampler(cfg, family):  # refused before the first step, not at the first evaluation
        pass
    if cfg.metrics is None:  # every metric that applies and whose inputs the job provides
        chosen = [m for m in METRICS.values() if m.default and m.applies(family) and m.needs(cfg) is None]
    else:
        chosen = []
        for i, name in enumerate(cfg.metrics):
            if name not in METRICS:
                raise ConfigError(f"eval.metrics[{i}]",
                                  f"unknown metric {name!r}; available: {', '.join(sorted(METRICS))}")
            if not METRICS[name].applies(family):
                raise ConfigError(f"eval.metrics[{i}]", f"{name} does not apply to the {family.name} family")
            missing = METRICS[name].needs(cfg)
            if missing:
                raise ConfigError(f"eval.metrics[{i}]", f"{name} needs {missing}")
            chosen.append(METRICS[name])
    if cfg.best is not None:
        produced = {v for m in chosen for v in m.values_for(family)}
        if cfg.best not in produced:
            raise ConfigError("eval.best", f"{cfg.best!r} is not computed by this job's metrics; choose one of "
                                           f"{', '.join(sorted(produced)) or '(none)'}")
    return chosen


def check_inputs(cfg: EvalConfig, metrics: list[Metric]) -> None:
    """Before training: the inputs the chosen metrics read from other runs exist."""
    for metric in metrics:
        metric.check_inputs(cfg)


def skipped(cfg: EvalConfig, family: Family) -> list[str]:
    """Why default metrics that apply to the family were left out (their inputs are missing)."""
    if cfg.metrics is not None:
        return []
    _load_builtin()
    return [f"{m.name}: needs {m.needs(cfg)}" for m in METRICS.values() if m.applies(family) and m.needs(cfg)]


def protocol(metrics: list[Metric], ctx: EvalContext) -> str:
    """What the metrics measure, as logged beside their values (``eval/protocol``)."""
    text = "\n\n".join(m.describe(ctx) for m in metrics)
    with evaluation_sampler(ctx.cfg, ctx.family):
        if isinstance(ctx.family, HasSamplers):
            text += f"\n\ngenerated samples drawn with {ctx.family.sampler.describe()}"
    return text


def higher_is_better(metrics: list[Metric], family: Family, value: str) -> bool:
    return next(m.values_for(family)[value] for m in metrics if value in m.values_for(family))


def evaluate(metrics: list[Metric], ctx: EvalContext) -> dict[str, Any]:
    """Every metric's values (floats) and figures (matplotlib), by name."""
    results: dict[str, Any] = {}
    with evaluation_sampler(ctx.cfg, ctx.family):
        for metric in metrics:
            results.update(metric.compute(ctx))
    return results


# Generated samples kept for the evaluation's other metrics up to this size; beyond it (large images, many
# samples) each metric draws them again, the same samples from the same seeds.
SHARED_SAMPLES_BYTES = 2**30


def generated_samples(ctx: EvalContext, timed: bool = False):
    """(index of the first sample, samples, fixed inputs) of this rank's share of ``eval.n_samples``:
    chunk j of the sample stream comes from seed (eval.seed, j) and goes to rank j mod world size, so
    the set of samples does not depend on the number of ranks. Drawn once per evaluation (``ctx.drawn``)
    where they fit in ``SHARED_SAMPLES_BYTES``; ``timed``: each chunk with the seconds it took to draw."""
    if ctx.drawn is not None:
        yield from (chunk if timed else chunk[:3] for chunk in ctx.drawn)
        return
    family, cfg = ctx.family, ctx.cfg
    per_chunk = len(next(iter(family.fixed_inputs(cfg.batch_size, torch.Generator().manual_seed(0)).values())))
    kept: list | None = []
    size = 0
    for j in range(ctx.rank, math.ceil(cfg.n_samples / per_chunk), ctx.world_size):
        fixed = family.fixed_inputs(cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 7919 + j))
        take = min(per_chunk, cfg.n_samples - j * per_chunk)
        fixed = {k: v[:take].to(ctx.device) for k, v in fixed.items()}
        began = time.perf_counter()
        with sampling_mode(family):
            samples = family.sample(ctx.nets, fixed)
        if ctx.device.type == "cuda":  # the kernels finished, not just queued
            torch.cuda.synchronize(ctx.device)
        chunk = (j * per_chunk, samples, fixed, time.perf_counter() - began)
        size += samples.numel() * samples.element_size()
        kept = kept + [chunk] if kept is not None and size <= SHARED_SAMPLES_BYTES else None
        yield chunk if timed else chunk[:3]
    if kept is not None:  # every chunk drawn (a metric that stops early leaves nothing to share)
        ctx.drawn = kept
