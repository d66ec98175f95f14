"""Diffusion family building blocks against closed forms and Monte Carlo (all fixed seeds).

Monte-Carlo tolerances are 5 standard errors: for n i.i.d. draws the sample mean has SE σ/√n and
the sample variance of Gaussian draws has SE σ²·√(2/(n−1)); a 5-SE band fails by chance with
probability ≈ 6e-7 per check. Exact identities in float64 are checked at 1e-10…1e-12 relative,
a few hundred ulps of the ~1e-16 rounding of the handful of operations involved.
"""

import math

import pytest
import torch
from torch import distributions as D

from gensuite.families.diffusion.networks import UNet, group_count
from gensuite.families.diffusion.objectives import (
    discretized_gaussian_log_likelihood, diffusion_loss, drop_labels, dsm_loss, nats_to_bits_per_dim,
    ncsn_score_fn, variational_bound, variational_bound_bits_per_dim)
from gensuite.families.diffusion.samplers import (
    annealed_langevin, ddim_invert, ddim_sample, ddim_sigma, ddpm_sample, guided, timesteps)
from gensuite.families.diffusion.schedules import NoiseSchedule, geometric_sigmas

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests loop over many small tensors, where intra-op threads only add synchronisation
    (and stall badly when the cores are shared); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_mean_var(x: torch.Tensor, mean, var, k: float = 5.0):
    """Sample mean/variance over dim 0 within k standard errors of the given mean/variance."""
    n = x.shape[0]
    mean, var = torch.as_tensor(mean, dtype=F64), torch.as_tensor(var, dtype=F64)
    x = x.to(F64)
    se_mean, se_var = (var / n).sqrt(), var * math.sqrt(2.0 / (n - 1))
    assert bool(((x.mean(0) - mean).abs() <= k * se_mean).all()), (x.mean(0), mean, se_mean)
    assert bool(((x.var(0) - var).abs() <= k * se_var).all()), (x.var(0), var, se_var)


def gaussian_eps_fn(schedule, mu, sd):
    """The exact ε-predictor E[ε | x_t] for data N(mu, diag(sd²)):
    Cov(ε, x_t) = √(1−ᾱ), Var(x_t) = ᾱ sd² + 1 − ᾱ."""
    def fn(x, t):
        a = schedule.gather(schedule.alphas_cumprod, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sd ** 2 + 1 - a)
    return fn


def randomised(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so the zero-initialised branches (and the output) become active."""
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_unet(**kw) -> UNet:
    args = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), image_size=8, dropout=0.0)
    args.update(kw)
    return UNet(**args)


# -- schedules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_iterated_forward_process_has_the_closed_form_marginals(kind):
    sched = getattr(NoiseSchedule, kind)(T=1000)
    n, x0 = 20_000, torch.tensor([0.7, -0.3], dtype=F64)
    g, gq = gen(0), gen(1)
    x = x0.expand(n, 2).clone()
    checked = {0, 9, 99, 299, 599, 999}
    for t in range(sched.T):
        beta = sched.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n, 2, generator=g, dtype=F64)
        if t in checked:
            mean, var = sched.alphas_cumprod[t].sqrt() * x0, (1 - sched.alphas_cumprod[t]).expand(2)
            assert_mean_var(x, mean, var)
            tt = torch.full((n,), t)
            xq = sched.q_sample(x0.expand(n, 2), tt, torch.randn(n, 2, generator=gq, dtype=F64))
            assert_mean_var(xq, mean, var)
            m, v = sched.q_mean_variance(x0.expand(1, 2), tt[:1])
            assert torch.allclose(m[0], mean, rtol=1e-12) and torch.allclose(v[0], var, rtol=1e-12)


def test_cosine_schedule_matches_its_definition():
    sched = NoiseSchedule.cosine(T=1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 990):  # unclipped steps: ᾱ_t = f((t+1)/T)/f(0) exactly
        assert abs(float(sched.alphas_cumprod[t]) - f((t + 1) / 1000) / f(0)) < 1e-12
    assert float(sched.betas.max()) == pytest.approx(0.999)  # the last β is clipped
    lin = NoiseSchedule.linear()
    assert float(lin.betas[0]) == 1e-4 and float(lin.betas[-1]) == pytest.approx(0.02, abs=1e-15)
    assert lin.betas.dtype == F64


def test_posterior_is_gaussian_conditioning_of_the_joint():
    """(x_{t−1}, x_t) | x0 is jointly Gaussian: x_{t−1} ~ N(√ᾱ_{t−1} x0, 1 − ᾱ_{t−1}),
    x_t = √α_t x_{t−1} + √β_t ε, so Σ11 = 1 − ᾱ_{t−1}, Σ12 = √α_t Σ11, Σ22 = α_t Σ11 + β_t, and
    x_{t−1} | x_t has mean μ1 + Σ12/Σ22 (x_t − μ2) and variance Σ11 − Σ12²/Σ22 (Schur complement)."""
    g = gen(2)
    for sched in (NoiseSchedule.linear(), NoiseSchedule.cosine(T=500)):
        T = sched.T
        t = torch.arange(T)
        x0 = torch.randn(T, 3, generator=g, dtype=F64).clamp(-1, 1)
        xt = torch.randn(T, 3, generator=g, dtype=F64)
        a_prev = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(1 - sched.betas, 0)[:-1]])[:, None]
        alpha, beta = (1 - sched.betas)[:, None], sched.betas[:, None]
        s11 = 1 - a_prev
        s12 = alpha.sqrt() * s11
        s22 = alpha * s11 + beta
        mu1, mu2 = a_prev.sqrt() * x0, (alpha * a_prev).sqrt() * x0
        mean_ref = mu1 + s12 / s22 * (xt - mu2)
        var_ref = (s11 - s12 ** 2 / s22).expand(T, 3)
        mean, var, logvar = sched.posterior_mean_variance(x0, xt, t)
        assert torch.allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
        assert torch.allclose(var.expand(T, 3), var_ref, rtol=1e-10, atol=1e-15)
        assert float(var[0]) == 0.0 and torch.allclose(mean[0], x0[0], rtol=1e-12)  # x_0 | x_1, x0 is x0
        bt = (1 - a_prev[1:, 0]) / (1 - sched.alphas_cumprod[1:]) * sched.betas[1:]  # β̃_t
        assert torch.allclose(var[1:, 0], bt, rtol=1e-12)
        assert torch.allclose(logvar[1:], bt.log()[:, None], rtol=1e-12)


def test_prediction_target_conversions_round_trip():
    sched = NoiseSchedule.cosine(T=100)
    g = gen(3)
    t = torch.randint(0, 100, (64,), generator=g)
    x0, eps = torch.randn(64, 5, generator=g, dtype=F64), torch.randn(64, 5, generator=g, dtype=F64)
    xt = sched.q_sample(x0, t, eps)
    v = sched.predict_v(x0, eps, t)
    a = sched.alphas_cumprod[t][:, None]
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=1e-12)
    tol = dict(rtol=1e-8, atol=1e-8)  # 1/√ᾱ at the last cosine step amplifies rounding ~1e3
    assert torch.allclose(sched.predict_x0_from_eps(xt, t, eps), x0, **tol)
    assert torch.allclose(sched.predict_eps_from_x0(xt, t, x0), eps, **tol)
    assert torch.allclose(sched.predict_x0_from_v(xt, t, v), x0, **tol)
    assert torch.allclose(sched.predict_eps_from_v(xt, t, v), eps, **tol)
    for target, out in (("eps", eps), ("x0", x0), ("v", v)):
        x0_hat, eps_hat = sched.x0_and_eps(out, xt, t, target)
        assert torch.allclose(x0_hat, x0, **tol) and torch.allclose(eps_hat, eps, **tol)
    assert torch.allclose(sched.snr(t), a[:, 0] / (1 - a[:, 0]), rtol=1e-12)
    sig = geometric_sigmas(50.0, 0.01, 10)
    ratios = sig[1:] / sig[:-1]
    assert float(sig[0]) == pytest.approx(50.0) and float(sig[-1]) == pytest.approx(0.01)
    assert torch.allclose(ratios, ratios[0].expand(9), rtol=1e-12)


# -- DDIM ----------------------------------------------------------------------------------------

def test_timestep_sequences():
    assert timesteps(1000, 50) == list(range(0, 1000, 20))
    assert timesteps(10, 10) == list(range(10)) == timesteps(10, 10, "quadratic")
    for T in range(1, 41):
        for steps in range(1, T + 1):
            for spacing in ("uniform", "quadratic"):
                seq = timesteps(T, steps, spacing)  # raises unless strictly increasing in [0, T)
                assert len(seq) == steps
                if spacing == "quadratic" and steps > 1:
                    assert seq[-1] == T - 1


def test_ddim_sigma_with_eta_one_is_beta_tilde():
    for sched in (NoiseSchedule.linear(), NoiseSchedule.cosine()):
        sig2 = torch.tensor([ddim_sigma(sched, t, t - 1, 1.0) ** 2 for t in range(sched.T)], dtype=F64)
        assert torch.allclose(sig2, sched.posterior_variance, rtol=1e-12, atol=0)


def test_ddim_posterior_preserves_the_ddpm_marginals():
    """q_σ(x_{τ−1} | x_τ, x0) = N(√ᾱ_{τ−1} x0 + √(1−ᾱ_{τ−1}−σ²) (x_τ − √ᾱ_τ x0)/√(1−ᾱ_τ), σ²):
    from x_τ ~ N(√ᾱ_τ x0, 1−ᾱ_τ) the mean is √ᾱ_{τ−1} x0 and the variance (1−ᾱ_{τ−1}−σ²) + σ²,
    for any σ. Checked analytically for random σ, then by Monte Carlo through ddim_sample with the
    exact x0-predictor (model = x0) for several η, at every intermediate step."""
    sched = NoiseSchedule.linear()
    g = gen(4)
    seq = timesteps(sched.T, 20)
    a = sched.alphas_cumprod
    x0 = torch.tensor([0.5, -0.25], dtype=F64)
    for i in range(len(seq) - 1, 0, -1):
        t, tp = seq[i], seq[i - 1]
        sigma2 = float(torch.rand((), generator=g, dtype=F64)) * (1 - a[tp])
        c = ((1 - a[tp] - sigma2) / (1 - a[t])).sqrt()
        mean = a[tp].sqrt() * x0 + c * (a[t].sqrt() * x0 - a[t].sqrt() * x0)
        var = c ** 2 * (1 - a[t]) + sigma2
        assert torch.allclose(mean, a[tp].sqrt() * x0, rtol=1e-12)
        assert abs(float(var - (1 - a[tp]))) < 1e-12

    n = 20_000
    for eta in (0.0, 0.5, 1.0):
        x_T = a[seq[-1]].sqrt() * x0 + (1 - a[seq[-1]]).sqrt() * torch.randn(n, 2, generator=gen(5), dtype=F64)
        states = {}
        prev = {t: (seq[j - 1] if j else -1) for j, t in enumerate(seq)}
        out = ddim_sample(lambda x, t: x0.expand_as(x), sched, (n, 2), "x0", steps=20, eta=eta,
                          generator=gen(6), x_T=x_T,
                          progress=lambda i, t, x, x0h: states.__setitem__(prev[t], x.clone()))
        for tp, x in states.items():
            if tp >= 0:
                assert_mean_var(x, a[tp].sqrt() * x0, (1 - a[tp]).expand(2))
        assert torch.allclose(out, x0.expand(n, 2), atol=1e-12)


def test_ddim_eta_zero_is_deterministic():
    model = randomised(tiny_unet(), 7)
    sched = NoiseSchedule.linear(T=50)
    x_T = torch.randn(3, 1, 8, 8, generator=gen(8))
    with torch.no_grad():
        a = ddim_sample(model, sched, x_T.shape, "eps", steps=10, eta=0.0, generator=gen(1), x_T=x_T)
        b = ddim_sample(model, sched, x_T.shape, "eps", steps=10, eta=0.0, generator=gen(2), x_T=x_T)
        c = ddim_sample(model, sched, x_T.shape, "eps", steps=10, eta=0.5, generator=gen(2), x_T=x_T)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_inversion_reconstructs_with_error_shrinking_in_steps():
    """Gaussian data N(mu, sd²): the exact ε-predictor is known in closed form, so the only error
    is the O(1/steps) discretisation of the DDIM ODE (measured RMS ≈ 0.15, 0.033, 0.0068, 0.0017
    at 10, 50, 250, 1000 steps: each step-up must at least halve it, and the last bound leaves a
    factor ~2)."""
    sched = NoiseSchedule.linear()
    mu, sd = torch.tensor([0.2, -0.4], dtype=F64), torch.tensor([0.5, 0.3], dtype=F64)
    eps_fn = gaussian_eps_fn(sched, mu, sd)
    x0 = mu + sd * torch.randn(500, 2, generator=gen(9), dtype=F64)
    errors = []
    for steps in (10, 50, 250, 1000):
        x_T = ddim_invert(eps_fn, sched, x0, "eps", steps)
        rec = ddim_sample(eps_fn, sched, x0.shape, "eps", steps, 0.0, generator=gen(0), clip_x0=False, x_T=x_T)
        errors.append(float((rec - x0).pow(2).mean().sqrt()))
    assert all(b < a / 2 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 4e-3, errors
    # At 1000 steps the encoding is close to the exact probability-flow map of N(mu, sd²) data,
    # x_T = √ᾱ_T mu + √(ᾱ_T sd² + 1 − ᾱ_T)·(x0 − mu)/sd.
    z = (x0 - mu) / sd
    ab = sched.alphas_cumprod[-1]
    assert torch.allclose(x_T, ab.sqrt() * mu + (ab * sd ** 2 + 1 - ab).sqrt() * z, atol=2e-2)


# -- score matching identities ----------------------------------------------------------------------

def _linear_params(g, d=2):
    return [(torch.randn(d, d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)) for _ in range(4)]


def _gauss_sq_norm(C, d, m, S):
    """E‖C x + d‖² for x ~ N(m, S) = tr(C S Cᵀ) + ‖C m + d‖²."""
    return torch.trace(C @ S @ C.T) + (C @ m + d).pow(2).sum()


def test_explicit_and_implicit_score_matching_differ_by_a_constant_gaussian():
    """Data N(m, S), s_θ(x) = A x + b. J_ESM = ½E‖s_θ + S⁻¹(x−m)‖², J_ISM = E[½‖s_θ‖² + tr A];
    Hyvärinen: J_ESM − J_ISM = ½E‖∇log p‖² = ½ tr(S⁻¹), independent of θ (exact, float64)."""
    g = gen(10)
    m = torch.tensor([0.3, -1.0], dtype=F64)
    L = torch.tensor([[1.0, 0.0], [0.6, 0.5]], dtype=F64)
    S = L @ L.T
    P = torch.linalg.inv(S)
    diffs = []
    for A, b in _linear_params(g):
        esm = 0.5 * _gauss_sq_norm(A + P, b - P @ m, m, S)
        ism = 0.5 * _gauss_sq_norm(A, b, m, S) + torch.trace(A)
        diffs.append(float(esm - ism))
    assert max(diffs) - min(diffs) < 1e-12
    assert diffs[0] == pytest.approx(0.5 * float(torch.trace(P)), rel=1e-12)


def test_denoising_and_explicit_score_matching_differ_by_a_constant_gaussian():
    """x̃ = x + σ z: J_DSM = ½E‖s_θ(x̃) + z/σ‖² (mean A m + b, covariance A S Aᵀ + (σA + I/σ)(σA + I/σ)ᵀ)
    and J_ESM on q_σ = N(m, S + σ²I). Vincent 2011: their difference does not depend on θ."""
    g = gen(11)
    m = torch.tensor([0.3, -1.0], dtype=F64)
    S = torch.tensor([[1.0, 0.6], [0.6, 0.61]], dtype=F64)
    I2 = torch.eye(2, dtype=F64)
    for sigma in (0.1, 0.7):
        Ps = torch.linalg.inv(S + sigma ** 2 * I2)
        diffs = []
        for A, b in _linear_params(g):
            B = sigma * A + I2 / sigma
            dsm = 0.5 * (torch.trace(A @ S @ A.T) + torch.trace(B @ B.T) + (A @ m + b).pow(2).sum())
            esm = 0.5 * _gauss_sq_norm(A + Ps, b - Ps @ m, m, S + sigma ** 2 * I2)
            diffs.append(float(dsm - esm))
        assert max(diffs) - min(diffs) < 1e-11
        # The constant: ½E‖z/σ‖² − ½E‖∇log q_σ‖² = ½(d/σ² − tr((S + σ²I)⁻¹)).
        assert diffs[0] == pytest.approx(0.5 * (2 / sigma ** 2 - float(torch.trace(Ps))), rel=1e-10)


class Mixture:
    """Two-component 2-D Gaussian mixture with closed-form density score; ``widen`` adds σ²I."""

    def __init__(self, widen: float = 0.0):
        self.w = torch.tensor([0.3, 0.7], dtype=F64)
        self.means = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64)
        self.covs = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=F64),
                                 torch.tensor([[0.2, -0.05], [-0.05, 0.4]], dtype=F64)]) + widen * torch.eye(2, dtype=F64)

    def sample(self, n, g):
        k = (torch.rand(n, generator=g, dtype=F64) > self.w[0]).long()
        L = torch.linalg.cholesky(self.covs)
        return self.means[k] + (L[k] @ torch.randn(n, 2, 1, generator=g, dtype=F64))[..., 0]

    def score(self, x):
        comps = D.MultivariateNormal(self.means, self.covs)
        logp = comps.log_prob(x[:, None, :]) + self.w.log()
        r = torch.softmax(logp, dim=1)  # responsibilities
        grads = -(torch.linalg.inv(self.covs) @ (x[:, None, :] - self.means)[..., None])[..., 0]
        return (r[..., None] * grads).sum(1)


def _paired_constant(per_sample: list[torch.Tensor]):
    """per_sample[j]: the per-draw difference of two objectives at θ_j on common draws. The
    objectives differ by a θ-independent constant iff every paired contrast has mean 0."""
    for d in per_sample[1:]:
        contrast = d - per_sample[0]
        se = contrast.std() / math.sqrt(len(contrast))
        assert abs(float(contrast.mean())) < 5 * float(se), (float(contrast.mean()), float(se))


def test_score_matching_identities_by_monte_carlo_on_a_mixture():
    n = 200_000
    mix = Mixture()
    thetas = _linear_params(gen(12))
    x = mix.sample(n, gen(13))
    grad = mix.score(x)
    # ESM − ISM per draw, θ = (A, b): ½‖s − ∇log p‖² − ½‖s‖² − tr A.
    _paired_constant([0.5 * ((x @ A.T + b) - grad).pow(2).sum(1) - 0.5 * (x @ A.T + b).pow(2).sum(1) - torch.trace(A)
                      for A, b in thetas])
    # DSM − ESM on q_σ per draw: ½‖s(x̃) + z/σ‖² − ½‖s(x̃) − ∇log q_σ(x̃)‖².
    sigma = 0.5
    z = torch.randn(n, 2, generator=gen(14), dtype=F64)
    xt = x + sigma * z
    grad_s = Mixture(widen=sigma ** 2).score(xt)
    _paired_constant([0.5 * ((xt @ A.T + b) + z / sigma).pow(2).sum(1) - 0.5 * ((xt @ A.T + b) - grad_s).pow(2).sum(1)
                      for A, b in thetas])


def test_dsm_loss_is_song_ermon_sigma_squared_weighting():
    """dsm_loss = mean ½σ²‖s_θ(x̃) + (x̃−x)/σ²‖² with s_θ = output/σ; its minimiser output is −ε."""
    sigmas = geometric_sigmas(1.0, 0.01, 5)
    g = gen(15)
    x0 = torch.randn(16, 1, 4, 4, generator=g, dtype=F64)
    index = torch.randint(0, 5, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    model = lambda x, t: 0.3 * x - 0.1 * t.to(x.dtype)[:, None, None, None]  # noqa: E731
    sig = sigmas[index][:, None, None, None]
    xt = x0 + sig * noise
    ref = (0.5 * sig[:, 0, 0, 0] ** 2 * ((model(xt, index) / sig) + (xt - x0) / sig ** 2).pow(2).flatten(1).sum(1)).mean()
    got = dsm_loss(model, sigmas, x0, index=index, noise=noise)
    assert float(got) == pytest.approx(float(ref), rel=1e-12)
    assert float(dsm_loss(lambda x, t: -noise, sigmas, x0, index=index, noise=noise)) == 0.0
    score = ncsn_score_fn(model, sigmas)
    assert torch.allclose(score(xt, index), model(xt, index) / sig, rtol=1e-12)
    score_log = ncsn_score_fn(lambda x, t: t[:, None, None, None].to(x.dtype).expand_as(x), sigmas, "log_sigma")
    assert torch.allclose(score_log(xt, index), sig.log().float().to(F64) / sig, rtol=1e-6)


# -- training loss --------------------------------------------------------------------------------

def test_diffusion_loss_weightings_agree_across_targets():
    """Defined in x0 space, a weighting gives the same loss whichever target the (same) model is
    parameterised in: eps and v predictions derived from one x0-predictor, same t and noise."""
    sched = NoiseSchedule.cosine(T=200)
    g = gen(16)
    x0 = torch.rand(32, 1, 4, 4, generator=g, dtype=F64) * 2 - 1
    t = torch.randint(0, 200, (32,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    f_x0 = lambda x, t: torch.tanh(x) * 0.8  # noqa: E731
    f_eps = lambda x, t: sched.predict_eps_from_x0(x, t, f_x0(x, t))  # noqa: E731
    f_v = lambda x, t: sched.predict_v(f_x0(x, t), f_eps(x, t), t)  # noqa: E731
    for weighting in ("snr", "min_snr"):
        vals = [float(diffusion_loss(f, sched, x0, tgt, weighting, t=t, noise=noise))
                for f, tgt in ((f_x0, "x0"), (f_eps, "eps"), (f_v, "v"))]
        assert vals[1] == pytest.approx(vals[0], rel=1e-9) and vals[2] == pytest.approx(vals[0], rel=1e-9)
    xt = sched.q_sample(x0, t, noise)
    simple = (f_eps(xt, t) - noise).pow(2).flatten(1).mean(1).mean()
    assert float(diffusion_loss(f_eps, sched, x0, "eps", "uniform", t=t, noise=noise)) == pytest.approx(float(simple), rel=1e-12)
    snr = sched.snr(t)
    per_x0 = (f_x0(xt, t) - x0).pow(2).flatten(1).mean(1)
    assert float(diffusion_loss(f_x0, sched, x0, "x0", "min_snr", t=t, noise=noise)) == pytest.approx(
        float((snr.clamp(max=5.0) * per_x0).mean()), rel=1e-12)
    assert float(diffusion_loss(lambda x, t: noise, sched, x0, "eps", t=t, noise=noise)) == 0.0


def test_label_dropout_rate_and_conditional_unet_loss_backprops():
    y = torch.zeros(100_000, dtype=torch.long)
    dropped = (drop_labels(y, 0.2, 10, gen(17)) == 10).double().mean()
    assert abs(float(dropped) - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 100_000)  # binomial SE
    model = tiny_unet(num_classes=3)
    x0 = torch.rand(4, 1, 8, 8, generator=gen(18)) * 2 - 1
    loss = diffusion_loss(model, NoiseSchedule.linear(T=100), x0, "v", "min_snr", y=torch.tensor([0, 1, 2, 1]),
                          p_uncond=0.5, generator=gen(19))
    loss.backward()
    assert loss.item() > 0 and model.conv_out.weight.grad.abs().sum() > 0


# -- variational bound --------------------------------------------------------------------------------

VB_SCHEDULE = NoiseSchedule.cosine(T=10)


def _toy_eps_model(x, t):
    """A fair but inexact model: the optimal ε-predictor for N(0, 0.6²) data, plus a nonlinearity."""
    a = VB_SCHEDULE.gather(VB_SCHEDULE.alphas_cumprod, t, x)
    return (1 - a).sqrt() * x / (a * 0.36 + 1 - a) + 0.05 * torch.tanh(2 * x) * (t.to(x.dtype)[:, None, None, None] / 10)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_variational_bound_equals_direct_monte_carlo_of_the_elbo(variance):
    """E_q[log q(x_{1:T}|x0) − log p(x_{0:T})] estimated directly from forward trajectories, with
    every density written out independently (torch.distributions), against the bound's
    Rao-Blackwellised form L_T + Σ KL + L_0. T = 10; both are per-x0 Monte-Carlo means, compared
    within 5 combined SEs (the SE is ≈0.3% of the value here, so the check is sharp)."""
    sched = VB_SCHEDULE
    T = sched.T
    x_base = (torch.randint(0, 256, (4, 1, 2, 2), generator=gen(20)).to(F64) / 255) * 2 - 1
    x_base[0, 0, 0, 0], x_base[1, 0, 1, 1] = -1.0, 1.0  # exercise both edge bins
    reps = 5000
    x0 = x_base.repeat(reps, 1, 1, 1)
    n = x0.shape[0]

    vb = variational_bound(_toy_eps_model, sched, x0, "eps", variance=variance, clip_x0=False, generator=gen(21))
    assert torch.allclose(vb.total, vb.prior + vb.diffusion + vb.decoder)

    # Direct: sample x_1..x_T forward and evaluate log q(x_{1:T}|x0) − log p(x_{0:T}).
    g = gen(22)
    betas, alphas, ab = sched.betas, 1 - sched.betas, sched.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas
    model_var = beta_tilde.clone() if variance == "beta_tilde" else betas.clone()
    model_var[0] = beta_tilde[1]  # decoder variance
    xs, log_q, x = [x0], torch.zeros(n, dtype=F64), x0
    for t in range(T):
        nxt = alphas[t].sqrt() * x + betas[t].sqrt() * torch.randn(x.shape, generator=g, dtype=F64)
        log_q += D.Normal(alphas[t].sqrt() * x, betas[t].sqrt()).log_prob(nxt).flatten(1).sum(1)
        xs.append(nxt)
        x = nxt
    log_p = D.Normal(0.0, 1.0).log_prob(xs[T]).flatten(1).sum(1)
    for t in range(T - 1, -1, -1):  # p(x_t-index-state | next); xs[t+1] is the state at index t
        xt = xs[t + 1]
        eps = _toy_eps_model(xt, torch.full((n,), t))
        mu = (xt - betas[t] / (1 - ab[t]).sqrt() * eps) / alphas[t].sqrt()  # Ho et al. eq. 11
        if t > 0:
            log_p += D.Normal(mu, model_var[t].sqrt()).log_prob(xs[t]).flatten(1).sum(1)
        else:
            normal = D.Normal(mu, model_var[0].sqrt())
            hi = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
            lo = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
            log_p += (hi - lo).log().flatten(1).sum(1)
    direct = log_q - log_p

    for k in range(4):  # per distinct x0
        a, b = vb.total[k::4], direct[k::4]
        se = math.sqrt(float(a.var()) / reps + float(b.var()) / reps)
        assert abs(float(a.mean() - b.mean())) < 5 * se, (k, float(a.mean()), float(b.mean()), se)
        assert se < 0.01 * abs(float(b.mean()))

    # An unbiased estimate from 2 random t per sample agrees with the full sum.
    est = variational_bound(_toy_eps_model, sched, x0, "eps", timesteps=2, variance=variance, clip_x0=False,
                            generator=gen(23))
    for k in range(4):
        a, b = vb.diffusion[k::4], est.diffusion[k::4]
        se = math.sqrt(float(a.var()) / reps + float(b.var()) / reps)
        assert abs(float(a.mean() - b.mean())) < 5 * se
    kw = dict(variance=variance, clip_x0=False)
    nats = variational_bound(_toy_eps_model, sched, x0[:8], "eps", generator=gen(36), **kw).total
    bpd = variational_bound_bits_per_dim(_toy_eps_model, sched, x0[:8], "eps", generator=gen(36), **kw)
    assert torch.equal(bpd, nats_to_bits_per_dim(nats, 4))
    assert torch.allclose(nats_to_bits_per_dim(nats, (1, 2, 2)), nats / (4 * math.log(2)), rtol=1e-15)


def test_variational_bound_runs_on_a_unet_with_clipping():
    model = tiny_unet().eval()  # zero output: ε̂ = 0
    x0 = (torch.randint(0, 256, (3, 1, 8, 8), generator=gen(37)).float() / 255) * 2 - 1
    with torch.no_grad():
        bpd = variational_bound_bits_per_dim(model, NoiseSchedule.linear(T=20), x0, "eps", generator=gen(38))
        est = variational_bound_bits_per_dim(model, NoiseSchedule.linear(T=20), x0, "v", timesteps=3, generator=gen(38))
    assert bpd.shape == est.shape == (3,) and torch.isfinite(bpd).all() and (bpd > 0).all() and torch.isfinite(est).all()


def test_discretized_decoder_is_a_distribution_over_the_256_bins():
    grid = torch.linspace(-1, 1, 256, dtype=F64)
    for mean, log_scale in ((0.0, -1.0), (0.97, -4.0), (-2.0, 0.5), (0.3, -8.0)):
        logp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, log_scale))
        assert torch.isfinite(logp).all()
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-12)
        inner = D.Normal(mean, math.exp(log_scale))  # interior bins against plain CDF differences
        ref = (inner.cdf(grid[100:110] + 1 / 255) - inner.cdf(grid[100:110] - 1 / 255)).log()
        if torch.isfinite(ref).all():
            assert torch.allclose(logp[100:110], ref, rtol=1e-8)


# -- network ----------------------------------------------------------------------------------------

def test_ho_cifar10_unet_has_35_7m_parameters():
    with torch.device("meta"):
        model = UNet(3, 128, (1, 2, 2, 2), 2, (16,), 32, 0.1)
    count = sum(p.numel() for p in model.parameters())
    assert count == 35_746_307
    assert round(count / 1e6, 1) == 35.7  # Ho et al. 2020, table/appendix B: 35.7M
    # At least 4 channels per group (Ho's narrowest case, 128/32): with one channel per group the
    # norm after the timestep bias would subtract that bias exactly and erase the conditioning.
    assert [group_count(c) for c in (128, 256, 64, 48, 20, 36, 33, 8, 7)] == [32, 32, 16, 12, 5, 9, 3, 2, 1]


def test_unet_shapes_conditioning_and_zero_init():
    model = tiny_unet(num_classes=4, heads=2, in_channels=2, out_channels=4).eval()
    x = torch.randn(3, 2, 8, 8, generator=gen(24))
    t = torch.tensor([0, 5, 999])
    out = model(x, t, torch.tensor([0, 1, 4]))
    assert out.shape == (3, 4, 8, 8) and torch.equal(out, torch.zeros_like(out))  # zero-initialised output
    plain = tiny_unet().eval()
    assert torch.equal(plain(x[:, :1], t), torch.zeros(3, 1, 8, 8))
    model = randomised(model, 25)
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 1, 2]))
        b = model(x, t, torch.tensor([3, 1, 2]))
        c = model(x, t.double(), torch.tensor([0, 1, 2]))  # float timesteps embed the same values
        null = model(x, t)  # y=None is the null class
    assert a.shape == (3, 4, 8, 8)
    assert (a[0] - b[0]).abs().max() > 1e-4 and torch.equal(a[1:], b[1:])
    assert torch.allclose(a, c, atol=1e-6)
    assert torch.equal(null, model(x, t, torch.full((3,), 4)))
    with torch.no_grad():
        cont = model(x, torch.tensor([0.5, -2.3, 7.25]))  # continuous noise levels (e.g. log σ)
    assert torch.isfinite(cont).all()
    with pytest.raises(ValueError):
        plain(x[:, :1], t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        tiny_unet(image_size=7)


# -- samplers ------------------------------------------------------------------------------------

def test_samplers_are_reproducible_and_leave_the_global_rng_alone():
    model = randomised(tiny_unet(num_classes=2), 26)
    sched = NoiseSchedule.linear(T=20)
    y = torch.tensor([0, 1])
    fn = guided(model, 1.5, null_class=2, y=y)
    sigmas = geometric_sigmas(1.0, 0.05, 3)
    runs = {
        "ddpm": lambda g: ddpm_sample(fn, sched, (2, 1, 8, 8), "eps", "beta", generator=g),
        "ddpm_tilde_v": lambda g: ddpm_sample(fn, sched, (2, 1, 8, 8), "v", "beta_tilde", generator=g),
        "ddim": lambda g: ddim_sample(fn, sched, (2, 1, 8, 8), "x0", steps=5, eta=0.7, spacing="quadratic", generator=g),
        "langevin": lambda g: annealed_langevin(ncsn_score_fn(model, sigmas, y=y), sigmas, (2, 1, 8, 8),
                                                steps_per_sigma=3, generator=g),
    }
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    for name, run in runs.items():
        a, b, c = run(gen(27)), run(gen(27)), run(gen(28))
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name
        assert torch.isfinite(a).all()
    assert torch.equal(torch.get_rng_state(), state)


def test_guidance_combination_convention():
    base = lambda x, t, y: x * (y.to(x.dtype)[:, None] + 1)  # noqa: E731
    x, t, y = torch.ones(2, 3), torch.zeros(2, dtype=torch.long), torch.tensor([1, 2])
    out = guided(base, 2.0, null_class=0)(x, t, y)  # (1 + w) cond − w uncond
    assert torch.equal(out, 3 * base(x, t, y) - 2 * base(x, t, torch.zeros_like(y)))
    assert torch.equal(guided(base, 0.0, 0, y)(x, t), base(x, t, y))


def _gaussian_sampler_moments(sched, mu, sd):
    """Exact mean/variance after DDPM(β̃) sampling with the exact predictor for N(mu, sd²) data, x_T ~ N(0,1):
    each step is affine, x_prev = A x_t + c + σ z, so (m, v) ← (A m + c, A² v + σ²)."""
    a = sched.alphas_cumprod
    m, v = torch.zeros_like(mu), torch.ones_like(mu)
    for t in range(sched.T - 1, -1, -1):
        gain = a[t].sqrt() * sd ** 2 / (a[t] * sd ** 2 + 1 - a[t])  # E[x0 | x_t] = gain x_t + off
        off = mu - gain * a[t].sqrt() * mu
        k1, k2 = sched.posterior_mean_coef1[t], sched.posterior_mean_coef2[t]
        A, c = k1 * gain + k2, k1 * off
        m, v = A * m + c, A ** 2 * v + (sched.posterior_variance[t] if t > 0 else 0.0)
    return m, v


def test_ddim_eta_one_full_steps_samples_like_ddpm_beta_tilde():
    """Gaussian data, exact ε-predictor: DDIM(η=1, steps=T) and DDPM(β̃) take the same steps, so with
    one seed they agree to rounding, and both follow the exact affine-Gaussian recursion's law."""
    sched = NoiseSchedule.linear()
    mu, sd = torch.tensor([0.2, -0.4], dtype=F64), torch.tensor([0.5, 0.3], dtype=F64)
    eps_fn = gaussian_eps_fn(sched, mu, sd)
    n = 20_000
    x_T = torch.randn(n, 2, generator=gen(29), dtype=F64)
    ddpm = ddpm_sample(eps_fn, sched, (n, 2), "eps", "beta_tilde", generator=gen(30), clip_x0=False, x_T=x_T)
    ddim = ddim_sample(eps_fn, sched, (n, 2), "eps", steps=1000, eta=1.0, generator=gen(30), clip_x0=False, x_T=x_T)
    assert torch.allclose(ddpm, ddim, atol=1e-9)
    ddim2 = ddim_sample(eps_fn, sched, (n, 2), "eps", steps=1000, eta=1.0, generator=gen(31), clip_x0=False,
                        x_T=torch.randn(n, 2, generator=gen(32), dtype=F64))
    m, v = _gaussian_sampler_moments(sched, mu, sd)
    assert_mean_var(ddpm, m, v)
    assert_mean_var(ddim2, m, v)
    # The exact recursion lands near the data's law: β̃ under-disperses slightly (by 1.6% and
    # 2.4% here, since the true reverse conditionals have variance β̃ + coef1²·Var(x0 | x_t)).
    assert torch.allclose(m, mu, atol=1e-6) and torch.allclose(v, sd ** 2, rtol=3e-2)


def test_ddim_matches_across_prediction_targets():
    sched = NoiseSchedule.cosine(T=100)
    mu, sd = torch.tensor([0.2, -0.4], dtype=F64), torch.tensor([0.5, 0.3], dtype=F64)
    eps_fn = gaussian_eps_fn(sched, mu, sd)
    x0_fn = lambda x, t: sched.predict_x0_from_eps(x, t, eps_fn(x, t))  # noqa: E731
    v_fn = lambda x, t: sched.predict_v(x0_fn(x, t), eps_fn(x, t), t)  # noqa: E731
    x_T = torch.randn(50, 2, generator=gen(33), dtype=F64)
    outs = [ddim_sample(f, sched, (50, 2), tgt, steps=20, eta=0.3, generator=gen(34), clip_x0=False, x_T=x_T)
            for f, tgt in ((eps_fn, "eps"), (x0_fn, "x0"), (v_fn, "v"))]
    assert torch.allclose(outs[0], outs[1], atol=1e-8) and torch.allclose(outs[0], outs[2], atol=1e-8)


def test_annealed_langevin_on_a_gaussian_with_the_exact_score():
    """Data N(mu, sd²); the score of the σ-smoothed density is −(x − mu)/(sd² + σ²). Every update is
    affine, so the sampler's exact output law follows by recursion from the uniform start
    (mean 0, variance 1/3); the Monte-Carlo moments must match it within 5 SE, and the recursion
    itself must land within 3% of the data variance (the residual finite-step bias)."""
    mu, sd = torch.tensor([0.2, -0.4], dtype=F64), torch.tensor([0.5, 0.3], dtype=F64)
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    score = lambda x, i: -(x - mu) / (sd ** 2 + sigmas[i][:, None] ** 2)  # noqa: E731
    lr, steps = 5e-5, 100
    n = 20_000
    out = annealed_langevin(score, sigmas, (n, 2), steps, lr, generator=gen(35), dtype=F64)
    m, v = torch.zeros(2, dtype=F64), torch.full((2,), 1 / 3, dtype=F64)
    for s in sigmas.tolist():
        alpha = lr * (s / float(sigmas[-1])) ** 2
        k = 1 - 0.5 * alpha / (sd ** 2 + s ** 2)
        for _ in range(steps):
            m, v = k * m + 0.5 * alpha * mu / (sd ** 2 + s ** 2), k ** 2 * v + alpha
    s2 = float(sigmas[-1]) ** 2
    k = 1 - s2 / (sd ** 2 + s2)  # the final denoising step x + σ_L² s(x)
    m, v = k * m + s2 * mu / (sd ** 2 + s2), k ** 2 * v
    assert_mean_var(out, m, v)
    assert torch.allclose(m, mu, atol=1e-6) and torch.allclose(v, sd ** 2, rtol=3e-2)
