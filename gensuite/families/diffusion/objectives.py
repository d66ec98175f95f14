"""Training objectives and the likelihood bound of the diffusion family.

Model calling convention everywhere: ``model(x_t, t)`` when y is None, else ``model(x_t, t, y)``,
with t a (N,) tensor (long timestep indices for DDPM; see ``noise_condition`` for NCSN).

* ``diffusion_loss``: Ho et al.'s simple loss generalised to three targets and three weightings.
* ``dsm_loss`` / ``ncsn_score_fn``: denoising score matching for a noise-conditional score network
  (Song & Ermon 2019). Convention: the network output is σ·s_θ, i.e. s_θ(x̃, σ) = output / σ, so the
  optimum output is −ε for x̃ = x + σ ε.
* ``variational_bound`` / ``variational_bound_bits_per_dim``: the DDPM negative ELBO
  L = L_T + Σ_{t=2}^T L_{t−1} + L_0 per sample, with a discretised Gaussian decoder L_0.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from gensuite.families.diffusion.schedules import NoiseSchedule

MIN_SNR_GAMMA = 5.0
WEIGHTINGS = ("uniform", "snr", "min_snr")


def call_model(model: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return model(x, t) if y is None else model(x, t, y)


def drop_labels(y: torch.Tensor | None, p_uncond: float, null_class: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Replace each label by ``null_class`` with probability p_uncond (classifier-free guidance
    training, Ho & Salimans 2021)."""
    if y is None or p_uncond <= 0.0:
        return y
    if null_class is None:
        raise ValueError("p_uncond > 0 needs a null class (the model's num_classes)")
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def loss_weight(schedule: NoiseSchedule, t: torch.Tensor, target: str, weighting: str,
                gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Per-sample weight (float64, shape of t) on the target-space MSE.

    Weightings are defined on the x0-space error ‖x0 − x̂0‖² and converted to the target's space,
    using ‖ε − ε̂‖² = SNR·‖x0 − x̂0‖² and ‖v − v̂‖² = (SNR + 1)·‖x0 − x̂0‖² at fixed x_t:
      "uniform": 1 on the target-space MSE (Ho's L_simple for target="eps");
      "snr":     x0-space weight SNR(t), i.e. the ε-MSE whatever the target
                 (eps: 1, x0: SNR, v: SNR/(SNR+1));
      "min_snr": x0-space weight min(SNR, γ) (Hang et al. 2023, γ = 5)
                 (eps: min(SNR,γ)/SNR, x0: min(SNR,γ), v: min(SNR,γ)/(SNR+1)).
    """
    snr = schedule.snr(t)
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "snr":
        x0_weight = snr
    elif weighting == "min_snr":
        x0_weight = snr.clamp(max=gamma)
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    factor = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1.0}.get(target)
    if factor is None:
        raise ValueError(f"unknown target {target!r}")
    return x0_weight / factor


def diffusion_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, target: str = "eps",
                   weighting: str = "uniform", y: torch.Tensor | None = None, p_uncond: float = 0.0,
                   *, null_class: int | None = None, generator: torch.Generator | None = None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """mean_n w(t_n) · mean_pixels (model(x_t, t) − target)², t ~ U{0..T−1}, x_t = q_sample(x0, t, ε).

    ``null_class`` defaults to ``model.num_classes``. t and noise may be given (tests); otherwise
    they are drawn with ``generator`` (the global RNG when None)."""
    n = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.T, (n,), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
    y = drop_labels(y, p_uncond, null_class, generator)
    xt = schedule.q_sample(x0, t, noise)
    goal = schedule.target(x0, noise, t, target)
    per_sample = (call_model(model, xt, t, y) - goal).pow(2).flatten(1).mean(1)
    weight = loss_weight(schedule, t, target, weighting).to(per_sample.device, per_sample.dtype)
    return (weight * per_sample).mean()


# -- noise-conditional score networks -----------------------------------------------------------

def noise_condition(sigmas: torch.Tensor, index: torch.Tensor, condition: str = "index") -> torch.Tensor:
    """What the network receives as "t" for noise level σ_index: the index itself ("index", as the
    per-level conditioning of NCSN) or log σ ("log_sigma", continuous)."""
    if condition == "index":
        return index
    if condition == "log_sigma":
        return sigmas.to(index.device)[index].log().float()
    raise ValueError(f"unknown noise condition {condition!r}; expected 'index' or 'log_sigma'")


def dsm_loss(model: Callable, sigmas: torch.Tensor, x0: torch.Tensor, y: torch.Tensor | None = None,
             *, condition: str = "index", generator: torch.Generator | None = None,
             index: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Song & Ermon's denoising score matching over noise levels, λ(σ) = σ²:

        mean_n ½ σ² ‖s_θ(x̃, σ) − ∇_x̃ log N(x̃; x, σ²I)‖²,  x̃ = x + σ ε,  σ = σ_i, i ~ U{0..L−1},

    summed over dimensions as in the paper. With s_θ = output/σ and ∇ log q = −ε/σ this is
    mean_n ½ ‖output + ε‖², so the optimal output is −ε (−σ times the score)."""
    n = x0.shape[0]
    if index is None:
        index = torch.randint(0, len(sigmas), (n,), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    sigma = NoiseSchedule.gather(sigmas, index, x0)
    out = call_model(model, x0 + sigma * noise, noise_condition(sigmas, index, condition), y)
    return 0.5 * (out + noise).pow(2).flatten(1).sum(1).mean()


def ncsn_score_fn(model: Callable, sigmas: torch.Tensor, condition: str = "index",
                  y: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """score_fn(x, i) = model(x, cond(i)[, y]) / σ_i, i a (N,) long tensor of noise-level indices:
    the interface of ``samplers.annealed_langevin``."""
    def score(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = call_model(model, x, noise_condition(sigmas, index, condition), y)
        return out / NoiseSchedule.gather(sigmas, index, x)
    return score


# -- the variational bound ----------------------------------------------------------------------

def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2) - 1.0)


def _log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Φ(b) − Φ(a)) for a < b, using the tail on the side of the interval (no cancellation)."""
    flip = a > 0  # Φ(b) − Φ(a) = Φ(−a) − Φ(−b)
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    la, lb = torch.special.log_ndtr(lo), torch.special.log_ndtr(hi)
    return lb + torch.log((-torch.expm1(la - lb)).clamp(min=torch.finfo(a.dtype).tiny))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """Elementwise log P(x) for data on the grid {−1 + 2k/(bins−1)} under N(mean, e^{2 log_scale})
    integrated over x's bin [x − 1/(bins−1), x + 1/(bins−1)], the end bins extended to ∓∞
    (Ho et al.'s decoder L_0)."""
    half = 1.0 / (bins - 1)
    inv = torch.exp(-log_scale)
    edge = 1.0 - half / 2
    a = torch.where(x < -edge, torch.full_like(x, -math.inf), (x - half - mean) * inv)
    b = torch.where(x > edge, torch.full_like(x, math.inf), (x + half - mean) * inv)
    return _log_ndtr_diff(a, b)


class VariationalBound(NamedTuple):
    """Per-sample terms of the negative ELBO, in nats, each of shape (N,)."""
    total: torch.Tensor
    prior: torch.Tensor      # L_T = KL(q(x_T | x0) ‖ N(0, I))
    diffusion: torch.Tensor  # Σ_{t=2}^T L_{t−1}, exact over all t or an unbiased estimate
    decoder: torch.Tensor    # L_0 = −log p(x0 | x1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, e^logvar): the decoder L_0 of continuous data (points)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean).pow(2) * torch.exp(-logvar))


def vb_term(model, schedule, x0, t, y, target, variance, clip_x0, noise, discrete: bool = True) -> torch.Tensor:
    """One term of the bound per sample, with x_t drawn from ``noise``: KL(q(x_{t−1}|x_t,x0) ‖
    p_θ(x_{t−1}|x_t)) where t ≥ 1 (paper index t+1), the decoder's −log p_θ(x0|x1) where t = 0:
    a probability of x0's bin on the 256-level grid (``discrete``, images) or a density (points)."""
    xt = schedule.q_sample(x0, t, noise)
    x0_hat, _ = schedule.x0_and_eps(call_model(model, xt, t, y), xt, t, target, clip_x0)
    mean, _, _ = schedule.posterior_mean_variance(x0_hat, xt, t)
    model_logvar = schedule.reverse_log_variance(t, variance, xt)
    log_decoder = (discretized_gaussian_log_likelihood(x0, mean, 0.5 * model_logvar) if discrete
                   else gaussian_log_likelihood(x0, mean, model_logvar))
    decoder = -log_decoder.flatten(1).sum(1)
    if bool((t == 0).all()):
        return decoder
    true_mean, _, true_logvar = schedule.posterior_mean_variance(x0, xt, t)
    kl = normal_kl(true_mean, true_logvar, mean, model_logvar).flatten(1).sum(1)
    return torch.where(t == 0, decoder, kl)


def prior_term(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x0) ‖ N(0, I)) per sample, in nats (no draws)."""
    t_T = torch.full((x0.shape[0],), schedule.T - 1, device=x0.device, dtype=torch.long)
    mean_T, var_T = schedule.q_mean_variance(x0, t_T)
    return normal_kl(mean_T, var_T.log(), torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).sum(1)


def variational_bound(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, target: str = "eps",
                      y: torch.Tensor | None = None, timesteps: int | None = None,
                      variance: str = "beta_tilde", clip_x0: bool = True,
                      generator: torch.Generator | None = None) -> VariationalBound:
    """The DDPM negative ELBO E_q[log q(x_{1:T}|x0) − log p(x_{0:T})] per sample (Ho et al. eq. 5):

      L_T = KL(q(x_T|x0) ‖ N(0,I));  L_{t−1} = KL(q(x_{t−1}|x_t,x0) ‖ p_θ(x_{t−1}|x_t)), t = 2..T,
      with one draw x_t ~ q(x_t|x0) each;  L_0 = −log p_θ(x0|x1), discretised Gaussian on 256 bins.

    p_θ(x_{t−1}|x_t) = N(μ̃(x̂0, x_t), σ_t²) with x̂0 from the model (clipped to [−1, 1] when clip_x0,
    as in Ho's evaluation) and σ_t² per ``variance`` (see ``NoiseSchedule.reverse_log_variance``).
    ``timesteps=None`` sums all T−1 KL terms; an integer k instead averages k terms at indices
    drawn uniformly from {2..T} per sample and multiplies by T−1 (unbiased). x0 must lie on the
    256-level grid of [−1, 1]. Draws use ``generator`` (the global RNG when None)."""
    n, T = x0.shape[0], schedule.T

    def randn():
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    t_T = torch.full((n,), T - 1, device=x0.device, dtype=torch.long)
    prior = prior_term(schedule, x0)

    args = (y, target, variance, clip_x0)
    diffusion = x0.new_zeros(n)
    if T > 1:
        if timesteps is None:
            for i in range(1, T):
                diffusion = diffusion + vb_term(model, schedule, x0, torch.full_like(t_T, i), *args, randn())
        else:
            for _ in range(timesteps):
                t = torch.randint(1, T, (n,), generator=generator, device=x0.device)
                diffusion = diffusion + vb_term(model, schedule, x0, t, *args, randn())
            diffusion = diffusion * ((T - 1) / timesteps)
    decoder = vb_term(model, schedule, x0, torch.zeros_like(t_T), *args, randn())
    return VariationalBound(prior + diffusion + decoder, prior, diffusion, decoder)


def nats_to_bits_per_dim(nats: torch.Tensor, dims: int | tuple[int, ...] | torch.Size) -> torch.Tensor:
    """nats per sample → bits per dimension: nats / (D ln 2), D = prod(dims) (e.g. x0.shape[1:])."""
    d = dims if isinstance(dims, int) else math.prod(dims)
    return nats / (d * math.log(2.0))


def variational_bound_bits_per_dim(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor,
                                   target: str = "eps", **kwargs) -> torch.Tensor:
    """``variational_bound(...).total`` per sample, in bits/dim, shape (N,)."""
    return nats_to_bits_per_dim(variational_bound(model, schedule, x0, target, **kwargs).total, x0.shape[1:])
