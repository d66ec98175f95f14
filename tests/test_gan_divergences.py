"""GAN discriminator losses as f-divergences: numerical optima against the closed forms.

Tolerances, all float64 (unit roundoff EPS/2 ≈ 1.1e-16):
- Optimal α: the minimiser states its own accuracy, the half-width of its final bisection
  bracket (``alpha_error_bound``, ~1e-20 to 1 ulp). On top of that, rounding: the closed form is
  a division and a log (≤ ~2 ulps·(1 + |α|)), and bisection can only be misled where the rounded
  slope (a few ulps of its terms) outweighs the true one, i.e. within a few ulps of the optimum,
  because for these losses the slope's terms are at most 2× the curvature there. ALPHA_ROUNDING
  = 64 EPS (1 + |α|) covers both with a wide margin (the observed error is ≤ 1 EPS (1 + |α|)).
- Risks: each side is a sum of n ≤ 20 terms of size ≤ 1, each costing ≤ ~10 roundings, and the
  closed forms also use Σ p = 1, which the generated masses satisfy to ~n ulps. 64·n·EPS ≥ 3× that
  bound; the optimiser's own error is ½ r''·δ² with δ ~ 1e-16, far below it.
- Induced f on u ∈ (0, 50]: the closed form subtracts terms as large as (u+1) log(u+1) ≈ 200, so
  f_tolerance(u) = 64 EPS (1 + (u+1) log(u+1)); first/second differences combine 2/4 values.
"""

import math

import pytest
import torch

from gensuite.families.gan.divergences import (
    MARGIN_LOSSES, empirical_margin_risk, f_divergence, induced_f, induced_f_closed_form, logistic,
    minimal_risk, minimise_pointwise_risk, optimal_discriminator, pointwise_risk)
from gensuite.families.gan.objectives import d_bce

F64 = torch.float64
EPS = torch.finfo(F64).eps
ALPHA_ROUNDING = 64 * EPS
SMOOTH_LOSSES = ["squared", "logistic"]
# (seed, support size): sizes span 5–20
CASES = [(0, 5), (1, 7), (2, 10), (3, 13), (4, 16), (5, 20)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: intra-op threads only add synchronisation on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def risk_tolerance(n_terms: int) -> float:
    return 64 * n_terms * EPS


def f_tolerance(u: torch.Tensor) -> torch.Tensor:
    return 64 * EPS * (1 + (u + 1) * torch.log1p(u))


def distribution_pair(seed: int, size: int, *, with_zeros: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """p_d, p_g on `size` points: two points with p_d = p_g exactly (one of them tiny), a near-zero
    mass (~1e-9) in each, and, if `with_zeros`, an exact zero in each at other points."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(size, generator=g)
    tied, tiny_data, tiny_gen = order[:2], order[2], order[3]
    raw_data = torch.rand(size, generator=g, dtype=F64) + 0.05
    raw_gen = torch.rand(size, generator=g, dtype=F64) + 0.05
    raw_data[tied[1]] *= 1e-8
    raw_data[tiny_data] *= 1e-9
    raw_gen[tiny_gen] *= 1e-9
    if with_zeros:
        raw_data[order[4]] = 0.0
        raw_gen[tiny_data] = 0.0  # p_d tiny, p_g zero: the squared optimum is exactly +1 there
    p_data = raw_data / raw_data.sum()
    untied = torch.ones(size, dtype=torch.bool)
    untied[tied] = False
    # Copy the tied masses and spread what remains over the other points, so p_g sums to 1 too.
    p_gen = p_data.clone()
    p_gen[untied] = (1 - p_data[tied].sum()) * raw_gen[untied] / raw_gen[untied].sum()
    assert (p_data[tied] == p_gen[tied]).all() and (p_data + p_gen > 0).all()
    return p_data, p_gen


@pytest.mark.parametrize("seed,size", CASES)
@pytest.mark.parametrize("loss_name", list(MARGIN_LOSSES))
def test_numerical_optimum_matches_closed_forms(loss_name: str, seed: int, size: int):
    p_data, p_gen = distribution_pair(seed, size, with_zeros=loss_name != "logistic")
    found = minimise_pointwise_risk(loss_name, p_data, p_gen)
    expected_alpha = optimal_discriminator(loss_name, p_data, p_gen)

    if loss_name == "zero_one":
        differ = p_data != p_gen
        assert differ.sum() >= size - 2
        assert torch.equal(torch.sign(found.alpha[differ]), expected_alpha[differ])
        # Where p_d = p_g every α is optimal; the search's tie-break returns 0 = sign(0).
        assert (found.alpha[~differ] == 0).all()
    else:
        # The default settings bisect down to (nearly) adjacent floats, so the stated bound is tight
        # and a coarser optimiser cannot hide behind its own error bar.
        assert (found.alpha_error_bound <= 4 * EPS * (1 + expected_alpha.abs())).all()
        alpha_tolerance = found.alpha_error_bound + ALPHA_ROUNDING * (1 + expected_alpha.abs())
        assert ((found.alpha - expected_alpha).abs() <= alpha_tolerance).all(), (found.alpha, expected_alpha)

    closed_form = minimal_risk(loss_name, p_data, p_gen)
    assert abs(found.total_risk.item() - closed_form.item()) <= risk_tolerance(size)
    # The same number as −½ D_f(p_d ‖ p_g) with the closed-form f (needs p_g > 0).
    if (p_gen > 0).all():
        divergence = f_divergence(lambda u: induced_f_closed_form(loss_name, u), p_data, p_gen)
        assert abs(found.total_risk.item() + 0.5 * divergence.item()) <= risk_tolerance(size)


U_STEP = 0.02
U_GRID = U_STEP * torch.arange(1, 2501, dtype=F64)  # (0, 50], evenly spaced for finite differences


@pytest.fixture(scope="module")
def numerical_f() -> dict[str, torch.Tensor]:
    return {name: induced_f(name, U_GRID) for name in MARGIN_LOSSES}


@pytest.mark.parametrize("loss_name", list(MARGIN_LOSSES))
def test_induced_f_closed_form_convex_non_increasing(loss_name: str, numerical_f: dict[str, torch.Tensor]):
    f = numerical_f[loss_name]
    tolerance = f_tolerance(U_GRID)
    assert ((f - induced_f_closed_form(loss_name, U_GRID)).abs() <= tolerance).all()

    first_differences = f[1:] - f[:-1]
    second_differences = f[2:] - 2 * f[1:-1] + f[:-2]
    assert (first_differences <= 2 * tolerance[1:]).all()
    assert (second_differences >= -4 * tolerance[2:]).all()
    if loss_name in SMOOTH_LOSSES:
        # f' = −4/(1+u)² or log(u/(u+1)): at u = 50 a step drops f by ≥ 3e-5, far above rounding.
        assert (first_differences < -2 * tolerance[1:]).all()
    else:
        # −min(u, 1): slope −1 up to u = 1, flat after; the test would catch a wrong shape.
        below_one = U_GRID[1:] <= 1
        assert (first_differences[below_one] < -U_STEP / 2).all()
        assert (first_differences[~below_one].abs() <= 2 * tolerance[1:][~below_one]).all()


@pytest.mark.parametrize("loss_name", list(MARGIN_LOSSES))
def test_equal_distributions_give_the_no_information_risk(loss_name: str):
    """p_d = p_g: min R = −½ f(1) = ℓ(0), the risk of the constant discriminator α ≡ 0
    (½, 1, log 2); and any p_d ≠ p_g does strictly better (the divergence is positive)."""
    loss = MARGIN_LOSSES[loss_name]
    zero = torch.zeros((), dtype=F64)
    no_information = loss(zero).item()
    assert math.isclose(no_information, -0.5 * induced_f_closed_form(loss_name, torch.ones((), dtype=F64)).item(),
                        rel_tol=0, abs_tol=8 * EPS)
    assert math.isclose(no_information, {"zero_one": 0.5, "squared": 1.0, "logistic": math.log(2)}[loss_name],
                        rel_tol=0, abs_tol=8 * EPS)

    for seed, size in CASES:
        p_data, p_gen = distribution_pair(seed, size, with_zeros=False)
        same = minimise_pointwise_risk(loss_name, p_data, p_data.clone())
        assert abs(same.total_risk.item() - no_information) <= risk_tolerance(size)
        assert abs(pointwise_risk(loss, zero, p_data, p_data).sum().item() - no_information) <= risk_tolerance(size)
        different = minimise_pointwise_risk(loss_name, p_data, p_gen)
        assert different.total_risk.item() < no_information - risk_tolerance(size)


def test_logistic_loss_is_accurate_in_float64():
    """log(1 + e^{−α}) against math.log1p/exp, including |α| > 20 where F.softplus's default
    threshold would drop ~e^{−20}."""
    alphas = [-45.0, -30.0, -21.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 21.0, 30.0, 45.0]
    values = logistic(torch.tensor(alphas, dtype=F64))
    for alpha, value in zip(alphas, values.tolist()):
        exact = -alpha + math.log1p(math.exp(alpha)) if alpha < 0 else math.log1p(math.exp(-alpha))
        assert math.isclose(value, exact, rel_tol=4 * EPS, abs_tol=0), (alpha, value, exact)


def test_d_bce_is_twice_the_logistic_margin_risk():
    g = torch.Generator().manual_seed(7)
    real_logits = 4 * torch.randn(7, generator=g, dtype=F64)
    fake_logits = 4 * torch.randn(11, generator=g, dtype=F64)
    # Batch means of softplus terms with |logit| ≲ 15 (< F.softplus's threshold of 20, so d_bce
    # is float64-accurate too): sizes ≤ ~15, ~20 roundings → 64·20·EPS·15 is ample.
    tolerance = 64 * 20 * EPS * 15
    assert max(real_logits.abs().max(), fake_logits.abs().max()) < 15
    risk = empirical_margin_risk(logistic, real_logits, fake_logits)
    assert abs(d_bce(real_logits, fake_logits, 1.0).item() - 2 * risk.item()) <= tolerance

    # Batches that realise two distributions exactly (each point repeated by its count), scored by
    # the numerically optimal discriminator: d_bce = 2 (log 2 − JS) = log 4 − 2 JS.
    counts_data = torch.randint(1, 10, (8,), generator=g)
    counts_gen = torch.randint(1, 10, (8,), generator=g)
    p_data = counts_data.to(F64) / counts_data.sum()
    p_gen = counts_gen.to(F64) / counts_gen.sum()
    alpha = minimise_pointwise_risk("logistic", p_data, p_gen).alpha
    assert alpha.abs().max() < 15
    batch_loss = d_bce(alpha.repeat_interleave(counts_data), alpha.repeat_interleave(counts_gen), 1.0)
    assert abs(batch_loss.item() - 2 * minimal_risk("logistic", p_data, p_gen).item()) <= tolerance
