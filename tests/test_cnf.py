"""CNF family (FFJORD and the course's tanh exercise): traces against closed forms, Hutchinson's estimator
against the exact trace, the grid density against exact probabilities and a histogram, adjoint gradients
against direct backprop and finite differences, memory of the two, the function-evaluation counts, and a
short training run. Every tolerance says where it comes from."""

import math

import pytest
import torch
from sklearn.datasets import make_moons
from torch import nn

from gensuite.config import from_dict, load_job
from gensuite.errors import ConfigError
from gensuite.families.cnf import CNF, CNFConfig
from gensuite.families.cnf.density import (bin_probabilities, compare, expected_tv_bound, grid_log_density,
                                           mcdiarmid_slack, total_variation)
from gensuite.families.cnf.dynamics import (BackwardNFE, CNFDynamics, Solver, StateDynamics, exact_divergence,
                                            hutchinson_divergence, probes, solve)
from gensuite.families.cnf.memory import saved_tensor_bytes
from gensuite.families.cnf.networks import ConcatSquashMLP, TanhField
from gensuite.families.cnf.objectives import (cnf_log_likelihood, dequantize, inverse_logit_transform,
                                              logit_transform, standard_normal_logprob)
from gensuite.registry import DataSpec, Networks

MOONS = DataSpec("moons", "points", (2,))
TINY_IMAGES = DataSpec("tiny", "image", (1, 6, 6))  # 36 dimensions: above exact_trace_max_dim (16)


def family(flavor="debug", data=MOONS, **overrides):
    return CNF(from_dict(CNFConfig, {**CNF.flavors[flavor], **overrides}, "model"), data)


# -- traces ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("power", [3, 2, 1])
def test_autograd_trace_equals_the_tanh_fields_analytic_divergence(power):
    torch.manual_seed(0)
    field = TanhField(2, power, "self", [0.7, -1.3]).double()
    z = (torch.randn(256, 2, dtype=torch.float64) * 1.5).requires_grad_(True)
    div, frob = exact_divergence(field(torch.tensor(0.0), z), z, create_graph=False)
    theta = field.theta.detach()
    diag = theta * power * z.detach() ** (power - 1) * (1 - torch.tanh(theta * z.detach() ** power) ** 2)
    # Both are float64 evaluations of the same expression: agreement to a few ulps of O(10) values.
    torch.testing.assert_close(div, diag.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div, field.divergence(z.detach()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(frob, diag.pow(2).sum(1), rtol=1e-12, atol=1e-12)  # the Jacobian is diagonal


def test_a_field_driven_by_the_other_component_preserves_volume():
    field = TanhField(2, 3, "other", [1.0, 2.0]).double()
    z = torch.randn(64, 2, dtype=torch.float64, requires_grad=True)
    f = field(torch.tensor(0.0), z)
    torch.testing.assert_close(f[:, 0], torch.tanh(z[:, 1] ** 3))  # f_1 is driven by z_2, f_2 by z_1
    div, _ = exact_divergence(f, z, create_graph=False)
    assert torch.equal(div, torch.zeros(64, dtype=torch.float64)) and torch.equal(field.divergence(z), div)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinsons_estimator_is_unbiased_with_the_closed_form_variance(kind):
    torch.manual_seed(1)
    field = ConcatSquashMLP(5, [16], "tanh").double()
    t, m = torch.tensor(0.3, dtype=torch.float64), 20000
    z0 = torch.randn(1, 5, dtype=torch.float64)
    z = z0.expand(m, 5).clone().requires_grad_(True)  # m copies of one point: one probe each
    f = field(t, z)
    exact, exact_frob = exact_divergence(f[:1], z, create_graph=False)
    eps = probes(kind, (1, m, 5), torch.Generator().manual_seed(2), torch.float64)
    est, frob = hutchinson_divergence(f, z, eps, create_graph=False)
    jac = torch.autograd.functional.jacobian(lambda v: field(t, v), z0)[0, :, 0]  # (5, 5)
    sym = (jac + jac.T) / 2
    # Var εᵀAε = 2 Σ_{i≠j} S_ij² (Rademacher: ε_i² = 1) or 2 ‖S‖_F² (Gaussian), S = (A + Aᵀ)/2.
    var = 2 * (sym.pow(2).sum() - (sym.diag().pow(2).sum() if kind == "rademacher" else 0))
    assert float(jac.trace()) == pytest.approx(float(exact[0]), abs=1e-12)
    # The mean of m independent estimates lies within 4 standard errors (a 6e-5 two-sided chance).
    assert abs(float(est.mean() - exact[0])) < 4 * math.sqrt(var / m)
    # The sample variance of m draws has a relative standard error ≈ √((κ − 1)/m) ≤ 2 %: 10 % is > 5 SE.
    assert float(est.var()) == pytest.approx(float(var), rel=0.10)
    # ‖εᵀJ‖² is unbiased for ‖J‖_F²; 4 empirical standard errors.
    assert abs(float(frob.mean() - exact_frob[0])) < 4 * float(frob.std()) / math.sqrt(m)


# -- the objective -----------------------------------------------------------------------------------------


class Linear(nn.Module):
    """f(t, z) = A z: z(T) = e^{AT} z(0), so x = z(T) ~ N(0, e^{AT} e^{AᵀT}) in closed form."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, t, z):
        return z @ self.a.T


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_log_likelihood_and_rnode_integrals_of_a_linear_field_match_closed_forms(trace):
    torch.manual_seed(3)
    a = torch.tensor([[0.3, -0.8], [0.5, -0.2]], dtype=torch.float64)
    T, x = 0.7, torch.randn(32, 2, dtype=torch.float64)
    dynamics = CNFDynamics(Linear(a), trace, regularize=True)
    if trace == "hutchinson":
        dynamics.noise = probes("gaussian", (1, 32, 2), dtype=torch.float64)
    out = cnf_log_likelihood(dynamics, x, T, Solver("dopri5", 1e-10, 1e-10))
    e = torch.linalg.matrix_exp(a * T)
    expected = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), e @ e.T).log_prob(x)
    # Tolerance: the solver's (1e-10 per step) accumulated over a few dozen steps.
    if trace == "exact":
        torch.testing.assert_close(out["log_px"], expected, rtol=0, atol=1e-8)
        torch.testing.assert_close(out["jacobian"], torch.full((32,), T * float(a.pow(2).sum()), dtype=torch.float64),
                                   rtol=0, atol=1e-8)
    else:  # a linear field's Jacobian is constant: the estimate is exact for tr A up to each probe's noise
        est = -out["log_px"] + standard_normal_logprob(torch.linalg.solve(e, x.T).T)  # = T εᵀAε
        torch.testing.assert_close(est, T * torch.einsum("ni,ij,nj->n", dynamics.noise[0], a, dynamics.noise[0]),
                                   rtol=0, atol=1e-8)
    # ∫_0^T ‖A z(t)‖² dt with z(t) = e^{−A(T−t)} x, by Simpson's rule on 2001 points (error ~1e-14).
    ts = torch.linspace(0, T, 2001, dtype=torch.float64)
    speeds = torch.stack([((x @ torch.linalg.matrix_exp(-a * (T - s)).T) @ a.T).pow(2).sum(1) for s in ts])
    w = torch.ones(2001, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    torch.testing.assert_close(out["kinetic"], (w[:, None] * speeds).sum(0) * (T / 2000) / 3, rtol=0, atol=1e-8)


def test_dequantisation_and_logit_transform_invert_and_have_the_right_log_det():
    torch.manual_seed(4)
    x = torch.randint(0, 256, (4, 1, 3, 3)).double() / 255
    y = dequantize(x, torch.rand(4, 1, 3, 3, dtype=torch.float64))
    assert torch.equal(torch.floor(y * 256), (x * 255).round())  # y stays inside its pixel's bin
    w, log_det = logit_transform(y, 0.05)
    torch.testing.assert_close(inverse_logit_transform(w, 0.05), y)
    jac = torch.autograd.functional.jacobian(lambda v: logit_transform(v, 0.05)[0].sum(0), y)  # diagonal
    diag = jac.flatten(0, 2).flatten(1).sum(0).view_as(y)  # ∂w_i/∂y_i per sample (the Jacobian is diagonal)
    torch.testing.assert_close(log_det, diag.log().flatten(1).sum(1))


# -- the exercise: a histogram against the grid density --------------------------------------------------


def exact_bin_probabilities(theta, t, lo, hi, bins):
    """Bins of the self-coupled tanh flow at time t without any density: each axis moves on its own and
    monotonically, so P(e_a < z_i(t) < e_b) = Φ(z_i(0) of e_b) − Φ(z_i(0) of e_a), the edges integrated
    back to 0 (float64, rtol = atol = 1e-12)."""
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    field = TanhField(2, 3, "self", theta).double()
    start = edges[:, None].expand(-1, 2).clone()
    with torch.no_grad():
        back = start if t == 0 else solve(StateDynamics(field), start, t, 0.0, Solver("dopri5", 1e-12, 1e-12))
    cdf = torch.distributions.Normal(0.0, 1.0).cdf(back)  # (bins + 1, 2)
    per_axis = cdf[1:] - cdf[:-1]
    return per_axis[:, 1, None] * per_axis[None, :, 0]  # rows: y (axis 1), columns: x (axis 0)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_grid_density_has_the_exact_mass_and_bin_probabilities(t):
    lo, hi, bins, n = -4.0, 4.0, 40, 160
    field = TanhField(2, 3, "self", [1.0, 1.0]).double()
    log_p = grid_log_density(field, t, lo, hi, n, Solver("dopri5", 1e-8, 1e-8))
    grid_bins = bin_probabilities(log_p, lo, hi, bins)
    exact = exact_bin_probabilities([1.0, 1.0], t, lo, hi, bins)
    # Mass inside [-4, 4]²: 1 minus what has left the square (1.3e-4 at t = 0, 5.4e-3 at t = 1). The
    # midpoint rule on 0.05-wide cells errs by ≈ h²/24 · ∫|∇²p| = 1e-4 · ∫|∇²p| (measured ≤ 6e-6); the
    # solver's 1e-8 is negligible. Per bin the errors do not cancel: TV measured ≤ 2.4e-4.
    assert float(grid_bins.sum()) == pytest.approx(float(exact.sum()), abs=5e-5)
    assert total_variation(grid_bins, 0.0, exact, 0.0) < 1e-3
    assert float(exact.sum()) > 0.99


def test_histogram_agrees_with_the_grid_density_within_sampling_noise():
    """(b1) against (b3) at t = 1/2 with the assignment's θ = (1, 1): the TV between a histogram of n
    samples and the bin probabilities p that drew it has E[TV] ≤ ½ Σ √(p_b (1 − p_b) / n) (Jensen) and
    exceeds its mean by ε = √(ln(1/δ) / 2n) with probability ≤ δ (McDiarmid: one sample moves TV by ≤ 1/n);
    the grid's own error adds its TV to the exact bins (< 1e-3, test above)."""
    n, lo, hi = 200_000, -4.0, 4.0
    field = TanhField(2, 3, "self", [1.0, 1.0])
    result = compare(field, 0.5, lo, hi, 160, 40, n, Solver("dopri5", 1e-6, 1e-6), torch.Generator().manual_seed(5))
    bound = result["tv_noise"] + mcdiarmid_slack(n, 1e-6) + 1e-3
    assert result["tv"] < bound, (result["tv"], bound)  # measured 0.028 < 0.041
    # Mass inside the square against the samples inside it: binomial sd √(p (1 − p) / n) with p ≈ 1e-3 outside,
    # 3 sd, plus the grid's 5e-5.
    assert result["grid_mass"] == pytest.approx(1 - result["outside"], abs=3 * math.sqrt(1e-3 / n) + 5e-5)
    # and the histogram is not trivially close: a flow with θ = (0.3, 0.3) is far from it
    other = compare(TanhField(2, 3, "self", [0.3, 0.3]), 0.5, lo, hi, 160, 40, n, Solver("dopri5", 1e-6, 1e-6),
                    torch.Generator().manual_seed(5))
    assert total_variation(result["histogram"], result["outside"], other["bins"], 1 - other["grid_mass"]) > 3 * bound


def test_expected_tv_bound_is_what_multinomial_noise_gives():
    p = torch.full((10, 10), 0.01, dtype=torch.float64)
    assert expected_tv_bound(p, 0.0, 10_000) == pytest.approx(0.5 * 100 * math.sqrt(0.01 * 0.99 / 10_000))


# -- gradients: the adjoint, direct backprop, finite differences ------------------------------------------


def _loss_and_grad(field, x, solver):
    field.zero_grad()
    loss = -cnf_log_likelihood(CNFDynamics(field, "exact"), x, 1.0, solver)["log_px"].mean()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in field.parameters()])


def test_adjoint_gradients_equal_direct_backprop_and_finite_differences():
    torch.manual_seed(6)
    x = torch.randn(64, 2, dtype=torch.float64) * 1.5
    field = TanhField(2, 3, "self", [0.8, 1.3]).double()
    tight = dict(rtol=1e-10, atol=1e-10)
    _, adjoint = _loss_and_grad(field, x, Solver("dopri5", backprop="adjoint", **tight))
    _, direct = _loss_and_grad(field, x, Solver("dopri5", backprop="odeint", **tight))
    # Both are dL/dθ (|g| ≈ 0.05) to the solvers' tolerance 1e-10 per step, accumulated over ~100 steps
    # (measured difference 3e-10).
    torch.testing.assert_close(adjoint, direct, rtol=0, atol=1e-8)
    # Finite differences of a fixed-step rk4 loss (smooth in θ, unlike an adaptive step sequence) against
    # backprop through the same rk4 steps, which is that loss's exact derivative: central differences
    # with h = 1e-5 err by h² |L'''| / 6 ≈ 3e-12 (L''' ≈ 0.2, measured from h = 1e-3, 1e-4) plus
    # rounding ≈ 1e-16 · |L| / h ≈ 4e-11.
    rk4 = Solver("rk4", step_size=0.01, backprop="odeint")
    _, through_rk4 = _loss_and_grad(field, x, rk4)
    h, fd = 1e-5, []
    with torch.no_grad():
        for i in range(2):
            values = []
            for sign in (1, -1):
                field.theta[i] += sign * h
                values.append(float(-cnf_log_likelihood(CNFDynamics(field, "exact"), x, 1.0, rk4)["log_px"].mean()))
                field.theta[i] -= sign * h
            fd.append((values[0] - values[1]) / (2 * h))
    torch.testing.assert_close(torch.tensor(fd, dtype=torch.float64), through_rk4, rtol=0, atol=1e-9)
    # rk4 with 100 steps is 4th order: its gradient is the continuous one to ~C/100⁴ (measured 6e-10).
    torch.testing.assert_close(through_rk4, adjoint, rtol=0, atol=1e-8)


def test_adjoint_equals_direct_backprop_for_a_time_dependent_network():
    torch.manual_seed(7)
    field = ConcatSquashMLP(2, [8, 8], "tanh").double()
    x = torch.randn(32, 2, dtype=torch.float64)
    tight = dict(rtol=1e-10, atol=1e-10)
    _, adjoint = _loss_and_grad(field, x, Solver("dopri5", backprop="adjoint", **tight))
    _, direct = _loss_and_grad(field, x, Solver("dopri5", backprop="odeint", **tight))
    torch.testing.assert_close(adjoint, direct, rtol=0, atol=1e-8)  # |g| ≤ 0.3; measured 1e-9


def test_adjoint_memory_does_not_grow_with_the_solvers_steps_but_direct_backprops_does():
    torch.manual_seed(8)
    field = ConcatSquashMLP(2, [16, 16]).double()
    x = torch.randn(256, 2, dtype=torch.float64)
    saved = {}
    for backprop in ("odeint", "adjoint"):
        for steps in (8, 32):
            solver = Solver("rk4", step_size=1 / steps, backprop=backprop)
            _, saved[backprop, steps] = saved_tensor_bytes(
                lambda: cnf_log_likelihood(CNFDynamics(field, "exact"), x, 1.0, solver)["log_px"].mean())
    # Direct backprop keeps every stage of every step: 4x the steps, about 4x the bytes (a constant aside).
    assert saved["odeint", 32] > 3.5 * saved["odeint", 8]
    # The adjoint keeps the initial and final states and the parameters, whatever the step count.
    assert saved["adjoint", 32] == saved["adjoint", 8] < saved["odeint", 8] / 20


@pytest.mark.parametrize("backprop", ["adjoint", "odeint"])
def test_function_evaluations_are_counted_forward_and_backward(backprop):
    cnf = family(solver="rk4", step_size=0.25, backprop=backprop)  # 4 steps of 4 stages
    torch.manual_seed(9)
    nets = Networks(cnf.build_networks())
    terms = cnf.loss("model", nets, {"x": torch.randn(16, 2)}, 1)
    assert float(terms["nfe_forward"]) == 16 and float(terms["nfe_backward"]) == 0  # not yet backpropagated
    terms["loss"].backward()
    # The adjoint solves backwards with the same 4 rk4 steps; direct backprop calls f no more.
    assert float(terms["nfe_backward"]) == (16 if backprop == "adjoint" else 0)


def test_backward_nfe_counter_without_gradients_stays_zero():
    dynamics = CNFDynamics(TanhField(2), "exact")
    counter = BackwardNFE(dynamics)
    with torch.no_grad():
        x = counter.attach(torch.randn(4, 2))
    assert not x.requires_grad and float(counter.value) == 0


# -- the family --------------------------------------------------------------------------------------------


def test_short_ffjord_training_on_moons_lowers_the_held_out_nll():
    torch.manual_seed(10)
    cnf = family("debug", hidden=[32, 32])
    nets = Networks(cnf.build_networks())
    train = torch.tensor(make_moons(4000, noise=0.05, random_state=0)[0], dtype=torch.float32)
    test = {"x": torch.tensor(make_moons(500, noise=0.05, random_state=1)[0], dtype=torch.float32)}

    def held_out():
        return float(cnf.log_likelihood(nets, test, 1, torch.arange(500))["log_px"].mean())

    before = held_out()
    opt = torch.optim.Adam(nets["field"].parameters(), lr=1e-2)
    for step in range(40):
        terms = cnf.loss("model", nets, {"x": train[torch.randint(0, 4000, (128,))]}, step)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    after = held_out()
    # Measured: -2.85 -> -1.92 nats (the one-Gaussian toyflow of docs/adding-a-family.md ends at -2.0).
    assert after > before + 0.4, (before, after)


def test_image_likelihood_is_a_seeded_unbiased_hutchinson_estimate_of_the_exact_one():
    torch.manual_seed(11)
    hutch = family("digits", data=TINY_IMAGES, conv_channels=[4], eval_rtol=1e-6, eval_atol=1e-6)
    exact = family("digits", data=TINY_IMAGES, conv_channels=[4], eval_rtol=1e-6, eval_atol=1e-6,
                   exact_trace_max_dim=36)
    nets = Networks(hutch.build_networks())
    x = torch.randint(0, 256, (16, 1, 6, 6)).float() / 255
    seeds = torch.arange(16) + 500
    first = hutch.log_likelihood(nets, {"x": x}, 8, seeds)["log_px"]
    assert torch.equal(first, hutch.log_likelihood(nets, {"x": x}, 8, seeds)["log_px"])  # the seeds fix every draw
    truth = exact.log_likelihood(nets, {"x": x}, 8, seeds)["log_px"]  # the same dequantisation noise (seeded)
    diff = first - truth
    # 16 independent zero-mean errors (each sample's own probes): their mean within 4 standard errors.
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(16)
    # The bits/dim of a discrete bound: ≥ 0 nats of probability mass lost, and close to 8 untrained.
    bpd = -truth / (36 * math.log(2))
    assert bool((bpd > 0).all()) and 5 < float(bpd.mean()) < 12
    samples = hutch.sample(nets, hutch.fixed_inputs(4, torch.Generator().manual_seed(0)))
    assert samples.shape == (4, 1, 6, 6) and float(samples.min()) >= 0 and float(samples.max()) <= 1


@pytest.mark.parametrize("data, overrides, message", [
    (MOONS, {"field": "conv"}, "model.field: conv is for images; moons holds points"),
    (TINY_IMAGES, {"field": "concatsquash"}, "model.field: concatsquash is for points; tiny holds images"),
    (TINY_IMAGES, {"field": "conv", "trace": "exact"}, "model.trace: the exact trace of 36 dimensions"),
    (MOONS, {"theta_target": [1.0, 1.0]}, "model.theta_target: the known θ* drives the tanh field only"),
    (MOONS, {"field": "tanh", "theta_init": [1.0]}, "model.theta_init: needs one θ per dimension: 2 values"),
    (MOONS, {"histogram_bins": 7}, "model.histogram_bins: 7 does not divide density_grid 24"),
    (MOONS, {"density_times": [0.5, 2.0]}, "model.density_times: each time must be in [0, 1.0]"),
    (MOONS, {"solver": "rk4", "step_size": 2.0}, "model.step_size: 2.0 is longer than integration_time"),
    (MOONS, {"adjoint_seminorm": True, "solver": "rk4"}, "model.adjoint_seminorm: needs backprop: adjoint and an"),
    (MOONS, {"logit_alpha": 0.5}, "model.logit_alpha: must be in [0, 0.5)"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(data, overrides, message):
    with pytest.raises(ConfigError) as e:
        family("debug", data=data, **overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_exercise_job_learns_theta_and_logs_its_figures_and_checks(shard_root, tmp_path):
    from pathlib import Path

    from test_trainer import events

    from gensuite.trainer import train

    job = load_job(Path(__file__).resolve().parents[1] / "jobs" / "cnf_tanh_exercise.yaml",
                   [f"data.root={shard_root}", "train.steps=3", "train.sample_every=3", "train.log_every=1",
                    "eval.n_samples=20000", "log.progress_bar=false", "log.grid_size=64"])
    metrics = train(job, tmp_path)
    acc = events(tmp_path)
    scalars = set(acc.Tags()["scalars"])
    assert {"model/theta_0", "model/theta_1", "model/theta_error", "model/nfe_forward", "model/nfe_backward",
            "eval/hist_tv", "eval/hist_tv_noise", "eval/grid_mass", "eval/theta_error"} <= scalars
    first = acc.Scalars("model/theta_error")[0].value
    assert first == pytest.approx(math.sqrt(2) * 0.5, abs=1e-6)  # θ = (0.5, 0.5), θ* = (1, 1)
    assert metrics["final/eval/theta_error"] < first  # three Adam steps of lr 0.05 move towards θ*
    assert metrics["final/eval/grid_mass"] == pytest.approx(0.9991, abs=5e-4)  # near θ = (0.5, 0.5)..(1, 1)
    assert {"figures/density", "figures/histogram", "figures/samples"} <= set(acc.Tags()["images"])
