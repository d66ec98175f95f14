"""Samplers of the diffusion family, all on one interface.

``model_fn(x, t)`` returns the network output in the family's ``target`` space ("eps", "x0" or
"v") for x at timestep indices t, a (N,) long tensor; the samplers convert it to (x̂0, ε̂) with
``NoiseSchedule.x0_and_eps``. Bind labels and guidance into model_fn (see ``guided``).

Every random draw goes through the explicit ``generator`` argument, and samples are created on
the generator's device (or x_T's, when given), so a run is reproducible bit for bit and leaves the
global RNG untouched. ``progress(i, t, x, x0_hat)`` (optional) is called after step i with the
timestep index just used, the new state and the current x0 prediction, e.g. to record frames.
All samplers run under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from gensuite.families.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _start(shape: Sequence[int], generator: torch.Generator, x_T: torch.Tensor | None,
           dtype: torch.dtype) -> torch.Tensor:
    if x_T is not None:
        return x_T.clone()
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)


def _steps(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def ddpm_sample(model_fn: ModelFn, schedule: NoiseSchedule, shape: Sequence[int], target: str = "eps",
                variance: str = "beta", *, generator: torch.Generator, clip_x0: bool = True,
                progress: Progress | None = None, x_T: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ancestral sampling (Ho et al. algorithm 2): x_T ~ N(0, I), then for t = T..1
    x_{t−1} = μ̃_t(x̂0, x_t) + σ_t z with σ_t² = β_t ("beta") or β̃_t ("beta_tilde"), and no noise
    at the last step. μ̃ is the posterior mean at x̂0 (clipped to [−1, 1] when clip_x0); unclipped
    with target "eps" it is Ho's (x_t − β_t/√(1−ᾱ_t) ε̂)/√α_t."""
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"unknown variance {variance!r}")
    x = _start(shape, generator, x_T, dtype)
    table = schedule.betas if variance == "beta" else schedule.posterior_variance
    for i, t in enumerate(range(schedule.T - 1, -1, -1)):
        tt = _steps(x, t)
        x0, _ = schedule.x0_and_eps(model_fn(x, tt), x, tt, target, clip_x0)
        mean, _, _ = schedule.posterior_mean_variance(x0, x, tt)
        if t > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + schedule.gather(table, tt, x).sqrt() * noise
        else:
            x = mean
        if progress is not None:
            progress(i, t, x, x0)
    return x


def timesteps(T: int, steps: int, spacing: str = "uniform") -> list[int]:
    """Increasing sub-sequence τ_1 < … < τ_S of {0..T−1} used by DDIM (S = steps).

    "uniform": τ_i = round(i·T/S), i = 0..S−1 (every step when S = T; 0, 20, …, 980 for T=1000,
    S=50, as in Song et al.). "quadratic": τ_i ≈ (T−1)(i/(S−1))², i = 0..S−1, with the crowded
    small values pushed apart to stay distinct (denser near t = 0)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "uniform":
        seq = [int(round(i * T / steps)) for i in range(steps)]
    elif spacing == "quadratic":
        if steps == 1:
            return [T - 1]
        seq = []
        for i in range(steps):
            v = int(round((T - 1) * (i / (steps - 1)) ** 2))
            seq.append(max(v, seq[-1] + 1) if seq else v)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected 'uniform' or 'quadratic'")
    if any(b <= a for a, b in zip(seq, seq[1:])) or seq[0] < 0 or seq[-1] > T - 1:
        raise AssertionError(f"bad timestep sequence for T={T}, steps={steps}, {spacing}")
    return seq


def ddim_sigma(schedule: NoiseSchedule, t: int, t_prev: int, eta: float) -> float:
    """σ_τ(η) of DDIM (Song et al. 2021, eq. 16) from index t to t_prev (−1 = the data):
    η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev), in float64. η = 1 with t_prev = t−1 is √β̃_t."""
    a = float(schedule.alphas_cumprod[t])
    a_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    return eta * math.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, schedule: NoiseSchedule, shape: Sequence[int], target: str = "eps",
                steps: int = 50, eta: float = 0.0, spacing: str = "uniform", *,
                generator: torch.Generator, clip_x0: bool = True, x_T: torch.Tensor | None = None,
                progress: Progress | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DDIM (Song et al. 2021): along τ from timesteps(T, steps, spacing), from the last down,
    x_prev = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z with σ = ddim_sigma(η) (ᾱ_prev = 1 after
    the first element). η = 0 is deterministic given x_T; η = 1 with steps = T is DDPM with
    σ_t² = β̃_t (and consumes the generator in the same order as ddpm_sample). With clip_x0, ε̂ is
    recomputed from the clipped x̂0."""
    x = _start(shape, generator, x_T, dtype)
    seq = timesteps(schedule.T, steps, spacing)
    for i in range(len(seq) - 1, -1, -1):
        t, t_prev = seq[i], (seq[i - 1] if i > 0 else -1)
        tt = _steps(x, t)
        x0, eps = schedule.x0_and_eps(model_fn(x, tt), x, tt, target, clip_x0)
        a_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        sigma = ddim_sigma(schedule, t, t_prev, eta)
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        if eta > 0 and t_prev >= 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if progress is not None:
            progress(len(seq) - 1 - i, t, x, x0)
    return x


@torch.no_grad()
def ddim_invert(model_fn: ModelFn, schedule: NoiseSchedule, x0: torch.Tensor, target: str = "eps",
                steps: int = 50, spacing: str = "uniform", progress: Progress | None = None) -> torch.Tensor:
    """Deterministic (η = 0) DDIM encoding x0 → x_T, running the DDIM ODE step forward:
    x_next = √ᾱ_next x̂0 + √(1−ᾱ_next) ε̂ with ε̂ the model's prediction at the current state
    evaluated at the next timestep (the standard approximation ε̂(x_t, t_next) ≈ ε̂(x_next, t_next)).
    The error vanishes as steps grow; decode with ddim_sample(..., eta=0, clip_x0=False, x_T=...)
    on the same sequence. Nothing is clipped."""
    x = x0.clone()
    seq = timesteps(schedule.T, steps, spacing)
    a_cur = 1.0
    for i, t in enumerate(seq):
        tt = _steps(x, t)
        out = model_fn(x, tt)
        # Read the output as a prediction at (x, t), then re-express it at the current level.
        _, eps = schedule.x0_and_eps(out, x, tt, target)
        x0_hat = (x - math.sqrt(1.0 - a_cur) * eps) / math.sqrt(a_cur)
        a_next = float(schedule.alphas_cumprod[t])
        x = math.sqrt(a_next) * x0_hat + math.sqrt(1.0 - a_next) * eps
        a_cur = a_next
        if progress is not None:
            progress(i, t, x, x0_hat)
    return x


@torch.no_grad()
def annealed_langevin(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sigmas: torch.Tensor,
                      shape: Sequence[int], steps_per_sigma: int = 100, step_lr: float = 2e-5, *,
                      generator: torch.Generator, denoise_last: bool = True,
                      x_init: torch.Tensor | None = None, progress: Progress | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, algorithm 1). For σ_1 > … > σ_L, with
    α_i = ε σ_i²/σ_L² (ε = step_lr), repeat steps_per_sigma times
    x ← x + (α_i/2) s(x, i) + √α_i z. ``score_fn(x, i)`` takes i as a (N,) long tensor of level
    indices (see objectives.ncsn_score_fn). x starts uniform on [−1, 1] unless x_init is given.
    ``denoise_last`` adds the final Tweedie step x ← x + σ_L² s(x, L) (Song & Ermon 2020;
    Jolicoeur-Martineau et al. 2021), returning the posterior mean instead of a noisy sample.
    progress(i, level, x, x) is called after each level i."""
    if x_init is not None:
        x = x_init.clone()
    else:
        x = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype) * 2 - 1
    sig = [float(s) for s in sigmas]
    for i, s in enumerate(sig):
        alpha = step_lr * (s / sig[-1]) ** 2
        idx = _steps(x, i)
        for _ in range(steps_per_sigma):
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + 0.5 * alpha * score_fn(x, idx) + math.sqrt(alpha) * z
        if progress is not None:
            progress(i, i, x, x)
    if denoise_last:
        x = x + sig[-1] ** 2 * score_fn(x, _steps(x, len(sig) - 1))
    return x


def guided(model_fn: Callable, scale: float, null_class: int, y: torch.Tensor | None = None) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2021): returns fn(x, t, y=<bound y>) computing
    (1 + w)·f(x, t, y) − w·f(x, t, null) with w = ``scale``, from ``model_fn(x, t, y)``.

    Convention: w = 0 is the plain conditional model (not "no guidance = scale 1" as in the
    ε_u + s(ε_c − ε_u) form; s = 1 + w). Conditional and unconditional halves are evaluated in one
    batch of 2N. Because every target is affine in the others at fixed (x_t, t), guiding the
    eps, x0 or v output gives the same combination in every space. Bind y here so the result
    fits the samplers' model_fn(x, t)."""
    bound = y

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = bound if y is None else y
        if y is None:
            raise ValueError("guided model_fn needs class labels y")
        if scale == 0:
            return model_fn(x, t, y)
        null = torch.full_like(y, null_class)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        return (1.0 + scale) * cond - scale * uncond
    return fn
