"""A 2-D flow's density on a grid (exact: one forward pass per grid point) and its mass there."""

from __future__ import annotations

import torch
from torch import nn

from gensuite.families.flow.objectives import flow_log_likelihood


def grid_points(lo: float, hi: float, n: int, dtype=torch.float32) -> torch.Tensor:
    """(n², 2) cell centres of [lo, hi]², row-major with y outer: reshaped to (n, n), row r is y index r
    and column c is x index c (what ``imshow(origin="lower")`` expects)."""
    h = (hi - lo) / n
    axis = lo + h * (torch.arange(n, dtype=dtype) + 0.5)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], 1)


@torch.no_grad()
def grid_log_density(flow: nn.Module, lo: float, hi: float, n: int, chunk: int = 16384) -> torch.Tensor:
    """log p(x) (n, n) at the cell centres of [lo, hi]², in the flow's dtype and device."""
    like = next(iter(flow.parameters()))
    points = grid_points(lo, hi, n, like.dtype).to(like.device)
    return torch.cat([flow_log_likelihood(*flow(p)) for p in points.split(chunk)]).view(n, n)


def grid_mass(log_density: torch.Tensor, lo: float, hi: float) -> float:
    """∫ p over [lo, hi]² by the midpoint rule on the grid, in float64."""
    n = log_density.shape[0]
    return float(log_density.double().exp().sum() * ((hi - lo) / n) ** 2)
