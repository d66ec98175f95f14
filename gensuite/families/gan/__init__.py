"""GANs: vanilla MLP GAN and DCGAN, with minimax or non-saturating losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from gensuite.errors import ConfigError, GensuiteError
from gensuite.families.gan.networks import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from gensuite.families.gan.objectives import LOSSES
from gensuite.registry import Batch, GenerativeFamily, Networks, Player, register


@dataclass
class GANConfig:
    latent_dim: int = 100
    architecture: Literal["mlp", "dcgan"] = "dcgan"
    loss: str = "non_saturating"  # a key of gensuite.families.gan.objectives.LOSSES
    n_critic: int = 1  # D steps per G step
    ngf: int = 64  # DCGAN generator width (channels of the last hidden layer)
    ndf: int = 64  # DCGAN discriminator width (channels of the first layer)
    g_hidden: list[int] = field(default_factory=lambda: [256, 512, 1024])  # MLP generator
    d_hidden: list[int] = field(default_factory=lambda: [1024, 512, 256])  # MLP discriminator
    d_dropout: float = 0.3  # MLP discriminator
    label_smoothing: float = 0.0  # one-sided: real targets become 1 - label_smoothing

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError("model.loss", f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.latent_dim < 1:
            raise ConfigError("model.latent_dim", "must be >= 1")
        if self.n_critic < 1:
            raise ConfigError("model.n_critic", "must be >= 1")
        if self.ngf < 1 or self.ndf < 1:
            raise ConfigError("model.ngf", "ngf and ndf must be >= 1")
        if not 0 <= self.d_dropout < 1:
            raise ConfigError("model.d_dropout", "must be in [0, 1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("model.label_smoothing", "must be in [0, 0.5)")


@register
class GAN(GenerativeFamily):
    name = "gan"
    config_class = GANConfig
    flavors = {
        "mlp": {"architecture": "mlp", "latent_dim": 100},
        "dcgan": {"architecture": "dcgan", "latent_dim": 100, "ngf": 64, "ndf": 64},
        "debug": {"architecture": "dcgan", "latent_dim": 8, "ngf": 8, "ndf": 8},
    }

    def __init__(self, cfg: GANConfig, data):
        super().__init__(cfg, data)
        if data.kind != "image":
            raise ConfigError("data.dataset", f"the gan family needs images; {data.dataset} holds points")
        size = data.image_size
        if cfg.architecture == "dcgan" and (size < 8 or size & (size - 1)):
            raise GensuiteError(f"flavor dcgan needs a power-of-two image size >= 8, the {data.dataset} shards are "
                                f"{size}x{size}; rebuild them with: python shards/build.py {data.dataset} --size 32 "
                                f"(or use flavor: mlp)")
        self.objective = LOSSES[cfg.loss]

    def build_networks(self):
        c, d = self.cfg, self.data
        if c.architecture == "dcgan":
            return {"G": DCGANGenerator(c.latent_dim, d.channels, d.image_size, c.ngf),
                    "D": DCGANDiscriminator(d.channels, d.image_size, c.ndf)}
        return {"G": MLPGenerator(c.latent_dim, d.shape, c.g_hidden),
                "D": MLPDiscriminator(d.shape, c.d_hidden, c.d_dropout)}

    def players(self):
        return [Player("D", ("D",), steps=self.cfg.n_critic), Player("G", ("G",), consumes_data=False)]

    def noise(self, n: int, device) -> torch.Tensor:
        return torch.randn(n, self.cfg.latent_dim, device=device)

    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        real = batch["x"] * 2 - 1  # G's tanh range
        z = self.noise(len(real), real.device)
        if player == "D":
            with torch.no_grad():
                fake = nets["G"](z)
            real_logits, fake_logits = nets["D"](real), nets["D"](fake)
            loss = self.objective.d_loss(real_logits, fake_logits, 1.0 - self.cfg.label_smoothing)
            return {"loss": loss, "real_logit": real_logits.mean(), "fake_logit": fake_logits.mean(),
                    "real_acc": (real_logits > 0).float().mean(), "fake_acc": (fake_logits < 0).float().mean()}
        fake_logits = nets["D"](nets["G"](z))
        return {"loss": self.objective.g_loss(fake_logits), "fake_logit": fake_logits.mean()}

    def fixed_inputs(self, n: int, generator: torch.Generator):
        return {"z": torch.randn(n, self.cfg.latent_dim, generator=generator)}

    def sample(self, nets: Networks, fixed):
        return (nets.ema("G")(fixed["z"]) + 1) / 2
