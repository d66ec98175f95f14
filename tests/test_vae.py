"""VAE family: the ELBO's terms against closed forms and torch.distributions; the seeds' theory."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

from gensuite.config import from_dict
from gensuite.errors import ConfigError
from gensuite.families.vae import VAE, VAEConfig
from gensuite.families.vae.objective import bernoulli_nll, gaussian_nll, kl_standard_normal, reparameterize
from gensuite.registry import DataSpec, Networks

MNIST = DataSpec("mnist", "image", (1, 28, 28), 10, tuple("0123456789"))
CIFAR = DataSpec("cifar10", "image", (3, 32, 32), 10, tuple("abcdefghij"))


def family(flavor="debug", data=MNIST, **overrides):
    cfg = from_dict(VAEConfig, {**VAE.flavors[flavor], **overrides}, "model")
    return VAE(cfg, data)


def test_kl_closed_form_matches_torch_and_monte_carlo():
    torch.manual_seed(0)
    mean, log_var = torch.randn(3, 4), torch.randn(3, 4) * 0.5
    q = D.Normal(mean, (0.5 * log_var).exp())
    expected = D.kl_divergence(q, D.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl_standard_normal(mean, log_var), expected, atol=1e-6)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - D.Normal(0.0, 1.0).log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(mc, expected, atol=0.02)


def test_bernoulli_decoder_reconstruction_is_binary_cross_entropy():
    torch.manual_seed(1)
    logits, x = torch.randn(5, 1, 4, 4), torch.rand(5, 1, 4, 4).round()
    expected = -D.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(bernoulli_nll(logits, x), expected, atol=1e-5)


def test_gaussian_fixed_identity_covariance_is_mse_plus_constant():
    torch.manual_seed(2)
    mean, x = torch.randn(5, 12), torch.randn(5, 12)
    nll = gaussian_nll(mean, torch.zeros(()), x)
    assert torch.allclose(nll, 0.5 * ((x - mean) ** 2).sum(1) + 0.5 * 12 * math.log(2 * math.pi), atol=1e-5)


def test_gaussian_learned_variance_matches_normal_log_prob():
    torch.manual_seed(3)
    mean, log_std, x = torch.randn(4, 6), torch.randn(6) * 0.3, torch.randn(4, 6)
    expected = -D.Normal(mean, log_std.exp()).log_prob(x).sum(1)
    assert torch.allclose(gaussian_nll(mean, log_std, x), expected, atol=1e-5)


def test_reparameterization_has_the_right_moments_and_gradient_path():
    torch.manual_seed(4)
    mean = torch.full((200_000, 1), 1.5, requires_grad=True)
    log_var = torch.full((200_000, 1), math.log(0.25), requires_grad=True)
    z = reparameterize(mean, log_var)
    assert z.mean().item() == pytest.approx(1.5, abs=0.01) and z.var().item() == pytest.approx(0.25, abs=0.01)
    z.sum().backward()
    assert torch.all(mean.grad == 1)


def test_score_function_and_reparameterization_are_unbiased_but_reinforce_is_noisier():
    # d/dμ E_{z~N(μ,1)}[z²] = 2μ. Reparameterized: 2(μ+ε). Score function: z² (z − μ).
    torch.manual_seed(5)
    mu, eps = 0.7, torch.randn(400_000)
    z = mu + eps
    reparam, score = 2 * z, z ** 2 * (z - mu)
    assert reparam.mean().item() == pytest.approx(2 * mu, abs=0.01)
    assert score.mean().item() == pytest.approx(2 * mu, abs=0.05)
    assert score.var().item() > 5 * reparam.var().item()


def test_gumbel_softmax_temperature_limits():
    torch.manual_seed(6)
    logits = torch.tensor([[1.0, 0.5, -1.0, 2.0]]).repeat(2000, 1)
    cold = F.gumbel_softmax(logits, tau=0.01)
    hot = F.gumbel_softmax(logits, tau=1000.0)
    assert cold.max(1).values.mean() > 0.99  # λ → 0: one-hot
    assert torch.allclose(hot, torch.full_like(hot, 0.25), atol=0.01)  # λ → ∞: uniform
    # The one-hot's arg-max follows the categorical distribution softmax(logits).
    freq = torch.bincount(cold.argmax(1), minlength=4).float() / 2000
    assert torch.allclose(freq, logits[0].softmax(0), atol=0.04)


def _loss(fam, nets, batch, seed=0):
    torch.manual_seed(seed)
    return fam.loss("model", Networks(nets), batch, 1)


def test_beta_scales_only_the_kl_term():
    torch.manual_seed(7)
    batch = {"x": torch.rand(8, 1, 28, 28), "y": torch.randint(0, 10, (8,))}
    f1, f4 = family(beta=1.0), family(beta=4.0)
    torch.manual_seed(0)
    nets = f1.build_networks()
    a, b = _loss(f1, nets, batch), _loss(f4, nets, batch)
    assert torch.allclose(a["recon"], b["recon"]) and torch.allclose(a["kl"], b["kl"])
    assert torch.allclose(b["loss"] - a["loss"], 3 * a["kl"], atol=1e-4)
    assert torch.allclose(a["elbo"], -(a["recon"] + a["kl"]))
    assert torch.allclose(a["bpd"], (a["recon"] + a["kl"]) / (784 * math.log(2)))


def test_conditional_vae_output_depends_on_the_label():
    fam = family(conditional=True)
    torch.manual_seed(0)
    nets = fam.build_networks()
    z = torch.randn(1, 2).repeat(10, 1)
    images = fam.sample(Networks(nets), {"z": z, "y": torch.arange(10)})
    assert images.shape == (10, 1, 28, 28)
    assert (images[0] - images[1]).abs().max() > 1e-4
    assert fam.grid_nrow(100) == 10
    fixed = fam.fixed_inputs(100, torch.Generator().manual_seed(0))
    assert fixed["y"].tolist() == [c for c in range(10) for _ in range(10)]  # one row per class


def test_conditional_needs_labels():
    with pytest.raises(ConfigError, match="model.conditional"):
        family(data=DataSpec("x", "image", (1, 8, 8), 0), conditional=True)


def test_conv_flavor_is_the_assignment_architecture():
    nets = family("conv").build_networks()
    convs = [m for m in nets["encoder"].modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in nets["encoder"].modules() if isinstance(m, nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32] and len(pools) == 3
    assert all(p.kernel_size == 2 for p in pools)
    linears = [m for m in nets["decoder"].modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [32, 64, 784]


@pytest.mark.parametrize("flavor, data", [("mlp", MNIST), ("conv", MNIST), ("debug", CIFAR), ("conv", CIFAR)])
def test_shapes_and_visuals(flavor, data):
    fam = family(flavor, data, latent_dim=2)
    torch.manual_seed(0)
    nets = Networks(fam.build_networks())
    x = torch.rand(6, *data.shape)
    terms = _loss(fam, dict(nets), {"x": x, "y": torch.arange(6)})
    assert terms["loss"].dim() == 0 and torch.isfinite(terms["loss"])
    for m in nets.values():
        m.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        out = fam.visuals(nets, fam.fixed_inputs(16, torch.Generator().manual_seed(0)), {"x": x, "y": torch.arange(6)})
    assert torch.equal(state, torch.get_rng_state())  # exact resume depends on this
    assert out["samples"].shape == (16, *data.shape) and 0 <= out["samples"].min() and out["samples"].max() <= 1
    assert out["reconstructions"].shape == (12, *data.shape)
    assert torch.equal(out["reconstructions"][0::2], x)
    assert type(out["latent"]).__name__ == "Figure"


# -- likelihood bounds against a linear-Gaussian model whose log p(x) is known in closed form ----

def _linear_gaussian(seed=0, latent=3, dim=5, n=4, sigma=0.5):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, latent, generator=g, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * 2
    marginal = D.MultivariateNormal(b, W @ W.T + sigma**2 * torch.eye(dim, dtype=torch.float64))
    post_cov = torch.linalg.inv(torch.eye(latent, dtype=torch.float64) + W.T @ W / sigma**2)
    post_mean = (x - b) @ W @ post_cov / sigma**2  # (n, latent); post_cov is symmetric

    def log_px_given_z(z):  # (k, n, latent) -> (k, n)
        return D.Normal(z @ W.T + b, sigma).log_prob(x).sum(-1)

    return W, b, x, sigma, marginal.log_prob(x), post_mean, post_cov, log_px_given_z


def test_bounds_are_exact_with_the_true_posterior():
    from gensuite.families.vae.objective import likelihood_bounds

    # The exact posterior is diagonal (so a VAE's q can equal it) when W's columns are orthogonal.
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(5, 3, generator=g, dtype=torch.float64))
    W = q * torch.tensor([1.5, 0.7, 2.0], dtype=torch.float64)
    b = torch.zeros(5, dtype=torch.float64)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    sigma = 0.5
    log_px = D.MultivariateNormal(b, W @ W.T + sigma**2 * torch.eye(5, dtype=torch.float64)).log_prob(x)
    post_var = 1 / (1 + (W**2).sum(0) / sigma**2)  # diagonal because W's columns are orthogonal
    post_mean = (x - b) @ W * post_var / sigma**2
    bounds = likelihood_bounds(lambda z: D.Normal(z @ W.T + b, sigma).log_prob(x).sum(-1), post_mean,
                               post_var.log().expand_as(post_mean), k=7, generator=g)
    assert torch.allclose(bounds["elbo"], log_px, atol=1e-10)
    assert torch.allclose(bounds["iwae"], log_px, atol=1e-10)


def test_elbo_matches_its_closed_form_and_iwae_tightens_towards_log_px():
    from gensuite.families.vae.objective import likelihood_bounds

    W, b, x, sigma, log_px, post_mean, post_cov, log_px_given_z = _linear_gaussian()
    # A deliberately imperfect diagonal q: shifted mean, the posterior's marginal variances x 1.5.
    q_mean, q_var = post_mean + 0.3, torch.diagonal(post_cov).expand_as(post_mean) * 1.5
    g = torch.Generator().manual_seed(2)
    elbo_closed = (D.Normal(x - q_mean @ W.T - b, sigma).log_prob(torch.zeros_like(x)).sum(-1)
                   - (q_var @ (W**2).T).sum(-1) / (2 * sigma**2)
                   - kl_standard_normal(q_mean, q_var.log()))
    chunks = torch.stack([likelihood_bounds(log_px_given_z, q_mean, q_var.log(), k=20_000, generator=g)["elbo"]
                          for _ in range(20)])
    standard_error = chunks.std(0) / math.sqrt(len(chunks))
    assert ((chunks.mean(0) - elbo_closed).abs() < 4 * standard_error + 1e-3).all()
    assert (standard_error < 0.02).all()  # the check is tight
    gaps = [(log_px - elbo_closed).mean().item()]  # E[iwae_1] is the ELBO
    for k, runs in ((8, 400), (64, 100), (4096, 20)):
        iwae = torch.stack([likelihood_bounds(log_px_given_z, q_mean, q_var.log(), k=k, generator=g)["iwae"]
                            for _ in range(runs)]).mean(0)
        gaps.append((log_px - iwae).mean().item())
    assert gaps[0] > 1.0  # the imperfect q leaves a real gap to close
    assert all(a > b_ > 0 for a, b_ in zip(gaps, gaps[1:])) and gaps[-1] < 0.1 * gaps[0], gaps


def test_vae_family_bounds_use_the_ema_networks_and_order_correctly():
    fam = family()
    torch.manual_seed(0)
    nets_dict = fam.build_networks()
    nets = Networks(nets_dict)
    x = torch.rand(6, *fam.data.shape)
    g = torch.Generator().manual_seed(0)
    bounds = fam.log_likelihood_bounds(nets, {"x": x}, k=16, generator=g)
    assert bounds["elbo"].shape == bounds["iwae"].shape == (6,)
    assert (bounds["iwae"] >= bounds["elbo"] - 1e-5).all()
    # k = 1: the bound is one reparameterised ELBO sample, as in the training loss.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    one = fam.log_likelihood_bounds(nets, {"x": x}, k=1, generator=g1)
    assert torch.allclose(one["iwae"], one["elbo"])
    mean, log_var = nets_dict["encoder"](x)
    z = mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=g2)
    out, _ = nets_dict["decoder"](z)
    from gensuite.families.vae.objective import log_normal_diag
    expected = (-bernoulli_nll(out, x) + log_normal_diag(z, torch.zeros_like(z), torch.zeros_like(z))
                - log_normal_diag(z, mean, log_var))
    assert torch.allclose(one["elbo"], expected, atol=1e-5)


def test_log_px_minus_elbo_is_the_kl_from_q_to_the_true_posterior():
    """Assignment 004 Q1: log p(x) − ELBO(q) = KL(q(z|x) || p(z|x)) for any q, here an imperfect diagonal q
    on the linear-Gaussian model, with log p(x), the posterior and the ELBO all in closed form (float64:
    equal to rounding), and the ELBO's Monte-Carlo estimate within 4 standard errors."""
    from gensuite.families.vae.objective import likelihood_bounds

    W, b, x, sigma, log_px, post_mean, post_cov, log_px_given_z = _linear_gaussian()
    q_mean, q_var = post_mean - 0.4, torch.diagonal(post_cov).expand_as(post_mean) * 0.6
    elbo_closed = (D.Normal(x - q_mean @ W.T - b, sigma).log_prob(torch.zeros_like(x)).sum(-1)
                   - (q_var @ (W**2).T).sum(-1) / (2 * sigma**2)
                   - kl_standard_normal(q_mean, q_var.log()))
    q = D.MultivariateNormal(q_mean, torch.diag_embed(q_var))
    kl_to_posterior = D.kl_divergence(q, D.MultivariateNormal(post_mean, post_cov))
    assert (kl_to_posterior > 0.5).all()  # q is far enough from the posterior for the check to mean something
    assert torch.allclose(log_px - elbo_closed, kl_to_posterior, rtol=0, atol=1e-10)
    g = torch.Generator().manual_seed(3)
    chunks = torch.stack([likelihood_bounds(log_px_given_z, q_mean, q_var.log(), k=20_000, generator=g)["elbo"]
                          for _ in range(10)])
    standard_error = chunks.std(0) / math.sqrt(len(chunks))
    assert ((log_px - chunks.mean(0) - kl_to_posterior).abs() < 4 * standard_error).all()


def test_learned_prior_enters_the_kl_the_bounds_and_the_samples():
    from gensuite.families.vae.objective import kl_normal_units

    torch.manual_seed(8)
    mq, lq, mp, lp = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    expected = D.kl_divergence(D.Normal(mq, (0.5 * lq).exp()), D.Normal(mp, (0.5 * lp).exp()))
    assert torch.allclose(kl_normal_units(mq, lq, mp, lp), expected, atol=1e-5)

    fam = family(prior="learned")
    torch.manual_seed(0)
    nets = fam.build_networks()
    assert set(nets) == {"encoder", "decoder", "prior"}
    with torch.no_grad():
        nets["prior"].mean.copy_(torch.tensor([0.5, -1.0]))
        nets["prior"].log_var.fill_(math.log(0.25))  # σ_z = 0.5, one scalar: N(μ_z, σ_z² I)
    x = torch.rand(5, 1, 28, 28)
    terms = _loss(fam, nets, {"x": x})
    mean, log_var = nets["encoder"](x)
    expected = D.kl_divergence(D.Normal(mean, (0.5 * log_var).exp()), D.Normal(nets["prior"].mean, 0.5)).sum(1)
    assert torch.allclose(terms["kl"], expected.mean(), atol=1e-4)
    terms["loss"].backward()
    assert nets["prior"].mean.grad.abs().sum() > 0 and nets["prior"].log_var.grad.abs() > 0  # it is learned
    # k = 1: the bound is one draw's log p(x|z) + log N(z; μ_z, σ_z²) − log q(z|x).
    one = fam.log_likelihood_bounds(Networks(nets), {"x": x}, k=1, generator=torch.Generator().manual_seed(5))
    z = mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    expected = (-bernoulli_nll(nets["decoder"](z)[0], x) + D.Normal(nets["prior"].mean, 0.5).log_prob(z).sum(1)
                - D.Normal(mean, (0.5 * log_var).exp()).log_prob(z).sum(1))
    assert torch.allclose(one["elbo"], expected, atol=1e-3)
    # Samples are decoded from μ_z + σ_z ε.
    eps = torch.randn(3, 2)
    images = fam.sample(Networks(nets), {"z": eps, "y": torch.zeros(3, dtype=torch.long)})
    assert torch.allclose(images, nets["decoder"](torch.tensor([0.5, -1.0]) + 0.5 * eps)[0].sigmoid())


def test_decoder_variance_from_a_network_head_is_bounded_and_per_sample():
    fam = family(likelihood="gaussian", variance="network", min_std=0.05)
    torch.manual_seed(0)
    nets = fam.build_networks()
    z = torch.randn(6, 2) * 3
    mean, log_std = nets["decoder"](z)
    assert mean.shape == log_std.shape == (6, 1, 28, 28)
    assert (log_std.exp() >= 0.05).all() and (log_std[0] != log_std[1]).any()  # σ(z) depends on z
    x = torch.rand(6, 1, 28, 28)
    expected = -D.Normal(mean, log_std.exp()).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(fam.reconstruction_nll(mean, log_std, x), expected, rtol=1e-5)
    terms = _loss(fam, nets, {"x": x})
    terms["loss"].backward()
    assert nets["decoder"].std_head.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="^model.variance: a network variance needs likelihood: gaussian"):
        family(variance="network")
