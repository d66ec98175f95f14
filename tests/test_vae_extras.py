"""VAE extras: categorical latents with the Gumbel-softmax relaxation (assignment 000 Q2) and the
EfficientNet-B0 encoder with weights from a local file (assignment 002, bonus)."""

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

from gensuite.config import from_dict, load_job
from gensuite.errors import ConfigError
from gensuite.families.vae import VAE, VAEConfig
from gensuite.families.vae import categorical as cat
from gensuite.registry import DataSpec, Networks

ROOT = Path(__file__).resolve().parents[1]
POINTS = DataSpec("toy", "points", (4,))
DIGITS = DataSpec("digits", "image", (1, 16, 16), 10, tuple("0123456789"))


def gumbel_vae(data=POINTS, **overrides):
    raw = {**VAE.flavors["gumbel"], "hidden": [16], "decoder_hidden": [16], **overrides}
    return VAE(from_dict(VAEConfig, raw, "model"), data)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "gensuite", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


# -- the categorical latent's math ----------------------------------------------------------------------------


@pytest.mark.parametrize("variables, categories", [(1, 2), (2, 3), (3, 4)])
def test_kl_to_the_uniform_prior_is_the_brute_force_sum_over_every_code(variables, categories):
    logits = torch.randn(5, variables, categories, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    q = logits.softmax(-1)
    brute = torch.zeros(5, dtype=torch.float64)
    for code in itertools.product(range(categories), repeat=variables):  # all K^N joint codes
        q_code = torch.stack([q[:, n, k] for n, k in enumerate(code)]).prod(0)
        brute += q_code * (q_code.log() + variables * math.log(categories))  # q log(q / K^-N)
    assert torch.allclose(cat.kl_uniform(logits), brute, rtol=0, atol=1e-12)
    uniform = D.Categorical(logits=torch.zeros_like(logits))
    assert torch.allclose(cat.kl_uniform(logits), D.kl_divergence(D.Categorical(logits=logits), uniform).sum(-1),
                          rtol=0, atol=1e-12)
    assert (cat.kl_uniform_units(torch.zeros(3, variables, categories)) == 0).all()  # q = p: no KL


def test_gradient_variance_grows_as_the_temperature_shrinks():
    """A fixed objective f(y) = c·y of one relaxed sample y = softmax((logits + g)/λ) of K = 4 categories;
    the estimator is ∂f/∂logits = (1/λ) y ⊙ (c − c·y), one per Gumbel draw. Its total variance
    (trace of the covariance) is estimated from M = 100,000 independent draws per λ, each λ from its own
    seed. As λ → 0 the sample is one-hot except near ties of logits + g (probability O(λ)), where the
    gradient is O(1/λ): the variance grows like 1/λ (from about 0.024 at λ = 2 to 5.4 at λ = 0.1).

    Monte-Carlo error: with s_i = ‖∂_i − mean‖², the estimate is mean(s_i) and its standard error
    sd(s_i)/√M (0.2 % to 0.9 % of the value here, the heavier tail at small λ). Consecutive estimates
    must differ by more than 10 combined standard errors (a false ordering at that margin has probability
    below 1e-20 under the normal approximation), and their ratio must exceed 2: the true ratios are about
    7, 4 and 8, so the ordering is certain, not a lucky seed."""
    m = 100_000
    base = torch.tensor([0.5, -0.3, 1.0, 0.0], dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    estimates = []
    for i, tau in enumerate((2.0, 1.0, 0.5, 0.1)):
        torch.manual_seed(1000 + i)
        logits = base.repeat(m, 1).requires_grad_()
        (cat.gumbel_softmax(logits, tau) @ c).sum().backward()  # row i's gradient is draw i's estimate
        s = (logits.grad - logits.grad.mean(0)).pow(2).sum(1)
        estimates.append((tau, s.mean().item(), s.std().item() / math.sqrt(m)))
    for (t1, v1, e1), (t2, v2, e2) in zip(estimates, estimates[1:]):
        assert v2 - v1 > 10 * math.hypot(e1, e2), estimates
        assert v2 > 2 * v1, estimates


def test_straight_through_is_exactly_one_hot_forward_with_the_soft_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, 7, generator=g, requires_grad=True)
    noise = -torch.log(-torch.log(torch.rand(64, 5, 7, generator=g)))
    hard = cat.gumbel_softmax(logits, 0.7, hard=True, gumbel=noise)
    expected = F.one_hot((logits + noise).argmax(-1), 7).float()  # Gumbel-max: the exact categorical draw
    assert torch.equal(hard, expected)  # exactly 0 and 1, not 1 − 1e-8
    assert torch.equal(hard.sum(-1), torch.ones(64, 5))
    weights = torch.randn(7, generator=g)
    grad_hard, = torch.autograd.grad((hard * weights).sum(), logits)
    grad_soft, = torch.autograd.grad((cat.gumbel_softmax(logits, 0.7, gumbel=noise) * weights).sum(), logits)
    assert grad_hard.abs().sum() > 0 and torch.allclose(grad_hard, grad_soft)

    # Through the family: the decoder sees exact one-hots, and the encoder still gets gradients.
    fam = gumbel_vae(straight_through=True, categorical_vars=3, categories=4)
    torch.manual_seed(0)
    nets = fam.build_networks()
    seen = []
    nets["decoder"].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    fam.loss("model", Networks(nets), {"x": torch.randn(8, 4)}, 1)["loss"].backward()
    codes = seen[0].view(8, 3, 4)
    assert torch.equal(codes, F.one_hot(codes.argmax(-1), 4).float())
    assert nets["encoder"].logits.weight.grad.abs().sum() > 0


def test_temperature_schedule_and_its_logged_value():
    assert cat.temperature(0, 1.0, 0.5, 1e-3) == 1.0
    assert cat.temperature(100, 1.0, 0.5, 1e-3) == pytest.approx(math.exp(-0.1), abs=1e-15)
    assert cat.temperature(693, 1.0, 0.5, 1e-3) == pytest.approx(math.exp(-0.693), abs=1e-15)  # just above 0.5
    assert cat.temperature(694, 1.0, 0.5, 1e-3) == 0.5  # floored at λ_min
    assert cat.temperature(10 ** 6, 2.0, 0.1, 1e-3) == 0.1
    assert cat.temperature(5000, 0.7, 0.5, 0.0) == 0.7  # rate 0: constant
    fam = gumbel_vae(temperature=2.0, temperature_min=0.3, anneal_rate=0.01)
    torch.manual_seed(0)
    nets = Networks(fam.build_networks())
    for step in (1, 50, 1000):
        terms = fam.loss("model", nets, {"x": torch.randn(4, 4)}, step)
        assert terms["temperature"].item() == pytest.approx(max(0.3, 2.0 * math.exp(-0.01 * step)), rel=1e-6)
    gaussian = VAE(from_dict(VAEConfig, {"hidden": [8], "decoder_hidden": [8]}, "model"), POINTS)
    assert "temperature" not in gaussian.loss("model", Networks(gaussian.build_networks()), {"x": torch.randn(4, 4)}, 1)


def test_loss_terms_are_the_decoder_nll_at_the_relaxed_draw_plus_the_exact_kl():
    fam = gumbel_vae(categorical_vars=3, categories=4, beta=2.0)
    torch.manual_seed(0)
    nets = fam.build_networks()
    x = torch.randn(6, 4)
    terms = fam.loss("model", Networks(nets), {"x": x}, 1)
    logits = nets["encoder"](x)[0].view(6, 3, 4)
    assert torch.allclose(terms["kl"], cat.kl_uniform(logits).mean())
    assert torch.allclose(terms["loss"], terms["recon"] + 2.0 * terms["kl"])
    assert torch.allclose(terms["elbo"], -(terms["recon"] + terms["kl"]))


def test_bounds_are_those_of_the_discrete_model_by_exact_enumeration():
    """With N = 2 variables of K = 3 categories there are 9 codes: log p(x) = log Σ_z p(z) p(x|z) and the
    discrete ELBO Σ_z q(z|x) log p(x|z) − KL are exact sums. At the family's Gumbel-max draws z ~ q(z|x),
    the log weights' mean must match the exact ELBO, and the importance weights w = p(x, z)/q(z|x) must
    average to p(x) (the IWAE bound's limit), each within 4 standard errors of 20,000 draws."""
    fam = gumbel_vae(categorical_vars=2, categories=3, likelihood="gaussian", fixed_std=0.5)
    torch.manual_seed(0)
    nets = {k: v.double() for k, v in fam.build_networks().items()}
    with torch.no_grad():  # away from initialisation: a peaked q(z|x) and a decoder that tells codes apart
        nets["encoder"].logits.weight.mul_(6)
        nets["decoder"].net[-1].weight.mul_(6)
    view = Networks(nets)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        log_q = nets["encoder"](x)[0].view(3, 2, 3).log_softmax(-1)
        log_joint, q_codes = [], []
        for a, b in itertools.product(range(3), repeat=2):
            z = torch.cat([F.one_hot(torch.tensor([a]), 3), F.one_hot(torch.tensor([b]), 3)], 1).double().repeat(3, 1)
            out, log_std = nets["decoder"](z)
            log_joint.append(-fam.reconstruction_nll(out, log_std, x) - 2 * math.log(3))  # log p(x|z) + log p(z)
            q_codes.append((log_q[:, 0, a] + log_q[:, 1, b]).exp())
        log_joint, q_codes = torch.stack(log_joint), torch.stack(q_codes)  # (9 codes, 3 samples)
        log_px = torch.logsumexp(log_joint, 0)
        exact_elbo = (q_codes * (log_joint - q_codes.log())).sum(0)
        k = 20_000
        eps = torch.randn(k, 3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        log_w = fam.log_weights(view, {"x": x}, eps)
        bounds = fam.log_likelihood(view, {"x": x}, 64, torch.arange(3) + 7)
    assert ((log_w.mean(0) - exact_elbo).abs() < 4 * log_w.std(0) / math.sqrt(k)).all()
    ratio = (log_w - log_px).exp()  # w / p(x): mean 1 exactly under q
    assert ((ratio.mean(0) - 1).abs() < 4 * ratio.std(0) / math.sqrt(k)).all()
    assert (exact_elbo < log_px - 0.1).all()  # q is not the posterior: the check has a gap to see
    assert (bounds["iwae"] >= bounds["elbo"]).all() and torch.isfinite(bounds["iwae"]).all()


def test_sampling_draws_one_hot_codes_from_the_uniform_prior_and_visuals_skip_the_scatter():
    fam = gumbel_vae(DIGITS, categorical_vars=1, categories=2)  # N·K = 2, like a 2-D latent: still no scatter
    fixed = fam.fixed_inputs(4000, torch.Generator().manual_seed(0))
    codes = fixed["z"].view(4000, 1, 2)
    assert torch.equal(codes.sum(-1), torch.ones(4000, 1)) and set(codes.unique().tolist()) == {0.0, 1.0}
    assert codes[:, 0, 0].mean().item() == pytest.approx(0.5, abs=0.03)
    torch.manual_seed(0)
    nets = Networks(fam.build_networks())
    x = torch.rand(6, 1, 16, 16)
    state = torch.get_rng_state()
    with torch.no_grad():
        out = fam.visuals(nets, fam.fixed_inputs(16, torch.Generator().manual_seed(0)), {"x": x, "y": torch.arange(6)})
    assert torch.equal(state, torch.get_rng_state())  # no draws from the global RNG: exact resume
    assert set(out) == {"samples", "reconstructions"}
    assert out["samples"].shape == (16, 1, 16, 16) and out["reconstructions"].shape == (12, 1, 16, 16)


@pytest.mark.parametrize("overrides, field", [
    ({"hierarchy": [16, 8]}, "model.hierarchy"), ({"prior": "learned"}, "model.prior"),
    ({"categories": 1}, "model.categories"), ({"categorical_vars": 0}, "model.categorical_vars"),
    ({"temperature": 0.0}, "model.temperature"), ({"temperature_min": 2.0}, "model.temperature_min"),
    ({"anneal_rate": -1.0}, "model.anneal_rate"),
    ({"latent": "gaussian", "straight_through": True}, "model.straight_through")])
def test_bad_categorical_settings_name_their_field(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        gumbel_vae(**overrides)


def test_categorical_config_errors_are_one_line_with_exit_code_2():
    result = cli("validate", ROOT / "jobs" / "gumbel_vae_digits.yaml", "--set", "model.hierarchy=[16, 8]")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.hierarchy: ") and "hierarchy: []" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_tiny_gumbel_vae_trains_through_the_loop(shard_root, tmp_path):
    from gensuite.evaluation import METRICS, _load_builtin
    from gensuite.report import read_run
    from gensuite.trainer import train

    job = load_job(ROOT / "jobs" / "gumbel_vae_digits.yaml", [
        f"data.root={shard_root}", "data.shuffle_buffer=64", "model.hidden=[64]", "model.decoder_hidden=[64]",
        "model.categorical_vars=4", "model.categories=5", "model.anneal_rate=0.02", "model.temperature_min=0.3",
        "train.steps=40", "train.batch_size=32", "train.log_every=10", "train.sample_every=40",
        "train.checkpoint_every=40", "optim.lr=3e-3", "eval.every=null", "eval.max_samples=64",
        "eval.importance_samples=4", "log.grid_size=16", "log.progress_bar=false"])
    train(job, tmp_path / "run")
    run = read_run(tmp_path / "run")
    loss = [v for _, v in run.scalars["model/loss"]]
    assert len(loss) == 4 and loss[-1] < loss[0] - 10, loss  # nats per 16x16 image
    temperature = run.scalars["model/temperature"]
    for step, value in temperature:  # the mean of λ over the 10 steps up to `step`
        expected = sum(cat.temperature(s, 1.0, 0.3, 0.02) for s in range(step - 9, step + 1)) / 10
        assert value == pytest.approx(expected, rel=1e-5)
    assert temperature[-1][1] < temperature[0][1]
    final = {t: v[-1][1] for t, v in run.scalars.items()}
    assert final["eval/iwae"] >= final["eval/elbo"] - 1e-3 and math.isfinite(final["eval/elbo"])
    assert not any(t.startswith("eval/au_") for t in final)  # active_units does not apply to categorical codes
    _load_builtin()
    family = VAE(job.model, DIGITS)
    assert METRICS["likelihood"].applies(family) and not METRICS["active_units"].applies(family)
    assert "samples/samples" in run.images and "samples/reconstructions" in run.images
    assert "figures/latent" not in run.images


# -- the EfficientNet-B0 encoder ------------------------------------------------------------------------------


def effnet_vae(data=DIGITS, **overrides):
    raw = {**VAE.flavors["mlp"], "encoder": "efficientnet_b0", "encoder_weights": "random", "encoder_resize": 32,
           "latent_dim": 2, "decoder_hidden": [32], **overrides}
    return VAE(from_dict(VAEConfig, raw, "model"), data)


@pytest.fixture(scope="module")
def effnet_file(tmp_path_factory):
    """torchvision's efficientnet_b0, randomly initialised from seed 123, saved as torchvision saves it."""
    from torchvision.models import efficientnet_b0

    torch.manual_seed(123)
    model = efficientnet_b0(weights=None)
    path = tmp_path_factory.mktemp("weights") / "efficientnet_b0.pth"
    torch.save(model.state_dict(), path)
    return path, model.features.state_dict()


def test_the_weights_file_is_loaded_bit_for_bit(effnet_file):
    path, expected = effnet_file
    fam = effnet_vae(encoder_weights=str(path))
    assert fam.initializes_from_data  # the trainer calls initialize() before the first step
    torch.manual_seed(0)
    nets = fam.build_networks()
    trunk = nets["encoder"].features.backbone
    assert not all(torch.equal(v, expected[k]) for k, v in trunk.state_dict().items())
    fam.initialize(Networks(nets), {"x": torch.rand(2, 1, 16, 16)})
    loaded = trunk.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    # A state dict of the features alone loads the same.
    features_only = path.with_name("features.pth")
    torch.save(expected, features_only)
    fam = effnet_vae(encoder_weights=str(features_only), freeze_encoder=True)
    torch.manual_seed(1)
    nets = fam.build_networks()
    fam.initialize(Networks(nets), {"x": torch.rand(2, 1, 16, 16)})
    assert all(torch.equal(nets["encoder"].features.backbone.state_dict()[k], expected[k]) for k in expected)
    # Frozen: the trunk holds buffers under the same keys; only the heads are parameters.
    assert {n for n, _ in nets["encoder"].named_parameters()} == {"mean.weight", "mean.bias", "log_var.weight",
                                                                  "log_var.bias"}
    assert nets["encoder"].state_dict().keys() == effnet_vae().build_networks()["encoder"].state_dict().keys()
    nets["encoder"].train()
    assert not nets["encoder"].features.backbone.training  # batch-norm statistics stay the pretrained ones


def test_existing_encoders_keep_their_checkpoint_keys():
    fam = VAE(from_dict(VAEConfig, dict(VAE.flavors["conv"]), "model"), DataSpec("d", "image", (1, 32, 32)))
    keys = set(fam.build_networks()["encoder"].state_dict())
    assert keys == {"features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
                    "features.6.weight", "features.6.bias", "mean.weight", "mean.bias", "log_var.weight",
                    "log_var.bias"}


def test_effnet_encoder_shapes_and_settings_errors():
    fam = effnet_vae(encoder_resize=16)
    torch.manual_seed(0)
    nets = fam.build_networks()
    mean, log_var = nets["encoder"](torch.rand(3, 1, 16, 16))
    assert mean.shape == (3, 2) and log_var.shape == (3, 2)
    with pytest.raises(ConfigError, match="^model.encoder_weights: .*random"):
        effnet_vae(encoder_weights=None)
    with pytest.raises(ConfigError, match="^model.encoder_weights: applies to encoder: efficientnet_b0"):
        VAE(from_dict(VAEConfig, {"encoder_weights": "random"}, "model"), DIGITS)
    with pytest.raises(ConfigError, match="^model.freeze_encoder: "):
        VAE(from_dict(VAEConfig, {"freeze_encoder": True}, "model"), DIGITS)
    with pytest.raises(ConfigError, match="^model.encoder: efficientnet_b0 encodes images"):
        effnet_vae(POINTS)
    with pytest.raises(ConfigError, match="^model.encoder_weights: .*no such file"):
        VAE.complete_config(from_dict(VAEConfig, {"encoder": "efficientnet_b0",
                                                  "encoder_weights": "/nonexistent/w.pth"}, "model"))


def test_a_missing_weights_file_is_a_one_line_error_with_exit_code_2(shard_root, tmp_path):
    missing = tmp_path / "weights" / "efficientnet_b0_rwightman-7f5810bc.pth"
    job = ROOT / "jobs" / "effnet_vae_digits.yaml"
    sets = ["--set", f"data.root={shard_root}", "--set", f"model.encoder_weights={missing}"]
    for args in (("validate", "--data", job, *sets), ("train", job, "--run-dir", tmp_path / "run", *sets)):
        result = cli(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: model.encoder_weights: {missing}: no such file"), lines
        assert "random" in lines[0] and "Traceback" not in result.stderr


def test_the_effnet_digits_job_trains_through_the_loop_with_a_frozen_pretrained_trunk(shard_root, tmp_path,
                                                                                       effnet_file):
    from gensuite.checkpoint import latest_checkpoint
    from gensuite.report import read_run
    from gensuite.trainer import train

    path, expected = effnet_file
    job = load_job(ROOT / "jobs" / "effnet_vae_digits.yaml", [
        f"data.root={shard_root}", "data.shuffle_buffer=32", "train.steps=2", "train.batch_size=8",
        "train.log_every=1", "train.sample_every=2", "train.checkpoint_every=2", f"model.encoder_weights={path}",
        "model.freeze_encoder=true", "eval.max_samples=16", "eval.importance_samples=2", "log.grid_size=4",
        "log.progress_bar=false"])
    train(job, tmp_path / "run")
    logged = {t: v[-1][1] for t, v in read_run(tmp_path / "run").scalars.items()}
    assert math.isfinite(logged["model/loss"]) and logged["eval/iwae"] >= logged["eval/elbo"] - 1e-3
    state = torch.load(latest_checkpoint(tmp_path / "run"), map_location="cpu", weights_only=False)
    encoder = state["networks"]["encoder"]
    trunk = {k.removeprefix("features.backbone."): v for k, v in encoder.items() if k.startswith("features.backbone.")}
    assert trunk.keys() == expected.keys()
    assert all(torch.equal(trunk[k], expected[k]) for k in expected)  # frozen: still the file's, bit for bit
    assert state["step"] == 2
