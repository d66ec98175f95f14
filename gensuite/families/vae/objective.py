"""The (β-)ELBO: reconstruction negative log-likelihood plus β times KL(q(z|x) || p(z)), for one
stochastic layer or a hierarchy p(x|z_1) p(z_1|z_2) ... p(z_L), q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1});
free bits and KL-weight schedules against posterior collapse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kl_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) per sample, summed over latent dimensions (closed form)."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).flatten(1).sum(1)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """−log p(x|z) for a sigmoid-Bernoulli decoder, per sample: binary cross-entropy summed over pixels."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def gaussian_nll(mean: torch.Tensor, log_std: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """−log N(x; mean, diag(exp(2 log_std))) per sample. With log_std = 0 this is
    0.5 * ||x − mean||² + 0.5 * D * log(2π): MSE up to a constant, i.e. fixed identity covariance."""
    log_std = log_std.expand_as(mean)
    nll = 0.5 * ((x - mean) / log_std.exp()).pow(2) + log_std + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(1)


def reparameterize(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """z = mean + σ ε with ε ~ N(0, I): a sample whose gradient flows to mean and log_var."""
    return mean + (0.5 * log_var).exp() * torch.randn_like(mean)


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(log_var))), summed over the last dimension."""
    return -0.5 * (((z - mean) ** 2) / log_var.exp() + log_var + math.log(2 * math.pi)).sum(-1)


def likelihood_bounds(log_px_given_z, mean: torch.Tensor, log_var: torch.Tensor, k: int,
                      generator: torch.Generator | None = None,
                      eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample lower bounds on log p(x) from k draws z_i ~ q(z|x) = N(mean, diag(exp(log_var))).

    ``log_px_given_z`` maps z of shape (k, B, D) to log p(x|z) of shape (k, B). With log weights
    w_i = log p(x|z_i) + log p(z_i) − log q(z_i|x):
      elbo = mean_i w_i                      (unbiased estimate of the ELBO),
      iwae = logsumexp_i w_i − log k         (Burda et al. 2016; ≥ elbo on the same draws,
                                              non-decreasing in k in expectation, → log p(x)).
    With q equal to the true posterior every w_i is log p(x) and both bounds are exact.
    """
    if eps is None:  # given: standard normal draws of shape (k, B, D), e.g. seeded per sample
        eps = torch.randn((k, *mean.shape), generator=generator, dtype=mean.dtype)
    z = mean + (0.5 * log_var).exp() * eps.to(mean.device, mean.dtype)
    log_prior = log_normal_diag(z, torch.zeros_like(mean), torch.zeros_like(log_var))
    return importance_bounds(log_px_given_z(z) + log_prior - log_normal_diag(z, mean, log_var))


def importance_bounds(log_w: torch.Tensor) -> dict[str, torch.Tensor]:
    """ELBO (mean) and IWAE (log-mean-exp) of log weights (k, B) over their k draws."""
    return {"elbo": log_w.mean(0), "iwae": torch.logsumexp(log_w, 0) - math.log(len(log_w))}


# -- per latent unit: hierarchies, learned priors, free bits -----------------------------------------


def kl_standard_normal_units(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, 1)) per unit (the terms kl_standard_normal sums)."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var)


def kl_normal_units(mean_q: torch.Tensor, log_var_q: torch.Tensor, mean_p: torch.Tensor,
                    log_var_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_q, exp(log_var_q)) || N(mean_p, exp(log_var_p))) per unit, in closed form."""
    return 0.5 * (log_var_p - log_var_q + (log_var_q.exp() + (mean_q - mean_p).pow(2)) / log_var_p.exp() - 1.0)


def log_normal_units(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(log_var)) per unit."""
    return -0.5 * ((z - mean).pow(2) / log_var.exp() + log_var + math.log(2 * math.pi))


def layer_kl_units(q: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   p: list[tuple[torch.Tensor, torch.Tensor]], standard_top: bool = False) -> list[torch.Tensor]:
    """Per-layer, per-unit estimates of the KL terms of the ELBO, one tensor (..., U_l) per layer.

    ``q``: (mean, log-variance, draw) of q(z_1|x), q(z_2|z_1), ...; ``p``: (mean, log-variance) of
    p(z_1|z_2), ..., p(z_L) at those draws. ELBO = E[log p(x|z_1)] − Σ_l (these terms), exactly in
    expectation:

    - top layer z_L: KL(q(z_L|z_{L-1}) || p(z_L)) in closed form given the drawn z_{L-1} (Monte Carlo
      over the layers below);
    - z_l below the top: log q(z_l|z_{l-1}) − log p(z_l|z_{l+1}) with the entropy term in closed form
      (−H[q(z_l|·)]) and the cross-entropy at the drawn z_l, z_{l+1}. A closed-form
      KL(q(z_l|·) || p(z_l|z_{l+1})) would be biased: z_{l+1} is drawn from z_l (bottom-up inference),
      so it is not independent of z_l. Below the top a unit's term can be negative on a draw.
    """
    out = []
    for l, ((q_mean, q_log_var, z), (p_mean, p_log_var)) in enumerate(zip(q, p)):
        if l == len(q) - 1:
            out.append(kl_standard_normal_units(q_mean, q_log_var) if standard_top
                       else kl_normal_units(q_mean, q_log_var, p_mean, p_log_var))
        else:
            entropy = 0.5 * (q_log_var + math.log(2 * math.pi * math.e))
            out.append(-entropy - log_normal_units(z, p_mean, p_log_var))
    return out


def free_bits(kl_units: torch.Tensor, threshold: float) -> torch.Tensor:
    """Σ_u max(λ, mean over the batch of KL_u) for KL terms (N, U) (Kingma et al. 2016, "free bits"):
    a unit whose batch-mean KL is below λ contributes the constant λ, so its KL gets no gradient."""
    return kl_units.mean(0).clamp(min=threshold).sum()


def kl_weight(step: int, schedule: str, steps: int, ratio: float = 0.5) -> float:
    """The KL term's weight in [0, 1] at training step ``step`` (1-based, as the loop counts):

    - ``none``: 1;
    - ``linear``: step / steps, then 1 (warm-up; Bowman et al. 2016);
    - ``cyclical``: periods of ``steps``; within each, rising linearly from 0 to 1 over the first
      ``ratio`` of it, then 1 (Fu et al. 2019).
    """
    if schedule == "none":
        return 1.0
    if schedule == "linear":
        return min(1.0, step / steps)
    position = ((step - 1) % steps + 1) / steps  # in (0, 1]: step 1 starts a period
    return min(1.0, position / ratio)
