"""EBM family: ∇log Z = E_p[−∇E] on an energy whose Z is a quadrature (and contrastive divergence
with exact negatives follows the negative log-likelihood's gradient), SGLD's stationary mean and
variance on a Gaussian against the closed form of its finite-step bias, the replay buffer (distinct
draws, restart share, its state), bitwise resume with the buffer on one and two ranks, the visuals,
sampling with gradients through the contract, one-line config errors, and the job file."""

import math
from pathlib import Path

import matplotlib.figure
import pytest
import torch

from gensuite import checkpoint as ckpt
from gensuite.config import from_dict, job_from_dict, load_job
from gensuite.errors import ConfigError, GensuiteError
from gensuite.families.ebm import EBMConfig, EnergyBasedModel
from gensuite.families.ebm.networks import EnergyNet
from gensuite.families.ebm.objectives import contrastive_divergence, energy_from_logits
from gensuite.families.ebm.samplers import ReplayBuffer, sgld
from gensuite.registry import DataSpec, Networks, sampling_mode

ROOT = Path(__file__).resolve().parents[1]
DIGITS16 = DataSpec("digits", "image", (1, 16, 16), 10, tuple("0123456789"))


def family(flavor="debug", data=DIGITS16, **overrides):
    return EnergyBasedModel(from_dict(EBMConfig, {**EnergyBasedModel.flavors[flavor], **overrides}, "model"), data)


# -- assignment 003 P2: ∇θ log Z = E_p[−∇θ E] -------------------------------------------------------------


def quartic_energy(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """E_θ(x) = θ1 x² + θ2 x⁴ (normalisable for θ2 > 0)."""
    return theta[0] * x**2 + theta[1] * x**4


def grid_log_z(theta: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """log ∫ exp(−E_θ) by the midpoint rule on an equally spaced grid (the tails beyond it are < e^-600)."""
    dx = grid[1] - grid[0]
    return torch.logsumexp(-quartic_energy(theta, grid), 0) + dx.log()


def exact_samples(theta: torch.Tensor, grid: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n draws from p_θ by inverting the grid's CDF (then uniform within the cell): exact up to the
    grid's resolution, and independent, so Monte-Carlo standard errors are the textbook ones."""
    with torch.no_grad():
        p = torch.softmax(-quartic_energy(theta, grid), 0)
        g = torch.Generator().manual_seed(seed)
        cell = torch.searchsorted(p.cumsum(0), torch.rand(n, generator=g, dtype=grid.dtype)).clamp(max=len(grid) - 1)
        dx = grid[1] - grid[0]
        return grid[cell] + (torch.rand(n, generator=g, dtype=grid.dtype) - 0.5) * dx


@pytest.mark.parametrize("theta", [(0.5, 0.1), (-1.0, 0.25)])  # one well, and two wells at x = ±√2
def test_grad_log_z_is_the_expected_negative_energy_gradient(theta):
    grid = torch.linspace(-8, 8, 160_001, dtype=torch.float64)
    theta = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    (grad_log_z,) = torch.autograd.grad(grid_log_z(theta, grid), theta)
    # the same expectation by quadrature: -∇θE = -(x², x⁴) under p on the grid (arithmetic: 1e-10)
    p = torch.softmax(-quartic_energy(theta, grid), 0).detach()
    assert torch.allclose(grad_log_z, -torch.stack([(p * grid**2).sum(), (p * grid**4).sum()]), atol=1e-10)
    # ... and by Monte Carlo from exact samples, within 4 standard errors (each side: P(fail) ~ 6e-5)
    n = 200_000
    x = exact_samples(theta, grid, n, seed=0)
    per_sample = -torch.stack([x**2, x**4], 1)  # -∇θE(x) for each sample
    estimate, standard_error = per_sample.mean(0), per_sample.std(0) / math.sqrt(n)
    assert ((estimate - grad_log_z).abs() < 4 * standard_error).all(), (estimate, grad_log_z, standard_error)
    # The test can fail: the sign error ∇log Z = E_p[+∇E] is hundreds of standard errors off.
    assert ((-estimate - grad_log_z).abs() > 100 * standard_error).all()


def test_contrastive_divergence_with_exact_negatives_follows_the_nll_gradient():
    """∇θ [mean E(x⁺) − mean E(x⁻)] with x⁻ ~ p_θ estimates ∇θ [mean E(x⁺) + log Z] = ∇θ (−mean log p(x⁺)):
    the family's loss (α = 0) against quadrature, within 4 standard errors of the x⁻ average."""
    grid = torch.linspace(-8, 8, 160_001, dtype=torch.float64)
    theta = torch.tensor([0.5, 0.1], dtype=torch.float64, requires_grad=True)
    x_pos = exact_samples(torch.tensor([0.2, 0.3], dtype=torch.float64), grid, 1000, seed=1)  # "data"
    nll = quartic_energy(theta, x_pos).mean() + grid_log_z(theta, grid)
    (expected,) = torch.autograd.grad(nll, theta)
    n = 200_000
    x_neg = exact_samples(theta, grid, n, seed=2)
    terms = contrastive_divergence(quartic_energy(theta, x_pos), quartic_energy(theta, x_neg), alpha=0.0)
    (cd_grad,) = torch.autograd.grad(terms["loss"], theta)
    standard_error = torch.stack([x_neg**2, x_neg**4], 1).std(0) / math.sqrt(n)
    assert ((cd_grad - expected).abs() < 4 * standard_error).all(), (cd_grad, expected, standard_error)
    assert terms["reg"].item() == 0.0 and terms["cd"].item() == pytest.approx(terms["loss"].item())


def test_energy_regulariser_and_jem_energy_are_their_formulas():
    e_pos, e_neg = torch.tensor([1.0, -3.0]), torch.tensor([2.0, 4.0, 0.0])
    terms = contrastive_divergence(e_pos, e_neg, alpha=0.5)
    # cd = -1 - 2 = -3; reg = 0.5 (5 + 20/3)
    assert terms["cd"].item() == pytest.approx(-3.0) and terms["reg"].item() == pytest.approx(0.5 * (5 + 20 / 3))
    assert terms["loss"].item() == pytest.approx(-3.0 + 0.5 * (5 + 20 / 3))
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert energy_from_logits(logits).item() == pytest.approx(-math.log(4.0))


# -- SGLD on a Gaussian: the stationary law of the finite-step chain ----------------------------------------


@pytest.mark.parametrize("step_size, noise", [(1.0, None), (0.5, 0.3), (0.1, None)])
def test_sgld_reaches_the_closed_form_mean_and_variance_of_its_finite_step(step_size, noise):
    """E = (x − μ)²/(2σ²): x ← x − (ε/2)(x − μ)/σ² + s ξ is AR(1) with a = 1 − ε/(2σ²), so its stationary
    law is N(μ, s²/(1 − a²)); with s = √ε (noise: null) that is σ²/(1 − ε/(4σ²)), above σ² by the
    discretisation bias. 40,000 independent chains after 200 steps (a²⁰⁰ < 1e-9 of the start remains)."""
    mu, sigma = 0.7, 1.3
    cfg = EBMConfig(step_size=step_size, noise=noise)
    s = cfg.noise_std
    a = 1 - step_size / (2 * sigma**2)
    variance = s**2 / (1 - a**2)
    if noise is None:
        assert variance == pytest.approx(sigma**2 / (1 - step_size / (4 * sigma**2)), rel=1e-12)
    n = 40_000
    x0 = torch.zeros(n, 1, dtype=torch.float64)
    torch.manual_seed(0)
    x = sgld(lambda v: ((v - mu) ** 2 / (2 * sigma**2)).sum(1), x0, 200, cfg.step_size, s, grad_clip=None,
             bounds=None, generator=torch.Generator().manual_seed(3))
    mean_se = math.sqrt(variance / n)
    var_se = variance * math.sqrt(2 / (n - 1))  # of the sample variance of n Gaussians
    assert abs(x.mean().item() - mu) < 4 * mean_se
    assert abs(x.var().item() - variance) < 4 * var_se
    if noise is None and step_size == 1.0:  # the bias is resolved: σ²/(1 − ε/(4σ²)) − σ² is 21 standard errors
        assert abs(x.var().item() - sigma**2) > 8 * var_se


def test_sgld_clips_each_gradient_element_and_clamps_to_the_bounds():
    x = torch.zeros(1, 3)
    # E = 100·(x₀ − 5) − 0.001·x₁: ∇E = (100, −0.001, 0); one step of ε = 2, no noise
    energy = lambda v: 100 * (v[:, 0] - 5) - 0.001 * v[:, 1]  # noqa: E731
    out = sgld(energy, x, 1, 2.0, 0.0, grad_clip=0.5, bounds=None)
    assert torch.allclose(out, torch.tensor([[-0.5, 0.001, 0.0]]))
    out = sgld(energy, x, 10, 2.0, 0.0, grad_clip=None, bounds=(-1.0, 1.0))
    assert out[0, 0].item() == -1.0


def test_sgld_refuses_to_run_without_gradients():
    with torch.no_grad(), pytest.raises(GensuiteError, match="sampling_mode"):
        sgld(lambda v: v.pow(2).sum(1), torch.zeros(2, 1), 1, 0.1, 0.1)


# -- the replay buffer ------------------------------------------------------------------------------------


def test_replay_buffer_draws_distinct_entries_restarts_its_share_and_resumes_exactly():
    buffer = ReplayBuffer(1000, (2,), reinit_prob=0.2)
    buffer.start(7)
    assert buffer.samples.min() >= -1 and buffer.samples.max() <= 1
    buffer.samples.fill_(5.0)  # marks every kept entry; restarted ones come back in [-1, 1]
    restarted, n, draws = 0, 100, 50
    for _ in range(draws):
        index, start = buffer.draw(n)
        assert len(index.unique()) == n
        restarted += int((start[:, 0] != 5.0).sum())
    p, total = 0.2, n * draws
    assert abs(restarted / total - p) < 4 * math.sqrt(p * (1 - p) / total)  # binomial, 4 standard errors
    saved = buffer.state_dict()
    first = buffer.draw(10)
    again = ReplayBuffer(1000, (2,), reinit_prob=0.2)
    again.load_state_dict(saved)
    second = again.draw(10)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    index, start = buffer.draw(10)
    buffer.store(index, start * 0 - 0.25)
    assert (buffer.samples[index] == -0.25).all()
    with pytest.raises(ConfigError, match=r"^model.buffer_size: 1000 entries cannot give a batch of 1001"):
        buffer.draw(1001)


def raw_job(shard_root, steps, **model):
    return {"name": "ebm-test", "family": "ebm", "flavor": "debug", "model": model,
            "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
            "train": {"steps": steps, "batch_size": 16, "log_every": 2, "sample_every": 100, "checkpoint_every": 100,
                      "seed": 3},
            "log": {"grid_size": 16, "progress_bar": False}}


def make_job(shard_root, steps, **model):
    return job_from_dict(raw_job(shard_root, steps, **model))


def test_resume_is_bitwise_identical_with_the_buffer(shard_root, tmp_path):
    from test_trainer import _assert_bitwise_equal

    from gensuite.trainer import train

    train(make_job(shard_root, 6), tmp_path / "straight")
    train(make_job(shard_root, 3), tmp_path / "split")
    train(make_job(shard_root, 6), tmp_path / "split")
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / n)) for n in ("straight", "split"))
    buffer = a["family_ranks"][0]["buffer"]
    assert buffer["samples"].shape == (64, 1, 16, 16) and buffer["generator"].dtype == torch.uint8
    for key in ("networks", "optimizers", "family_ranks", "rng"):
        _assert_bitwise_equal(a[key], b[key], key)
    # The comparison can fail: one more step moves the buffer and the weights.
    train(make_job(shard_root, 7), tmp_path / "split")
    c = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "split"))
    assert not torch.equal(c["family_ranks"][0]["buffer"]["samples"], buffer["samples"])
    assert not torch.equal(c["networks"]["energy"]["head.3.weight"], a["networks"]["energy"]["head.3.weight"])


def test_two_ranks_keep_their_own_buffers_and_resume_them_bitwise(shard_root, tmp_path):
    from launchers import torchrun_job
    from test_trainer import _assert_bitwise_equal

    runs = {}
    for name, steps in (("straight", [4]), ("split", [2, 4])):
        (tmp_path / name).mkdir()
        for s in steps:
            result = torchrun_job(raw_job(shard_root, s), tmp_path / name)
            assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / name / "run"))
    a, b = runs["straight"], runs["split"]
    assert a["data"]["world_size"] == 2 and len(a["family_ranks"]) == 2
    first, second = (r["buffer"]["samples"] for r in a["family_ranks"])
    assert not torch.equal(first, second)  # each rank its own chains (and its own restarts)
    assert not torch.equal(a["family_ranks"][0]["buffer"]["generator"], a["family_ranks"][1]["buffer"]["generator"])
    for key in ("networks", "optimizers", "family_ranks", "rng"):
        _assert_bitwise_equal(a[key], b[key], key)


# -- network, visuals, sampling --------------------------------------------------------------------------


def test_network_shapes_and_the_energy_of_each_head():
    for side in (16, 28, 32):
        net = EnergyNet(1, side, 8, 3, 16, 1, "leaky_relu", use_spectral_norm=True)
        assert net(torch.zeros(2, 1, side, side)).shape == (2, 1)
    scalar, jem = family(), family(energy="jem")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    torch.manual_seed(0)
    net = jem.build_networks()["energy"]
    assert jem.energy(net, x).shape == (3,)
    assert torch.allclose(jem.energy(net, x), -torch.logsumexp(net(x), 1))
    assert scalar.energy(scalar.build_networks()["energy"], x).shape == (3,)


def test_visuals_show_samples_buffer_chains_and_energies(shard_root):
    fam = family(sample_steps=6, chain_frames=3)
    torch.manual_seed(0)
    nets = Networks(fam.build_networks())
    batch = {"x": torch.rand(16, 1, 16, 16), "y": torch.arange(16) % 10}
    fam.loss("model", nets, batch, 1)  # starts the buffer
    fixed = fam.fixed_inputs(10, torch.Generator().manual_seed(0))
    with sampling_mode(fam):
        out = fam.visuals(nets, fixed, {"x": batch["x"]})
    assert set(out) == {"samples", "chains", "buffer", "energies"}
    assert out["samples"].shape == (10, 1, 16, 16) and 0 <= out["samples"].min() and out["samples"].max() <= 1
    assert out["buffer"].shape == (10, 1, 16, 16)
    # 8 chains by (start + steps 2, 4, 6): one image of 8 rows and 4 columns of 16 px tiles, padding 2
    assert out["chains"].shape == (1, 3, 8 * 18 + 2, 4 * 18 + 2)
    assert isinstance(out["energies"], matplotlib.figure.Figure)
    with sampling_mode(fam):  # the same inputs give the same samples (the chains' noise is in them)
        assert torch.equal(fam.sample(nets, fixed), out["samples"])


def test_sampling_runs_with_gradients_through_the_contract(shard_root, tmp_path):
    """The family declares sampling_needs_gradients; gensuite sample's draw and the evaluation's
    generated samples honour it (they would fail in sgld otherwise)."""
    from gensuite.config import EvalConfig
    from gensuite.evaluation import EvalContext, generated_samples
    from gensuite.sampling import draw, load_run
    from gensuite.trainer import train

    assert EnergyBasedModel.sampling_needs_gradients
    train(make_job(shard_root, 2), tmp_path)
    run = load_run(tmp_path)
    with torch.no_grad():  # as a caller might: the contract turns gradients back on for sampling
        samples = draw(run, 5, seed=1)
    assert samples.shape == (5, 1, 16, 16) and torch.isfinite(samples).all()
    ctx = EvalContext(run.family, run.networks, shard_root / "digits", EvalConfig(n_samples=7, batch_size=4),
                      torch.device("cpu"))
    with torch.no_grad():
        chunks = [s for _, s, _ in generated_samples(ctx)]
    assert sum(len(c) for c in chunks) == 7


# -- settings and the job ----------------------------------------------------------------------------------


def test_settings_errors_are_one_line_and_name_the_field():
    points = DataSpec("moons", "points", (2,), 2)
    unlabelled = DataSpec("shapes", "image", (3, 16, 16))
    cases = [
        (dict(step_size=0.0), "model.step_size: must be > 0"),
        (dict(noise=-0.1), "model.noise: must be >= 0, or null for sqrt(step_size)"),
        (dict(grad_clip=0.0), "model.grad_clip: must be > 0, or null"),
        (dict(reinit_prob=1.5), "model.reinit_prob: must be in [0, 1]"),
        (dict(buffer_size=-1), "model.buffer_size: must be >= 0"),
        (dict(langevin_steps=0), "model.langevin_steps: must be >= 1"),
        (dict(alpha=-1.0), "model.alpha: must be >= 0"),
        (dict(data=points), "data.dataset: the energy network is convolutional; moons holds points"),
        (dict(data=unlabelled, energy="jem"), "model.energy: jem needs class labels; shapes has none"),
    ]
    for kwargs, message in cases:
        data = kwargs.pop("data", DIGITS16)
        with pytest.raises(ConfigError) as e:
            family(data=data, **kwargs)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match=r"^model.spectral_nrom: unknown key; did you mean model.spectral_norm\?"):
        job_from_dict({"family": "ebm", "flavor": "debug", "model": {"spectral_nrom": True}})


def test_flavors_carry_the_papers_sampler_settings():
    igebm, jem = EnergyBasedModel.flavors["igebm"], EnergyBasedModel.flavors["jem"]
    assert (igebm["langevin_steps"], igebm["step_size"], igebm["noise"], igebm["buffer_size"],
            igebm["reinit_prob"], igebm["spectral_norm"]) == (60, 10.0, 0.005, 10000, 0.05, True)
    assert (jem["langevin_steps"], jem["step_size"], jem["noise"], jem["reinit_prob"], jem["energy"]) == (
        20, 1.0, 0.01, 0.05, "jem")


def test_the_digits_job_trains_two_steps_and_judges_its_samples(shard_root, tmp_path):
    from test_trainer import events

    from gensuite.trainer import train

    classifier = job_from_dict({"name": "clf", "family": "classifier", "flavor": "debug",
                                "data": {"dataset": "digits", "root": str(shard_root)},
                                "train": {"steps": 10, "batch_size": 32, "log_every": 10, "sample_every": 10,
                                          "checkpoint_every": 10}, "log": {"progress_bar": False}})
    train(classifier, tmp_path / "clf")
    job = load_job(ROOT / "jobs" / "ebm_digits.yaml",
                   [f"data.root={shard_root}", "train.steps=2", "train.log_every=1", "train.sample_every=2",
                    "model.langevin_steps=3", "model.sample_steps=4", "model.width=8", "model.hidden=16",
                    "train.batch_size=16", f"eval.classifier={tmp_path / 'clf'}", "eval.n_samples=20",
                    "log.grid_size=16", "log.progress_bar=false"])
    assert job.family == "ebm" and "clf_fid" in job.eval.metrics
    metrics = train(job, tmp_path / "run")
    acc = events(tmp_path / "run")
    assert {"model/loss", "model/E_pos", "model/E_neg", "model/cd", "model/reg", "eval/clf_fid"} <= set(
        acc.Tags()["scalars"])
    assert {"samples/samples", "samples/buffer", "samples/chains", "figures/energies"} <= set(acc.Tags()["images"])
    assert math.isfinite(metrics["final/eval/clf_fid"]) and metrics["final/eval/clf_fid"] > 0
