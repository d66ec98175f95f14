"""GANs: vanilla MLP GAN and DCGAN on images or 2-D points, with the loss zoo of ``objectives``
(minimax, non-saturating, least squares, Wasserstein with clipping or gradient penalty, hinge; R1),
and two mode-collapse remedies: PacGAN packing and unrolled GAN (``unrolled``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from gensuite.errors import ConfigError, GensuiteError
from gensuite.families.gan.networks import (ACGANDiscriminator, ACGANGenerator, DCGANDiscriminator, DCGANGenerator,
                                            DeadUnits, MLPDiscriminator, MLPGenerator, ProjectionDiscriminator)
from gensuite.families.gan.objectives import LOSSES, clip_parameters, d_wasserstein, gradient_penalty, r1_penalty
from gensuite.families.gan.unrolled import call, unrolled_state
from gensuite.registry import Batch, GenerativeFamily, Networks, Player, register


@dataclass
class GANConfig:
    latent_dim: int = 100
    architecture: Literal["mlp", "dcgan", "acgan"] = "dcgan"  # acgan: assignment 002's ACGAN networks
    loss: str = "non_saturating"  # a key of gensuite.families.gan.objectives.LOSSES
    n_critic: int = 1  # D steps per G step
    ngf: int = 64  # DCGAN generator width (channels of the last hidden layer)
    ndf: int = 64  # DCGAN discriminator width (channels of the first layer)
    g_hidden: list[int] = field(default_factory=lambda: [256, 512, 1024])  # MLP generator
    d_hidden: list[int] = field(default_factory=lambda: [1024, 512, 256])  # MLP discriminator
    d_dropout: float = 0.3  # MLP discriminator
    label_smoothing: float = 0.0  # one-sided: real targets become 1 - label_smoothing
    g_activation: Literal["relu", "leaky_relu", None] = None  # None: dcgan relu, mlp leaky_relu
    critic_norm: Literal["batch", "layer", "none", None] = None  # DCGAN D; None: the loss's (GP: layer)
    gradient_penalty: float | None = None  # λ; None: the loss's (wasserstein_gp 10, else 0)
    clip_weights: float | None = None  # None: the loss's (wasserstein 0.01, else no clipping)
    r1_gamma: float = 0.0  # R1 penalty γ/2 E‖∇D(x)‖² on real data; 0: off
    pack: int = 1  # PacGAN: D judges `pack` samples at once (all real or all generated)
    unroll_steps: int = 0  # unrolled GAN: G's loss against D after this many look-ahead steps
    unroll_lr: float = 0.01  # step size of those (plain gradient) look-ahead steps (0.1 diverged on the ring)
    conditioning: Literal["none", "cgan", "acgan"] = "none"  # class-conditional G(z | y); acgan: D classifies
    projection: bool = False  # cgan: projection discriminator (Miyato & Koyama) instead of label channels
    d_noise_std: float = 0.0  # acgan networks: Gaussian noise on the input of each of D's convs (training)

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
        if self.label_smoothing and not LOSSES[self.loss].smoothing:
            raise ConfigError("model.label_smoothing", f"the {self.loss} loss has no real-label target to smooth; "
                                                       f"set it to 0")
        if self.gradient_penalty is not None and self.gradient_penalty < 0:
            raise ConfigError("model.gradient_penalty", "must be >= 0 (0: off; null: the loss's own λ)")
        if self.clip_weights is not None and self.clip_weights <= 0:
            raise ConfigError("model.clip_weights", "must be > 0 (null: the loss's own bound, if any)")
        if self.r1_gamma < 0:
            raise ConfigError("model.r1_gamma", "must be >= 0 (0: off)")
        if self.pack < 1:
            raise ConfigError("model.pack", "must be >= 1 (1: no packing; PacGAN used 2 to 4)")
        if self.unroll_steps < 0:
            raise ConfigError("model.unroll_steps", "must be >= 0 (0: no unrolling; Metz et al. used up to 10)")
        if self.unroll_lr <= 0:
            raise ConfigError("model.unroll_lr", "must be > 0")
        if (self.architecture == "acgan") != (self.conditioning == "acgan"):
            raise ConfigError("model.conditioning", "the acgan networks and conditioning: acgan go together (D's "
                                                    "class head); use flavor: acgan, or conditioning: cgan with "
                                                    "the dcgan or mlp networks")
        if self.projection and self.conditioning != "cgan":
            raise ConfigError("model.projection", "projects a label: needs conditioning: cgan")
        if self.d_noise_std < 0 or self.d_noise_std and self.architecture != "acgan":
            raise ConfigError("model.d_noise_std", "must be >= 0, and only the acgan networks take it")
        if self.pack > 1 and (self.projection or self.conditioning == "acgan"):
            raise ConfigError("model.pack", "packing mixes samples with different labels: a projection or "
                                            "ACGAN discriminator judges one labelled sample at a time; use pack: 1")


@register
class GAN(GenerativeFamily):
    name = "gan"
    config_class = GANConfig
    flavors = {
        "mlp": {"architecture": "mlp", "latent_dim": 100},
        "dcgan": {"architecture": "dcgan", "latent_dim": 100, "ngf": 64, "ndf": 64},
        "debug": {"architecture": "dcgan", "latent_dim": 8, "ngf": 8, "ndf": 8},
        # 2-D points (ring, grid, moons): 128-unit MLPs as in the mode-collapse papers' toy experiments.
        # Assignment 002's ACGAN table (32x32 images, z of 100, batch 100 in its job).
        "acgan": {"architecture": "acgan", "conditioning": "acgan", "latent_dim": 100},
        "points": {"architecture": "mlp", "latent_dim": 64, "g_hidden": [128, 128], "d_hidden": [128, 128],
                   "d_dropout": 0.0, "g_activation": "relu"},
    }
    debug_dataset = "digits"

    def __init__(self, cfg: GANConfig, data):
        super().__init__(cfg, data)
        self.points = data.kind == "points"
        if cfg.conditioning != "none" and data.num_classes < 2:
            raise ConfigError("model.conditioning", f"{data.dataset} has no class labels; set it to none")
        if cfg.architecture == "acgan" and (self.points or data.image_size != 32):
            raise ConfigError("data.dataset", f"the acgan networks draw 32x32 images; rebuild the shards with: "
                                              f"python shards/build.py {data.dataset} --size 32")
        if self.points and cfg.architecture == "dcgan":
            raise ConfigError("flavor", f"{data.dataset} holds 2-D points; the {cfg.architecture} networks draw "
                                        f"images: use flavor: points (or model.architecture: mlp)")
        size = data.image_size
        if not self.points and cfg.architecture == "dcgan" and (size < 8 or size & (size - 1)):
            raise GensuiteError(f"flavor dcgan needs a power-of-two image size >= 8, the {data.dataset} shards are "
                                f"{size}x{size}; rebuild them with: python shards/build.py {data.dataset} --size 32 "
                                f"(or use flavor: mlp)")
        self.objective = LOSSES[cfg.loss]
        self.penalty = self.objective.gradient_penalty if cfg.gradient_penalty is None else cfg.gradient_penalty
        self.clip = self.objective.clip_weights if cfg.clip_weights is None else cfg.clip_weights
        self.critic_norm = cfg.critic_norm or self.objective.critic_norm
        if self.penalty and self.critic_norm == "batch" and cfg.architecture == "dcgan":
            raise ConfigError("model.critic_norm", "BatchNorm couples the samples of a batch, so the per-sample "
                                                   "gradient penalty no longer constrains D(x) alone: use layer "
                                                   "or none")
        self.g_activation = cfg.g_activation or ("relu" if cfg.architecture == "dcgan" else "leaky_relu")

    @property
    def conditional(self) -> bool:
        return self.cfg.conditioning != "none"

    def build_networks(self):
        c, d = self.cfg, self.data
        classes = d.num_classes if self.conditional else 0
        # Label channels (CGAN without projection) are concatenated before packing.
        label_channels = classes if c.conditioning == "cgan" and not c.projection else 0
        g_input = c.latent_dim + classes
        if c.architecture == "acgan":
            return {"G": ACGANGenerator(g_input, d.channels),
                    "D": ACGANDiscriminator(d.channels, d.num_classes, c.d_noise_std, d.image_size)}
        if c.architecture == "dcgan":
            G = DCGANGenerator(g_input, d.channels, d.image_size, c.ngf, self.g_activation)
            D = DCGANDiscriminator((d.channels + label_channels) * c.pack, d.image_size, c.ndf, self.critic_norm)
        else:
            G = MLPGenerator(g_input, d.shape, c.g_hidden, self.g_activation, bounded=not self.points)
            D = MLPDiscriminator(((d.shape[0] + label_channels) * c.pack, *d.shape[1:]), c.d_hidden, c.d_dropout)
        return {"G": G, "D": ProjectionDiscriminator(D, classes) if c.projection else D}

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """PacGAN: consecutive groups of ``pack`` samples side by side along the channel (feature) axis."""
        m = self.cfg.pack
        if m == 1:
            return x
        if len(x) % m:
            raise ConfigError("model.pack", f"the per-rank batch of {len(x)} is not a multiple of pack={m}; "
                                            f"change train.batch_size or model.pack")
        return x.reshape(len(x) // m, m * x.shape[1], *x.shape[2:])

    def players(self):
        return [Player("D", ("D",), steps=self.cfg.n_critic), Player("G", ("G",), consumes_data=False)]

    def noise(self, n: int, device) -> torch.Tensor:
        return torch.randn(n, self.cfg.latent_dim, device=device)

    def one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.data.num_classes).to(like.dtype)

    def generate(self, G, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """G(z), or G(z | y) with the label's one-hot concatenated to z (CGAN and ACGAN)."""
        return G(torch.cat([z, self.one_hot(y, z)], dim=1) if self.conditional else z)

    def discriminate(self, D, x: torch.Tensor, y: torch.Tensor | None, state=None):
        """D's source output per (packed) sample and, for ACGAN, its class logits (else None). CGAN
        without projection sees the label as constant one-hot channels (features for points).
        ``state``: D's parameters to use instead of its own (the unrolled look-ahead)."""
        if self.cfg.conditioning == "cgan" and not self.cfg.projection:
            onehot = self.one_hot(y, x)
            x = torch.cat([x, onehot[:, :, None, None].expand(-1, -1, *x.shape[2:]) if x.dim() == 4 else onehot], 1)
        args = (self.packed(x), y) if self.cfg.projection else (self.packed(x),)
        out = D(*args) if state is None else call(D, state, *args)
        return (out[:, 0], out[:, 1:]) if self.cfg.conditioning == "acgan" else (out, None)

    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        real = batch["x"] if self.points else batch["x"] * 2 - 1  # images: G's tanh range
        # Conditional GANs generate for the batch's own labels: fakes follow the data's label distribution.
        y = batch["y"] if self.conditional else None
        z = self.noise(len(real), real.device)
        target = 1.0 - self.cfg.label_smoothing
        D = nets["D"]
        if player == "D":
            with torch.no_grad():
                fake = self.generate(nets["G"], z, y)
            (real_out, real_cls), (fake_out, fake_cls) = self.discriminate(D, real, y), self.discriminate(D, fake, y)
            loss = self.objective.d_loss(real_out, fake_out, target)
            terms = {"real_logit": real_out.mean(), "fake_logit": fake_out.mean()}
            if self.objective.d_loss is d_wasserstein:
                terms["critic_gap"] = real_out.mean() - fake_out.mean()  # the W1 estimate
            else:  # the decision threshold: 0 for logits and hinge, ½ for least squares' 0/1 coding
                threshold = 0.5 if self.cfg.loss == "least_squares" else 0.0
                terms["real_acc"] = (real_out > threshold).float().mean()
                terms["fake_acc"] = (fake_out < threshold).float().mean()
            if real_cls is not None:  # ACGAN: D also maximises the class log-likelihood L_C of both
                terms["class_loss"] = F.cross_entropy(real_cls, y) + F.cross_entropy(fake_cls, y)
                terms["class_acc_real"] = (real_cls.argmax(1) == y).float().mean()
                terms["class_acc_fake"] = (fake_cls.argmax(1) == y).float().mean()
                loss = loss + terms["class_loss"]
            source = lambda x: self.discriminate(D, x, y)[0]  # noqa: E731  (D as a function of the image)
            if self.penalty:
                terms["gradient_penalty"] = gradient_penalty(source, real, fake)
                loss = loss + self.penalty * terms["gradient_penalty"]
            if self.cfg.r1_gamma:
                terms["r1"] = r1_penalty(source, real)
                loss = loss + self.cfg.r1_gamma / 2 * terms["r1"]
            return {"loss": loss, **terms}
        dead = DeadUnits(nets.bare("G")) if self.log_step else None  # a logged diagnostic only
        fake = self.generate(nets["G"], z, y)
        logged = {"dead_units": dead.fraction()} if dead is not None else {}  # (removes the hooks)
        state = None
        if self.cfg.unroll_steps:
            def d_loss(s):
                return self.objective.d_loss(self.discriminate(D, real, y, s)[0], self.discriminate(D, fake, y, s)[0],
                                             target)
            state = unrolled_state(D, d_loss, self.cfg.unroll_steps, self.cfg.unroll_lr)
        fake_out, fake_cls = self.discriminate(D, fake, y, state)
        terms = {"fake_logit": fake_out.mean(), **logged}
        loss = self.objective.g_loss(fake_out)
        if fake_cls is not None:  # ACGAN: G maximises L_C too
            terms["class_loss"] = F.cross_entropy(fake_cls, y)
            loss = loss + terms["class_loss"]
        return {"loss": loss, **terms}

    def validation_terms(self, nets: Networks, batch: Batch, step: int):
        # PacGAN's D judges whole groups of `pack` samples: a held-out batch (eval.batch_size, or a split
        # smaller than that) is cut to whole groups rather than refused after training.
        keep = len(batch["x"]) - len(batch["x"]) % self.cfg.pack
        if keep == 0:
            raise ConfigError("eval.batch_size", f"validation batches of {len(batch['x'])} hold no group of "
                                                 f"pack={self.cfg.pack} samples; use at least {self.cfg.pack}")
        return super().validation_terms(nets, {k: v[:keep] for k, v in batch.items()}, step)

    def loss_needs_gradients(self, player: str) -> bool:
        """D's gradient penalty and R1 differentiate D at its input; G's unrolled loss differentiates D's
        look-ahead steps: their validation terms need autograd (on inputs only, parameters are frozen)."""
        if player == "D":
            return bool(self.penalty or self.cfg.r1_gamma)
        return self.cfg.unroll_steps > 0

    def after_step(self, player: str, nets: Networks, step: int) -> None:
        if player == "D" and self.clip:
            clip_parameters(nets.bare("D"), self.clip)

    def fixed_inputs(self, n: int, generator: torch.Generator):
        y = self.fixed_labels(n)  # conditional: one grid row per class
        return {"z": torch.randn(len(y), self.cfg.latent_dim, generator=generator), "y": y}

    def sample(self, nets: Networks, fixed):
        out = self.generate(nets.ema("G"), fixed["z"], fixed.get("y"))
        return out if self.points else (out + 1) / 2
