"""A 2-D flow's density two ways (the course exercise, assignment 003 P1b), and how far apart they are.

* (b1) Samples: z(0) ~ N(0, I) integrated to time t, counted in a 2-D histogram.
* (b3) A grid: every grid point z is integrated from t back to 0 together with ∫ tr ∂f/∂z, so
  log p_t(z) = log N(z(0)) − ∫_0^t tr ∂f/∂z dt (``objectives.cnf_log_likelihood``), exactly up to the
  solver's tolerance; nothing is estimated from samples.

The grid is the ``n × n`` cell centres of the square [lo, hi]²; the histogram's bins are blocks of
``n / bins`` × ``n / bins`` cells, so a bin's probability under the grid density is its cells' sum of
p · (cell area) (the midpoint rule on the fine grid). The total variation between the two is over the
bins plus one cell for "outside the square".
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gensuite.families.cnf.dynamics import CNFDynamics, Solver, StateDynamics, solve
from gensuite.families.cnf.objectives import cnf_log_likelihood
from gensuite.figures import grid_points


@torch.no_grad()
def grid_log_density(field: nn.Module, t: float, lo: float, hi: float, n: int, solver: Solver,
                     chunk: int = 16384) -> torch.Tensor:
    """log p_t on the grid (n, n) (rows: y, columns: x), by integrating each point back to 0 with the
    exact trace."""
    like = next(iter(field.parameters()), torch.zeros(()))
    points = grid_points(lo, hi, n, like.dtype).to(like.device)
    dynamics = CNFDynamics(field, "exact")
    out = [cnf_log_likelihood(dynamics, p, t, solver)["log_px"] for p in points.split(chunk)]
    return torch.cat(out).view(n, n)


@torch.no_grad()
def samples_at(field: nn.Module, z0: torch.Tensor, t: float, solver: Solver) -> torch.Tensor:
    """z(t) from z(0) (no trace: the state alone)."""
    return z0 if t == 0 else solve(StateDynamics(field), z0, 0.0, t, solver, adjoint=False)


def histogram(points: torch.Tensor, lo: float, hi: float, bins: int) -> tuple[torch.Tensor, float]:
    """Fractions of ``points`` (N, 2) in each of bins × bins square bins of [lo, hi]² (rows: y) and the
    fraction outside the square."""
    h = (hi - lo) / bins
    idx = torch.floor((points.double() - lo) / h).long()
    inside = ((idx >= 0) & (idx < bins)).all(1)
    flat = idx[inside, 1] * bins + idx[inside, 0]
    counts = torch.bincount(flat, minlength=bins * bins).double().view(bins, bins)
    return counts / len(points), float((~inside).double().mean())


def bin_probabilities(log_density: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """(bins, bins) probabilities of the histogram's bins under the grid density (n, n): each bin's
    cells' p · cell area summed (n must be a multiple of bins)."""
    n = log_density.shape[0]
    if n % bins:
        raise ValueError(f"the grid's {n} points per axis are not a multiple of {bins} bins")
    s = n // bins
    cell = ((hi - lo) / n) ** 2
    p = log_density.double().exp() * cell
    return p.view(bins, s, bins, s).sum((1, 3))


def total_variation(p_bins: torch.Tensor, p_outside: float, q_bins: torch.Tensor, q_outside: float) -> float:
    """½ Σ |p − q| over the bins and the outside cell."""
    return 0.5 * (float((p_bins - q_bins).abs().sum()) + abs(p_outside - q_outside))


def expected_tv_bound(p_bins: torch.Tensor, p_outside: float, n: int) -> float:
    """An upper bound on the expected total variation between an n-sample histogram and the bin
    probabilities p that drew it: E|p̂_b − p_b| ≤ sd(p̂_b) = √(p_b (1 − p_b) / n) (Jensen), so
    E[TV] ≤ ½ Σ_b √(p_b (1 − p_b) / n), the outside cell included."""
    p = torch.cat([p_bins.flatten().double(), torch.tensor([p_outside], dtype=torch.float64)]).clamp(0, 1)
    return 0.5 * float((p * (1 - p) / n).sqrt().sum())


def mcdiarmid_slack(n: int, delta: float) -> float:
    """TV of an n-sample histogram changes by at most 1/n when one sample moves, so (McDiarmid)
    P(TV ≥ E[TV] + ε) ≤ exp(−2 n ε²): ε = √(ln(1/δ) / (2n)) holds with probability 1 − δ."""
    return math.sqrt(math.log(1 / delta) / (2 * n))


def compare(field: nn.Module, t: float, lo: float, hi: float, grid: int, bins: int, n_samples: int,
            solver: Solver, generator: torch.Generator) -> dict:
    """Both densities at time t and how they compare: ``log_density`` (grid, grid), ``histogram`` (bins,
    bins) fractions, ``bins`` (bins, bins) grid probabilities, and the floats ``tv``, ``tv_noise`` (the
    expected TV of sampling noise alone, ``expected_tv_bound``), ``grid_mass`` (the grid density's
    mass inside the square) and ``outside`` (the samples' fraction outside it)."""
    log_density = grid_log_density(field, t, lo, hi, grid, solver)
    z0 = torch.randn(n_samples, 2, generator=generator, dtype=log_density.dtype).to(log_density.device)
    points = samples_at(field, z0, t, solver).cpu()
    hist, outside = histogram(points, lo, hi, bins)
    probs = bin_probabilities(log_density.cpu(), lo, hi, bins)
    mass = float(probs.sum())
    return {"log_density": log_density, "histogram": hist, "bins": probs, "samples": points,
            "tv": total_variation(hist, outside, probs, max(0.0, 1 - mass)),
            "tv_noise": expected_tv_bound(probs, max(0.0, 1 - mass), n_samples),
            "grid_mass": mass, "outside": outside}
