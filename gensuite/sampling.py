"""Rebuild a trained run from its checkpoint alone (no dataset needed) and draw samples from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gensuite import checkpoint as ckpt
from gensuite.config import JobConfig, job_from_dict
from gensuite.errors import GensuiteError
from gensuite.registry import (DataSpec, Family, HasSamplers, Networks, SamplerChoice, TextConditioned,
                               get_family, sampling_mode)


@dataclass
class TrainedRun:
    job: JobConfig
    family: Family
    networks: Networks  # EMA copies where the run kept them
    step: int
    checkpoint: Path


def data_spec_from_state(state: dict) -> DataSpec:
    spec = state.get("data_spec")
    if spec is None:
        raise GensuiteError("checkpoint predates stored data specs; retrain or resume it once with this version")
    return DataSpec.from_dict(spec)


def load_run(source: str | Path, device: str = "cpu") -> TrainedRun:
    """A run directory (its latest checkpoint) or a checkpoint file -> family and networks."""
    path, state = ckpt.load_source(source)  # a damaged newest checkpoint: the newest that loads, with a warning
    job = job_from_dict(state["config"])
    family = get_family(job.family)(job.model, data_spec_from_state(state))
    family.load_state_dict(state.get("family", {}))  # e.g. the held-out captions a text run samples for
    modules = family.build_networks()
    ema = {}
    for name, module in modules.items():
        ckpt.check_fits(module, state["networks"].get(name, {}), str(path), name)
        module.load_state_dict(state["networks"][name])
        module.to(device).eval()
        weights = ckpt.ema_weights(state, name)
        if weights is not None:
            copy = family.build_networks()[name]
            ckpt.check_fits(copy, weights, str(path), f"EMA {name}")
            copy.load_state_dict(weights)
            ema[name] = copy.to(device).eval()
    return TrainedRun(job, family, Networks(modules, ema), state["step"], path)


def draw(run: TrainedRun, n: int, seed: int = 0, label: int | None = None, text: str | None = None,
         sampler: SamplerChoice | None = None) -> torch.Tensor:
    """``n`` samples from the run's sampler (fixed inputs drawn from ``seed``; all of class ``label``;
    all for the caption ``text``; with another of the model's samplers)."""
    if sampler is not None:
        use_sampler(run.family, sampler, f"{run.job.family}/{run.job.flavor} run")
    asked = n
    while True:  # class-conditional families draw n // classes per class: ask until there are n
        fixed = run.family.fixed_inputs(asked, torch.Generator().manual_seed(seed))
        if not fixed or len(next(iter(fixed.values()))) >= n:
            break
        asked *= 2
    fixed = {k: v[:n] for k, v in fixed.items()}
    if label is not None:
        classes = run.family.data.num_classes
        if not run.family.conditional:
            raise GensuiteError(f"--class: this {run.job.family}/{run.job.flavor} run is not class-conditional")
        if not 0 <= label < classes:
            raise GensuiteError(f"--class: {label} is not a class of {run.family.data.dataset} "
                                f"(0..{classes - 1}: {', '.join(run.family.data.class_names)})")
        fixed["y"] = torch.full_like(fixed["y"], label)
    if text is not None:
        fixed = run.family.with_text(fixed, embed_text(run, text))
    with sampling_mode(run.family):
        return run.family.sample(run.networks, fixed)


def use_sampler(family: Family, choice: SamplerChoice, what: str) -> None:
    """Switch ``family`` to the chosen sampler, or a one-line error when it has only one."""
    if not isinstance(family, HasSamplers):
        raise GensuiteError(f"--sampler/--steps/--eta: this {what} has one sampler; they apply to models with "
                            f"several (diffusion)")
    family.use_sampler(choice)


def embed_text(run: TrainedRun, text: str) -> torch.Tensor:
    """(1, T) embedding of new text by the encoder the run's shards were embedded with, or a
    one-line error saying why this run cannot take new text."""
    from gensuite.text import encoder_for

    encoder = run.family.data.text_encoder
    if not encoder or not isinstance(run.family, TextConditioned):
        raise GensuiteError(f"--text: this {run.job.family}/{run.job.flavor} run on {run.family.data.dataset} "
                            f"is not text-conditioned")
    return torch.as_tensor(encoder_for(encoder).embed([text]), dtype=torch.float32)


def save_samples(samples: torch.Tensor, family: Family, out: Path) -> None:
    """An image grid (one row per class for conditional families), or a scatter plot for points."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if samples.dim() == 2:
        from gensuite.logger import scatter

        fig = scatter(samples)
        fig.savefig(out, dpi=100)
        return
    from torchvision.utils import save_image

    save_image(samples.float().clamp(0, 1).cpu(), out, nrow=family.grid_nrow(len(samples)), padding=2)
