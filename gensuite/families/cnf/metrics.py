"""``density_grid``: a 2-D flow's density on a grid against a histogram of its samples (assignment 003
P1b: b1 against b3), and, for the tanh exercise, how far θ is from θ*. Only CNF runs on 2-D points."""

from __future__ import annotations

import torch

from gensuite.data.pipeline import read_split
from gensuite.evaluation import EvalContext, Metric, register_metric


def applies(family) -> bool:
    from gensuite.families.cnf import CNF  # imported here: this module is imported by the family's __init__

    return isinstance(family, CNF) and family.data.kind == "points" and family.data.dim == 2


def values(family) -> dict[str, bool]:
    out = {"hist_tv": False, "hist_tv_noise": False, "grid_mass": True}
    if getattr(family, "target", None) is not None:
        out["theta_error"] = False
    return out


@torch.no_grad()
def compute(ctx: EvalContext) -> dict[str, float]:
    """The same on every rank (no data is split): the grid, eval.n_samples samples from eval.seed."""
    family, cfg = ctx.family, ctx.cfg
    reference = None if family.cfg.plot_extent is not None else read_split(ctx.shard_dir, cfg.split, 1000)["x"]
    lo, hi = family.extent(reference)
    field = ctx.nets.ema("field")
    result = family.density_check(field, lo, hi, cfg.n_samples, cfg.seed)
    out = {"hist_tv": result["tv"], "hist_tv_noise": result["tv_noise"], "grid_mass": result["grid_mass"]}
    if family.target is not None:
        theta = field.theta.detach().cpu()
        out["theta_error"] = float((theta - family.target.theta.cpu()).norm())
    return out


def describe(ctx: EvalContext) -> str:
    f = ctx.family
    return (f"density_grid: at t={f.histogram_time:g}, the exact log-density on a {f.cfg.density_grid}² grid "
            f"(each point "
            f"integrated back to t=0 with the exact trace, rtol {f.cfg.eval_rtol:g}, atol {f.cfg.eval_atol:g}) summed "
            f"into {f.cfg.histogram_bins}² bins, against a histogram of {ctx.cfg.n_samples} samples (seed "
            f"{ctx.cfg.seed}): total variation hist_tv, its expected value from sampling noise alone hist_tv_noise "
            f"(an upper bound), the grid's mass grid_mass")


register_metric(Metric("density_grid", values, applies=applies, compute=compute, describe=describe))
