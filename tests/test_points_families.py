"""The points flavors of the VAE, diffusion and EBM families: each builds, trains a few steps through the
loop on the moons shards, samples 2-D points, and one numeric check of its objective."""

import math

import pytest
import torch

from gensuite.config import from_dict, job_from_dict
from gensuite.families.diffusion import Diffusion, DiffusionConfig
from gensuite.families.ebm import EBMConfig, EnergyBasedModel
from gensuite.families.vae import VAE, VAEConfig
from gensuite.registry import DataSpec, Networks, sampling_mode
from gensuite.trainer import train

MOONS = DataSpec("moons", "points", (2,), 2, ("upper", "lower"))


def family(cls, config, **overrides):
    return cls(from_dict(config, {**cls.flavors["points"], **overrides}, "model"), MOONS)


@pytest.mark.parametrize("name", ["vae", "diffusion", "ebm"])
def test_points_flavor_trains_through_the_loop_and_samples_points(shard_root, tmp_path, name):
    model = {"ebm": {"langevin_steps": 5, "sample_steps": 10, "buffer_size": 64}}.get(name, {})
    job = job_from_dict({"name": f"{name}-points", "family": name, "flavor": "points", "model": model,
                         "data": {"dataset": "moons", "root": str(shard_root), "shuffle_buffer": 64},
                         "train": {"steps": 4, "batch_size": 32, "log_every": 2, "sample_every": 4,
                                   "checkpoint_every": 4, "seed": 0},
                         "log": {"grid_size": 50, "progress_bar": False}, "eval": {"metrics": []}})
    metrics = train(job, tmp_path)
    losses = [v for k, v in metrics.items() if k.endswith("model/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "samples" / "samples-00000004.png").is_file()


def test_diffusion_mlp_loss_at_init_is_the_noise_energy():
    """The denoiser's last layer starts at zero, so ε̂ = 0 and L_simple = mean ε² per coordinate, whose
    expectation is 1 and whose standard error over n·2 draws (Var ε² = 2) is 1/√n."""
    fam = family(Diffusion, DiffusionConfig)
    assert fam.schedule.T == 100 and not fam.cfg.clip_x0
    torch.manual_seed(0)
    nets = Networks(fam.build_networks())
    n = 4096
    x = torch.rand(n, 2) * 3 - 1
    loss = fam.loss("model", nets, {"x": x}, 0)["loss"].item()
    assert loss == pytest.approx(1.0, abs=5 / math.sqrt(n))
    out = fam.sample(nets, fam.fixed_inputs(64, torch.Generator().manual_seed(0)))
    assert out.shape == (64, 2) and torch.isfinite(out).all()
    # The bound is a density in nats (a continuous decoder), finite for points outside [-1, 1].
    values = fam.log_likelihood(nets, {"x": x[:8] * 2}, 3, torch.arange(8))["vlb"]
    assert values.shape == (8,) and torch.isfinite(values).all()


def test_diffusion_refuses_the_unet_and_clipping_on_points():
    from gensuite.errors import ConfigError

    with pytest.raises(ConfigError, match="^flavor: moons holds points"):
        Diffusion(from_dict(DiffusionConfig, Diffusion.flavors["debug"], "model"), MOONS)
    with pytest.raises(ConfigError, match="^model.clip_x0"):
        family(Diffusion, DiffusionConfig, clip_x0=True)


def test_vae_points_elbo_terms_match_the_closed_form_kl_and_samples_carry_the_decoder_noise():
    fam = family(VAE, VAEConfig)
    torch.manual_seed(0)
    nets = fam.build_networks()
    x = torch.randn(256, 2)
    terms = fam.loss("model", Networks(nets), {"x": x}, 0)
    mean, log_var = nets["encoder"](x)
    closed_form = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1).mean()
    assert terms["kl"].item() == pytest.approx(closed_form.item(), rel=1e-5) and terms["kl"] >= 0
    assert "bpd" not in terms and torch.isfinite(terms["elbo"])
    fixed = fam.fixed_inputs(2000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        nets["decoder"].log_std.fill_(math.log(0.5))
        spread = fam.sample(Networks(nets), fixed) - nets["decoder"](fixed["z"])[0]
    assert spread.shape == (2000, 2)
    assert spread.std(0).tolist() == pytest.approx([0.5, 0.5], abs=5 * 0.5 / math.sqrt(2 * 2000))


def test_ebm_points_chains_live_in_the_data_box_from_initialize():
    fam = family(EnergyBasedModel, EBMConfig, langevin_steps=3, sample_steps=3, buffer_size=64)
    torch.manual_seed(0)
    nets = Networks(fam.build_networks())
    data = torch.tensor([[-1.0, -0.5], [2.0, 1.0]])
    fam.initialize(nets, {"x": data})
    low, high = fam.bounds
    assert low.tolist() == pytest.approx([-1.75, -0.875]) and high.tolist() == pytest.approx([2.75, 1.375])
    with sampling_mode(fam):
        out = fam.sample(nets, fam.fixed_inputs(500, torch.Generator().manual_seed(0)))
    assert out.shape == (500, 2) and ((out >= low) & (out <= high)).all()
    assert (out[:, 0] < 0).any() and (out[:, 0] > 2).any()  # spread over the box, not [-1, 1]
    restored = family(EnergyBasedModel, EBMConfig, buffer_size=64)
    restored.load_state_dict(fam.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.bounds, fam.bounds))
