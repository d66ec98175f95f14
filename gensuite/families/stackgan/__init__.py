"""StackGAN text-to-image (Zhang et al. 2017): Stage I (text -> 64 px) and Stage II (Stage-I image
and text -> 256 px), with conditioning augmentation and a matching-aware discriminator.

The ``paper`` flavor is the authors' StackGAN-Pytorch birds configuration, network for network
(parameter counts in the tests). Stage II keeps the Stage-I generator as the frozen network ``G1``,
loaded from the Stage-I run named by ``model.stage1``; its own ``G`` refines G1's images.
Batches carry ``embeddings`` (N, 10, T): each step conditions every image on one of its captions at
random (or the mean of ``embeddings_per_step`` of them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from gensuite.errors import ConfigError, GensuiteError
from gensuite.families.stackgan.networks import (Stage1Discriminator, Stage1Generator, Stage2Discriminator,
                                                 Stage2Generator)
from gensuite.families.stackgan.objectives import discriminator_loss, generator_loss
from gensuite.registry import Batch, GenerativeFamily, Networks, Player, register

STAGE1_JOB = "jobs/stackgan_stage1.yaml"
# What Stage II needs to rebuild the Stage-I generator (copied from the Stage-I run's config).
STAGE1_KEYS = ("z_dim", "c_dim", "ngf", "stage1_upsamples", "upsample", "ca_activation")
CROP_RATIO = 64 / 76  # the original loads images at 76/64 of the training size and crops randomly


@dataclass
class StackGANConfig:
    stage: int = 1
    stage1: str = ""  # Stage II: the Stage-I run directory or checkpoint whose G becomes the frozen G1
    z_dim: int = 100
    c_dim: int = 128  # conditioning augmentation output (mu and log-variance each c_dim)
    ngf: int = 128  # generator width (the original's GAN.GF_DIM): Stage I starts at 8 ngf channels
    ndf: int = 64  # discriminator width (GAN.DF_DIM)
    stage1_upsamples: int = 4  # Stage-I output side 4 * 2^n (4: 64 px); Stage II is 4x that
    res_blocks: int = 4  # Stage-II residual blocks (GAN.R_NUM)
    upsample: Literal["nearest_conv", "pixelshuffle"] = "nearest_conv"
    kl_weight: float = 2.0  # TRAIN.COEFF.KL
    # relu: StackGAN-Pytorch's conditioning augmentation; leaky_relu: the TensorFlow original's (see networks)
    ca_activation: Literal["relu", "leaky_relu"] = "relu"
    # unit_rms rescales each text embedding to norm sqrt(T) before conditioning augmentation: unit-norm
    # encoders (hashing, sentence) would otherwise give a code mu ~ 0.01, drowned by its unit noise.
    # auto: unit_rms for those, none for the char-CNN-RNN embeddings the paper settings were made for.
    text_scaling: Literal["auto", "none", "unit_rms"] = "auto"
    embeddings_per_step: int = 1  # 1: one caption's embedding at random; k: the mean of k random ones
    crop: bool = True  # random crop of 64/76 of the stored image, as the original
    flip: bool = True  # random horizontal flip; turn off when captions say left or right (shapes)
    # full: Stage II draws the whole image (the paper); residual: it adds a correction to the upsampled
    # Stage-I image before the final tanh (LAPGAN-style), keeping Stage I's colours and layout from the start
    refine: Literal["full", "residual"] = "full"
    channels_last: bool = False
    # Filled from the Stage-I run when Stage II starts, so a Stage-II checkpoint rebuilds G1 alone.
    stage1_generator: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ConfigError("model.stage", f"must be 1 or 2, got {self.stage}")
        if self.stage == 2 and not self.stage1:
            raise ConfigError("model.stage1", f"Stage II needs the Stage-I run it builds on; train {STAGE1_JOB} "
                                              "first and set model.stage1 to its run directory")
        if self.stage1:
            self.stage1 = str(Path(self.stage1).expanduser().absolute())  # SLURM tasks start elsewhere
        for name in ("z_dim", "c_dim", "ngf", "ndf", "embeddings_per_step"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", "must be >= 1")
        if self.stage1_upsamples < 1:
            raise ConfigError("model.stage1_upsamples", "must be >= 1")
        if self.res_blocks < 0:
            raise ConfigError("model.res_blocks", "must be >= 0")
        if self.ngf % 4:
            raise ConfigError("model.ngf", f"must be a multiple of 4 (Stage II narrows to ngf/4), got {self.ngf}")
        if self.kl_weight < 0:
            raise ConfigError("model.kl_weight", "must be >= 0")


def stage1_settings(source: str) -> dict[str, Any]:
    """The Stage-I generator settings of a Stage-I run, or a one-line error naming the job to run."""
    from gensuite import checkpoint as ckpt

    try:
        state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(source))
    except GensuiteError as e:
        raise ConfigError("model.stage1", f"{e}; run the Stage-I job first: python launch/submit.py "
                                          f"{STAGE1_JOB}") from None
    config = state["config"]
    if config["family"] != "stackgan" or config["model"].get("stage") != 1:
        raise ConfigError("model.stage1", f"{source} is a {config['family']} run, not StackGAN Stage I; "
                                          f"point it at the run of {STAGE1_JOB}")
    model = config["model"]  # settings a run predates take their defaults
    return {k: model.get(k, StackGANConfig.__dataclass_fields__[k].default) for k in STAGE1_KEYS}


@register
class StackGAN(GenerativeFamily):
    name = "stackgan"
    config_class = StackGANConfig
    flavors = {
        "paper": {"z_dim": 100, "c_dim": 128, "ngf": 128, "ndf": 64, "stage1_upsamples": 4, "res_blocks": 4},
        # CPU-sized: 16 px Stage I, 64 px Stage II (the shapes demo).
        "small": {"z_dim": 32, "c_dim": 64, "ngf": 32, "ndf": 16, "stage1_upsamples": 2, "res_blocks": 2},
        "debug": {"z_dim": 8, "c_dim": 8, "ngf": 8, "ndf": 4, "stage1_upsamples": 2, "res_blocks": 1},
    }
    debug_dataset = "shapes"
    held_out_conditions = 1000  # test images whose captions fixed inputs and evaluations draw from
    condition_fields = frozenset({"embeddings", "captions"})

    @classmethod
    def complete_config(cls, cfg: StackGANConfig) -> StackGANConfig:
        """Stage II copies its Stage-I generator's settings from the Stage-I run once, into the
        run's own config, so its checkpoints rebuild G1 without that run."""
        if cfg.stage == 2 and not cfg.stage1_generator:
            return dataclasses.replace(cfg, stage1_generator=stage1_settings(cfg.stage1))
        return cfg

    def __init__(self, cfg: StackGANConfig, data):
        super().__init__(cfg, data)
        if "embeddings" not in data.fields:
            raise ConfigError("data.dataset", f"{data.dataset} has no text embeddings; StackGAN trains on "
                                              f"captioned shard sets: python shards/build.py shapes (or cub --src DIR)")
        self.text_dim = int(data.fields["embeddings"]["shape"][-1])
        # Without the Stage-I settings (gensuite summary before Stage I ran), G1 is shown with this job's.
        defaults = {k: StackGANConfig.__dataclass_fields__[k].default for k in STAGE1_KEYS}
        self.g1 = {**defaults, **cfg.stage1_generator} if cfg.stage1_generator else \
            {k: getattr(cfg, k) for k in STAGE1_KEYS}
        self.stage1_size = 4 * 2 ** self.g1["stage1_upsamples"]
        self.size = self.stage1_size * (4 if cfg.stage == 2 else 1)
        # Stage II learns from the high-resolution copy when the shards have one (CUB's 304 px).
        self.image_key = "hires" if cfg.stage == 2 and "hires" in data.fields else "x"
        encoder = data.text_encoder.get("name", "char_cnn_rnn")
        self.unit_rms = cfg.text_scaling == "unit_rms" or (cfg.text_scaling == "auto" and encoder != "char_cnn_rnn")
        self.conditions: dict[str, Any] = {}  # held-out embeddings (M, 10, T) and captions

    # -- networks --------------------------------------------------------------------------------
    def build_networks(self):
        c, g1 = self.cfg, self.g1
        stage1 = Stage1Generator(g1["z_dim"], g1["c_dim"], self.text_dim, g1["ngf"], g1["stage1_upsamples"],
                                 g1["upsample"], g1["ca_activation"])
        if c.stage == 1:
            nets = {"G": stage1, "D": Stage1Discriminator(c.c_dim, c.ndf, self.size)}
        else:
            nets = {"G1": stage1, "G": Stage2Generator(c.c_dim, self.text_dim, c.ngf, c.res_blocks, c.upsample,
                                                       c.ca_activation, c.refine),
                    "D": Stage2Discriminator(c.c_dim, c.ndf, self.size)}
        if c.channels_last:
            for net in nets.values():  # the constructors already drew the original init
                net.to(memory_format=torch.channels_last)
        return nets

    def players(self):
        return [Player("D", ("D",)), Player("G", ("G",), consumes_data=False)]

    def frozen_networks(self):
        return {"G1": (self.cfg.stage1, "G")} if self.cfg.stage == 2 else {}

    def generate(self, nets: Networks, z: torch.Tensor, embedding: torch.Tensor, ema: bool = False):
        """(image in [-1, 1], mu, logvar, Stage-I image or None) of this stage."""
        if self.unit_rms:
            embedding = embedding * (embedding.shape[-1] ** 0.5 / embedding.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        generator = nets.ema("G") if ema else nets["G"]
        if self.cfg.stage == 1:
            image, mu, logvar = generator(z, embedding)
            return image, mu, logvar, None
        with torch.no_grad():  # G1 is frozen: its image is an input to Stage II
            low = nets["G1"](z, embedding)[0]
        image, mu, logvar = generator(low, embedding)
        return image, mu, logvar, low

    # -- training --------------------------------------------------------------------------------
    def pick_embedding(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, K, T) -> (N, T): one of each image's K caption embeddings at random, or the mean of
        ``embeddings_per_step`` distinct ones."""
        n, k, _ = embeddings.shape
        take = min(self.cfg.embeddings_per_step, k)
        chosen = torch.rand(n, k, device=embeddings.device).argsort(dim=1)[:, :take]
        return torch.gather(embeddings, 1, chosen[:, :, None].expand(-1, -1, embeddings.shape[2])).mean(1)

    def real_images(self, batch: Batch) -> torch.Tensor:
        """The stored images randomly cropped (64/76 of their side) and flipped, at this stage's
        size, in [-1, 1]."""
        images = batch[self.image_key]
        n, _, h, w = images.shape
        if self.cfg.crop:
            side = max(1, round(min(h, w) * CROP_RATIO))
            top = torch.randint(0, h - side + 1, (n,)).tolist()
            left = torch.randint(0, w - side + 1, (n,)).tolist()
            images = torch.stack([im[:, t:t + side, l_:l_ + side] for im, t, l_ in zip(images, top, left)])
        if self.cfg.flip:
            flip = torch.rand(n, device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                                   align_corners=False)
        images = images * 2 - 1
        return images.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else images

    @staticmethod
    def mismatched(labels: torch.Tensor) -> torch.Tensor:
        """For each sample, the index of a random other sample of another class (the "wrong"
        caption); the next sample when the whole batch is one class."""
        n = len(labels)
        other = labels[:, None] != labels[None, :]
        scores = torch.rand(n, n, device=labels.device) * other
        fallback = (torch.arange(n, device=labels.device) + 1) % n
        return torch.where(other.any(1), scores.argmax(1), fallback)

    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        embedding = self.pick_embedding(batch["embeddings"])
        z = torch.randn(len(embedding), self.g1["z_dim"], device=embedding.device)
        D = nets["D"]
        if player == "D":
            real = self.real_images(batch)
            with torch.no_grad():
                fake, mu, _, _ = self.generate(nets, z, embedding)
            # One pass over [real; fake]: BatchNorm statistics per half, as two separate passes.
            features = D.features(torch.cat([real, fake.to(real.dtype)]), groups=2)
            real_h, fake_h = features.chunk(2)
            wrong_mu = mu[self.mismatched(batch["y"])] if "y" in batch else mu.roll(1, 0)
            uncond = D.uncond_logits is not None
            return discriminator_loss(D.cond_logits(real_h, mu), D.cond_logits(real_h, wrong_mu),
                                      D.cond_logits(fake_h, mu),
                                      D.uncond_logits(real_h) if uncond else None,
                                      D.uncond_logits(fake_h) if uncond else None)
        fake, mu, logvar, _ = self.generate(nets, z, embedding)
        features = D.features(fake)
        cond_mu = mu.detach()  # D judges the pair against the text's mean code, as the original
        return generator_loss(D.cond_logits(features, cond_mu), mu, logvar, self.cfg.kl_weight,
                              D.uncond_logits(features) if D.uncond_logits is not None else None)

    # -- held-out conditions, sampling and visuals ---------------------------------------------------
    def set_conditions(self, held_out: Batch) -> None:
        captions = held_out.get("captions") or [[] for _ in range(len(held_out["embeddings"]))]
        self.conditions = {"embeddings": held_out["embeddings"].float().cpu(), "captions": list(captions)}

    def state_dict(self):
        return {"conditions": self.conditions}

    def load_state_dict(self, state):
        self.conditions = state.get("conditions", {})

    def with_text(self, fixed, embedding):
        """Every sample drawn for one new caption's (1, T) embedding (``gensuite sample --text``)."""
        return {**fixed, "embedding": embedding.to(fixed["embedding"]).expand(len(fixed["embedding"]), -1)}

    def fixed_inputs(self, n: int, generator: torch.Generator):
        """Noise, and the embedding of a random caption of a random held-out image per sample;
        ``caption`` = image index * captions per image + caption index; ``noise_seed`` makes the
        conditioning augmentation's noise a function of the inputs."""
        if not self.conditions:
            raise GensuiteError("stackgan: no held-out captions to sample for; this run's checkpoint predates "
                                "them, resume it once to store them")
        bank = self.conditions["embeddings"]
        images, per_image = bank.shape[:2]
        caption = torch.randint(0, images * per_image, (n,), generator=generator)
        return {"z": torch.randn(n, self.g1["z_dim"], generator=generator),
                "embedding": bank.flatten(0, 1)[caption], "caption": caption,
                "noise_seed": torch.randint(0, 2**62, (1,), generator=generator).expand(n)}

    @contextlib.contextmanager
    def seeded(self, fixed):
        """The conditioning augmentation draws eps from the global RNG: fork it, seeded by the inputs,
        so the same fixed inputs give the same images and training's RNG stream is untouched."""
        device = fixed["z"].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(fixed["noise_seed"][0]))
            yield

    def sample(self, nets: Networks, fixed):
        with self.seeded(fixed):
            image = self.generate(nets, fixed["z"], fixed["embedding"], ema=True)[0]
        return (image.float() + 1) / 2

    def caption_text(self, index: int) -> str:
        captions = self.conditions.get("captions") or []
        per_image = self.conditions["embeddings"].shape[1]
        image, k = divmod(int(index), per_image)
        texts = captions[image] if image < len(captions) else []
        return texts[k] if k < len(texts) else f"(test image {image}, caption {k})"

    def visuals(self, nets: Networks, fixed, reference: Batch):
        with self.seeded(fixed):
            image, _, _, low = self.generate(nets, fixed["z"], fixed["embedding"], ema=True)
        out = {"samples": (image.float() + 1) / 2}
        if low is not None:
            out["stage1_samples"] = (low.float() + 1) / 2
        captioned = self.fixed_inputs(10, torch.Generator().manual_seed(0))
        captioned = {k: v.to(fixed["z"].device) for k, v in captioned.items()}
        with self.seeded(captioned):
            image, _, _, low = self.generate(nets, captioned["z"], captioned["embedding"], ema=True)
        texts = [self.caption_text(i) for i in captioned["caption"]]
        out["captioned"] = captioned_figure(texts, (image.float() + 1) / 2,
                                            (low.float() + 1) / 2 if low is not None else None)
        return out


def captioned_figure(captions: list[str], images: torch.Tensor, stage1: torch.Tensor | None):
    """One column per caption: the text, the Stage-I image and (Stage II) the Stage-II image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("Stage I", stage1), ("Stage II", images)] if stage1 is not None else [("Stage I", images)]
    fig, axes = plt.subplots(len(rows), len(captions), figsize=(2.0 * len(captions), 2.0 * len(rows) + 1.2),
                             squeeze=False)
    for col, text in enumerate(captions):
        for row, (label, batch) in enumerate(rows):
            ax = axes[row][col]
            ax.imshow(batch[col].clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label)
        axes[0][col].set_title(textwrap.fill(text, 22), fontsize=7)
    fig.tight_layout()
    return fig


from gensuite.families.stackgan import caption_match  # noqa: E402,F401  (registers the caption_match metric)
