"""GAN family: DCGAN's architecture rules, loss formulas and the optimal discriminator."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gensuite.config import from_dict
from gensuite.errors import ConfigError, GensuiteError
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


# -- the loss zoo (issue 15) ------------------------------------------------------------------

POINTS = DataSpec("ring", "points", (2,), 8)


def test_least_squares_wasserstein_and_hinge_formulas():
    real, fake = torch.tensor([1.5, -0.5, 0.2]), torch.tensor([0.3, -2.0, 1.1])
    ls, w, hinge = LOSSES["least_squares"], LOSSES["wasserstein"], LOSSES["hinge"]
    assert ls.d_loss(real, fake, 1.0).item() == pytest.approx(
        0.5 * ((0.5 ** 2 + 1.5 ** 2 + 0.8 ** 2) / 3) + 0.5 * ((0.09 + 4.0 + 1.21) / 3), rel=1e-6)
    assert ls.g_loss(fake).item() == pytest.approx(0.5 * ((0.49 + 9.0 + 0.01) / 3), rel=1e-6)
    assert w.d_loss(real, fake, 1.0).item() == pytest.approx((0.3 - 2.0 + 1.1) / 3 - (1.5 - 0.5 + 0.2) / 3, rel=1e-6)
    assert w.g_loss(fake).item() == pytest.approx(-(0.3 - 2.0 + 1.1) / 3, rel=1e-6)
    # hinge: max(0, 1 - D(x)) = [0, 1.5, 0.8]; max(0, 1 + D(G(z))) = [1.3, 0, 2.1]
    assert hinge.d_loss(real, fake, 1.0).item() == pytest.approx(2.3 / 3 + 3.4 / 3, rel=1e-6)
    assert w.clip_weights == 0.01 and LOSSES["wasserstein_gp"].gradient_penalty == 10.0
    assert set(LOSSES) == {"minimax", "non_saturating", "least_squares", "wasserstein", "wasserstein_gp", "hinge"}


def test_gradient_penalty_and_r1_on_a_linear_critic_are_closed_forms():
    from gensuite.families.gan.objectives import gradient_penalty, r1_penalty

    critic = nn.Linear(6, 1)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0, -0.5]]))
    norm = critic.weight.norm().item()  # ∇ₓ(w·x + b) = w everywhere
    real, fake = torch.randn(7, 6), torch.randn(7, 6)
    gp = gradient_penalty(lambda x: critic(x).flatten(), real, fake)
    assert gp.item() == pytest.approx((norm - 1) ** 2, rel=1e-6)
    assert r1_penalty(lambda x: critic(x).flatten(), real).item() == pytest.approx(norm ** 2, rel=1e-6)
    gp.backward()  # the penalty trains the critic: d/dw (‖w‖ − 1)² = 2(‖w‖ − 1) w/‖w‖
    expected = 2 * (norm - 1) * critic.weight / norm
    assert torch.allclose(critic.weight.grad, expected.detach(), rtol=1e-5)


def test_wgan_gp_critic_has_no_batchnorm_and_batchnorm_is_refused():
    fam = family("debug", spec(16, 1), loss="wasserstein_gp")
    D = fam.build_networks()["D"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in D.modules())  # layer normalisation
    with pytest.raises(ConfigError, match="model.critic_norm"):
        family("debug", spec(16, 1), loss="wasserstein_gp", critic_norm="batch")
    terms = fam.loss("D", Networks(fam.build_networks()), {"x": torch.rand(8, 1, 16, 16)}, 1)
    assert {"gradient_penalty", "critic_gap"} <= terms.keys() and "real_acc" not in terms
    assert terms["loss"].item() == pytest.approx(
        (-terms["critic_gap"] + 10 * terms["gradient_penalty"]).item(), rel=1e-5)


def test_wasserstein_clips_the_critic_after_its_step_only():
    fam = family("debug", spec(16, 1), loss="wasserstein")
    nets = fam.build_networks()
    with torch.no_grad():
        for p in list(nets["D"].parameters()) + list(nets["G"].parameters()):
            p.mul_(100)
    g_before = [p.clone() for p in nets["G"].parameters()]
    fam.after_step("G", Networks(nets), 1)
    assert max(p.abs().max().item() for p in nets["D"].parameters()) > 0.01
    fam.after_step("D", Networks(nets), 1)
    assert max(p.abs().max().item() for p in nets["D"].parameters()) == pytest.approx(0.01)
    assert all(torch.equal(a, b) for a, b in zip(g_before, nets["G"].parameters()))


def test_label_smoothing_is_refused_where_no_target_exists():
    with pytest.raises(ConfigError, match="model.label_smoothing"):
        from_dict(GANConfig, {"loss": "hinge", "label_smoothing": 0.1}, "model")
    assert from_dict(GANConfig, {"loss": "least_squares", "label_smoothing": 0.1}, "model").label_smoothing == 0.1


def test_pacgan_packs_consecutive_samples_and_needs_a_divisible_batch():
    fam = family("debug", spec(16, 1), pack=4)
    nets = fam.build_networks()
    assert nets["D"].net[0].in_channels == 4
    x = torch.arange(8 * 16 * 16, dtype=torch.float32).view(8, 1, 16, 16)
    packed = fam.packed(x)
    assert packed.shape == (2, 4, 16, 16) and torch.equal(packed[1, 2], x[6, 0])
    assert nets["D"](packed).shape == (2,)
    with pytest.raises(ConfigError, match="model.pack"):
        fam.packed(x[:6])
    points = family("points", POINTS, pack=3)
    assert points.build_networks()["D"].net[1].in_features == 6
    assert torch.equal(points.packed(torch.arange(12.0).view(6, 2))[1], torch.tensor([6.0, 7, 8, 9, 10, 11]))


def test_points_are_unbounded_and_image_networks_are_refused():
    fam = family("points", POINTS)
    torch.manual_seed(0)
    G = fam.build_networks()["G"]
    with torch.no_grad():
        G.net[-1].bias.fill_(5.0)  # a tanh would cap this at 1
    out = fam.sample(Networks({"G": G}), fam.fixed_inputs(4, torch.Generator().manual_seed(0)))
    assert out.shape == (4, 2) and out.min().item() > 3
    with pytest.raises(ConfigError, match="flavor"):
        family("dcgan", POINTS)


def test_unrolled_generator_loss_looks_ahead_through_d_steps():
    from gensuite.families.gan.unrolled import call, unrolled_state

    torch.manual_seed(0)
    fam = family("points", POINTS, unroll_steps=3, unroll_lr=0.05)
    nets = fam.build_networks()
    batch = {"x": torch.randn(16, 2)}
    torch.manual_seed(1)
    unrolled = fam.loss("G", Networks(nets), batch, 1)["loss"]
    # The same value by hand: copy D, take three SGD steps on D's loss with G's samples fixed, score G.
    torch.manual_seed(1)
    fake = nets["G"](fam.noise(16, "cpu"))
    D = copy.deepcopy(nets["D"])
    opt = torch.optim.SGD(D.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        fam.objective.d_loss(D(batch["x"]), D(fake.detach()), 1.0).backward()
        opt.step()
    assert unrolled.item() == pytest.approx(fam.objective.g_loss(D(fake)).item(), rel=1e-5)
    # G's gradient includes the path through D's steps: it differs from the gradient against the
    # unrolled D held fixed (what a first-order look-ahead would give).
    unrolled.backward()
    second_order = [p.grad.clone() for p in nets["G"].parameters()]
    for p in nets["G"].parameters():
        p.grad = None
    torch.manual_seed(1)
    fake = nets["G"](fam.noise(16, "cpu"))
    state = unrolled_state(nets["D"], lambda s: fam.objective.d_loss(call(nets["D"], s, batch["x"]),
                                                                      call(nets["D"], s, fake), 1.0), 3, 0.05)
    fam.objective.g_loss(call(nets["D"], {k: v.detach() for k, v in state.items()}, fake)).backward()
    first_order = [p.grad for p in nets["G"].parameters()]
    gap = max((a - b).abs().max().item() for a, b in zip(second_order, first_order))
    assert gap > 1e-4 * max(a.abs().max().item() for a in second_order)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in nets["D"].parameters())


def test_dead_units_count_relu_units_silent_on_the_whole_batch():
    fam = family("points", POINTS, g_hidden=[4], latent_dim=3)
    G = fam.build_networks()["G"]
    with torch.no_grad():
        G.net[0].weight.zero_()
        G.net[0].bias.copy_(torch.tensor([-1.0, 1.0, 0.5, -0.2]))  # two units never fire
    terms = fam.loss("G", Networks(fam.build_networks() | {"G": G}), {"x": torch.randn(8, 2)}, 1)
    assert terms["dead_units"].item() == 0.5
    assert not G._forward_hooks and not any(m._forward_hooks for m in G.modules())  # hooks removed
    leaky = family("points", POINTS, g_hidden=[4], latent_dim=3, g_activation="leaky_relu")
    assert isinstance(leaky.build_networks()["G"].net[1], nn.LeakyReLU)


# -- conditional GANs -------------------------------------------------------------------------

CIFAR = DataSpec("cifar10", "image", (3, 32, 32), 10)


def test_acgan_networks_follow_the_assignment_table():
    fam = family("acgan", CIFAR)
    torch.manual_seed(0)
    nets = fam.build_networks()
    G, D = nets["G"], nets["D"]
    assert G.project[0].in_features == 110 and G.project[0].out_features == 384 * 4 * 4
    convs = [m for m in G.net if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (384, 192, (5, 5), (2, 2)), (192, 96, (5, 5), (2, 2)), (96, 3, (5, 5), (2, 2))]
    images = G(torch.randn(4, 110))
    assert images.shape == (4, 3, 32, 32) and isinstance(G.net[-1], nn.Tanh)
    d_convs = [m for m in D.net if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size, m.stride[0]) for m in d_convs] == [
        (16, (3, 3), 2), (32, (3, 3), 1), (64, (3, 3), 2), (128, (3, 3), 1), (256, (3, 3), 2), (512, (3, 3), 1)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.net) == 5 and not isinstance(D.net[2], nn.BatchNorm2d)
    assert [m.p for m in D.net if isinstance(m, nn.Dropout)] == [0.5] * 6
    assert D(images).shape == (4, 11) and D.net[-1].in_features == 512 * 4 * 4
    linear_and_convs = [m for n in nets.values() for m in n.modules() if isinstance(m, (nn.Linear, nn.Conv2d,
                                                                                      nn.ConvTranspose2d))]
    assert all(m.bias is None or not m.bias.any() for m in linear_and_convs)  # biases 0
    weights = torch.cat([m.weight.flatten() for m in linear_and_convs])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)


def test_acgan_losses_add_the_class_log_likelihood():
    fam = family("acgan", spec(32, 1), d_noise_std=0.1)
    torch.manual_seed(0)
    nets = fam.build_networks()
    for m in nets.values():
        m.eval()  # no dropout or activation noise: the recomputation below sees the same D
    batch = {"x": torch.rand(6, 1, 32, 32), "y": torch.tensor([0, 1, 2, 3, 4, 5])}
    torch.manual_seed(3)
    terms = fam.loss("D", Networks(nets), batch, 1)
    torch.manual_seed(3)
    z = fam.noise(6, "cpu")
    fake = nets["G"](torch.cat([z, F.one_hot(batch["y"], 10).float()], 1))
    real_out, fake_out = nets["D"](batch["x"] * 2 - 1), nets["D"](fake)
    source = d_bce(real_out[:, 0], fake_out[:, 0])
    classes = F.cross_entropy(real_out[:, 1:], batch["y"]) + F.cross_entropy(fake_out[:, 1:], batch["y"])
    assert terms["loss"].item() == pytest.approx((source + classes).item(), rel=1e-5)
    assert terms["class_acc_real"].item() == (real_out[:, 1:].argmax(1) == batch["y"]).float().mean().item()
    torch.manual_seed(4)
    g_terms = fam.loss("G", Networks(nets), batch, 1)
    torch.manual_seed(4)
    fake_out = nets["D"](nets["G"](torch.cat([fam.noise(6, "cpu"), F.one_hot(batch["y"], 10).float()], 1)))
    expected = g_non_saturating(fake_out[:, 0]) + F.cross_entropy(fake_out[:, 1:], batch["y"])  # G maximises L_C
    assert g_terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    noise = [m for m in nets["D"].modules() if type(m).__name__ == "GaussianNoise"]
    assert len(noise) == 6 and all(m.std == 0.1 for m in noise)


def test_cgan_conditions_g_and_d_and_draws_one_row_per_class():
    fam = family("debug", spec(16, 1), conditioning="cgan")
    torch.manual_seed(0)
    nets = fam.build_networks()
    assert nets["D"].net[0].in_channels == 1 + 10  # one-hot label maps beside the image
    assert nets["G"].latent_dim == 8 + 10
    fixed = fam.fixed_inputs(20, torch.Generator().manual_seed(0))
    assert fixed["y"].tolist() == [c for c in range(10) for _ in range(2)] and fam.grid_nrow(20) == 2
    for m in nets.values():
        m.eval()
    same_z = {"z": fixed["z"][:1].repeat(2, 1), "y": torch.tensor([3, 7])}
    out = fam.sample(Networks(nets), same_z)
    assert (out[0] - out[1]).abs().max() > 1e-4  # the label changes the sample
    terms = fam.loss("D", Networks(nets), {"x": torch.rand(4, 1, 16, 16), "y": torch.tensor([1, 2, 3, 4])}, 1)
    assert torch.isfinite(terms["loss"])
    with pytest.raises(ConfigError, match="model.conditioning"):
        family("debug", DataSpec("x", "image", (1, 16, 16), 0), conditioning="cgan")


def test_projection_discriminator_adds_the_label_inner_product():
    fam = family("debug", spec(16, 1), conditioning="cgan", projection=True)
    torch.manual_seed(0)
    D = fam.build_networks()["D"]
    D.eval()
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 4, 9])
    features = D.body(x)
    expected = D.head(features).flatten() + (D.embed.weight[y] * features.sum(dim=(2, 3))).sum(1)
    assert torch.allclose(D(x, y), expected, rtol=1e-6, atol=1e-7)
    assert D.body[0].in_channels == 1  # the label does not enter as channels
    with pytest.raises(ConfigError, match="model.projection"):
        from_dict(GANConfig, {"projection": True}, "model")
    with pytest.raises(ConfigError, match="model.pack"):
        from_dict(GANConfig, {"conditioning": "cgan", "projection": True, "pack": 2}, "model")
    with pytest.raises(ConfigError, match="model.conditioning"):
        from_dict(GANConfig, {"conditioning": "acgan"}, "model")


# -- through the training loop ----------------------------------------------------------------

@pytest.mark.parametrize("model, dataset, tags", [
    ({"loss": "wasserstein", "n_critic": 2}, "digits", {"D/critic_gap", "G/dead_units"}),
    ({"loss": "wasserstein_gp", "r1_gamma": 1.0, "conditioning": "cgan"}, "digits",
     {"D/gradient_penalty", "D/r1", "D/critic_gap"}),
    ({"unroll_steps": 2, "pack": 2, "loss": "hinge"}, "moons", {"D/real_acc", "G/dead_units"}),
])
def test_zoo_settings_train_through_the_loop(shard_root, tmp_path, model, dataset, tags):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gensuite.checkpoint import latest_checkpoint
    from gensuite.config import job_from_dict
    from gensuite.trainer import train

    flavor = "points" if dataset == "moons" else "debug"
    job = job_from_dict({"name": "zoo", "family": "gan", "flavor": flavor, "model": model,
                         "data": {"dataset": dataset, "root": str(shard_root), "shuffle_buffer": 64},
                         "train": {"steps": 4, "batch_size": 16, "log_every": 2, "sample_every": 4,
                                   "checkpoint_every": 4, "seed": 0},
                         "log": {"grid_size": 20, "progress_bar": False}, "eval": {"metrics": []}})
    train(job, tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert tags <= set(acc.Tags()["scalars"])
    state = torch.load(latest_checkpoint(tmp_path), map_location="cpu", weights_only=False)
    D = state["networks"]["D"]
    if model.get("loss") == "wasserstein":  # clipped after every D step, so also in the checkpoint
        assert max(v.abs().max().item() for k, v in D.items() if "running" not in k and v.is_floating_point()) <= 0.01
    if model.get("conditioning"):
        assert D["net.0.weight"].shape[1] == 1 + 10  # the label channels of D's first conv


@pytest.fixture(scope="module")
def zoo_shards(tmp_path_factory):
    """The zoo jobs' own data at their own sizes: digits at 32 px (ACGAN's table), the ring."""
    from gensuite.data.shards import build

    root = tmp_path_factory.mktemp("zoo_shards")
    build("digits", None, str(root), size=32, progress=False)
    build("ring", None, str(root), n=2000, progress=False)
    return root


ZOO_JOBS = ["gan_losses_digits", "cgan_digits", "acgan_digits", "gan_mode_collapse"]


@pytest.mark.parametrize("name", ZOO_JOBS)
def test_every_task_of_the_zoo_jobs_trains_two_steps(zoo_shards, tmp_path, name):
    """The shipped digits/ring jobs, every sweep task of them, as written but for length and data root."""
    import yaml

    from gensuite.config import load_job
    from gensuite.sweep import override_sets
    from gensuite.trainer import train

    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.yaml"
    base = ["train.steps=2", "train.epochs=null", "train.batch_size=20", f"data.root={zoo_shards}", "eval.metrics=[]",
            "log.progress_bar=false", "train.sample_every=2", "train.checkpoint_every=2"]
    tasks = override_sets(load_job(path))
    for i, overrides in enumerate(tasks):
        swept = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in overrides.items()]
        job = load_job(path, base + swept + ["sweep.sets=[]", "sweep.grid={}"])
        train(job, tmp_path / str(i))
        assert (tmp_path / str(i) / "checkpoints" / "step-00000002.pt").is_file()
    assert len(tasks) == {"gan_losses_digits": 6, "gan_mode_collapse": 4}.get(name, 1)
