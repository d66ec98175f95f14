"""VAE, β-VAE and conditional VAE (CVAE)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from gensuite.errors import ConfigError
from gensuite.families.vae.networks import Decoder, Encoder
from gensuite.families.vae.objective import (bernoulli_nll, gaussian_nll, kl_standard_normal,
                                             likelihood_bounds, reparameterize)
from gensuite.registry import Batch, GenerativeFamily, Networks, per_sample_normal, register


@dataclass
class VAEConfig:
    latent_dim: int = 16
    encoder: Literal["mlp", "conv"] = "mlp"
    hidden: list[int] = field(default_factory=lambda: [512, 256])  # MLP encoder widths
    conv_channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # conv encoder, each + 2x2 max-pool
    decoder_hidden: list[int] = field(default_factory=lambda: [256, 512])
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    variance: Literal["fixed", "learned"] = "fixed"  # gaussian only: per-pixel learned std or fixed_std
    fixed_std: float = 1.0  # 1.0: the reconstruction term is 0.5 * squared error + const (MSE)
    beta: float = 1.0  # weight of the KL term (β-VAE)
    conditional: bool = False  # CVAE: the label's one-hot enters encoder and decoder

    def __post_init__(self):
        if self.latent_dim < 1:
            raise ConfigError("model.latent_dim", "must be >= 1")
        if self.beta < 0:
            raise ConfigError("model.beta", "must be >= 0")
        if self.fixed_std <= 0:
            raise ConfigError("model.fixed_std", "must be > 0")
        for name in ("hidden", "conv_channels", "decoder_hidden"):
            if any(w < 1 for w in getattr(self, name)):
                raise ConfigError(f"model.{name}", "layer widths must be >= 1")
        if self.variance == "learned" and self.likelihood != "gaussian":
            raise ConfigError("model.variance", "a learned variance needs likelihood: gaussian")


@register
class VAE(GenerativeFamily):
    name = "vae"
    config_class = VAEConfig
    flavors = {
        "mlp": {"encoder": "mlp", "hidden": [512, 256], "decoder_hidden": [256, 512], "latent_dim": 16},
        # Assignment 000 P7: 3 conv layers (16, 32, 32) each followed by 2x2 max-pool; decoder 32 then 64.
        "conv": {"encoder": "conv", "conv_channels": [16, 32, 32], "decoder_hidden": [32, 64], "latent_dim": 16},
        "debug": {"encoder": "mlp", "hidden": [32], "decoder_hidden": [32], "latent_dim": 2},
    }

    def __init__(self, cfg: VAEConfig, data):
        super().__init__(cfg, data)
        if cfg.conditional and data.num_classes < 2:
            raise ConfigError("model.conditional", f"dataset {data.dataset} has no class labels; set it to false")
        if cfg.encoder == "conv" and (data.kind != "image" or data.image_size < 2 ** len(cfg.conv_channels)):
            raise ConfigError("model.encoder", f"conv needs images of at least {2 ** len(cfg.conv_channels)} pixels; "
                                               f"use encoder: mlp for {data.dataset}")
        self.cond_dim = data.num_classes if cfg.conditional else 0

    @property
    def conditional(self) -> bool:
        return self.cond_dim > 0

    def build_networks(self):
        c, shape = self.cfg, self.data.shape
        return {
            "encoder": Encoder(shape, c.latent_dim, self.cond_dim, c.encoder, c.hidden, c.conv_channels),
            "decoder": Decoder(shape, c.latent_dim, self.cond_dim, c.decoder_hidden,
                               learned_variance=c.likelihood == "gaussian" and c.variance == "learned"),
        }

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return F.one_hot(y, self.data.num_classes).float() if self.cond_dim else None

    def reconstruction_nll(self, out: torch.Tensor, log_std: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.likelihood == "bernoulli":
            return bernoulli_nll(out, x)
        if log_std is None:
            log_std = out.new_tensor(math.log(self.cfg.fixed_std))
        return gaussian_nll(out, log_std, x)

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        return out.sigmoid() if self.cfg.likelihood == "bernoulli" else out.clamp(0, 1)

    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        x, cond = batch["x"], self.condition(batch.get("y"))
        mean, log_var = nets["encoder"](x, cond)
        out, log_std = nets["decoder"](reparameterize(mean, log_var), cond)
        recon = self.reconstruction_nll(out, log_std, x).mean()
        kl = kl_standard_normal(mean, log_var).mean()
        neg_elbo = recon + kl
        return {"loss": recon + self.cfg.beta * kl, "recon": recon, "kl": kl, "elbo": -neg_elbo,
                "bpd": neg_elbo / (self.data.dim * math.log(2))}

    likelihood_values = ("elbo", "iwae")

    def log_likelihood(self, nets: Networks, batch: Batch, k: int, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = per_sample_normal(seeds, k, self.cfg.latent_dim).transpose(0, 1)  # (k, N, latent)
        return self.log_likelihood_bounds(nets, batch, k, eps=eps.to(batch["x"].device))

    @torch.no_grad()
    def log_likelihood_bounds(self, nets: Networks, batch: Batch, k: int = 64,
                              generator: torch.Generator | None = None,
                              eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample ELBO and k-sample importance-weighted bound on log p(x), in nats, from the
        EMA networks (bits/dim = −bound / (dim · ln 2))."""
        x, cond = batch["x"], self.condition(batch.get("y"))
        mean, log_var = nets.ema("encoder")(x, cond)
        decoder = nets.ema("decoder")

        def log_px_given_z(z: torch.Tensor) -> torch.Tensor:
            k_, b = z.shape[:2]
            c = cond.repeat(k_, 1) if cond is not None else None
            out, log_std = decoder(z.flatten(0, 1), c)
            return -self.reconstruction_nll(out, log_std, x.repeat(k_, *[1] * (x.dim() - 1))).view(k_, b)

        return likelihood_bounds(log_px_given_z, mean, log_var, k, generator, eps)

    def fixed_inputs(self, n: int, generator: torch.Generator):
        y = self.fixed_labels(n)
        return {"z": torch.randn(len(y), self.cfg.latent_dim, generator=generator), "y": y}

    def sample(self, nets: Networks, fixed):
        return self.mean_image(nets.ema("decoder")(fixed["z"], self.condition(fixed["y"]))[0])

    def visuals(self, nets: Networks, fixed, reference: Batch):
        x = reference["x"][:32]
        y = reference.get("y")
        cond = self.condition(y[:32]) if y is not None else None
        mean, _ = nets.ema("encoder")(x, cond)
        recon = self.mean_image(nets.ema("decoder")(mean, cond)[0])  # the posterior mean: no sampling
        pairs = torch.stack([x, recon], dim=1).flatten(0, 1)  # original, reconstruction, ...
        out = {"samples": self.sample(nets, fixed), "reconstructions": pairs}
        if self.cfg.latent_dim == 2:
            all_cond = self.condition(y) if y is not None else None
            out["latent"] = latent_scatter(nets.ema("encoder")(reference["x"], all_cond)[0], y, self.data.class_names)
        return out


def latent_scatter(mean: torch.Tensor, labels: torch.Tensor | None, class_names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    z = mean.detach().float().cpu().numpy()
    c = labels.cpu().numpy() if labels is not None else None
    points = ax.scatter(z[:, 0], z[:, 1], c=c, cmap="tab10", s=8, vmin=0, vmax=max(9, len(class_names) - 1))
    if c is not None:
        fig.colorbar(points, ax=ax, ticks=range(len(class_names))).ax.set_yticklabels(class_names)
    ax.set_xlabel("z[0] (posterior mean)")
    ax.set_ylabel("z[1]")
    fig.tight_layout()
    return fig
