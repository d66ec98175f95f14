"""A normalising flow's objective: the exact log-likelihood by the change of variables, and the image
preprocessing that makes it a likelihood of discrete pixels.

    log p_X(x) = log N(f(x); 0, I) + log |det ∂f/∂x|

Images: pixels k/255 (k ∈ {0..255}) are dequantised, y = (k + u)/256 with u ~ U[0, 1)^D (Theis et al.
2016), then mapped to w by a logit (RealNVP) or an affine map (Glow) whose log-det is counted; then
log P(k) ≥ E_u[log p_W(w) + log |det ∂w/∂y|] − D log 256, and −value / (D ln 2) is the usual
dequantised bits/dim.
"""

from __future__ import annotations

import math

import torch


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample (N,), over every non-batch dimension."""
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)


def flow_log_likelihood(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """log p(x) = log N(z; 0, I) + log |det ∂z/∂x| per sample, in nats."""
    return standard_normal_log_prob(z) + log_det


def dequantize(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pixels x = k/255 in [0, 1] -> y = (k + u)/256 in [0, 1), u in [0, 1) of x's shape."""
    return ((x * 255).round() + u) / 256


def per_sample_uniform(seeds: torch.Tensor, *shape: int) -> torch.Tensor:
    """(len(seeds), *shape) uniforms in [0, 1), row i from its own generator seeded with seeds[i]
    (the uniform twin of ``registry.per_sample_normal``)."""
    return torch.stack([torch.rand(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def logit_transform(y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w = logit(α + (1 − 2α) y) (RealNVP, section 4.1) and log |det ∂w/∂y| per sample (N,)."""
    s = alpha + (1 - 2 * alpha) * y
    w = torch.log(s) - torch.log1p(-s)
    log_det = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
    return w, log_det


def inverse_logit_transform(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """y = (σ(w) − α) / (1 − 2α): ``logit_transform``'s inverse (unclamped)."""
    return (torch.sigmoid(w) - alpha) / (1 - 2 * alpha)


def affine_transform(y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w = scale · (y − ½) (Glow's centring when scale is 1) and log |det| = D log scale per sample."""
    return scale * (y - 0.5), y.new_full((len(y),), y[0].numel() * math.log(scale))


def inverse_affine_transform(w: torch.Tensor, scale: float) -> torch.Tensor:
    return w / scale + 0.5


def discrete_log_likelihood(log_pw: torch.Tensor, log_det: torch.Tensor, dim: int) -> torch.Tensor:
    """The dequantised lower bound on log P(pixels) per sample in nats: log p_W(w) + log |det ∂w/∂y|
    − D log 256 (bits/dim: −value / (D ln 2))."""
    return log_pw + log_det - dim * math.log(256)
