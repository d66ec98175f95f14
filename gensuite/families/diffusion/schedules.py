"""Noise schedules of the discrete-time Gaussian diffusion q(x_t | x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t I)
and conversions between what a network may predict.

Indexing: timestep index t = 0..T−1 is the paper's step t+1, so ᾱ[t] = ∏_{s≤t} (1 − β_s) and
ᾱ_prev[0] = 1 (the clean data). Everything is computed in float64 and stored as float64 tensors;
per-timestep coefficients are gathered and cast to the dtype/device of the tensor they scale, so
float32 inputs get float32 coefficients rounded from float64 values and float64 inputs keep full
precision. Move the tables with ``schedule.to(device)`` to avoid a host→device copy per call.

With x_t = √ᾱ x0 + √(1−ᾱ) ε the three prediction targets are
  "eps": ε,   "x0": x0,   "v": v = √ᾱ ε − √(1−ᾱ) x0   (Salimans & Ho 2022),
and each is an affine function of any other for fixed (x_t, t).
"""

from __future__ import annotations

import math

import torch

TARGETS = ("eps", "x0", "v")


class NoiseSchedule:
    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D sequence in (0, 1)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # q(x_{t−1} | x_t, x0) = N(coef1 x0 + coef2 x_t, β̃_t), β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0; its log is replaced by log β̃_1 (Ho et al.), which is also the decoder's variance.
        var1 = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.cat([var1.reshape(1), self.posterior_variance[1:]]).log()
        # Ho's "fixedlarge" reverse variance: β_t, except β̃_1 at t = 0 (the decoder).
        self.log_betas_large = torch.cat([self.posterior_log_variance_clipped[:1], betas[1:].log()])

    _TABLES = ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_mean_coef1",
               "posterior_mean_coef2", "posterior_log_variance_clipped", "log_betas_large")

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """Ho et al.'s β_t linear from beta_start to beta_end over T steps."""
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal 2021: ᾱ(u) = f(u)/f(0), f(u) = cos²((u + s)/(1 + s) · π/2), u = t/T,
        β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), max_beta)."""
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return cls(torch.clamp(1.0 - f[1:] / f[:-1], max=max_beta))

    @property
    def T(self) -> int:
        return len(self.betas)

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        for name in self._TABLES:
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- gathering ----------------------------------------------------------------------------

    @staticmethod
    def gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as a (N, 1, ..., 1) tensor in like's dtype/device, broadcastable against it."""
        t = torch.as_tensor(t, device=table.device, dtype=torch.long)
        if t.dim() == 0:
            t = t.expand(like.shape[0])
        out = table[t].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t), float64, shape of t."""
        t = torch.as_tensor(t, device=self.betas.device, dtype=torch.long)
        a = self.alphas_cumprod[t]
        return a / (1.0 - a)

    # -- forward process and posterior --------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, a draw from q(x_t | x0)."""
        return (self.gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean √ᾱ_t x0 and variance 1 − ᾱ_t of q(x_t | x0)."""
        return (self.gather(self.sqrt_alphas_cumprod, t, x0) * x0,
                self.gather(1.0 - self.alphas_cumprod, t, x0))

    def posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t−1} | x_t, x0): mean coef1 x0 + coef2 x_t, variance β̃_t, and the clipped log β̃_t."""
        mean = (self.gather(self.posterior_mean_coef1, t, xt) * x0
                + self.gather(self.posterior_mean_coef2, t, xt) * xt)
        return (mean, self.gather(self.posterior_variance, t, xt),
                self.gather(self.posterior_log_variance_clipped, t, xt))

    def reverse_log_variance(self, t: torch.Tensor, variance: str, like: torch.Tensor) -> torch.Tensor:
        """log σ_t² of the fixed reverse variance of p(x_{t−1} | x_t): "beta_tilde" (σ² = β̃_t, Ho's
        fixedsmall) or "beta" (σ² = β_t, fixedlarge); both use β̃_1 at t = 0, where it is the
        variance of the decoder p(x0 | x1)."""
        if variance == "beta_tilde":
            return self.gather(self.posterior_log_variance_clipped, t, like)
        if variance == "beta":
            return self.gather(self.log_betas_large, t, like)
        raise ValueError(f"unknown reverse variance {variance!r}; expected 'beta' or 'beta_tilde'")

    # -- prediction targets -------------------------------------------------------------------

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t − √(1−ᾱ) ε) / √ᾱ."""
        return (xt - self.gather(self.sqrt_one_minus_alphas_cumprod, t, xt) * eps) / self.gather(
            self.sqrt_alphas_cumprod, t, xt)

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − √ᾱ x0) / √(1−ᾱ)."""
        return (xt - self.gather(self.sqrt_alphas_cumprod, t, xt) * x0) / self.gather(
            self.sqrt_one_minus_alphas_cumprod, t, xt)

    def predict_v(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ ε − √(1−ᾱ) x0."""
        return (self.gather(self.sqrt_alphas_cumprod, t, x0) * eps
                - self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def predict_x0_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = √ᾱ x_t − √(1−ᾱ) v."""
        return (self.gather(self.sqrt_alphas_cumprod, t, xt) * xt
                - self.gather(self.sqrt_one_minus_alphas_cumprod, t, xt) * v)

    def predict_eps_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ε = √(1−ᾱ) x_t + √ᾱ v."""
        return (self.gather(self.sqrt_one_minus_alphas_cumprod, t, xt) * xt
                + self.gather(self.sqrt_alphas_cumprod, t, xt) * v)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, target: str) -> torch.Tensor:
        """The regression target of a network trained to predict ``target``."""
        if target == "eps":
            return eps
        if target == "x0":
            return x0
        if target == "v":
            return self.predict_v(x0, eps, t)
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")

    def x0_and_eps(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, target: str,
                   clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) implied by a network output in ``target`` space at (x_t, t). With clip_x0, x̂0 is
        clamped to [−1, 1] and ε̂ recomputed from the clamped x̂0, so the pair stays consistent with
        x_t = √ᾱ x̂0 + √(1−ᾱ) ε̂."""
        if target == "eps":
            x0, eps = self.predict_x0_from_eps(xt, t, output), output
        elif target == "x0":
            x0, eps = output, self.predict_eps_from_x0(xt, t, output)
        elif target == "v":
            x0, eps = self.predict_x0_from_v(xt, t, output), self.predict_eps_from_v(xt, t, output)
        else:
            raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(xt, t, x0)
        return x0, eps


def geometric_sigmas(sigma_max: float, sigma_min: float, L: int) -> torch.Tensor:
    """NCSN noise levels σ_1 > … > σ_L, a geometric sequence from sigma_max to sigma_min
    (Song & Ermon 2019), as a float64 tensor of length L."""
    if not sigma_max > sigma_min > 0 or L < 2:
        raise ValueError("need sigma_max > sigma_min > 0 and L >= 2")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), L, dtype=torch.float64))
