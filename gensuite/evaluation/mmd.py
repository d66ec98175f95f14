"""Maximum mean discrepancy between generated and held-out points: one sample-based distance for every
family that draws points (GANs, flows, CNFs, ...), so a points leaderboard ranks them all alike.

``mmd`` is the unbiased estimator MMD²_u of Gretton et al. (2012, JMLR, Lemma 6, eq. 3) between the
``eval.n_samples`` generated points x_1..x_m and the first ``eval.max_samples`` points y_1..y_n of the
real ``eval.split``:

    MMD²_u = 1/(m(m-1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n-1)) Σ_{i≠j} k(y_i, y_j) - 2/(mn) Σ_{i,j} k(x_i, y_j)

with k(a, b) = Σ_σ exp(-||a - b||² / (2σ²)) over the fixed bandwidths σ in ``BANDWIDTHS`` (data units).
Lower is better; 0 in expectation when the model draws the data's distribution, so a value may be slightly
negative. Every Gaussian kernel is characteristic, so a sum of them is too: the population MMD is 0 only
for the data's distribution. Why these bandwidths: one kernel only resolves structure at its own scale, and
the points datasets span scales from a mode's std (ring 0.02, grid 0.05, moons' noise 0.05) to a mixture's
spacing (ring radius 2, grid step 2); 0.05 .. 2.0 covers both, and fixed values (not the median heuristic)
keep one job's numbers comparable with another's. Computed in float64 on ``ctx.device``, with squared
distances as sums of squared differences (no ||a||² + ||b||² - 2a·b cancellation).

Not torchmetrics' KID: that is the same unbiased estimator but with a cubic polynomial kernel on Inception
features of images; on 2-D points the Gaussian kernels above are the meaningful choice, and the estimator is
a few lines.

Several ranks: every rank draws its chunks of the generated stream (``generated_samples``), writes them at
their indices into a zero (m, d) float64 tensor and the tensors are added across ranks
(``ctx.sum_across_ranks``: torch.distributed's all-reduce when a process group is initialised); adding zeros
is exact, so this is an all-gather, and every rank then holds the one-process points. Every rank reads the
whole real split itself and computes the same float64 sums in the same order: the value equals the
one-process value bit for bit. A non-finite generated point makes the value NaN.
"""

from __future__ import annotations

import torch

from gensuite.data.pipeline import iterate_split
from gensuite.evaluation import EvalContext, Metric, generated_samples, register_metric

BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # σ of each Gaussian kernel, in data units
PAIRS_PER_BLOCK = 1 << 22  # kernel values held at once (32 MiB of float64)


def kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths=BANDWIDTHS) -> torch.Tensor:
    """Σ_{i,j} k(a_i, b_j) in float64 over all pairs of a (m, d) and b (n, d), a block of rows at a time."""
    a, b = a.double(), b.double()
    rows = max(1, PAIRS_PER_BLOCK // max(1, len(b)))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, len(a), rows):
        squared = (a[start:start + rows, None, :] - b[None, :, :]).pow(2).sum(-1)
        for sigma in bandwidths:
            total += torch.exp(squared / (-2 * sigma ** 2)).sum()
    return total


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths=BANDWIDTHS) -> float:
    """MMD²_u (Gretton et al. 2012, eq. 3) of x (m, d) and y (n, d), m, n >= 2. The diagonal of each
    within-set sum is k(a, a) = len(bandwidths) exactly, so it is subtracted rather than masked."""
    m, n, on_diagonal = len(x), len(y), float(len(bandwidths))
    within_x = (kernel_sum(x, x, bandwidths) - m * on_diagonal) / (m * (m - 1))
    within_y = (kernel_sum(y, y, bandwidths) - n * on_diagonal) / (n * (n - 1))
    between = kernel_sum(x, y, bandwidths) / (m * n)
    return float(within_x + within_y - 2 * between)


def real_points(ctx: EvalContext) -> torch.Tensor:
    """The first ``eval.max_samples`` points of ``eval.split``, read whole on every rank."""
    batches = [batch["x"] for _, batch in iterate_split(ctx.shard_dir, ctx.cfg.split, ctx.cfg.batch_size,
                                                        limit=ctx.cfg.max_samples, fields=set())]
    return torch.cat(batches).reshape(-1, ctx.family.data.dim).to(ctx.device, torch.float64)


def gathered_samples(ctx: EvalContext) -> torch.Tensor:
    """All ``eval.n_samples`` generated points (m, d) on every rank, in stream order."""
    points = torch.zeros(ctx.cfg.n_samples, ctx.family.data.dim, dtype=torch.float64, device=ctx.device)
    for start, samples, _ in generated_samples(ctx):
        points[start:start + len(samples)] = samples.detach().reshape(len(samples), -1).to(ctx.device, torch.float64)
    return ctx.sum_across_ranks(points)


@torch.no_grad()
def compute(ctx: EvalContext) -> dict[str, float]:
    return {"mmd": mmd2_unbiased(gathered_samples(ctx), real_points(ctx))}


def describe(ctx: EvalContext) -> str:
    n = ctx.family.data.samples.get(ctx.cfg.split, 0)
    n = min(n, ctx.cfg.max_samples) if ctx.cfg.max_samples else n
    sigmas = ", ".join(f"{s:g}" for s in BANDWIDTHS)
    return (f"mmd: unbiased MMD² (Gretton et al. 2012, eq. 3; lower is better, 0 in expectation for the data's "
            f"distribution, may be slightly negative) between {ctx.cfg.n_samples} generated points (seed "
            f"{ctx.cfg.seed}) and {n} points of the {ctx.cfg.split} split, float64, kernel k(a, b) = Σ_σ "
            f"exp(-||a - b||² / (2σ²)) over σ ∈ {{{sigmas}}} in data units")


def _generates_points(family) -> bool:
    return family.data.kind == "points" and bool(family.fixed_inputs(2, torch.Generator().manual_seed(0)))


# opt-in, like sampling_speed: it draws eval.n_samples points, costly for an ODE or Langevin sampler
register_metric(Metric("mmd", {"mmd": False}, applies=_generates_points, compute=compute, describe=describe,
                       default=False))
