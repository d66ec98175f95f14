"""The (β-)ELBO: reconstruction negative log-likelihood plus β times KL(q(z|x) || N(0, I))."""

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
    log_w = log_px_given_z(z) + log_prior - log_normal_diag(z, mean, log_var)
    return {"elbo": log_w.mean(0), "iwae": torch.logsumexp(log_w, 0) - math.log(k)}
