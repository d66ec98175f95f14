"""VAE, β-VAE, conditional VAE (CVAE) and hierarchical VAE, with remedies for posterior collapse;
categorical latents with the Gumbel-softmax relaxation (``categorical.py``); an EfficientNet-B0
encoder (``effnet.py``). On 2-D points (the ``points`` flavor) the MLPs model x with a Gaussian of
learned variance, and samples are draws from p(x|z), not the decoder's mean: a point cloud, shown as a
scatter plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from gensuite.errors import ConfigError
from gensuite.families.vae import categorical as cat
from gensuite.families.vae.networks import Decoder, Encoder, Prior, UpperEncoder
from gensuite.families.vae.objective import (bernoulli_nll, free_bits, gaussian_nll, importance_bounds, kl_weight,
                                             layer_kl_units, log_normal_units, reparameterize)
from gensuite.registry import Batch, GenerativeFamily, Networks, per_sample_normal, register


@dataclass
class VAEConfig:
    latent_dim: int = 16  # one stochastic layer; replaced by `hierarchy` when that is set
    # z: a diagonal Gaussian, or `categorical_vars` one-hot categoricals of `categories` each (Gumbel-softmax)
    latent: Literal["gaussian", "categorical"] = "gaussian"
    categorical_vars: int = 20  # categorical: N variables (latent_dim is ignored)
    categories: int = 10  # categorical: K categories per variable
    temperature: float = 1.0  # categorical: initial λ of the relaxation
    temperature_min: float = 0.5  # categorical: λ = max(temperature_min, temperature * exp(-anneal_rate * step))
    anneal_rate: float = 0.0  # categorical: r of the temperature schedule (0: constant λ)
    straight_through: bool = False  # categorical: hard one-hot forward pass, the relaxed sample's gradient
    encoder: Literal["mlp", "conv", "efficientnet_b0"] = "mlp"
    hidden: list[int] = field(default_factory=lambda: [512, 256])  # MLP encoder widths
    conv_channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # conv encoder, each + 2x2 max-pool
    # efficientnet_b0: a torchvision efficientnet_b0 state dict file (or of its `features`), or `random`
    encoder_weights: Optional[str] = None
    encoder_resize: int = 64  # efficientnet_b0: images are resized to this many pixels
    freeze_encoder: bool = False  # efficientnet_b0: keep the trunk's weights (and batch-norm statistics) fixed
    decoder_hidden: list[int] = field(default_factory=lambda: [256, 512])
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    # gaussian only: fixed_std, one learned std per pixel, or σ(z) = min_std + softplus(a head on the decoder)
    variance: Literal["fixed", "learned", "network"] = "fixed"
    fixed_std: float = 1.0  # 1.0: the reconstruction term is 0.5 * squared error + const (MSE)
    min_std: float = 0.01  # variance: network keeps σ above this (constant pixels would make log p(x|z) → ∞)
    beta: float = 1.0  # weight of the KL term (β-VAE)
    conditional: bool = False  # CVAE: the label's one-hot enters encoder and decoder
    prior: Literal["standard", "learned"] = "standard"  # p(z_L): N(0, I) or a learned N(μ_z, σ_z² I)
    # Hierarchical VAE: latent sizes of z_1 .. z_L (bottom to top), p(x|z_1) p(z_1|z_2) .. p(z_L),
    # q(z_1|x) q(z_2|z_1) .. q(z_L|z_{L-1}); [] is one layer of latent_dim.
    hierarchy: list[int] = field(default_factory=list)
    latent_hidden: list[int] = field(default_factory=lambda: [64])  # MLP widths of each q(z_l+1|z_l), p(z_l|z_l+1)
    skip: bool = False  # the top layer z_L also enters the decoder (a skip connection past z_1)
    # Against posterior collapse:
    free_bits: float = 0.0  # λ nats per latent unit: the KL term of each unit is max(λ, batch mean of its KL)
    kl_anneal: Literal["none", "linear", "cyclical"] = "none"  # schedule of the KL term's weight (times beta)
    anneal_steps: int = 1000  # linear: warm-up steps to weight 1; cyclical: the period
    anneal_ratio: float = 0.5  # cyclical: the fraction of each period over which the weight rises

    def latent_sizes(self) -> list[int]:
        return list(self.hierarchy) or [self.latent_dim]

    def __post_init__(self):
        if self.latent_dim < 1:
            raise ConfigError("model.latent_dim", "must be >= 1")
        if self.beta < 0:
            raise ConfigError("model.beta", "must be >= 0")
        if self.fixed_std <= 0:
            raise ConfigError("model.fixed_std", "must be > 0")
        for name in ("hidden", "conv_channels", "decoder_hidden", "latent_hidden"):
            if any(w < 1 for w in getattr(self, name)):
                raise ConfigError(f"model.{name}", "layer widths must be >= 1")
        if self.variance != "fixed" and self.likelihood != "gaussian":
            raise ConfigError("model.variance", f"a {self.variance} variance needs likelihood: gaussian")
        if self.min_std <= 0:
            raise ConfigError("model.min_std", "must be > 0")
        if len(self.hierarchy) == 1:
            raise ConfigError("model.hierarchy", "give two or more layer sizes, e.g. [16, 8]; for one layer use "
                                                 "latent_dim and hierarchy: []")
        if any(size < 1 for size in self.hierarchy):
            raise ConfigError("model.hierarchy", "layer sizes must be >= 1")
        if self.skip and not self.hierarchy:
            raise ConfigError("model.skip", "a skip connection from the top layer needs a hierarchy, e.g. "
                                            "hierarchy: [16, 8]; or set skip: false")
        if self.free_bits < 0:
            raise ConfigError("model.free_bits", "must be >= 0 nats per unit (0: off)")
        if self.anneal_steps < 1:
            raise ConfigError("model.anneal_steps", "must be >= 1")
        if not 0 < self.anneal_ratio <= 1:
            raise ConfigError("model.anneal_ratio", "must be in (0, 1]")
        self._check_categorical()
        self._check_encoder()

    def _check_categorical(self):
        if self.latent != "categorical":
            if self.straight_through:
                raise ConfigError("model.straight_through", "applies to latent: categorical; set it to false")
            return
        if self.categorical_vars < 1:
            raise ConfigError("model.categorical_vars", "must be >= 1")
        if self.categories < 2:
            raise ConfigError("model.categories", "must be >= 2")
        if self.temperature <= 0 or self.temperature_min <= 0:
            raise ConfigError("model.temperature" if self.temperature <= 0 else "model.temperature_min", "must be > 0")
        if self.temperature_min > self.temperature:
            raise ConfigError("model.temperature_min", f"must be <= model.temperature ({self.temperature:g}): the "
                                                       f"schedule anneals downwards")
        if self.anneal_rate < 0:
            raise ConfigError("model.anneal_rate", "must be >= 0 (0: constant temperature)")
        if self.hierarchy:
            raise ConfigError("model.hierarchy", "a categorical latent is one layer; set hierarchy: [] or "
                                                 "latent: gaussian")
        if self.prior != "standard":
            raise ConfigError("model.prior", "a categorical latent has the uniform prior; set prior: standard or "
                                             "latent: gaussian")

    def _check_encoder(self):
        if self.encoder != "efficientnet_b0":
            for name in ("encoder_weights", "freeze_encoder"):
                if getattr(self, name):
                    raise ConfigError(f"model.{name}", f"applies to encoder: efficientnet_b0; remove it for "
                                                       f"encoder: {self.encoder}")
            return
        if not self.encoder_weights:
            raise ConfigError("model.encoder_weights", "efficientnet_b0 needs its weights: the path of torchvision's "
                                                       "efficientnet_b0 state dict (efficientnet_b0_rwightman-7f5810bc"
                                                       ".pth), or random for a random initialisation")
        if self.encoder_resize < 16:
            raise ConfigError("model.encoder_resize", "must be >= 16 pixels (efficientnet_b0 downsamples by 32)")

    @property
    def categorical(self) -> bool:
        return self.latent == "categorical"

    @property
    def pretrained_encoder(self) -> bool:
        return self.encoder == "efficientnet_b0" and self.encoder_weights != "random"


@register
class VAE(GenerativeFamily):
    name = "vae"
    config_class = VAEConfig
    flavors = {
        "mlp": {"encoder": "mlp", "hidden": [512, 256], "decoder_hidden": [256, 512], "latent_dim": 16},
        # Assignment 000 P7: 3 conv layers (16, 32, 32) each followed by 2x2 max-pool; decoder 32 then 64.
        "conv": {"encoder": "conv", "conv_channels": [16, 32, 32], "decoder_hidden": [32, 64], "latent_dim": 16},
        "debug": {"encoder": "mlp", "hidden": [32], "decoder_hidden": [32], "latent_dim": 2},
        # Assignment 004 Q2: two stochastic layers, z_1 of 16 and z_2 of 8 units, MLPs throughout.
        "hvae": {"encoder": "mlp", "hidden": [512, 256], "decoder_hidden": [256, 512], "hierarchy": [16, 8],
                 "latent_hidden": [64]},
        # Assignment 000 Q2 / Jang et al. 2017: 20 categorical variables of 10 categories, Gumbel-softmax,
        # 512-256 MLP encoder and 256-512 MLP decoder, λ annealed from 1 towards 0.5.
        # 2-D points (moons, ring, grid): 128-128 MLPs, a 2-D latent (its scatter is drawn), a Gaussian
        # p(x|z) with one learned σ per coordinate (a fixed σ = 1 would blur the data away).
        "points": {"encoder": "mlp", "hidden": [128, 128], "decoder_hidden": [128, 128], "latent_dim": 2,
                   "likelihood": "gaussian", "variance": "learned"},
        "gumbel": {"latent": "categorical", "categorical_vars": 20, "categories": 10, "encoder": "mlp",
                   "hidden": [512, 256], "decoder_hidden": [256, 512], "temperature": 1.0, "temperature_min": 0.5,
                   "anneal_rate": 3e-4},
    }

    @classmethod
    def complete_config(cls, cfg: VAEConfig) -> VAEConfig:
        if cfg.pretrained_encoder:  # checked before the run starts (and by `gensuite validate --data`)
            from gensuite.families.vae.effnet import check_weights_file

            check_weights_file(cfg.encoder_weights)
        return cfg

    def __init__(self, cfg: VAEConfig, data):
        super().__init__(cfg, data)
        self.points = data.kind == "points"
        # Gaussian p(x|z) on points: samples are draws x ~ p(x|z), with noise among the fixed inputs.
        self.draws_points = self.points and cfg.likelihood == "gaussian"
        if cfg.conditional and data.num_classes < 2:
            raise ConfigError("model.conditional", f"dataset {data.dataset} has no class labels; set it to false")
        if cfg.encoder == "conv" and (data.kind != "image" or data.image_size < 2 ** len(cfg.conv_channels)):
            raise ConfigError("model.encoder", f"conv needs images of at least {2 ** len(cfg.conv_channels)} pixels; "
                                               f"use encoder: mlp for {data.dataset}")
        if cfg.encoder == "efficientnet_b0" and data.kind != "image":
            raise ConfigError("model.encoder", f"efficientnet_b0 encodes images; use encoder: mlp for {data.dataset}")
        self.cond_dim = data.num_classes if cfg.conditional else 0
        self.categorical = cfg.categorical
        # A categorical latent is one layer of N·K one-hot inputs to the decoder.
        self.sizes = [cfg.categorical_vars * cfg.categories] if self.categorical else cfg.latent_sizes()
        self.has_prior_network = len(self.sizes) > 1 or cfg.prior == "learned"
        self.initializes_from_data = cfg.pretrained_encoder  # initialize() reads the encoder's weights file

    @property
    def conditional(self) -> bool:
        return self.cond_dim > 0

    def build_networks(self):
        c, shape, sizes = self.cfg, self.data.shape, self.sizes
        nets = {
            "encoder": Encoder(shape, sizes[0], self.cond_dim, c.encoder, c.hidden, c.conv_channels,
                               categorical=self.categorical, resize=c.encoder_resize, freeze=c.freeze_encoder),
            "decoder": Decoder(shape, sizes[0] + (sizes[-1] if c.skip else 0), self.cond_dim, c.decoder_hidden,
                               learned_variance=c.likelihood == "gaussian" and c.variance == "learned",
                               std_head=c.likelihood == "gaussian" and c.variance == "network", min_std=c.min_std),
        }
        if len(sizes) > 1:
            nets["encoder_upper"] = UpperEncoder(sizes, c.latent_hidden)
        if self.has_prior_network:  # a plain VAE keeps its two networks (and its checkpoints' keys)
            nets["prior"] = Prior(sizes, c.latent_hidden, learned=c.prior == "learned")
        return nets

    def initialize(self, nets: Networks, batch: Batch) -> None:
        """The pretrained EfficientNet trunk from ``model.encoder_weights``, before the first step (a
        resumed run loads its checkpoint over it; sampling needs only the checkpoint)."""
        from gensuite.families.vae.effnet import trunk_state_dict

        nets["encoder"].features.load_trunk(trunk_state_dict(self.cfg.encoder_weights), self.cfg.encoder_weights)

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return F.one_hot(y, self.data.num_classes).float() if self.cond_dim else None

    def reconstruction_nll(self, out: torch.Tensor, log_std: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.likelihood == "bernoulli":
            return bernoulli_nll(out, x)
        if log_std is None:
            log_std = out.new_tensor(math.log(self.cfg.fixed_std))
        return gaussian_nll(out, log_std, x)

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z): a Bernoulli's probabilities, a Gaussian's mean (clamped to [0, 1] for pixels)."""
        if self.cfg.likelihood == "bernoulli":
            return out.sigmoid()
        return out if self.points else out.clamp(0, 1)

    # -- the stochastic layers ------------------------------------------------------------------------

    def posterior(self, get, x: torch.Tensor, cond: torch.Tensor | None, noise: list[torch.Tensor] | None = None):
        """(mean, log-variance, draw) of q(z_1|x), q(z_2|z_1), ... with draws mean + σ · noise[l] (fresh
        standard normals when ``noise`` is None); noise (k, N, U_l) gives k draws per sample.
        ``get``: how networks are fetched (``nets.__getitem__`` to train, ``nets.ema`` to evaluate)."""
        mean, log_var = get("encoder")(x, cond)
        if noise is None:
            z = reparameterize(mean, log_var)
        else:
            z = mean + (0.5 * log_var).exp() * noise[0]
            mean, log_var = mean.expand_as(z), log_var.expand_as(z)
        layers = [(mean, log_var, z)]
        if len(self.sizes) > 1:
            upper = noise[1:] if noise is not None else [torch.randn(*z.shape[:-1], u, device=z.device)
                                                         for u in self.sizes[1:]]
            layers += get("encoder_upper")(z, upper)
        return layers

    def prior_terms(self, get, zs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, log-variance) of p(z_1|z_2), ..., p(z_L) at the draws ``zs``."""
        if self.has_prior_network:
            return get("prior")(zs)
        return [(torch.zeros_like(zs[0]), torch.zeros_like(zs[0]))]

    def decoder_input(self, zs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([zs[0], zs[-1]], dim=-1) if self.cfg.skip else zs[0]

    def kl_units(self, q, p) -> list[torch.Tensor]:
        return layer_kl_units(q, p, standard_top=not self.has_prior_network)

    def logits(self, get, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Categorical latent: the logits of q(z|x), (B, N, K)."""
        return get("encoder")(x, cond)[0].unflatten(-1, (self.cfg.categorical_vars, self.cfg.categories))

    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        x, cond = batch["x"], self.condition(batch.get("y"))
        c, extra = self.cfg, {}
        if self.categorical:  # one relaxed draw of N one-hots; the KL to the uniform prior exactly
            logits = self.logits(nets.__getitem__, x, cond)
            tau = cat.temperature(step, c.temperature, c.temperature_min, c.anneal_rate)
            zs = [cat.gumbel_softmax(logits, tau, hard=c.straight_through).flatten(1)]
            kls = [cat.kl_uniform_units(logits)]  # per variable: (B, N)
            extra["temperature"] = x.new_tensor(tau)
        else:
            q = self.posterior(nets.__getitem__, x, cond)
            zs = [z for _, _, z in q]
            kls = self.kl_units(q, self.prior_terms(nets.__getitem__, zs))  # per layer: (N, U_l)
        out, log_std = nets["decoder"](self.decoder_input(zs), cond)
        recon = self.reconstruction_nll(out, log_std, x).mean()
        layer_kl = [k.sum(1).mean() for k in kls]
        kl = sum(layer_kl)
        penalty = sum(free_bits(k, c.free_bits) for k in kls) if c.free_bits > 0 else kl
        weight = kl_weight(step, c.kl_anneal, c.anneal_steps, c.anneal_ratio)
        neg_elbo = recon + kl
        terms = {"loss": recon + c.beta * weight * penalty, "recon": recon, "kl": kl, "elbo": -neg_elbo}
        if not self.points:  # a density of continuous points has no bits/dim of a discrete image
            terms["bpd"] = neg_elbo / (self.data.dim * math.log(2))
        if len(kls) > 1:  # model/kl_z1, model/kl_z2, ...: the ELBO's KL part layer by layer
            terms.update({f"kl_z{l + 1}": v for l, v in enumerate(layer_kl)})
        if c.kl_anneal != "none":
            terms["kl_weight"] = recon.new_tensor(weight)
        return {**terms, **extra}

    likelihood_values = ("elbo", "iwae")

    def log_likelihood(self, nets: Networks, batch: Batch, k: int, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = per_sample_normal(seeds, k, sum(self.sizes)).transpose(0, 1)  # (k, N, all latent units)
        return self.log_likelihood_bounds(nets, batch, k, eps=eps.to(batch["x"].device))

    @torch.no_grad()
    def log_likelihood_bounds(self, nets: Networks, batch: Batch, k: int = 64,
                              generator: torch.Generator | None = None,
                              eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample ELBO and k-sample importance-weighted bound on log p(x), in nats, from the
        EMA networks (bits/dim = −bound / (dim · ln 2)). ``eps``: standard normals (k, N, Σ U_l), the
        layers' units side by side, z_1's first."""
        x = batch["x"]
        if eps is None:
            eps = torch.randn((k, len(x), sum(self.sizes)), generator=generator)
        return importance_bounds(self.log_weights(nets, batch, eps.to(x.device, x.dtype)))

    def log_weights(self, nets: Networks, batch: Batch, eps: torch.Tensor) -> torch.Tensor:
        """log p(x, z_1..z_L) − log q(z_1..z_L | x) at the draws made from ``eps`` (k, N, Σ U_l): (k, N).
        Categorical latent: at one-hot draws z ~ q(z|x) made by Gumbel-max from ``eps`` (k, N, N·K)."""
        x, cond = batch["x"], self.condition(batch.get("y"))
        k_, b = eps.shape[:2]
        c = cond.repeat(k_, 1) if cond is not None else None
        if self.categorical:  # one-hot draws from q by Gumbel-max (the noise Gumbel from eps): the discrete model
            codes, log_q_over_p = cat.discrete_draws(self.logits(nets.ema, x, cond), eps)
            out, log_std = nets.ema("decoder")(codes.flatten(0, 1), c)
            return -self.reconstruction_nll(out, log_std, x.repeat(k_, *[1] * (x.dim() - 1))).view(k_, b) - log_q_over_p
        q = self.posterior(nets.ema, x, cond, list(eps.split(self.sizes, dim=-1)))
        zs = [z for _, _, z in q]
        out, log_std = nets.ema("decoder")(self.decoder_input(zs).flatten(0, 1), c)
        log_w = -self.reconstruction_nll(out, log_std, x.repeat(k_, *[1] * (x.dim() - 1))).view(k_, b)
        for (q_mean, q_log_var, z), (p_mean, p_log_var) in zip(q, self.prior_terms(nets.ema, zs)):
            log_w = log_w + (log_normal_units(z, p_mean, p_log_var) - log_normal_units(z, q_mean, q_log_var)).sum(-1)
        return log_w

    @torch.no_grad()
    def latent_statistics(self, nets: Networks, batch: Batch, k: int, seeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: E_q[z_l | x] (N, U_l) and the KL term per unit (N, U_l) of ``layer_kl_units``,
        from the EMA networks. E_q[z_1|x] is the encoder's mean; higher layers' are the mean of q(z_l|z_{l-1})
        averaged over k draws of the layers below, with the noise of sample i from ``seeds[i]``; the KL terms
        are averaged over the same k draws (exact for a single layer)."""
        x, cond = batch["x"], self.condition(batch.get("y"))
        eps = per_sample_normal(seeds, k, sum(self.sizes)).transpose(0, 1).to(x.device, x.dtype)
        q = self.posterior(nets.ema, x, cond, list(eps.split(self.sizes, dim=-1)))
        kls = self.kl_units(q, self.prior_terms(nets.ema, [z for _, _, z in q]))
        return [(mean.mean(0), kl.mean(0)) for (mean, _, _), kl in zip(q, kls)]

    def fixed_inputs(self, n: int, generator: torch.Generator):
        y = self.fixed_labels(n)
        if self.categorical:  # one-hot codes from the uniform prior
            fixed = {"z": cat.prior_codes(len(y), self.cfg.categorical_vars, self.cfg.categories, generator), "y": y}
        else:
            fixed = {"z": torch.randn(len(y), sum(self.sizes), generator=generator), "y": y}
        if self.draws_points:
            fixed["x_noise"] = torch.randn(len(y), *self.data.shape, generator=generator)
        return fixed

    def sample(self, nets: Networks, fixed):
        """Images: the decoder's mean (the usual VAE grid). Points under a Gaussian p(x|z): x ~ p(x|z),
        so the cloud has the model's spread."""
        noise = list(fixed["z"].split(self.sizes, dim=-1))
        zs = nets.ema("prior").sample(noise) if self.has_prior_network else noise  # categorical: the codes
        out, log_std = nets.ema("decoder")(self.decoder_input(zs), self.condition(fixed["y"]))
        if self.draws_points:
            log_std = out.new_tensor(math.log(self.cfg.fixed_std)) if log_std is None else log_std
            return out + log_std.exp() * fixed["x_noise"]
        return self.mean_image(out)

    def visuals(self, nets: Networks, fixed, reference: Batch):
        shown = len(reference["x"]) if self.points else 32  # points: every reference point's reconstruction
        x = reference["x"][:shown]
        y = reference.get("y")
        cond = self.condition(y[:shown]) if y is not None else None
        zero = [torch.zeros(len(x), u, device=x.device) for u in self.sizes]
        if self.categorical:  # no sampling: the most probable code of q(z|x)
            means = [cat.mode_codes(self.logits(nets.ema, x, cond))]
        else:
            means = [m for m, _, _ in self.posterior(nets.ema, x, cond, zero)]  # no sampling: each layer's mean
        recon = self.mean_image(nets.ema("decoder")(self.decoder_input(means), cond)[0])
        # Images: original, reconstruction, ... in pairs; points: the reconstructions' scatter.
        pairs = recon if self.points else torch.stack([x, recon], dim=1).flatten(0, 1)
        out = {"samples": self.sample(nets, fixed), "reconstructions": pairs}
        if self.sizes[0] == 2 and not self.categorical:
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


from . import metrics  # noqa: E402,F401  (registers the active_units metric)
