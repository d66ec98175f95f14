"""Flow family: every layer inverts and its log-det equals autograd's, whole flows likewise, a 2-D
density integrates to 1, ActNorm's data initialisation (and that a loaded one is never redone), the LU
1×1 convolution stays invertible, a short training lowers the test NLL on moons, the likelihood's
bookkeeping (dequantisation, preprocessing, bits/dim), and assignment 003 P1a's linear change of
variables against a Monte-Carlo histogram."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn
from torch.autograd.functional import jacobian

from gensuite.config import from_dict
from gensuite.data.pipeline import read_split
from gensuite.data.shards import data_spec, read_manifest
from gensuite.errors import ConfigError
from gensuite.families.flow import FlowConfig, NormalizingFlow
from gensuite.families.flow.density import grid_log_density
from gensuite.figures import grid_mass
from gensuite.families.flow.layers import (ActNorm, AffineCoupling, CheckerboardCoupling, InvertibleLinearLU,
                                           SplineCoupling, Split, Squeeze)
from gensuite.families.flow.linear import DEFAULT_A, linear_density, linear_log_density, sample_linear
from gensuite.families.flow.networks import MLP, ConvNet, image_flow, point_flow
from gensuite.families.flow.objectives import (affine_transform, dequantize, logit_transform, per_sample_uniform,
                                               standard_normal_log_prob)
from gensuite.families.flow.splines import rational_quadratic_spline, spline_parameters
from gensuite.registry import DataSpec, HasLikelihood, Networks

DIGITS16 = DataSpec("digits", "image", (1, 16, 16), 10, tuple("0123456789"))
MOONS = DataSpec("moons", "points", (2,), 2, ("upper", "lower"))


def family(flavor="debug", data=DIGITS16, **overrides):
    return NormalizingFlow(from_dict(FlowConfig, {**NormalizingFlow.flavors[flavor], **overrides}, "model"), data)


@torch.no_grad()
def perturb(module: nn.Module, seed: int, std: float = 0.3) -> nn.Module:
    """Every parameter redrawn from N(0, std²) (the zero-initialised last layers too), so no layer is
    the identity; buffers (permutations, signs, masks) are kept."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


# -- every layer: a factory of a perturbed layer and its input shape (one sample) ---------------------------

LAYERS = {
    "actnorm_points": (lambda: ActNorm(3, image=False), (3,)),
    "actnorm_images": (lambda: ActNorm(2, image=True), (2, 4, 4)),
    "lu_linear_points": (lambda: InvertibleLinearLU(3), (3,)),
    "lu_1x1_conv": (lambda: InvertibleLinearLU(4), (4, 3, 3)),
    "affine_tanh_points": (lambda: AffineCoupling(3, 0, MLP(1, 4, [8])), (3,)),
    "affine_tanh_points_parity1": (lambda: AffineCoupling(3, 1, MLP(2, 2, [8])), (3,)),
    "affine_sigmoid_channels": (lambda: AffineCoupling(4, 0, ConvNet(2, 4, 6), "sigmoid"), (4, 3, 3)),
    "checkerboard": (lambda: CheckerboardCoupling(4, 4, 1, ConvNet(2, 4, 6)), (2, 4, 4)),
    "spline_points": (lambda: SplineCoupling(3, 1, MLP(2, 1 * (3 * 5 - 1), [8]), bins=5, bound=1.5), (3,)),
    "squeeze": (lambda: Squeeze(), (2, 4, 4)),
    "split_learned_prior": (lambda: Split(4, nn.Conv2d(2, 4, 3, padding=1)), (4, 3, 3)),
    "split_standard": (lambda: Split(4), (4, 3, 3)),
}


def run_forward(layer, x):
    """A layer's forward as (output flattened to (N, D), log-det); a split's output is (keep, z)."""
    out = layer(x)
    if isinstance(layer, Split):
        keep, z, log_det = out
        return torch.cat([keep, z], 1).flatten(1), log_det
    return out[0].flatten(1), out[1]


def run_inverse(layer, y):
    if isinstance(layer, Split):
        return layer.inverse(*y.split(layer.split, dim=1))
    return layer.inverse(y)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_inverts_its_forward(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = perturb(make(), seed=1)
    x = torch.randn(16, *shape) * 1.5  # the spline's inputs reach past its bound 1.5: both tails
    with torch.no_grad():
        out = layer(x)
        back = run_inverse(layer, torch.cat(out[:2], 1) if isinstance(layer, Split) else out[0])
    # float32: each layer rounds to a few ulp of values of order e^2 · 4, about 1e-6 (measured at most 9.5e-7)
    assert back.shape == x.shape and (back - x).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_log_det_is_autograd_slogdet(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = perturb(make(), seed=2).double()
    x = torch.randn(3, *shape, dtype=torch.float64) * 1.5
    _, log_det = run_forward(layer, x)
    for i in range(len(x)):
        jac = jacobian(lambda v: run_forward(layer, v.view(1, *shape))[0][0], x[i].flatten())
        sign, expected = torch.linalg.slogdet(jac)
        # float64 throughout: the two agree to rounding of sums of O(10) terms, far below 1e-9
        assert sign != 0 and log_det[i].item() == pytest.approx(expected.item(), abs=1e-9)


# -- whole flows ---------------------------------------------------------------------------------------------

FLOWS = {
    "realnvp_points": (lambda: point_flow("realnvp", 3, 4, [8]), (3,)),
    "glow_points": (lambda: point_flow("glow", 2, 3, [8]), (2,)),
    "spline_points": (lambda: point_flow("spline", 2, 3, [8], bins=4, tail_bound=2.0, actnorm=True), (2,)),
    "realnvp_images": (lambda: image_flow("realnvp", (1, 8, 8), levels=2, steps=2, width=4), (1, 8, 8)),
    "glow_images": (lambda: image_flow("glow", (1, 8, 8), levels=2, steps=2, width=4, scale="sigmoid",
                                       split_prior=True), (1, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_whole_flows_invert_and_their_log_det_is_autograd_slogdet(name):
    make, shape = FLOWS[name]
    torch.manual_seed(0)
    flow = perturb(make(), seed=3, std=0.2)
    x = torch.randn(8, *shape)
    with torch.no_grad():
        z, _ = flow(x)
        back = flow.inverse(z)
    assert z.shape == (8, int(np.prod(shape)))
    # float32 through up to 15 layers, each adding about 1e-6 of rounding (measured at most 3.3e-6): 5e-5
    assert (back - x).abs().max().item() < 5e-5
    flow = flow.double()
    x = x[:2].double()
    _, log_det = flow(x)
    for i in range(len(x)):
        jac = jacobian(lambda v: flow(v.view(1, *shape))[0][0], x[i].flatten())
        assert log_det[i].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-8)


@pytest.mark.parametrize("kind", ["realnvp", "glow", "spline"])
def test_a_random_2d_flow_density_integrates_to_one(kind):
    torch.manual_seed(0)
    flow = perturb(point_flow(kind, 2, 4, [16], bins=6, tail_bound=2.0, actnorm=kind == "spline"), seed=4, std=0.2)
    flow = flow.double()
    lo, hi = -12.0, 12.0
    coarse = grid_mass(grid_log_density(flow, lo, hi, 300), lo, hi)
    fine = grid_mass(grid_log_density(flow, lo, hi, 600), lo, hi)
    with torch.no_grad():  # the mass outside the square, from 100,000 samples of the flow
        samples = flow.inverse(torch.randn(100_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    outside = float((samples.abs() > hi).any(1).double().mean())
    density = grid_log_density(flow, lo, hi, 300).exp()
    assert density.max() > 20 * density.mean()  # far from flat: the flow is non-trivial (measured 75 to 105)
    # The midpoint rule's error falls as h²: halving the cell changed the mass by < 1e-3 (measured 1e-6 to
    # 1e-4) and fewer than 1e-4 of the samples fell outside the square, so the fine grid's mass is 1 within 2e-3.
    assert outside < 1e-4
    assert abs(fine - coarse) < 1e-3
    assert fine == pytest.approx(1.0, abs=2e-3)


# -- splines ---------------------------------------------------------------------------------------------------


def test_spline_is_monotone_continuous_and_linear_outside_its_bound():
    torch.manual_seed(6)
    bins, bound = 6, 2.0
    raw = torch.randn(1, 3 * bins - 1).expand(4001, -1)
    x = torch.linspace(-3, 3, 4001)
    y, log_d = rational_quadratic_spline(x, *spline_parameters(raw, bins), bound)
    assert (y[1:] > y[:-1]).all()  # strictly increasing
    outside = x.abs() > bound
    assert torch.equal(y[outside], x[outside]) and torch.equal(log_d[outside], torch.zeros(int(outside.sum())))
    # the knots sit at ±B: y(±B) = ±B, and the slope there is 1 (continuous with the tails)
    ends, log_ends = rational_quadratic_spline(torch.tensor([-bound, bound]), *spline_parameters(raw[:2], bins), bound)
    assert torch.allclose(ends, torch.tensor([-bound, bound]), atol=1e-6)
    assert torch.allclose(log_ends, torch.zeros(2), atol=1e-5)
    zero = torch.zeros(5, 3 * bins - 1)
    xs = torch.linspace(-1.9, 1.9, 5)
    same, log_same = rational_quadratic_spline(xs, *spline_parameters(zero, bins), bound)
    assert torch.allclose(same, xs, atol=1e-6) and torch.allclose(log_same, torch.zeros(5), atol=1e-6)  # identity


# -- ActNorm ---------------------------------------------------------------------------------------------------


def test_actnorm_data_init_standardises_the_first_batch_and_is_never_redone(shard_root):
    spec = data_spec(read_manifest(shard_root / "digits"))
    fam = family("debug", spec)
    torch.manual_seed(0)
    nets = fam.build_networks()
    batch = read_split(shard_root / "digits", "train", 64)
    outputs = []
    norms = [m for m in nets["flow"].modules() if isinstance(m, ActNorm)]
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o[0].detach())) for m in norms]
    assert len(norms) == 2 and not any(bool(m.initialized) for m in norms)
    fam.initialize(Networks(nets), batch)
    for h in hooks:
        h.remove()
    assert len(outputs) == 2 and all(bool(m.initialized) for m in norms)
    for out in outputs:  # each ActNorm's own output on the initialisation batch
        # per-channel mean and variance of 64·H·W float32 values: exact to about 1e-6; 1e-4 leaves room
        assert out.mean((0, 2, 3)).abs().max() < 1e-4
        assert (out.var((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4

    # A checkpoint of the initialised flow loaded into a fresh one (a resumed run's trainer calls initialize()
    # on the rebuilt networks and then loads the checkpoint over them): initialize() with another batch
    # after the load changes nothing, and neither does a second call on the original.
    state = {k: v.clone() for k, v in nets["flow"].state_dict().items()}
    torch.manual_seed(1)
    fresh = fam.build_networks()
    fresh["flow"].load_state_dict(state)
    other = {"x": read_split(shard_root / "digits", "test", 32)["x"]}
    fam.initialize(Networks(fresh), other)
    fam.initialize(Networks(nets), other)
    for key, value in state.items():
        assert torch.equal(fresh["flow"].state_dict()[key], value), key
        assert torch.equal(nets["flow"].state_dict()[key], value), key


def test_actnorm_initialised_flag_survives_the_ema_copy():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    flow = point_flow("glow", 2, 2, [8])
    flow.data_init(torch.randn(64, 2) * 3 + 1)
    ema = AveragedModel(flow, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        ema.update_parameters(flow)
    assert all(float(m.initialized) == 1.0 for m in ema.module.modules() if isinstance(m, ActNorm))


# -- the LU 1×1 convolution ---------------------------------------------------------------------------------------


def test_lu_convolution_stays_invertible_while_it_trains():
    torch.manual_seed(7)
    layer = InvertibleLinearLU(4)
    # Maximum likelihood of a strongly correlated Gaussian through W: pushes W far from a rotation.
    mix = torch.tensor([[3.0, 0, 0, 0], [2.9, 0.1, 0, 0], [0, 0, 0.05, 0], [1, 1, 1, 1]])
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(300):
        x = torch.randn(256, 4) @ mix.T
        z, log_det = layer(x)
        loss = -(standard_normal_log_prob(z) + log_det).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w, w_inv = layer.weight().double(), layer.inverse_weight().double()
        cond = torch.linalg.cond(w).item()
        assert 30 < cond < 1e3  # it moved a long way from a rotation (condition number 1; measured 129)
        # W W⁻¹ = I to float32 rounding (6e-8) times the condition number: about 1e-5 (measured 7e-7)
        assert (w @ w_inv - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-5
        assert torch.linalg.slogdet(w)[1].item() == pytest.approx(layer.log_s.sum().item(), abs=1e-5)
        x = torch.randn(8, 4, 2, 2)
        assert (layer.inverse(layer(x)[0]) - x).abs().max() < 1e-4


# -- training ----------------------------------------------------------------------------------------------------


def test_a_short_training_lowers_the_test_nll_on_moons(shard_root):
    spec = data_spec(read_manifest(shard_root / "moons"))
    train_x = read_split(shard_root / "moons", "train", 2000)["x"]
    test = {"x": read_split(shard_root / "moons", "test", 400)["x"]}
    results = {}
    for flavor in ("realnvp", "spline"):
        fam = family(flavor, spec, layers=4, hidden=[32, 32])
        torch.manual_seed(0)
        nets = Networks(fam.build_networks())
        fam.initialize(nets, {"x": train_x[:256]})
        before = -fam.log_likelihood(nets, test, 1, torch.arange(400))["log_px"].mean().item()
        opt = torch.optim.Adam(nets["flow"].parameters(), lr=5e-3)
        g = torch.Generator().manual_seed(0)
        for step in range(300):
            batch = {"x": train_x[torch.randint(0, len(train_x), (256,), generator=g)]}
            loss = fam.loss("model", nets, batch, step)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = -fam.log_likelihood(nets, test, 1, torch.arange(400))["log_px"].mean().item()
        results[flavor] = (before, after)
    # Measured (torch 2.14, one thread): realnvp 2.49 -> 0.71 nats, spline 1.99 (ActNorm-initialised) -> 0.53.
    for flavor, (before, after) in results.items():
        assert after < before - 0.5 and after < 1.0, (flavor, before, after)


# -- the likelihood's bookkeeping ---------------------------------------------------------------------------------


def test_image_likelihood_is_the_dequantised_bound_in_nats_and_bits_per_dim():
    """With every coupling at its zero start (realnvp: the identity) and no ActNorm, the flow only
    permutes w, so log_px must be log N(w) + log |det ∂w/∂y| − D log 256 with w from the per-sample
    dequantisation noise; both preprocessings."""
    torch.manual_seed(8)
    x = (torch.rand(5, 1, 16, 16) * 255).round() / 255
    seeds = torch.tensor([11, 12, 13, 14, 15])
    for preprocess in ("logit", "affine"):
        fam = family("realnvp", DIGITS16, levels=2, steps=1, width=4, res_blocks=0, preprocess=preprocess,
                     affine_scale=2.0)
        nets = Networks(fam.build_networks())
        value = fam.log_likelihood(nets, {"x": x}, 4, seeds)["log_px"]
        y = dequantize(x, per_sample_uniform(seeds, 1, 16, 16))
        w, log_det = logit_transform(y, 0.05) if preprocess == "logit" else affine_transform(y, 2.0)
        expected = standard_normal_log_prob(w) + log_det - 256 * math.log(256)
        assert torch.allclose(value, expected, rtol=1e-6, atol=1e-3)  # float32 sums of 256 terms of O(1..10)
        bpd = -value / (256 * math.log(2))
        assert (bpd > 0).all()
        # each image's value depends on its own seed only: the same in another batch
        alone = fam.log_likelihood(nets, {"x": x[2:3]}, 4, seeds[2:3])["log_px"]
        assert torch.allclose(alone, value[2:3], rtol=1e-6)


@pytest.mark.parametrize("preprocess", ["logit", "affine"])
def test_preprocessing_log_det_is_autograd_and_it_inverts(preprocess):
    fam = family("debug", DIGITS16, preprocess=preprocess, affine_scale=3.0)
    y = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    x = (y * 255).round() / 255
    u = torch.rand_like(x)
    w, log_det = fam.to_model_space(x, u)
    jac = jacobian(lambda v: _pre(fam, v.view(1, 1, 4, 4)).flatten(), dequantize(x, u).flatten())
    assert log_det.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-9)
    assert torch.allclose(fam.to_data_space(w), dequantize(x, u), atol=1e-12)


def _pre(fam, y):
    """The preprocessing alone, y -> w (after dequantisation)."""
    c = fam.cfg
    return logit_transform(y, c.logit_alpha)[0] if c.preprocess == "logit" else affine_transform(y, c.affine_scale)[0]


def test_visuals_show_samples_and_the_density_for_points_and_samples_for_images(shard_root):
    import matplotlib.figure

    fam = family("debug", MOONS)
    torch.manual_seed(0)
    nets = Networks(fam.build_networks())
    fixed = fam.fixed_inputs(50, torch.Generator().manual_seed(0))
    out = fam.visuals(nets, fixed, {"x": torch.randn(100, 2)})
    assert set(out) == {"samples", "density"} and out["samples"].shape == (50, 2)
    assert isinstance(out["density"], matplotlib.figure.Figure)
    images = family("debug", DIGITS16)
    nets = Networks(images.build_networks())
    grid = images.visuals(nets, images.fixed_inputs(4, torch.Generator().manual_seed(0)), {})["samples"]
    assert grid.shape == (4, 1, 16, 16) and grid.min() >= 0 and grid.max() <= 1
    assert isinstance(images, HasLikelihood)


def test_settings_errors_name_the_field():
    mnist = DataSpec("mnist", "image", (1, 28, 28))
    cases = [
        (dict(flavor="spline", data=DIGITS16), "model.kind: spline couplings are for points"),
        (dict(flavor="glow", data=mnist), "model.levels: 3 levels of glow halve the side 3 times; 28x28 px "
                                          "allows at most 2"),
        (dict(flavor="realnvp", logit_alpha=0.5), "model.logit_alpha: must be in (0, 0.5)"),
        (dict(flavor="realnvp", hidden=[]), "model.hidden: needs at least one layer"),
        (dict(flavor="debug", data=DataSpec("line", "points", (1,))), "data.dataset: a coupling needs at least 2"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as e:
            family(**kwargs)
        assert str(e.value).startswith(message), str(e.value)
    assert family("realnvp", mnist).cfg.levels == 3  # two squeezes, 28 -> 14 -> 7: fits


# -- assignment 003 P1a: Y = A·Z ---------------------------------------------------------------------------


@pytest.mark.parametrize("a, mu", [(DEFAULT_A, (0.0, 0.0)), (((1.0, -2.0), (0.5, 0.3)), (0.4, -1.0))])
def test_linear_change_of_variables_is_the_gaussian_it_must_be(a, mu):
    y = torch.randn(100, 2, dtype=torch.float64) * 2
    a_, mu_ = np.array(a), np.array(mu)
    expected = scipy.stats.multivariate_normal(a_ @ mu_, a_ @ a_.T).logpdf(y.numpy())
    assert np.allclose(linear_log_density(y, a, mu).numpy(), expected, atol=1e-12, rtol=0)  # float64 rounding


@pytest.mark.parametrize("a, mu", [(DEFAULT_A, (0.0, 0.0)), (((1.0, -2.0), (0.5, 0.3)), (0.4, -1.0))])
def test_linear_change_of_variables_matches_a_monte_carlo_histogram(a, mu):
    n, bins, sub = 400_000, 24, 16
    samples = sample_linear(n, torch.Generator().manual_seed(9), a, mu)
    lo, hi = samples.quantile(0.005, 0).min().item(), samples.quantile(0.995, 0).max().item()
    h = (hi - lo) / bins
    idx = torch.floor((samples - lo) / h).long()
    inside = ((idx >= 0) & (idx < bins)).all(1)
    counts = torch.bincount(idx[inside, 1] * bins + idx[inside, 0], minlength=bins * bins).double()
    # each bin's probability: p_Y at sub × sub midpoints of the bin times their area (the midpoint rule,
    # whose relative error here is < 1e-3 of the bin's probability, far below the counting error)
    fine = lo + (h / sub) * (torch.arange(bins * sub, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(fine, fine, indexing="ij")
    p = linear_density(torch.stack([xx.flatten(), yy.flatten()], 1), a, mu).view(bins, sub, bins, sub)
    prob = (p.sum((1, 3)) * (h / sub) ** 2).flatten()
    expected = n * prob
    # a bin's count is Binomial(n, p_b): within 5 standard deviations (one bin of 576 outside has probability
    # 3e-4 for an exact density), plus 1e-3 · n p_b for the quadrature
    sd = (n * prob * (1 - prob)).sqrt()
    assert ((counts - expected).abs() <= 5 * sd + 1e-3 * expected + 1).all()
    assert (counts - expected).pow(2).div(expected.clamp_min(1)).sum().item() < 2 * bins * bins  # chi² ≈ bins²


def test_linear_change_of_variables_refuses_a_singular_matrix():
    with pytest.raises(ValueError, match="not invertible"):
        linear_log_density(torch.zeros(1, 2), ((1.0, 2.0), (2.0, 4.0)))
