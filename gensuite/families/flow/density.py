"""A 2-D flow's density on a grid (exact: one forward pass per grid point) and its mass there."""

from __future__ import annotations

import torch
from torch import nn

from gensuite.families.flow.objectives import flow_log_likelihood
from gensuite.figures import grid_points


@torch.no_grad()
def grid_log_density(flow: nn.Module, lo: float, hi: float, n: int, chunk: int = 16384) -> torch.Tensor:
    """log p(x) (n, n) at the cell centres of [lo, hi]², in the flow's dtype and device."""
    like = next(iter(flow.parameters()))
    points = grid_points(lo, hi, n, like.dtype).to(like.device)
    return torch.cat([flow_log_likelihood(*flow(p)) for p in points.split(chunk)]).view(n, n)
