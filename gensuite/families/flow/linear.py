"""Assignment 003 P1a, the linear change of variables: Y = A·Z with Z ~ N(μ, I₂) and A invertible,

    p_Y(y) = p_Z(A⁻¹ y) / |det A|,

by default A = [[3/5, 3/5], [1/5, 3/5]] (det A = 6/25) and μ = 0. (Y is Gaussian, N(Aμ, A Aᵀ), which
the tests use as a check; the function itself only uses the change of variables.)
"""

from __future__ import annotations

import math

import torch

DEFAULT_A = ((3 / 5, 3 / 5), (1 / 5, 3 / 5))


def linear_log_density(y: torch.Tensor, a=DEFAULT_A, mu=(0.0, 0.0)) -> torch.Tensor:
    """log p_Y(y) for points y (N, D) of Y = A·Z, Z ~ N(μ, I): log p_Z(A⁻¹ y) − log |det A|, in float64."""
    a = torch.as_tensor(a, dtype=torch.float64)
    mu = torch.as_tensor(mu, dtype=torch.float64)
    sign, log_abs_det = torch.linalg.slogdet(a)
    if sign == 0 or not torch.isfinite(log_abs_det):
        raise ValueError(f"A = {a.tolist()} is not invertible")
    z = torch.linalg.solve(a, y.double().T).T  # A⁻¹ y, without forming the inverse
    log_pz = -0.5 * ((z - mu).pow(2).sum(1) + len(mu) * math.log(2 * math.pi))
    return log_pz - log_abs_det


def linear_density(y: torch.Tensor, a=DEFAULT_A, mu=(0.0, 0.0)) -> torch.Tensor:
    """p_Y(y) (N,) = p_Z(A⁻¹ y) / |det A|."""
    return linear_log_density(y, a, mu).exp()


def sample_linear(n: int, generator: torch.Generator, a=DEFAULT_A, mu=(0.0, 0.0)) -> torch.Tensor:
    """n draws of Y = A·Z, Z ~ N(μ, I), in float64."""
    a = torch.as_tensor(a, dtype=torch.float64)
    z = torch.randn(n, a.shape[1], generator=generator, dtype=torch.float64) + torch.as_tensor(mu, dtype=torch.float64)
    return z @ a.T
