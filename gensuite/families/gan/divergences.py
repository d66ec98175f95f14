"""Discriminator losses as f-divergences: what a Bayes-optimal discriminator measures.

Setting: a point x comes from the data distribution p_d (label +1) or from the generator p_g
(label −1) with equal priors ½, and the discriminator outputs a real number α(x) (a logit,
a score). A margin loss ℓ charges ℓ(α) on a real point and ℓ(−α) on a fake one, so the risk is

    R(α) = Σ_x r(α(x); x),    r(α; x) = ½ [p_d(x) ℓ(α) + p_g(x) ℓ(−α)].

Nothing couples different x, so the best discriminator minimises r point by point. Writing
u = p_d(x)/p_g(x) and

    f(u) = −min_α [u ℓ(α) + ℓ(−α)],

the minimum at x is ½ p_g(x) · (−f(u)), hence

    min_α R = −½ Σ_x p_g(x) f(p_d(x)/p_g(x)) = −½ D_f(p_d ‖ p_g).

f is convex (a supremum of functions affine in u) and non-increasing (their slopes −ℓ(α) are
≤ 0), so D_f is an f-divergence. f(1) ≠ 0 here: with f̃(u) = f(u) − f(1), a proper divergence
(D_f̃ ≥ 0, zero iff p_d = p_g), min R = −½ f(1) − ½ D_f̃(p_d ‖ p_g). The constant −½ f(1) is the
"no information" risk, that of the constant discriminator α ≡ 0, which equals ℓ(0) for the
three losses below. A better generator (smaller divergence) therefore means a larger optimal
discriminator risk. For the three losses (TV, Δ, JS below; JS in nats):

    loss      ℓ(α)                 optimal α(x)                  min R         f(u)
    0-1       1[α<0] + ½·1[α=0]    sign(p_d − p_g)               ½ (1 − TV)    −min(u, 1)
    squared   (1 − α)²             (p_d − p_g)/(p_d + p_g)       1 − Δ/2       −4u/(1 + u)
    logistic  log(1 + e^{−α})      log(p_d/p_g)                  log 2 − JS    u log u − (u+1) log(u+1)

The logistic row is the GAN discriminator: ``objectives.d_bce`` with real target 1 is
mean ℓ(real logits) + mean ℓ(−fake logits), i.e. exactly 2 R on the batch (see
:func:`empirical_margin_risk`), whence the classic "optimal D gives 2 JS − log 4".

:func:`minimise_pointwise_risk` finds the optimum numerically (it never uses the closed forms),
so tests can check the table above against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

MarginLoss = Callable[[torch.Tensor], torch.Tensor]


# --- margin losses ------------------------------------------------------------------------------

def zero_one(alpha: torch.Tensor) -> torch.Tensor:
    """1 for a wrong sign, 0 for a right one, ½ at α = 0.

    The tie value ½ (a fair coin flip on the label) makes ℓ(α) + ℓ(−α) = 1 for every α, so the
    constant discriminator α ≡ 0 has risk ½, the same as guessing; with ℓ(0) = 1 it would be
    charged on both classes and look worse than guessing. The optimum never needs α = 0 except
    where p_d = p_g, where every α is optimal, so the convention changes no minimum.
    """
    half = torch.full_like(alpha, 0.5)
    return torch.where(alpha > 0, torch.zeros_like(alpha), torch.where(alpha < 0, torch.ones_like(alpha), half))


def squared(alpha: torch.Tensor) -> torch.Tensor:
    """(1 − α)²: least-squares on a ±1 label (label·α = α for a real point)."""
    return (1 - alpha) ** 2


def logistic(alpha: torch.Tensor) -> torch.Tensor:
    """log(1 + e^{−α}) = softplus(−α) = −log σ(α).

    F.softplus switches to the identity above ``threshold`` (default 20), which drops
    log(1 + e^{−20}) ≈ 2e-9: invisible in float32, but a million ulps in float64. At 40 the
    dropped e^{−40} ≈ 4e-18 is below half an ulp of 40, so the result is float64-accurate.
    """
    return F.softplus(-alpha, threshold=40.0)


MARGIN_LOSSES: dict[str, MarginLoss] = {"zero_one": zero_one, "squared": squared, "logistic": logistic}


# --- risks --------------------------------------------------------------------------------------

def pointwise_risk(loss: MarginLoss, alpha: torch.Tensor, p_data: torch.Tensor, p_gen: torch.Tensor) -> torch.Tensor:
    """r(α; x) = ½ [p_d(x) ℓ(α) + p_g(x) ℓ(−α)], elementwise (broadcasts)."""
    return 0.5 * (p_data * loss(alpha) + p_gen * loss(-alpha))


def empirical_margin_risk(loss: MarginLoss, real_outputs: torch.Tensor, fake_outputs: torch.Tensor) -> torch.Tensor:
    """The risk R with p_d, p_g replaced by the two batches: ½ [mean ℓ(real) + mean ℓ(−fake)].

    Each batch is averaged on its own, so the priors stay ½ whatever the batch sizes."""
    return 0.5 * (loss(real_outputs).mean() + loss(-fake_outputs).mean())


@dataclass(frozen=True)
class RiskMinimum:
    """The per-point optimum found by :func:`minimise_pointwise_risk`."""

    alpha: torch.Tensor  # the optimal discriminator output at each point
    pointwise_risk: torch.Tensor  # r(alpha; x) at each point
    alpha_error_bound: torch.Tensor  # |alpha − true minimiser| ≤ this, up to rounding (0: exact)

    @property
    def total_risk(self) -> torch.Tensor:
        return self.pointwise_risk.sum()


def _check_masses(p_data: torch.Tensor, p_gen: torch.Tensor) -> None:
    if p_data.shape != p_gen.shape:
        raise ValueError(f"p_data and p_gen need one shape, got {tuple(p_data.shape)} and {tuple(p_gen.shape)}")
    if (p_data < 0).any() or (p_gen < 0).any():
        raise ValueError("probability masses must be >= 0")


def _risk_slope(loss: MarginLoss, alpha: torch.Tensor, p_data: torch.Tensor, p_gen: torch.Tensor) -> torch.Tensor:
    """∂r/∂α at each point. The points are independent, so the gradient of the summed risk holds
    each point's own derivative."""
    with torch.enable_grad():
        alpha = alpha.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(pointwise_risk(loss, alpha, p_data, p_gen).sum(), alpha)
    return slope


def minimise_pointwise_risk(loss_name: str, p_data: torch.Tensor, p_gen: torch.Tensor, *,
                            alpha_range: float = 50.0, grid_size: int = 2001,
                            bisections: int = 64) -> RiskMinimum:
    """Minimise r(α; x) over α separately at every point, numerically.

    ``p_data``, ``p_gen``: non-negative masses of one shape (they need not sum to 1, so the same
    routine gives f(u) from p_d = u, p_g = 1).

    - ``zero_one``: ℓ depends only on the sign of α, so α ∈ {0, +1, −1} covers every case and the
      search is exact. Ties go to the first candidate, 0, which is what sign(p_d − p_g) gives
      where p_d = p_g.
    - ``squared``, ``logistic``: r is convex and differentiable in α (ℓ is). A grid search over
      [−alpha_range, alpha_range] finds the lowest grid value; by convexity the minimiser lies
      between its two neighbours, where the slope changes sign, and ``bisections`` halvings on the
      sign of ∂r/∂α shrink that bracket (0.1 wide by default) to 0.1·2^−64 ≈ 5e-21, or to adjacent
      floats. ``alpha_error_bound`` is the final half-width; rounding of the slope adds a few ulps.
      The minimiser must lie inside the range: a point with p_d = 0 or p_g = 0 under the logistic
      loss (optimum at ±∞), or with p_d = p_g = 0 (r ≡ 0), raises ValueError.
    """
    _check_masses(p_data, p_gen)
    loss = MARGIN_LOSSES[loss_name]
    if loss_name == "zero_one":
        candidates = torch.tensor([0.0, 1.0, -1.0], dtype=p_data.dtype, device=p_data.device)
        shape = (-1,) + (1,) * p_data.dim()
        risks = pointwise_risk(loss, candidates.view(shape), p_data, p_gen)
        best = risks.argmin(dim=0)  # the first of equal minima, i.e. 0 at a tie
        alpha = candidates[best]
        return RiskMinimum(alpha, pointwise_risk(loss, alpha, p_data, p_gen), torch.zeros_like(alpha))

    grid = torch.linspace(-alpha_range, alpha_range, grid_size, dtype=p_data.dtype, device=p_data.device)
    shape = (-1,) + (1,) * p_data.dim()
    best = pointwise_risk(loss, grid.view(shape), p_data, p_gen).argmin(dim=0)
    if ((best == 0) | (best == grid_size - 1)).any():
        raise ValueError(f"the minimiser lies at or beyond ±{alpha_range} for some point "
                         f"(a zero mass under the logistic loss, or p_d = p_g = 0)")
    low, high = grid[best - 1], grid[best + 1]
    # The bracket must hold a slope sign change; if rounding on a nearly flat r broke the grid's
    # argmin, say so instead of returning a wrong optimum.
    if (_risk_slope(loss, low, p_data, p_gen) > 0).any() or (_risk_slope(loss, high, p_data, p_gen) < 0).any():
        raise ValueError("the grid search did not bracket the minimiser; refine the grid")
    for _ in range(bisections):
        middle = 0.5 * (low + high)
        if not ((middle > low) & (middle < high)).any():
            break  # every bracket is down to adjacent floats
        minimiser_right_of_middle = _risk_slope(loss, middle, p_data, p_gen) < 0
        low = torch.where(minimiser_right_of_middle, middle, low)
        high = torch.where(minimiser_right_of_middle, high, middle)
    alpha = 0.5 * (low + high)
    return RiskMinimum(alpha, pointwise_risk(loss, alpha, p_data, p_gen), 0.5 * (high - low))


# --- closed forms -------------------------------------------------------------------------------

def total_variation(p_data: torch.Tensor, p_gen: torch.Tensor) -> torch.Tensor:
    """TV = ½ Σ |p_d − p_g|, in [0, 1]."""
    return 0.5 * (p_data - p_gen).abs().sum()


def triangular_discrimination(p_data: torch.Tensor, p_gen: torch.Tensor) -> torch.Tensor:
    """Δ = Σ (p_d − p_g)² / (p_d + p_g), in [0, 2]; points with no mass in either contribute 0."""
    total = p_data + p_gen
    has_mass = total > 0
    return torch.where(has_mass, (p_data - p_gen) ** 2 / torch.where(has_mass, total, 1.0), 0.0).sum()


def jensen_shannon(p_data: torch.Tensor, p_gen: torch.Tensor) -> torch.Tensor:
    """JS = ½ KL(p_d ‖ m) + ½ KL(p_g ‖ m), m = (p_d + p_g)/2, in nats, in [0, log 2]."""
    mixture = 0.5 * (p_data + p_gen)
    safe_mixture = torch.where(mixture > 0, mixture, 1.0)  # 0 · log(0/0) is 0; avoid the NaN
    return 0.5 * (torch.xlogy(p_data, p_data / safe_mixture) + torch.xlogy(p_gen, p_gen / safe_mixture)).sum()


def optimal_discriminator(loss_name: str, p_data: torch.Tensor, p_gen: torch.Tensor) -> torch.Tensor:
    """Closed-form minimiser of r(α; x) at each point (set ∂r/∂α = 0; for 0-1 pick the cheaper side)."""
    if loss_name == "zero_one":
        return torch.sign(p_data - p_gen)
    if loss_name == "squared":  # −p_d (1 − α) + p_g (1 + α) = 0
        return (p_data - p_gen) / (p_data + p_gen)
    if loss_name == "logistic":  # −p_d σ(−α) + p_g σ(α) = 0  ⇔  σ(α) = p_d / (p_d + p_g)
        return torch.log(p_data / p_gen)
    raise KeyError(loss_name)


def minimal_risk(loss_name: str, p_data: torch.Tensor, p_gen: torch.Tensor) -> torch.Tensor:
    """Closed-form min_α R for normalised p_d, p_g (each sums to 1): the table in the module docstring.

    0-1: Σ ½ min(p_d, p_g) and Σ min = 1 − TV. Squared: at the optimum r = 2 p_d p_g/(p_d + p_g)
    and Σ 4 p_d p_g/(p_d + p_g) = Σ (p_d + p_g) − Δ = 2 − Δ. Logistic: at the optimum
    r = ½ [p_d log((p_d+p_g)/p_d) + p_g log((p_d+p_g)/p_g)] and Σ p log(2m/p) = log 2 − KL(p ‖ m).
    """
    if loss_name == "zero_one":
        return 0.5 * (1 - total_variation(p_data, p_gen))
    if loss_name == "squared":
        return 1 - 0.5 * triangular_discrimination(p_data, p_gen)
    if loss_name == "logistic":
        return math.log(2) - jensen_shannon(p_data, p_gen)
    raise KeyError(loss_name)


# --- the induced f ------------------------------------------------------------------------------

def induced_f(loss_name: str, u: torch.Tensor) -> torch.Tensor:
    """f(u) = −min_α [u ℓ(α) + ℓ(−α)], numerically: that minimum is 2 r(α; ·) at p_d = u, p_g = 1."""
    return -2 * minimise_pointwise_risk(loss_name, u, torch.ones_like(u)).pointwise_risk


def induced_f_closed_form(loss_name: str, u: torch.Tensor) -> torch.Tensor:
    """f(u) at the closed-form optimum α(u) of the table (p_d = u, p_g = 1)."""
    if loss_name == "zero_one":  # min(u·ℓ(α) + ℓ(−α)) over the signs of α: min(1, u, (u + 1)/2)
        return -torch.minimum(u, torch.ones_like(u))
    if loss_name == "squared":  # α = (u − 1)/(u + 1): u (2/(u+1))² + (2u/(u+1))² = 4u/(u + 1)
        return -4 * u / (1 + u)
    if loss_name == "logistic":  # α = log u: u log((1+u)/u) + log(1 + u)
        return torch.xlogy(u, u) - (u + 1) * torch.log1p(u)
    raise KeyError(loss_name)


def f_divergence(f: Callable[[torch.Tensor], torch.Tensor], p_data: torch.Tensor, p_gen: torch.Tensor) -> torch.Tensor:
    """D_f(p_d ‖ p_g) = Σ p_g f(p_d/p_g), for p_g > 0 everywhere (so the ratio is defined)."""
    if (p_gen <= 0).any():
        raise ValueError("D_f as Σ p_g f(p_d/p_g) needs p_g > 0 at every point")
    return (p_gen * f(p_data / p_gen)).sum()
