"""GAN family: DCGAN's architecture rules, loss formulas and the optimal discriminator."""

import math

import pytest
import torch
from torch import nn

from gensuite.config import from_dict
from gensuite.errors import GensuiteError
from gensuite.families.gan import GAN, GANConfig
from gensuite.families.gan.objectives import LOSSES, d_bce, g_minimax, g_non_saturating
from gensuite.registry import DataSpec, Networks

MNIST = DataSpec("mnist", "image", (1, 28, 28), 10)


def spec(size, channels=3):
    return DataSpec("x", "image", (channels, size, size), 10)


def family(flavor="dcgan", data=spec(32), **overrides):
    return GAN(from_dict(GANConfig, {**GAN.flavors[flavor], **overrides}, "model"), data)


@pytest.mark.parametrize("size", [32, 64])
def test_dcgan_shapes_and_layer_rules(size):
    torch.manual_seed(0)
    nets = family(data=spec(size)).build_networks()
    G, D = nets["G"], nets["D"]
    images = G(torch.randn(4, 100))
    assert images.shape == (4, 3, size, size) and images.abs().max() <= 1
    assert D(images).shape == (4,)
    g_layers, d_layers = list(G.net), list(D.net)
    # G: BatchNorm after every transposed conv but the last, which feeds tanh; ReLU inside.
    assert isinstance(g_layers[-2], nn.ConvTranspose2d) and isinstance(g_layers[-1], nn.Tanh)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g_layers) == int(math.log2(size // 4))
    assert all(isinstance(m, nn.ReLU) for m in g_layers if isinstance(m, (nn.ReLU, nn.LeakyReLU)))
    # D: no BatchNorm on the input layer, LeakyReLU(0.2), strided convs, no pooling or hidden linear layers.
    assert isinstance(d_layers[0], nn.Conv2d) and isinstance(d_layers[1], nn.LeakyReLU)
    assert all(m.negative_slope == 0.2 for m in d_layers if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Linear)) for m in D.modules())
    assert all(m.stride == (2, 2) for m in d_layers[:-1] if isinstance(m, nn.Conv2d))


def test_dcgan_init_is_normal_0_02():
    torch.manual_seed(0)
    nets = family(ngf=64, ndf=64).build_networks()
    weights = torch.cat([m.weight.flatten() for n in nets.values() for m in n.modules()
                         if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert weights.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    bn = torch.cat([m.weight for n in nets.values() for m in n.modules() if isinstance(m, nn.BatchNorm2d)])
    assert bn.mean().item() == pytest.approx(1.0, abs=0.01) and bn.std().item() == pytest.approx(0.02, rel=0.2)


def test_dcgan_rejects_non_power_of_two_sizes():
    with pytest.raises(GensuiteError, match=r"--size 32"):
        family(data=MNIST)
    assert family("mlp", MNIST).build_networks()["G"](torch.randn(2, 100)).shape == (2, 1, 28, 28)


def test_loss_formulas_on_fixed_logits():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    expected_d = -(torch.log(sig(real))).mean() - torch.log(1 - sig(fake)).mean()
    assert d_bce(real, fake).item() == pytest.approx(expected_d.item(), rel=1e-6)
    smoothed = -(0.9 * torch.log(sig(real)) + 0.1 * torch.log(1 - sig(real))).mean() - torch.log(1 - sig(fake)).mean()
    assert d_bce(real, fake, 0.9).item() == pytest.approx(smoothed.item(), rel=1e-6)
    assert g_minimax(fake).item() == pytest.approx(torch.log(1 - sig(fake)).mean().item(), rel=1e-6)
    assert g_non_saturating(fake).item() == pytest.approx(-torch.log(sig(fake)).mean().item(), rel=1e-6)
    # A discriminator that cannot tell (logit 0) costs 2 log 2.
    assert d_bce(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2 * math.log(2))
    assert set(LOSSES) >= {"minimax", "non_saturating"}


def test_non_saturating_gradient_is_strong_where_minimax_saturates():
    fake = torch.tensor([-6.0], requires_grad=True)  # D confidently rejects the sample
    (g_min,) = torch.autograd.grad(g_minimax(fake), fake)
    (g_ns,) = torch.autograd.grad(g_non_saturating(fake), fake)
    assert abs(g_min.item()) < 0.01 < 0.9 < abs(g_ns.item())


def test_optimal_discriminator_gives_log4_minus_twice_jsd():
    # p_data and p_g on 4 points, as batches whose sample counts follow the probabilities.
    p_data, p_g = torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    logit = torch.log(p_data / p_g)  # D*(x) = p_data / (p_data + p_g)
    counts_d, counts_g = (p_data * 10).long(), (p_g * 10).long()
    real, fake = logit.repeat_interleave(counts_d), logit.repeat_interleave(counts_g)
    m = (p_data + p_g) / 2
    jsd = 0.5 * (p_data * (p_data / m).log()).sum() + 0.5 * (p_g * (p_g / m).log()).sum()
    assert d_bce(real, fake).item() == pytest.approx(math.log(4) - 2 * jsd.item(), rel=1e-5)
    # ... and any other discriminator does worse (a higher loss).
    assert d_bce(real * 0.5, fake * 0.5).item() > d_bce(real, fake).item()


def test_players_loss_terms_and_training_steps_reduce_d_loss():
    fam = family("debug", spec(16, 1), n_critic=3)
    assert [(p.name, p.steps, p.consumes_data) for p in fam.players()] == [("D", 3, True), ("G", 1, False)]
    torch.manual_seed(0)
    nets = fam.build_networks()
    batch = {"x": torch.rand(16, 1, 16, 16).round(), "y": torch.zeros(16, dtype=torch.long)}
    opt = torch.optim.Adam(nets["D"].parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        terms = fam.loss("D", Networks(nets), batch, 1)
        first = first if first is not None else terms["loss"].item()
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert terms["loss"].item() < 0.5 * first
    assert {"real_logit", "fake_logit", "real_acc", "fake_acc"} <= terms.keys()
    for p in nets["G"].parameters():
        assert p.grad is None  # G was not touched by D's step
    g_terms = fam.loss("G", Networks(nets), batch, 1)
    assert torch.isfinite(g_terms["loss"])


def test_sampling_is_in_unit_range_and_leaves_rng_and_bn_stats_alone():
    fam = family("debug", spec(16, 1))
    torch.manual_seed(0)
    nets = fam.build_networks()
    for m in nets.values():
        m.eval()
    bn = [m for m in nets["G"].modules() if isinstance(m, nn.BatchNorm2d)][0]
    before_stats, before_rng = bn.running_mean.clone(), torch.get_rng_state()
    with torch.no_grad():
        out = fam.visuals(Networks(nets), fam.fixed_inputs(9, torch.Generator().manual_seed(1)), {})
    assert out["samples"].shape == (9, 1, 16, 16)
    assert 0 <= out["samples"].min() and out["samples"].max() <= 1
    assert torch.equal(bn.running_mean, before_stats) and torch.equal(torch.get_rng_state(), before_rng)
