"""Normalising flows (assignment 003): RealNVP (Dinh et al. 2017), Glow (Kingma & Dhariwal 2018) and
rational-quadratic neural spline flows (Durkan et al. 2019), on 2-D points and on images, with the
exact log-likelihood (the ``HasLikelihood`` ability).

One network, ``flow`` (``networks.Flow``), maps data x to z with log |det ∂z/∂x|; samples are its
inverse applied to z ~ N(0, T² I). Points are modelled as they are; images are dequantised and
logit- or affine-transformed first (``objectives.py``), so their likelihood is the usual dequantised
bound on the discrete pixels' (bits/dim). Glow's ActNorm layers initialise from the first training
batch (``initialize``); the flag that says so is a buffer in the checkpoint, so a resumed run never
initialises again. The change of variables of assignment 003 P1a, Y = A·Z, is ``linear.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as default
from typing import Literal, Optional

import torch

from gensuite.errors import ConfigError
from gensuite.families.flow.density import grid_log_density
from gensuite.families.flow.layers import ActNorm
from gensuite.families.flow.networks import Flow, image_flow, point_flow, squeezes
from gensuite.families.flow.objectives import (affine_transform, dequantize, discrete_log_likelihood,
                                               flow_log_likelihood, inverse_affine_transform,
                                               inverse_logit_transform, logit_transform, per_sample_uniform)
from gensuite.figures import density_and_samples, grid_mass
from gensuite.registry import Batch, GenerativeFamily, Networks, register

INIT_NOISE_SEED = 0  # the dequantisation noise of the batch ActNorm initialises from (not the run's RNG)


def fits(kind: str, levels: int, shape: tuple[int, ...]) -> bool:
    """Whether (C, H, W) images go through ``levels`` levels: every squeeze needs even sides, and
    RealNVP's last checkerboard at least 2 pixels a side."""
    n = squeezes(kind, levels)
    return all(side % 2 ** n == 0 and side >= 2 ** n * (2 if kind == "realnvp" else 1) for side in shape[1:])


@dataclass
class FlowConfig:
    kind: Literal["realnvp", "glow", "spline"] = "realnvp"  # the layer design; spline: points only
    # points (N, D)
    layers: int = 8  # coupling layers; parities alternate, so each coordinate is moved every other layer
    hidden: list[int] = default(default_factory=lambda: [64, 64])  # the conditioners' MLP widths (ReLU)
    actnorm: bool = False  # realnvp, spline: an ActNorm (data-initialised) before each coupling; glow has it always
    bins: int = 8  # spline: K rational-quadratic pieces
    tail_bound: float = 3.0  # spline: B; the identity outside [-B, B]
    # images (N, C, H, W)
    levels: int = 3  # multi-scale levels; half the channels leave after each but the last
    steps: int = 3  # glow: flow steps per level; realnvp: couplings per stage (the last level: steps + 1)
    width: int = 64  # channels of each coupling's conv net
    res_blocks: int = 0  # residual blocks in each coupling's conv net (RealNVP's ResNet)
    split_prior: bool = False  # a learned Gaussian prior on each factored-out half (Glow)
    preprocess: Literal["logit", "affine"] = "logit"  # after dequantisation: logit (RealNVP) or affine (Glow)
    logit_alpha: float = 0.05  # logit: w = logit(α + (1 − 2α) y)
    affine_scale: float = 1.0  # affine: w = affine_scale · (y − ½)
    # affine couplings
    scale: Literal["tanh", "sigmoid"] = "tanh"  # tanh: log s = b·tanh(h/b); sigmoid: s = sigmoid(h + 2) (Glow)
    scale_bound: float = 2.0  # b: |log s| < b with scale tanh
    # samples and 2-D figures
    temperature: float = 1.0  # samples: z ~ N(0, T² I) (Glow's reduced-temperature samples for T < 1)
    plot_extent: Optional[float] = None  # the square [-a, a]²; None: around the reference data
    density_grid: int = 128  # grid points per axis of the density figure

    def __post_init__(self):
        for name in ("layers", "bins", "levels", "steps", "width", "density_grid"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", "must be >= 1")
        if self.res_blocks < 0:
            raise ConfigError("model.res_blocks", "must be >= 0")
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError("model.hidden", "needs at least one layer, each width >= 1")
        for name in ("tail_bound", "scale_bound", "affine_scale", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name}", "must be > 0")
        if not 0 < self.logit_alpha < 0.5:
            raise ConfigError("model.logit_alpha", "must be in (0, 0.5); use preprocess: affine for no logit")
        if self.plot_extent is not None and self.plot_extent <= 0:
            raise ConfigError("model.plot_extent", "must be > 0, or null for a square around the data")


@register
class NormalizingFlow(GenerativeFamily):
    name = "flow"
    config_class = FlowConfig
    flavors = {
        # RealNVP: points, 8 affine couplings (MLP 64-64, tanh-bounded log-scale); images, the paper's
        # multi-scale architecture (3 checkerboard, squeeze, 3 channel couplings per level, 4 checkerboard
        # couplings last) with 2-block ResNet conditioners of 64 channels, logit preprocessing.
        "realnvp": {"kind": "realnvp", "layers": 8, "hidden": [64, 64], "levels": 3, "steps": 3, "width": 64,
                    "res_blocks": 2, "preprocess": "logit", "scale": "tanh"},
        # Glow as in the paper's CIFAR-10 model (L = 3 levels, K = 32 steps, 512 channels, affine coupling,
        # learned split prior, affine preprocessing); on points, 8 steps of ActNorm, LU linear, coupling.
        "glow": {"kind": "glow", "layers": 8, "hidden": [64, 64], "levels": 3, "steps": 32, "width": 512,
                 "split_prior": True, "preprocess": "affine", "scale": "sigmoid"},
        # CPU-sized Glow for 32x32 images (jobs/glow_digits.yaml): 4 levels (the top one 2x2) of 3 steps,
        # 32-channel coupling nets; the logit preprocessing and the tanh-bounded scale, which trained
        # faster than the affine one and sigmoid(h + 2) on the digits (docs/families/flow.md).
        "glow_small": {"kind": "glow", "layers": 8, "hidden": [64, 64], "levels": 4, "steps": 3, "width": 32,
                       "split_prior": True, "preprocess": "logit", "scale": "tanh"},
        # Rational-quadratic spline couplings on points: the strong 2-D baseline (K = 8 bins on [-4, 4],
        # an ActNorm before each coupling keeps the data inside the bound).
        "spline": {"kind": "spline", "layers": 6, "hidden": [64, 64], "bins": 8, "tail_bound": 4.0,
                   "actnorm": True},
        "debug": {"kind": "glow", "layers": 2, "hidden": [16], "levels": 2, "steps": 1, "width": 8,
                  "split_prior": True, "preprocess": "affine", "scale": "sigmoid", "density_grid": 24},
    }
    debug_dataset = "digits"
    initializes_from_data = True  # ActNorm (glow, or actnorm: true); initialize() does nothing without one
    likelihood_values = ("log_px",)  # with log_likelihood below: the HasLikelihood ability

    def __init__(self, cfg: FlowConfig, data):
        super().__init__(cfg, data)
        self.image = data.kind == "image"
        if self.image:
            if cfg.kind == "spline":
                raise ConfigError("model.kind", f"spline couplings are for points; {data.dataset} holds images "
                                                f"(use realnvp or glow)")
            if not fits(cfg.kind, cfg.levels, data.shape):
                most = max((k for k in range(1, 9) if fits(cfg.kind, k, data.shape)), default=0)
                raise ConfigError("model.levels", f"{cfg.levels} levels of {cfg.kind} halve the side "
                                                  f"{squeezes(cfg.kind, cfg.levels)} times; {data.shape[1]}x"
                                                  f"{data.shape[2]} px allows at most {most}")
        elif data.dim < 2:
            raise ConfigError("data.dataset", f"a coupling needs at least 2 coordinates; {data.dataset} has {data.dim}")

    def build_networks(self):
        c = self.cfg
        if self.image:
            return {"flow": image_flow(c.kind, tuple(self.data.shape), c.levels, c.steps, c.width, c.res_blocks,
                                       c.scale, c.scale_bound, c.split_prior)}
        return {"flow": point_flow(c.kind, self.data.dim, c.layers, c.hidden, c.scale, c.scale_bound, c.bins,
                                   c.tail_bound, c.actnorm)}

    # -- the data's space and the flow's ----------------------------------------------------------
    def to_model_space(self, x: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Points: x itself (log-det 0). Images: dequantised with noise u, then the preprocessing."""
        if not self.image:
            return x, x.new_zeros(len(x))
        y = dequantize(x, u)
        if self.cfg.preprocess == "logit":
            return logit_transform(y, self.cfg.logit_alpha)
        return affine_transform(y, self.cfg.affine_scale)

    def to_data_space(self, w: torch.Tensor) -> torch.Tensor:
        if not self.image:
            return w
        if self.cfg.preprocess == "logit":
            return inverse_logit_transform(w, self.cfg.logit_alpha).clamp(0, 1)
        return inverse_affine_transform(w, self.cfg.affine_scale).clamp(0, 1)

    def data_log_likelihood(self, flow: Flow, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """Nats per sample: the density of points, or the dequantised bound on the pixels' probability."""
        w, pre_log_det = self.to_model_space(x, u)
        log_pw = flow_log_likelihood(*flow(w))
        if not self.image:
            return log_pw
        return discrete_log_likelihood(log_pw, pre_log_det, self.data.dim)

    # -- training ---------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, nets: Networks, batch: Batch) -> None:
        """ActNorm's data-dependent initialisation on the first training batch (dequantised with noise
        from a generator of its own, so the run's RNG is untouched). Layers already initialised (loaded
        from a checkpoint) are left as they are."""
        flow = nets["flow"]
        if not any(isinstance(m, ActNorm) for m in flow.modules()):
            return
        x = batch["x"]
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(INIT_NOISE_SEED)).to(x) if self.image else None
        flow.data_init(self.to_model_space(x, u)[0])

    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        x = batch["x"]
        log_px = self.data_log_likelihood(nets["flow"], x, torch.rand_like(x) if self.image else None)
        terms = {"loss": -log_px.mean(), "log_px": log_px.mean()}
        if self.image:
            terms["bpd"] = terms["loss"] / (self.data.dim * math.log(2))
        return terms

    # -- likelihood ---------------------------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, nets: Networks, batch: Batch, k: int, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact log p(x) per sample in nats from the EMA flow. Points: no noise. Images: one
        dequantisation draw per image from its own seed (k is not used), the bound on log P(pixels)."""
        x = batch["x"]
        u = per_sample_uniform(seeds, *x.shape[1:]).to(x) if self.image else None
        return {"log_px": self.data_log_likelihood(nets.ema("flow"), x, u)}

    # -- samples and figures --------------------------------------------------------------------------
    def fixed_inputs(self, n: int, generator: torch.Generator):
        return {"z": torch.randn(n, self.data.dim, generator=generator)}

    def sample(self, nets: Networks, fixed):
        flow = nets.ema("flow")
        return self.to_data_space(flow.inverse(fixed["z"] * self.cfg.temperature))

    def extent(self, reference: torch.Tensor | None) -> tuple[float, float]:
        """The square [-a, a]² (plot_extent), or the reference points' bounding square widened by a
        quarter of its side on every side."""
        if self.cfg.plot_extent is not None or reference is None:
            a = self.cfg.plot_extent or 4.0
            return -a, a
        lo, hi = float(reference[:, :2].min()), float(reference[:, :2].max())
        margin = 0.25 * (hi - lo)
        return lo - margin, hi + margin

    def visuals(self, nets: Networks, fixed, reference: Batch):
        samples = self.sample(nets, fixed)
        if self.image or self.data.dim != 2:
            return {"samples": samples}
        lo, hi = self.extent(reference["x"])
        log_density = grid_log_density(nets.ema("flow"), lo, hi, self.cfg.density_grid)
        figure = density_and_samples(log_density, lo, hi, samples, reference["x"], grid_mass(log_density, lo, hi))
        return {"samples": samples, "density": figure}
