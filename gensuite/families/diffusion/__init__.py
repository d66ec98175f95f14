"""Diffusion family: DDPM (Ho et al. 2020) with DDPM/DDIM samplers, and noise-conditional score
networks (Song & Ermon 2019) trained by denoising score matching and sampled by annealed Langevin
dynamics, on one U-Net.

``model.objective: ddpm`` trains ε-, x0- or v-prediction on a linear or cosine schedule and has the
likelihood ability (the variational bound, in nats and bits/dim); ``ncsn`` trains a score network
over a geometric σ ladder. Which sampler draws the samples (grids, ``gensuite sample``, evaluation)
is a run-time choice (``HasSamplers``): ``ddpm``, ``ddim`` with any number of steps and η, or
``langevin`` for score networks.

Images are modelled in [-1, 1] on the U-Net; 2-D points (moons, ring, grid) as they are, on an MLP
denoiser (``architecture: mlp``, the ``points`` flavor), with the same objectives and samplers, a
Gaussian-density decoder in the bound (nats) and scatter plots for figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from gensuite.errors import ConfigError, GensuiteError
from gensuite.families.diffusion.networks import MLPDenoiser, UNet
from gensuite.families.diffusion.objectives import diffusion_loss, dsm_loss, ncsn_score_fn, prior_term, vb_term
from gensuite.families.diffusion.samplers import annealed_langevin, ddim_invert, ddim_sample, ddpm_sample, guided
from gensuite.families.diffusion.schedules import NoiseSchedule, geometric_sigmas
from gensuite.figures import scatter_strip
from gensuite.registry import Batch, GenerativeFamily, Networks, SamplerChoice, register

SAMPLERS = {"ddpm": ("ddpm", "ddim"), "ncsn": ("langevin",)}


@dataclass
class DiffusionConfig:
    objective: Literal["ddpm", "ncsn"] = "ddpm"
    architecture: Literal["unet", "mlp"] = "unet"  # unet: images; mlp: points
    hidden: list[int] = field(default_factory=lambda: [128, 128, 128])  # mlp: the denoiser's widths (SiLU)
    # U-Net (Ho et al. appendix B): widths base_channels * channel_mults, attention at these sides
    base_channels: int = 128
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.1
    heads: int = 1
    # DDPM
    schedule: Literal["linear", "cosine"] = "linear"
    timesteps: int = 1000  # T
    beta_start: float = 1e-4  # linear schedule
    beta_end: float = 0.02
    target: Literal["eps", "x0", "v"] = "eps"  # what the network predicts
    weighting: Literal["uniform", "snr", "min_snr"] = "uniform"  # uniform + eps: Ho's L_simple
    variance: Literal["beta", "beta_tilde"] = "beta"  # σ_t² of ancestral sampling
    clip_x0: bool = True  # clip the predicted x0 to [-1, 1] while sampling (images only)
    # classifier-free guidance (class-conditional data only)
    class_conditional: bool = False
    p_uncond: float = 0.1  # training: a label is replaced by the null class with this probability
    guidance_scale: float = 0.0  # sampling: (1 + w) cond - w uncond; 0 = the conditional model
    # NCSN (objective: ncsn)
    sigma_max: float = 1.0
    sigma_min: float = 0.01
    num_sigmas: int = 10
    langevin_steps: int = 100  # per noise level
    langevin_step_lr: float = 2e-5
    # The sampler of grids, `gensuite sample` and evaluation (each can choose another)
    sampler: Literal["ddpm", "ddim", "langevin"] = "ddpm"
    sample_steps: int = 0  # DDIM steps (0: T)
    eta: float = 0.0  # DDIM: 0 deterministic, 1 = DDPM's β̃ noise
    spacing: Literal["uniform", "quadratic"] = "uniform"  # DDIM timestep spacing

    def __post_init__(self):
        for name in ("base_channels", "num_res_blocks", "timesteps", "num_sigmas", "langevin_steps", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", "must be >= 1")
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError("model.hidden", "needs at least one layer, each width >= 1")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ConfigError("model.channel_mults", "needs at least one level, each multiplier >= 1")
        if not 0 <= self.dropout < 1 or not 0 <= self.p_uncond < 1:
            raise ConfigError("model.dropout", "dropout and p_uncond must be in [0, 1)")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError("model.beta_start", "needs 0 < beta_start < beta_end < 1")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError("model.sigma_min", "needs 0 < sigma_min < sigma_max")
        if self.guidance_scale < 0:
            raise ConfigError("model.guidance_scale", "must be >= 0")
        if self.sampler not in SAMPLERS[self.objective]:
            raise ConfigError("model.sampler", f"{self.sampler} does not sample a {self.objective} model; use "
                                               f"{' or '.join(SAMPLERS[self.objective])}")
        check_sampler_settings(self.sample_steps, self.eta, self.timesteps, "model.sample_steps")


def check_sampler_settings(steps: int, eta: float, timesteps: int, where: str) -> None:
    if not 0 <= steps <= timesteps:
        raise ConfigError(where, f"must be in [0, {timesteps}] (0: every one of the T={timesteps} steps), got {steps}")
    if not 0 <= eta <= 1:
        raise ConfigError(where.replace("sample_steps", "eta").replace("steps", "eta"), f"must be in [0, 1], got {eta}")


@register
class Diffusion(GenerativeFamily):
    name = "diffusion"
    config_class = DiffusionConfig
    flavors = {
        # Ho et al.'s CIFAR-10 network: 35.7M parameters.
        "cifar10": {"base_channels": 128, "channel_mults": [1, 2, 2, 2], "num_res_blocks": 2,
                    "attention_resolutions": [16], "dropout": 0.1},
        # MNIST/digits at 28 or 32 px: three levels, attention at 8 px.
        "mnist": {"base_channels": 64, "channel_mults": [1, 2, 2], "num_res_blocks": 2,
                  "attention_resolutions": [8], "dropout": 0.1},
        # CPU-sized: digits in minutes on two cores.
        "small": {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1,
                  "attention_resolutions": [8], "dropout": 0.0, "timesteps": 1000},
        "debug": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
                  "dropout": 0.0, "timesteps": 20, "num_sigmas": 4, "langevin_steps": 3},
        # 2-D points: a 3x128 SiLU MLP denoiser. T = 100 with Ho's linear β rescaled to T steps as in
        # Nichol & Dhariwal's code (β from 1e-4·1000/T to 0.02·1000/T): ᾱ_T ≈ 4e-5 as with Ho's
        # T = 1000, at a tenth of the sampling steps. No x0 clipping: points do not live in [-1, 1].
        "points": {"architecture": "mlp", "hidden": [128, 128, 128], "timesteps": 100, "beta_start": 1e-3,
                   "beta_end": 0.2, "clip_x0": False},
    }
    paper_parameters = {"cifar10": "35.7M (Ho et al. 2020, table in appendix B)"}

    def __init__(self, cfg: DiffusionConfig, data):
        super().__init__(cfg, data)
        self.image = data.kind == "image"
        if cfg.architecture == "unet" and not self.image:
            raise ConfigError("flavor", f"{data.dataset} holds {data.kind}; the U-Net draws images: use flavor: "
                                        f"points (or model.architecture: mlp)")
        if cfg.architecture == "mlp" and self.image:
            raise ConfigError("model.architecture", f"the mlp denoiser draws points; {data.dataset} holds images "
                                                    f"(use unet)")
        if cfg.clip_x0 and not self.image:
            raise ConfigError("model.clip_x0", f"{data.dataset} points have no [-1, 1] range to clip x0 to; set it "
                                               f"to false")
        if cfg.class_conditional and data.num_classes < 2:
            raise ConfigError("model.class_conditional", f"{data.dataset} has no class labels; set it to false")
        self.schedule = (NoiseSchedule.linear(cfg.timesteps, cfg.beta_start, cfg.beta_end) if cfg.schedule == "linear"
                         else NoiseSchedule.cosine(cfg.timesteps))
        self.sigmas = geometric_sigmas(cfg.sigma_max, cfg.sigma_min, cfg.num_sigmas).float()
        self.sampler = SamplerChoice(cfg.sampler, cfg.sample_steps, cfg.eta)
        # The likelihood ability: only the DDPM objective has a bound.
        self.likelihood_values = ("vlb",) if cfg.objective == "ddpm" else ()
        if self.image:
            self.check_unet()

    def check_unet(self):
        cfg, data = self.cfg, self.data
        levels = len(cfg.channel_mults)
        side = data.image_size
        if side % 2 ** (levels - 1):
            raise ConfigError("model.channel_mults", f"{levels} levels halve the side {levels - 1} times; "
                                                     f"{side} px is not divisible by {2 ** (levels - 1)}; rebuild "
                                                     f"the shards with: python shards/build.py {data.dataset} --size 32 "
                                                     f"(with --src DIR where it needs one)")
        sides = [side // 2 ** i for i in range(levels)]
        missing = [r for r in cfg.attention_resolutions if r not in sides]
        if missing:  # attention at a side the U-Net never has would silently leave it out
            raise ConfigError("model.attention_resolutions", f"{missing} is not a side of this U-Net on {side} px "
                                                             f"images (its sides: {', '.join(map(str, sides))}); choose among those, "
                                                             f"or rebuild the shards at the side the job was made for: "
                                                             f"python shards/build.py {data.dataset} --size 32")

    @property
    def conditional(self) -> bool:
        return self.cfg.class_conditional

    @property
    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS[self.cfg.objective]

    def build_networks(self):
        c = self.cfg
        classes = self.data.num_classes if c.class_conditional else None
        if c.architecture == "mlp":
            return {"model": MLPDenoiser(self.data.dim, c.hidden, num_classes=classes)}
        return {"model": UNet(self.data.channels, c.base_channels, c.channel_mults, c.num_res_blocks,
                              c.attention_resolutions, self.data.image_size, c.dropout,
                              num_classes=classes, heads=c.heads)}

    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Images from [0, 1] to the model's [-1, 1]; points as they are."""
        return x * 2 - 1 if self.image else x

    def to_data_space(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() + 1) / 2).clamp(0, 1) if self.image else x.float()

    # -- training -----------------------------------------------------------------------------------
    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        x0 = self.to_model_space(batch["x"])
        y = batch.get("y") if self.conditional else None
        if self.cfg.objective == "ncsn":
            return {"loss": dsm_loss(nets["model"], self.sigmas.to(x0.device), x0, y)}
        model = nets["model"]
        loss = diffusion_loss(model, self.schedule, x0, self.cfg.target, self.cfg.weighting, y,
                              self.cfg.p_uncond if self.conditional else 0.0,
                              null_class=self.data.num_classes if self.conditional else None)
        return {"loss": loss}

    # -- likelihood: the variational bound ------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, nets: Networks, batch: Batch, k: int, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """−(L_T + Σ L_{t−1} + L_0) per sample in nats (images: x on the 256-level grid, x0 clipped as
        in Ho's evaluation; points: a density, unclipped): L_T and the decoder term exactly, the T−1 KL
        terms as an unbiased estimate from k timesteps per sample (all of them when k ≥ T−1), every
        draw from the sample's own seed."""
        x0 = self.to_model_space(batch["x"])
        y = batch.get("y") if self.conditional else None
        model = self._model_fn(nets, None)
        n, T = len(x0), self.schedule.T
        exact = k >= T - 1
        draws = T - 1 if exact else k
        times, noises = [], []
        for seed in seeds.tolist():
            g = torch.Generator().manual_seed(int(seed))
            t = torch.arange(1, T) if exact else torch.randint(1, T, (draws,), generator=g)
            times.append(torch.cat([t, torch.zeros(1, dtype=torch.long)]))  # + the decoder term at t = 0
            noises.append(torch.randn(draws + 1, *x0.shape[1:], generator=g))
        t = torch.stack(times).to(x0.device).flatten()
        noise = torch.stack(noises).to(x0.device).flatten(0, 1)
        x_rep = x0.repeat_interleave(draws + 1, 0)
        y_rep = y.repeat_interleave(draws + 1, 0) if y is not None else None
        terms = torch.cat([vb_term(model, self.schedule, x_rep[i:i + 256], t[i:i + 256],
                                   None if y_rep is None else y_rep[i:i + 256], self.cfg.target, "beta_tilde",
                                   self.image, noise[i:i + 256], discrete=self.image)
                           for i in range(0, len(t), 256)]).view(n, draws + 1)
        scale = 1.0 if exact else (T - 1) / draws
        prior = prior_term(self.schedule, x0)
        return {"vlb": -(prior + scale * terms[:, :-1].sum(1) + terms[:, -1])}

    # -- sampling ---------------------------------------------------------------------------------------
    def use_sampler(self, choice: SamplerChoice) -> None:
        """Draw with another sampler from now on (``gensuite sample --sampler``, ``eval.sampler``)."""
        name = choice.name or self.sampler.name
        if name not in self.samplers:
            raise GensuiteError(f"--sampler: {name} does not sample a {self.cfg.objective} model; use "
                                f"{' or '.join(self.samplers)}")
        steps = self.sampler.steps if choice.steps is None else choice.steps
        eta = self.sampler.eta if choice.eta is None else choice.eta
        check_sampler_settings(steps, eta, self.cfg.timesteps, "--steps")
        self.sampler = SamplerChoice(name, steps, eta)

    def _model_fn(self, nets: Networks, y: torch.Tensor | None):
        net = nets.ema("model")
        if y is None:
            return net
        if self.cfg.guidance_scale > 0:
            return guided(net, self.cfg.guidance_scale, self.data.num_classes, y)
        return lambda x, t: net(x, t, y)

    def fixed_inputs(self, n: int, generator: torch.Generator):
        y = self.fixed_labels(n)
        return {"x_T": torch.randn(len(y), *self.data.shape, generator=generator), "y": y,
                "seed": torch.randint(0, 2**62, (1,), generator=generator).expand(len(y))}

    def draw(self, nets: Networks, fixed, progress=None) -> torch.Tensor:
        """Samples in the model's space from the fixed inputs with the current sampler; the sampler's
        noise comes from ``fixed["seed"]``, so the same inputs give the same samples."""
        x_T = fixed["x_T"]
        generator = torch.Generator(device=x_T.device).manual_seed(int(fixed["seed"][0]))
        y = fixed["y"] if self.conditional else None
        c, choice = self.cfg, self.sampler
        if choice.name == "langevin":
            score = ncsn_score_fn(nets.ema("model"), self.sigmas.to(x_T.device), y=y)
            # Starts uniform on [-1, 1] (Song & Ermon), drawn from the inputs' seed.
            return annealed_langevin(score, self.sigmas, x_T.shape, c.langevin_steps, c.langevin_step_lr,
                                     generator=generator, progress=progress)
        model = self._model_fn(nets, y)
        if choice.name == "ddpm":
            return ddpm_sample(model, self.schedule, x_T.shape, c.target, c.variance, generator=generator,
                               clip_x0=c.clip_x0, x_T=x_T, progress=progress)
        return ddim_sample(model, self.schedule, x_T.shape, c.target, choice.steps or c.timesteps, choice.eta,
                           c.spacing, generator=generator, clip_x0=c.clip_x0, x_T=x_T, progress=progress)

    def sample(self, nets: Networks, fixed):
        return self.to_data_space(self.draw(nets, fixed))

    # -- the assignment's figures ---------------------------------------------------------------------
    def visuals(self, nets: Networks, fixed, reference: Batch):
        # The state after each step: the first image's, or every point's (a frame is a scatter plot).
        shown = slice(0, 1) if self.image else slice(None)
        states: list[tuple[int, torch.Tensor]] = []
        final = self.draw(nets, fixed, progress=lambda i, t, x, x0: states.append((t, x[shown].clone())))
        out = {"samples": self.to_data_space(final),
               "reverse_process": self.reverse_process_figure(fixed["x_T"][shown], states, final[shown])}
        if self.cfg.objective == "ddpm":
            x0 = self.to_model_space(reference["x"][shown])
            out["forward_process"] = self.forward_process_figure(x0)
            if self.image:
                out["ddim_inversion"] = self.inversion_figure(nets, x0)
        return out

    def strip(self, frames: list[torch.Tensor], labels: list[str], title: str):
        """Images side by side (each (C, H, W)), or scatter plots of point sets (each (N, D))."""
        return strip_figure([f[0] for f in frames], labels, title) if self.image else scatter_strip(frames, labels, title)

    def forward_process_figure(self, x0: torch.Tensor, frames: int = 10):
        """One image (or every point) noised by q(x_t | x0) at evenly spaced t (the same noise for every t)."""
        T = self.schedule.T
        ts = sorted({round(i * (T - 1) / (frames - 1)) for i in range(frames)})
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0)
        images = [self.schedule.q_sample(x0, torch.full((len(x0),), t, device=x0.device), noise) for t in ts]
        return self.strip([x0] + images, ["x0"] + [f"t={t + 1}" for t in ts], "forward process q(x_t | x0)")

    def reverse_process_figure(self, x_T: torch.Tensor, states: list[tuple[int, torch.Tensor]],
                               final: torch.Tensor, frames: int = 10):
        """One sample's state (or every point's) along its sampler's steps (every k-th)."""
        every = max(1, math.ceil(len(states) / frames))
        chosen = states[::every][:frames - 1]
        if self.sampler.name == "langevin":  # after each noise level σ_1 > ... > σ_L, then denoised
            images = [x for _, x in chosen] + [final]
            labels = [f"σ={float(self.sigmas[i]):.3g}" for i, _ in chosen] + ["denoised"]
        else:
            images = [x_T] + [x for _, x in chosen] + [final]
            labels = ["x_T"] + [f"t={t}" for t, _ in chosen] + ["x0"]  # the state x_t after step t+1 -> t
        return self.strip(images, labels, f"reverse process ({self.sampler.describe()})")

    def inversion_figure(self, nets: Networks, x0: torch.Tensor, steps: int = 0):
        """DDIM inversion: an image encoded to x_T and decoded back (η = 0), with the error."""
        steps = steps or min(50, self.schedule.T)
        model = self._model_fn(nets, None if not self.conditional else torch.zeros(1, dtype=torch.long,
                                                                                     device=x0.device))
        x_T = ddim_invert(model, self.schedule, x0, self.cfg.target, steps, self.cfg.spacing)
        back = ddim_sample(model, self.schedule, x0.shape, self.cfg.target, steps, 0.0, self.cfg.spacing,
                           generator=torch.Generator(device=x0.device), clip_x0=False, x_T=x_T)
        rmse = float((back - x0).pow(2).mean().sqrt()) / 2  # in [0, 1] pixel units
        return strip_figure([x0[0], x_T[0], back[0]], ["x0", "x_T (inverted)", f"decoded, RMSE {rmse:.4f}"],
                            f"DDIM inversion, {steps} steps")


def strip_figure(images: list[torch.Tensor], labels: list[str], title: str):
    """Images in [-1, 1] side by side, each with its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(1.3 * len(images), 1.8), squeeze=False)
    for ax, image, label in zip(axes[0], images, labels):
        pixels = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
        if pixels.shape[0] == 1:
            ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(label, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
