"""The ``mmd`` metric against closed forms: the estimator is its defining double sum, it converges to the
population MMD² of two Gaussians within standard errors derived from the sample sizes, it is unbiased (0 on
average for one distribution, where the biased estimator is not), it logs through the trainer, and ranks
give the one-process value bit for bit."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gensuite import evaluation
from gensuite.config import EvalConfig, job_from_dict
from gensuite.data.shards import data_spec, read_manifest
from gensuite.errors import ConfigError
from gensuite.evaluation.mmd import BANDWIDTHS, compute, describe, kernel_sum, mmd2_unbiased
from gensuite.registry import Networks
from launchers import free_port, gloo_rank

K = len(BANDWIDTHS)  # k(a, a): one per Gaussian kernel


def hand_kernel(a, b) -> float:
    return sum(math.exp(-sum((p - q) ** 2 for p, q in zip(a, b)) / (2 * s * s)) for s in BANDWIDTHS)


# -- the estimator is its double sum ---------------------------------------------------------------------


@pytest.mark.parametrize("x, y", [
    ([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [3.0, 0.0]]),
    ([[0.1], [0.15], [-0.3], [0.7]], [[0.0], [0.2], [0.4]])])
def test_the_estimator_is_gretton_eq_3_summed_by_hand(x, y):
    m, n = len(x), len(y)
    within_x = sum(hand_kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(hand_kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    between = sum(hand_kernel(a, b) for a in x for b in y) / (m * n)
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    value = mmd2_unbiased(x, y)
    assert value == pytest.approx(within_x + within_y - 2 * between, rel=1e-13, abs=1e-15)
    assert mmd2_unbiased(y, x) == pytest.approx(value, rel=1e-13, abs=1e-15)
    # blocks of rows change nothing but the summation order
    import gensuite.evaluation.mmd as mmd

    whole = kernel_sum(x, y)
    mmd.PAIRS_PER_BLOCK, before = 1, mmd.PAIRS_PER_BLOCK
    try:
        assert float(kernel_sum(x, y)) == pytest.approx(float(whole), rel=1e-14)
    finally:
        mmd.PAIRS_PER_BLOCK = before


# -- closed forms for Gaussians N(mu, s^2 I_d) and the metric's kernel --------------------------------------
# A "bump" (c, centre, w2) is c * exp(-|x - centre|^2 / (2 w2)); expectations of bumps and of products of bumps
# under a Gaussian are closed forms, and so are the estimator's mean and (first-order) variance.


def bump_mean(bumps, mu, s2):
    """E_{x ~ N(mu, s2 I)} of a sum of bumps."""
    d = len(mu)
    return sum(c * (w2 / (w2 + s2)) ** (d / 2) * math.exp(-_sq(centre, mu) / (2 * (w2 + s2)))
               for c, centre, w2 in bumps)


def bump_product(f, g):
    """The bumps of the product of two sums of bumps."""
    return [(c1 * c2 * math.exp(-_sq(m1, m2) / (2 * (w1 + w2))),
             [(w2 * a + w1 * b) / (w1 + w2) for a, b in zip(m1, m2)], w1 * w2 / (w1 + w2))
            for c1, m1, w1 in f for c2, m2, w2 in g]


def mean_embedding(mu, s2, sign=1.0):
    """x -> E_{x' ~ N(mu, s2 I)} k(x, x') as bumps."""
    d = len(mu)
    return [(sign * (sigma ** 2 / (sigma ** 2 + s2)) ** (d / 2), mu, sigma ** 2 + s2) for sigma in BANDWIDTHS]


def expected_kernel(mu1, mu2, s2):
    """E k(x, y), x ~ N(mu1, s2 I), y ~ N(mu2, s2 I): the brief's (σ²/(σ²+2s²))^{d/2} exp(-Δ²/(2(σ²+2s²)))."""
    d = len(mu1)
    return sum((sigma ** 2 / (sigma ** 2 + 2 * s2)) ** (d / 2) * math.exp(-_sq(mu1, mu2) / (2 * (sigma ** 2 + 2 * s2)))
               for sigma in BANDWIDTHS)


def population_mmd2(mu1, mu2, s2):
    return expected_kernel(mu1, mu1, s2) + expected_kernel(mu2, mu2, s2) - 2 * expected_kernel(mu1, mu2, s2)


def first_order_standard_error(mu1, mu2, s2, m, n):
    """sqrt(4 Var_x[a(x) - b(x)] / m + 4 Var_y[c(y) - e(y)] / n): the leading term (Hoeffding's projection)
    of the two-sample U-statistic's variance, a(x) = E_x' k(x, x'), b(x) = E_y k(x, y), and so on; the
    remainder is O(1/m^2)."""
    variance = 0.0
    for own, other, count in ((mu1, mu2, m), (mu2, mu1, n)):
        g = mean_embedding(own, s2) + mean_embedding(other, s2, sign=-1.0)
        variance += 4 * (bump_mean(bump_product(g, g), own, s2) - bump_mean(g, own, s2) ** 2) / count
    return math.sqrt(variance)


def null_standard_error(s2, d, m, n):
    """Exact for one distribution: the estimator is then a degenerate U-statistic in the centred kernel k~,
    Var = (2/(m(m-1)) + 2/(n(n-1)) + 4/(mn)) E[k~(x, x')^2], E[k~^2] = E k^2 - 2 E[a(x)^2] + (E k)^2."""
    mu = [0.0] * d
    k_squared = sum((w2 / (w2 + 2 * s2)) ** (d / 2) for w2 in
                    (s ** 2 * t ** 2 / (s ** 2 + t ** 2) for s in BANDWIDTHS for t in BANDWIDTHS))
    a = mean_embedding(mu, s2)
    centred = k_squared - 2 * bump_mean(bump_product(a, a), mu, s2) + expected_kernel(mu, mu, s2) ** 2
    return math.sqrt((2 / (m * (m - 1)) + 2 / (n * (n - 1)) + 4 / (m * n)) * centred)


def _sq(a, b) -> float:
    return sum((p - q) ** 2 for p, q in zip(a, b))


def gaussian(mu, s, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(mu, dtype=torch.float64) + s * torch.randn(n, len(mu), generator=g, dtype=torch.float64)


def test_the_closed_forms_agree_with_each_other():
    # E_x[a(x)] from the bumps is E k(x, x') of the brief's formula
    mu1, mu2, s2 = [0.0, 0.0], [0.3, -0.1], 0.04
    assert bump_mean(mean_embedding(mu1, s2), mu2, s2) == pytest.approx(expected_kernel(mu1, mu2, s2), rel=1e-14)
    assert population_mmd2(mu1, mu1, s2) == 0.0


@pytest.mark.parametrize("mu1, mu2, s", [([0.0], [0.25], 0.3), ([0.0, 0.0], [0.2, -0.15], 0.2)])
def test_the_estimator_converges_to_the_population_mmd_of_two_gaussians(mu1, mu2, s):
    m, n = 3000, 2000  # uneven, as generated samples and a test split are
    expected = population_mmd2(mu1, mu2, s * s)
    se = first_order_standard_error(mu1, mu2, s * s, m, n)
    assert expected > 10 * se  # the check can tell this pair of distributions from one
    value = mmd2_unbiased(gaussian(mu1, s, m, 1), gaussian(mu2, s, n, 2))
    assert abs(value - expected) <= 5 * se, (value, expected, se)


def test_one_distribution_scores_zero_on_average_and_the_biased_estimator_does_not():
    m = n = 400
    seeds = range(12)
    s2, d = 0.3 ** 2, 2
    values, biased = [], []
    for seed in seeds:
        x, y = gaussian([0.0, 0.0], 0.3, m, 2 * seed), gaussian([0.0, 0.0], 0.3, n, 2 * seed + 1)
        values.append(mmd2_unbiased(x, y))
        biased.append(float(kernel_sum(x, x) / m ** 2 + kernel_sum(y, y) / n ** 2 - 2 * kernel_sum(x, y) / (m * n)))
    se_of_mean = null_standard_error(s2, d, m, n) / math.sqrt(len(seeds))
    mean = sum(values) / len(values)
    assert abs(mean) <= 5 * se_of_mean, (mean, se_of_mean)
    assert min(values) < 0 < max(values)  # fluctuates around 0: negative values are the unbiasedness
    # the V-statistic keeps the diagonal: it exceeds MMD²_u by (K - W_x)/m + (K - W_y)/n, W the within-set
    # means (estimates of E k): in expectation (K - E k)(1/m + 1/n) > 0, many standard errors away
    bias = (K - expected_kernel([0.0, 0.0], [0.0, 0.0], s2)) * (1 / m + 1 / n)
    assert sum(biased) / len(biased) - mean == pytest.approx(bias, rel=1e-2)
    assert bias > 10 * se_of_mean and min(biased) > 0


# -- the metric: applies to point generators, ranks, the trainer ------------------------------------------


class ShiftedGaussian:
    """A stand-in family on two-moons shards: draws N(shift, 0.5^2 I_2) in chunks of its fixed inputs."""

    name = "shifted_gaussian"
    sampling_needs_gradients = False
    conditional = False

    def __init__(self, data):
        self.data = data

    def fixed_inputs(self, n, generator):
        return {"z": torch.randn(n, 2, generator=generator)}

    def sample(self, nets, fixed):
        return 0.5 * fixed["z"] + torch.tensor([0.5, 0.25])


def context(shard_dir, n_samples, batch_size, **kw):
    family = ShiftedGaussian(data_spec(read_manifest(shard_dir)))
    cfg = EvalConfig(metrics=["mmd"], n_samples=n_samples, batch_size=batch_size, seed=3)
    return evaluation.EvalContext(family, Networks({}), shard_dir, cfg, torch.device("cpu"), **kw)


def test_the_metric_is_the_estimator_on_the_generated_stream_and_the_split(shard_root):
    from gensuite.data.pipeline import read_split

    ctx = context(shard_root / "moons", 700, 300)
    assert [m.name for m in evaluation.resolve(ctx.cfg, ctx.family)] == ["mmd"]
    assert "mmd" not in [m.name for m in evaluation.resolve(EvalConfig(), ctx.family)]  # opt-in
    chunks = [ctx.family.sample(None, ctx.family.fixed_inputs(300, torch.Generator().manual_seed(3 * 7919 + j)))
              for j in range(3)]
    generated = torch.cat(chunks)[:700]
    real = read_split(shard_root / "moons", "test", 10_000)["x"]
    assert len(real) == 400
    assert compute(ctx) == {"mmd": mmd2_unbiased(generated, real)}
    ctx.cfg.max_samples = 100
    assert compute(ctx) == {"mmd": mmd2_unbiased(generated, real[:100])}
    assert "100 points of the test split" in describe(ctx)
    assert "exp(-||a - b||² / (2σ²)) over σ ∈ {0.05, 0.1, 0.2, 0.5, 1, 2}" in describe(ctx)
    ctx.family.fixed_inputs = lambda n, generator: {}  # draws nothing (a classifier)
    with pytest.raises(ConfigError, match=r"^eval.metrics\[0\]: mmd does not apply to the shifted_gaussian family"):
        evaluation.resolve(ctx.cfg, ctx.family)


def test_mmd_does_not_apply_to_image_generators(shard_root):
    family = ShiftedGaussian(data_spec(read_manifest(shard_root / "digits")))
    evaluation._load_builtin()
    assert not evaluation.METRICS["mmd"].applies(family)


def test_two_simulated_ranks_gather_the_points_of_one(shard_root):
    """Uneven chunks (7 of 300, the last of 100): each rank's zero-padded share, added, is the one-process set."""
    whole = []
    single = compute(context(shard_root / "moons", 1900, 300, sum_across_ranks=lambda t: whole.append(t) or t))
    parts = []
    for rank in (0, 1):
        compute(context(shard_root / "moons", 1900, 300, rank=rank, world_size=2,
                        sum_across_ranks=lambda t: parts.append(t.clone()) or t))
    assert torch.equal(parts[0] + parts[1], whole[0])
    for rank, other in ((0, parts[1]), (1, parts[0])):
        assert compute(context(shard_root / "moons", 1900, 300, rank=rank, world_size=2,
                               sum_across_ranks=lambda t: t + other)) == single


def _rank_main(rank, world, port, shard_dir, out_dir):
    with gloo_rank(rank, world, port) as all_reduce:
        values = compute(context(Path(shard_dir), 1900, 300, rank=rank, world_size=world, sum_across_ranks=all_reduce))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(values))


def test_two_gloo_ranks_give_the_value_of_one(shard_root, tmp_path):
    single = compute(context(shard_root / "moons", 1900, 300))
    mp.start_processes(_rank_main, args=(2, free_port(), str(shard_root / "moons"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    # the same points on every rank; only the kernel sums' float64 reduction order may differ with the
    # processes' thread counts: each of the ~10^6 terms is rounded at 1.1e-16, so 1e-12 relative is ample
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["mmd"] == pytest.approx(single["mmd"], rel=1e-12)


def test_a_points_job_logs_eval_mmd_through_the_trainer(shard_root, tmp_path):
    from gensuite.report import read_run
    from gensuite.trainer import train

    raw = {"name": "f", "family": "flow", "flavor": "debug", "model": {},
           "data": {"dataset": "moons", "root": str(shard_root), "shuffle_buffer": 64},
           "optim": {"lr": 3e-3}, "train": {"steps": 4, "batch_size": 32, "log_every": 2, "sample_every": 4,
                                             "checkpoint_every": 4},
           "eval": {"metrics": ["mmd"], "every": 2, "n_samples": 300, "batch_size": 100},
           "log": {"grid_size": 16, "progress_bar": False}}
    metrics = train(job_from_dict(raw), tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert [s for s, _ in run.scalars["eval/mmd"]] == [2, 4]
    assert math.isfinite(metrics["final/eval/mmd"]) and metrics["final/eval/mmd"] > 0
    assert run.scalars["eval/mmd"][-1][1] == pytest.approx(metrics["final/eval/mmd"], rel=1e-6)  # float32 in TB
    assert "unbiased MMD²" in run.texts["eval/protocol"][0][1]
