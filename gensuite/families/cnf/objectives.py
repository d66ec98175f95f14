"""FFJORD's objective: the exact log-likelihood of a continuous normalising flow, and the image
preprocessing (uniform dequantisation, logit transform) that makes it a likelihood of discrete pixels.

Convention (the course exercise's): the base N(0, I) sits at t = 0 and the data at t = T, so samples
integrate 0 → T and a data point's density integrates T → 0:

    log p_T(x) = log N(z(0); 0, I) − ∫_0^T tr ∂f/∂z(t, z(t)) dt,   z(T) = x.
"""

from __future__ import annotations

import math

import torch

from gensuite.families.cnf.dynamics import CNFDynamics, Solver, solve


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample (N,), summed over every non-batch dimension."""
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)


def cnf_log_likelihood(dynamics: CNFDynamics, x: torch.Tensor, t: float, solver: Solver,
                       x_start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """log p_t(x) (N,) by integrating (x, 0[, 0, 0]) from t back to 0; with ``dynamics.regularize`` also
    ``kinetic`` = ∫_0^t ‖f‖² dt and ``jacobian`` = ∫_0^t ‖∂f/∂z‖_F² dt per sample. At t = 0 the
    density is the base's. ``x_start`` (x itself, or x through ``BackwardNFE.attach``) is the state solved from."""
    zeros = x.new_zeros(len(x))
    if t == 0:
        out = {"log_px": standard_normal_logprob(x)}
        if dynamics.regularize:
            out.update(kinetic=zeros, jacobian=zeros)
        return out
    state = (x if x_start is None else x_start, zeros) + ((zeros, zeros) if dynamics.regularize else ())
    end = solve(dynamics, state, t, 0.0, solver)
    out = {"log_px": standard_normal_logprob(end[0]) - end[1]}
    if dynamics.regularize:  # integrated backwards in time: the accumulators end at −∫
        out.update(kinetic=-end[2], jacobian=-end[3])
    return out


# -- images: discrete pixels as a continuous density ---------------------------------------------------


def dequantize(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pixels x = k / 255 (k ∈ {0..255}) -> y = (k + u) / 256 ∈ (0, 1), u ~ U[0, 1)^D (Theis et al.
    2016): log P(k) ≥ E_u[log p_Y(y)] − D log 256, so a density of y bounds the pixels' likelihood."""
    return ((x * 255).round() + u) / 256


def logit_transform(y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w = logit(α + (1 − 2α) y) with log |det ∂w/∂y| (N,) (RealNVP's, FFJORD's preprocessing); α = 0
    only centres, w = y − 1/2 (log-det 0)."""
    if alpha == 0:
        return y - 0.5, y.new_zeros(len(y))
    s = alpha + (1 - 2 * alpha) * y
    w = torch.log(s) - torch.log1p(-s)
    log_det = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
    return w, log_det


def inverse_logit_transform(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """y from w (``logit_transform``'s inverse), clamped to [0, 1]."""
    y = w + 0.5 if alpha == 0 else (torch.sigmoid(w) - alpha) / (1 - 2 * alpha)
    return y.clamp(0, 1)


def discrete_log_likelihood(log_pw: torch.Tensor, log_det: torch.Tensor, dim: int) -> torch.Tensor:
    """log P(pixels) lower bound per sample in nats: log p_W(w) + log |det ∂w/∂y| − D log 256, whose
    bits/dim −value / (D ln 2) is the usual dequantised bits/dim."""
    return log_pw + log_det - dim * math.log(256)
