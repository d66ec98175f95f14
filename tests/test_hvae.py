"""Hierarchical VAE and the remedies for posterior collapse (assignment 004 Q2): the ELBO's per-layer
terms against a Monte-Carlo estimate of the log ratio, free bits' exactly-zero gradients, the KL-weight
schedules, collapse detected on a toy problem, and the active_units metric through training and
``gensuite report`` of a sweep."""

import pytest
import torch
from torch import distributions as D

from gensuite.config import from_dict, job_from_dict
from gensuite.errors import ConfigError
from gensuite.families.vae import VAE, VAEConfig
from gensuite.families.vae.metrics import layer_values, unit_statistics
from gensuite.families.vae.objective import free_bits, kl_weight
from gensuite.registry import DataSpec, Networks

POINTS = DataSpec("toy", "points", (4,))


def hvae(data=POINTS, **overrides):
    raw = {"hidden": [16], "decoder_hidden": [16], "hierarchy": [3, 2], "latent_hidden": [8],
           "likelihood": "gaussian", "fixed_std": 0.5, **overrides}
    return VAE(from_dict(VAEConfig, raw, "model"), data)


def log_ratio(fam, nets, x, eps):
    """log p(x|z_1[, z_L]) + Σ log p(z_l|z_l+1) + log p(z_L) − Σ log q(z_l|·) at z drawn from ``eps``
    (k, N, Σ U), written with torch.distributions and the networks' layers, apart from the family's code."""
    noise = eps.split(fam.sizes, dim=-1)
    mean, log_var = nets["encoder"](x)
    layers = [(mean, log_var)]
    zs = [mean + (0.5 * log_var).exp() * noise[0]]
    for layer, e in zip(nets["encoder_upper"].layers, noise[1:]):
        mean, log_var = layer(zs[-1])
        layers.append((mean, log_var))
        zs.append(mean + (0.5 * log_var).exp() * e)
    log_q = sum(D.Normal(m, (0.5 * v).exp()).log_prob(z).sum(-1) for (m, v), z in zip(layers, zs))
    prior = nets["prior"]
    top = D.Normal(prior.mean, (0.5 * prior.log_var).exp()) if prior.mean is not None else D.Normal(0.0, 1.0)
    log_p = top.log_prob(zs[-1]).sum(-1)
    for l, layer in enumerate(prior.layers):  # layers[l]: p(z_{l+1} | z_{l+2}), 0-based lists
        m, v = layer(zs[l + 1])
        log_p = log_p + D.Normal(m, (0.5 * v).exp()).log_prob(zs[l]).sum(-1)
    z_in = torch.cat([zs[0], zs[-1]], -1) if fam.cfg.skip else zs[0]
    out, log_std = nets["decoder"](z_in.flatten(0, 1))
    std = log_std.exp() if log_std is not None else torch.tensor(fam.cfg.fixed_std, dtype=x.dtype)
    k = len(eps)
    log_px = D.Normal(out, std).log_prob(x.repeat(k, 1)).sum(-1).view(k, len(x))
    return log_px + log_p - log_q


def double_networks(fam, seed=0):
    torch.manual_seed(seed)
    nets = {k: v.double() for k, v in fam.build_networks().items()}
    if fam.cfg.prior == "learned":  # away from N(0, I), so the learned prior's terms matter
        with torch.no_grad():
            nets["prior"].mean.copy_(torch.linspace(-0.5, 0.5, fam.sizes[-1]))
            nets["prior"].log_var.fill_(-0.4)
    return nets


CASES = [{}, {"skip": True, "prior": "learned", "variance": "network"}, {"hierarchy": [3, 2, 2]}]


@pytest.mark.parametrize("overrides", CASES)
def test_elbo_terms_match_a_monte_carlo_estimate_of_the_log_ratio(overrides):
    fam = hvae(**overrides)
    nets = double_networks(fam)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    # The bound's log weights are the log ratio, draw for draw (float64: to rounding).
    eps = torch.randn(5, 3, sum(fam.sizes), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(fam.log_weights(Networks(nets), {"x": x}, eps), log_ratio(fam, nets, x, eps),
                          rtol=0, atol=1e-10)

    # The training terms: recon − Σ_l kl_z<l> is an unbiased estimate of the same ELBO. 20,000 draws of
    # each, independently; their difference must be within 4 standard errors.
    s = 20_000
    torch.manual_seed(3)
    xs = x.repeat(s, 1)  # row j·3 + i is x_i
    q = fam.posterior(nets.__getitem__, xs, None)
    zs = [z for _, _, z in q]
    out, log_std = nets["decoder"](fam.decoder_input(zs))
    recon = fam.reconstruction_nll(out, log_std, xs)
    kls = [k.sum(1) for k in fam.kl_units(q, fam.prior_terms(nets.__getitem__, zs))]
    terms = (-recon - sum(kls)).view(s, 3)
    eps = torch.randn(s, 3, sum(fam.sizes), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ratio = log_ratio(fam, nets, x, eps)
    standard_error = (terms.var(0) / s + ratio.var(0) / s).sqrt()
    assert ((terms.mean(0) - ratio.mean(0)).abs() < 4 * standard_error).all()
    assert (standard_error < 0.1).all()  # the check is tight: the ELBOs here are about −10 to −30 nats

    # The loss logs those terms: the same draws (same seed) give the same batch means.
    torch.manual_seed(3)
    logged = fam.loss("model", Networks(nets), {"x": xs}, 1)
    layer_names = [f"kl_z{l}" for l in range(1, len(fam.sizes) + 1)]
    assert set(layer_names) <= logged.keys()
    assert torch.allclose(logged["recon"], recon.mean())
    for name, kl in zip(layer_names, kls):
        assert torch.allclose(logged[name], kl.mean())
    assert torch.allclose(logged["elbo"], -(logged["recon"] + sum(logged[n] for n in layer_names)))
    assert torch.allclose(logged["kl"], sum(logged[n] for n in layer_names))


def test_top_layer_kl_is_the_closed_form_and_the_lower_layer_estimate_uses_the_draws():
    fam = hvae(prior="learned")
    nets = double_networks(fam)
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.manual_seed(0)
    q = fam.posterior(nets.__getitem__, x, None)
    p = fam.prior_terms(nets.__getitem__, [z for _, _, z in q])
    kl_z1, kl_z2 = fam.kl_units(q, p)
    (m2, v2, _), (pm, pv) = q[1], p[1]
    expected = D.kl_divergence(D.Normal(m2, (0.5 * v2).exp()), D.Normal(pm, (0.5 * pv).exp()))
    assert torch.allclose(kl_z2, expected, atol=1e-12)
    (m1, v1, z1), (pm1, pv1) = q[0], p[0]
    expected = -D.Normal(m1, (0.5 * v1).exp()).entropy() - D.Normal(pm1, (0.5 * pv1).exp()).log_prob(z1)
    assert torch.allclose(kl_z1, expected, atol=1e-12)


def test_free_bits_give_units_below_the_threshold_exactly_zero_gradient():
    fam = hvae()
    nets = double_networks(fam)
    x = torch.randn(32, 4, dtype=torch.float64)
    torch.manual_seed(0)
    q = fam.posterior(nets.__getitem__, x, None)
    kls = fam.kl_units(q, fam.prior_terms(nets.__getitem__, [z for _, _, z in q]))
    units = torch.cat(kls, dim=1)  # (32, 5): z_1's 3 units, then z_2's 2
    per_unit = units.mean(0).detach()
    threshold = float(per_unit.sort().values[2:4].mean())  # between the 3rd and 4th smallest unit
    grad, = torch.autograd.grad(free_bits(units, threshold), units)
    below = per_unit < threshold
    assert below.sum() == 3
    assert torch.equal(grad[:, below], torch.zeros_like(grad[:, below]))  # exactly zero
    assert torch.allclose(grad[:, ~below], torch.full_like(grad[:, ~below], 1 / 32))
    assert free_bits(units, threshold).item() == pytest.approx(3 * threshold + per_unit[~below].sum().item())

    # Through the family's loss: with λ above every unit the KL part adds exactly nothing to any gradient.
    params = [p for m in nets.values() for p in m.parameters()]
    for lam, same in ((1e4, True), (0.0, False)):
        f = hvae(free_bits=lam)
        torch.manual_seed(1)
        terms = f.loss("model", Networks(nets), {"x": x}, 1)
        with_kl = torch.autograd.grad(terms["loss"], params, retain_graph=True)
        recon_only = torch.autograd.grad(terms["recon"], params, allow_unused=True)  # the prior's are None
        recon_only = [torch.zeros_like(p) if g is None else g for p, g in zip(params, recon_only)]
        assert all(torch.equal(a, b) for a, b in zip(with_kl, recon_only)) == same


def test_kl_weight_schedules():
    assert [kl_weight(s, "none", 4) for s in (1, 9)] == [1.0, 1.0]
    assert [kl_weight(s, "linear", 4) for s in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [kl_weight(s, "cyclical", 4, 0.5) for s in range(1, 10)] == [0.5, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.5]
    assert [kl_weight(s, "cyclical", 8, 0.5) for s in range(1, 6)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    fam = hvae(kl_anneal="linear", anneal_steps=4, beta=2.0)
    nets = double_networks(fam)
    x = torch.randn(8, 4, dtype=torch.float64)
    for step, weight in ((1, 0.25), (3, 0.75), (10, 1.0)):
        terms = fam.loss("model", Networks(nets), {"x": x}, step)
        assert terms["kl_weight"].item() == weight
        assert torch.allclose(terms["loss"] - terms["recon"], 2.0 * weight * terms["kl"])


@pytest.mark.parametrize("overrides, field", [
    ({"hierarchy": [16]}, "model.hierarchy"), ({"hierarchy": [16, 0]}, "model.hierarchy"),
    ({"hierarchy": [], "skip": True}, "model.skip"), ({"free_bits": -1.0}, "model.free_bits"),
    ({"anneal_ratio": 0.0}, "model.anneal_ratio"), ({"anneal_steps": 0}, "model.anneal_steps"),
    ({"min_std": 0.0}, "model.min_std"), ({"likelihood": "bernoulli", "variance": "network"}, "model.variance"),
    ({"latent_hidden": [0]}, "model.latent_hidden")])
def test_bad_settings_name_their_field(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        hvae(**overrides)


# -- collapse of the top layer on a toy problem that z_1 alone reconstructs ---------------------------


def _toy(n, generator):
    """x = (s, s, −s, s) + small noise, s ~ N(0, 1): one unit of z_1 holds everything and, with a linear
    encoder and decoder, its aggregate posterior is Gaussian, so z_2 has nothing to add to p(z_1|z_2)
    and only costs KL."""
    return torch.randn(n, 1, generator=generator) * torch.tensor([1.0, 1.0, -1.0, 1.0]) \
        + 0.05 * torch.randn(n, 4, generator=generator)


def _train_toy(free_bits_nats: float, steps: int = 800):
    """(active_units values, A_u of z_2's units) after training hierarchy [1, 2] on the toy data."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    fam = hvae(hierarchy=[1, 2], hidden=[], decoder_hidden=[], latent_hidden=[16], fixed_std=0.1,
               free_bits=free_bits_nats)
    nets = fam.build_networks()
    optimiser = torch.optim.Adam([p for m in nets.values() for p in m.parameters()], lr=1e-2)
    data = _toy(4096, g)
    for step in range(1, steps + 1):
        terms = fam.loss("model", Networks(nets), {"x": data[torch.randint(0, 4096, (64,), generator=g)]}, step)
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
    layers = fam.latent_statistics(Networks(nets), {"x": _toy(1000, g)}, 16, torch.arange(1000))
    mean = torch.cat([m for m, _ in layers], 1).double()
    kl = torch.cat([k for _, k in layers], 1).double()
    stats = unit_statistics(torch.cat([mean.sum(0), mean.pow(2).sum(0), kl.sum(0),
                                       torch.tensor([1000.0], dtype=torch.float64)]), fam.sizes)
    return layer_values(stats), stats[1][0]


def test_collapse_of_the_top_layer_is_detected_and_free_bits_prevent_it():
    (baseline, activity), (remedied, activity_fb) = _train_toy(0.0), _train_toy(0.5)
    # Baseline: z_1's unit carries x, z_2 has (almost) collapsed onto its prior. At this budget (800
    # steps) one z_2 unit still sits near Burda's 0.01 threshold (A_u ≈ 0.016, z_1's A_u ≈ 24), so the
    # count is at most 1 and the KL the sharper signal.
    assert baseline["au_z1"] == 1 and baseline["au_z2"] <= 1, baseline
    assert baseline["kl_z2"] < 0.05 and activity.max() < 0.05, (baseline, activity)
    # Free bits (λ = 0.5 nats per unit): KL below λ is free, so z_2 is used up to about λ per unit.
    assert remedied["au_z1"] == 1 and remedied["au_z2"] == 2, remedied
    assert remedied["kl_z2"] > 1.0 and activity_fb.min() > 0.3, (remedied, activity_fb)


# -- through the loop, a sweep and `gensuite report` ---------------------------------------------------


def test_a_collapse_sweep_trains_and_its_report_compares_active_units_per_layer(shard_root, tmp_path, capsys):
    from gensuite.cli import main
    from gensuite.report import read_run
    from gensuite.sweep import expand
    from gensuite.trainer import train

    job = job_from_dict({
        "name": "hvae-sweep", "family": "vae", "flavor": "hvae",
        "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
        "model": {"hidden": [32], "decoder_hidden": [32], "hierarchy": [4, 2], "latent_hidden": [8]},
        "train": {"steps": 4, "batch_size": 16, "log_every": 2, "sample_every": 4, "checkpoint_every": 4},
        "eval": {"metrics": ["likelihood", "active_units"], "max_samples": 64, "importance_samples": 4},
        "log": {"grid_size": 16, "progress_bar": False},
        "sweep": {"sets": [{"model.kl_anneal": "linear", "model.anneal_steps": 8}, {"model.free_bits": 0.5},
                           {"model.skip": True, "model.prior": "learned"}]}})
    tasks = expand(job, tmp_path / "root")
    for task in tasks:
        train(task.job, task.run_dir)
    run = read_run(tasks[0].run_dir)
    logged = {t: v[-1][1] for t, v in run.scalars.items()}
    assert {"model/recon", "model/kl_z1", "model/kl_z2", "model/kl_weight", "eval/au_z1", "eval/au_z2",
            "eval/kl_z1", "eval/kl_z2", "eval/elbo", "eval/iwae"} <= logged.keys()
    assert logged["model/kl_weight"] == (3 / 8 + 4 / 8) / 2  # steps 3 and 4 of an 8-step warm-up, averaged
    assert 0 <= logged["eval/au_z1"] <= 4 and 0 <= logged["eval/au_z2"] <= 2
    assert "figures/latent_units" in run.images
    assert main(["report", str(tmp_path / "root")]) == 0
    index = tmp_path / "root" / "report" / "index.md"
    header = next(line for line in index.read_text().splitlines() if line.startswith("| run |"))
    for column in ("`eval/au_z1`", "`eval/au_z2`", "`eval/kl_z1`", "`eval/kl_z2`", "`model.free_bits`"):
        assert column in header
    capsys.readouterr()
