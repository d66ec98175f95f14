"""Monotonic rational-quadratic splines with linear tails (Durkan, Bekasov, Murray, Papamakarios,
"Neural Spline Flows", NeurIPS 2019, section 3.1 and appendix A), written from the paper.

On [-B, B] the map is K rational-quadratic pieces through the knots (x_k, y_k), k = 0..K, with
x_0 = y_0 = -B, x_K = y_K = B and positive derivatives δ_k at the knots; outside it is the identity
(δ_0 = δ_K = 1, so the map and its derivative are continuous at ±B). The unconstrained parameters
(widths, heights, interior derivatives) come from a coupling layer's conditioner; zeros give uniform
bins and unit derivatives, i.e. the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_BIN_WIDTH = 1e-3  # of the interval 2B: every bin keeps at least this share
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(_UNIT) + MIN_DERIVATIVE = 1: a zero raw derivative is a unit slope (and the tails' slope is 1).
_UNIT = math.log(math.expm1(1 - MIN_DERIVATIVE))


def spline_parameters(raw: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split (..., 3K - 1) raw values into widths (..., K), heights (..., K), interior derivatives (..., K - 1)."""
    return raw[..., :bins], raw[..., bins:2 * bins], raw[..., 2 * bins:]


def _knots(raw: torch.Tensor, bound: float, minimum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Knot positions (..., K + 1) from -B to B, and bin sizes (..., K), from unnormalised bin sizes."""
    bins = raw.shape[-1]
    share = minimum + (1 - minimum * bins) * torch.softmax(raw, dim=-1)
    knots = F.pad(torch.cumsum(share, dim=-1), (1, 0), value=0.0)
    knots = 2 * bound * knots - bound
    knots = torch.cat([torch.full_like(knots[..., :1], -bound), knots[..., 1:-1],
                       torch.full_like(knots[..., :1], bound)], dim=-1)  # ends exactly at ±B
    return knots, knots[..., 1:] - knots[..., :-1]


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, index[..., None])[..., 0]


def rational_quadratic_spline(x: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor,
                              derivatives: torch.Tensor, bound: float,
                              inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The spline (or its inverse) applied elementwise to ``x`` (...), with parameters (..., K),
    (..., K), (..., K - 1); returns the output and log |dy/dx| elementwise (of the map applied: the
    inverse's log-derivative when ``inverse``)."""
    inside = (x >= -bound) & (x <= bound)
    out, log_det = x.clone(), torch.zeros_like(x)
    if not inside.any():
        return out, log_det
    xs = x[inside]
    w_raw, h_raw, d_raw = widths[inside], heights[inside], derivatives[inside]
    cum_w, w = _knots(w_raw, bound, MIN_BIN_WIDTH)
    cum_h, h = _knots(h_raw, bound, MIN_BIN_HEIGHT)
    d = MIN_DERIVATIVE + F.softplus(F.pad(d_raw, (1, 1)) + _UNIT)  # ends: softplus(_UNIT) + min = 1
    d = torch.cat([torch.ones_like(d[..., :1]), d[..., 1:-1], torch.ones_like(d[..., :1])], dim=-1)

    knots_in = cum_h if inverse else cum_w
    k = (torch.searchsorted(knots_in[..., 1:-1].contiguous(), xs[..., None].contiguous(), right=True)[..., 0])
    x_k, w_k, y_k, h_k = _gather(cum_w, k), _gather(w, k), _gather(cum_h, k), _gather(h, k)
    d_k, d_k1 = _gather(d, k), _gather(d, k + 1)
    s = h_k / w_k
    if not inverse:
        theta = (xs - x_k) / w_k
        one_minus = theta * (1 - theta)
        denominator = s + (d_k1 + d_k - 2 * s) * one_minus
        ys = y_k + h_k * (s * theta.pow(2) + d_k * one_minus) / denominator
        derivative = s.pow(2) * (d_k1 * theta.pow(2) + 2 * s * one_minus + d_k * (1 - theta).pow(2))
        out[inside] = ys
        log_det[inside] = torch.log(derivative) - 2 * torch.log(denominator)
        return out, log_det
    dy = xs - y_k  # xs holds y values here
    a = h_k * (s - d_k) + dy * (d_k1 + d_k - 2 * s)
    b = h_k * d_k - dy * (d_k1 + d_k - 2 * s)
    c = -s * dy
    discriminant = (b.pow(2) - 4 * a * c).clamp_min(0)
    theta = (2 * c) / (-b - discriminant.sqrt())  # the root in [0, 1] (the stable form of the formula)
    one_minus = theta * (1 - theta)
    denominator = s + (d_k1 + d_k - 2 * s) * one_minus
    derivative = s.pow(2) * (d_k1 * theta.pow(2) + 2 * s * one_minus + d_k * (1 - theta).pow(2))
    out[inside] = theta * w_k + x_k
    log_det[inside] = -(torch.log(derivative) - 2 * torch.log(denominator))
    return out, log_det
