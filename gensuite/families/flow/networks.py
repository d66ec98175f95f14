"""The conditioners (plain networks: an MLP for points, a small conv net for images) and the flows
assembled from the invertible layers of ``layers.py``: RealNVP, Glow and rational-quadratic spline
flows on points, and RealNVP's and Glow's multi-scale architectures on images. The flows map data
to the base space and back; they know nothing about the objective.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from gensuite.families.flow.layers import (ActNorm, AffineCoupling, CheckerboardCoupling, InvertibleLinearLU, Scale,
                                           Split, SplineCoupling, Squeeze, data_init_mode, halves)

Kind = Literal["realnvp", "glow", "spline"]


def _zero(layer: nn.Module) -> nn.Module:
    """The last layer of a conditioner starts at zero, so every coupling starts as the identity (affine:
    log s = 0 or Glow's sigmoid(2), t = 0; spline: uniform bins, unit slopes)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ZeroConv2d(nn.Module):
    """Glow's last convolution (released code, ``zeros``): a 3×3 conv starting at zero whose output
    is scaled per channel by exp(3 · logs), logs starting at 0; the learned scale lets outputs (a
    log-scale, a prior's log-std) reach large values in far fewer Adam steps than the weights alone."""

    LOGSCALE_FACTOR = 3.0

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = _zero(nn.Conv2d(n_in, n_out, 3, padding=1))
        self.logs = nn.Parameter(torch.zeros(1, n_out, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.logs * self.LOGSCALE_FACTOR)


class MLP(nn.Module):
    """in -> hidden widths (ReLU) -> out, the last layer zero-initialised."""

    def __init__(self, n_in: int, n_out: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(n_in, width), nn.ReLU()]
            n_in = width
        self.net = nn.Sequential(*layers, _zero(nn.Linear(n_in, n_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ConvNet(nn.Module):
    """Glow's coupling network (3×3 conv, ReLU, 1×1 conv, ReLU, ``ZeroConv2d``), with
    ``res_blocks`` residual blocks (RealNVP's ResNet conditioner) after the first convolution."""

    def __init__(self, n_in: int, n_out: int, width: int, res_blocks: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(n_in, width, 3, padding=1), *[ResBlock(width) for _ in range(res_blocks)],
                                 nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(),
                                 ZeroConv2d(width, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Flow(nn.Module):
    """A sequence of levels of invertible layers, with a ``Split`` after every level but the last
    (multi-scale). ``forward``: x -> (z, log |det ∂z/∂x|) with z (N, D) the factored-out parts and the
    last level's output, flattened and concatenated; ``inverse``: z (N, D) -> x. Points are one level
    without splits."""

    def __init__(self, levels: list[list[nn.Module]], splits: list[Split], latent_shapes: list[tuple[int, ...]]):
        super().__init__()
        if len(splits) != len(levels) - 1 or len(latent_shapes) != len(levels):
            raise ValueError("a flow needs one split per level but the last, and one latent shape per level")
        self.levels = nn.ModuleList(nn.ModuleList(level) for level in levels)
        self.splits = nn.ModuleList(splits)
        self.latent_shapes = [tuple(s) for s in latent_shapes]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(len(x))
        parts = []
        for i, level in enumerate(self.levels):
            for layer in level:
                x, ld = layer(x)
                log_det = log_det + ld
            if i < len(self.splits):
                x, z, ld = self.splits[i](x)
                parts.append(z.flatten(1))
                log_det = log_det + ld
        parts.append(x.flatten(1))
        return torch.cat(parts, 1), log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        sizes = [int(torch.Size(s).numel()) for s in self.latent_shapes]
        parts = [p.reshape(len(z), *s) for p, s in zip(z.split(sizes, dim=1), self.latent_shapes)]
        x = parts[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                x = self.splits[i].inverse(x, parts[i])
            for layer in reversed(self.levels[i]):
                x = layer.inverse(x)
        return x

    def layers(self) -> list[nn.Module]:
        """Every invertible layer in order, splits included (for tests and inspection)."""
        out: list[nn.Module] = []
        for i, level in enumerate(self.levels):
            out += list(level)
            if i < len(self.splits):
                out.append(self.splits[i])
        return out

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """ActNorm's data-dependent initialisation: one forward pass of ``x`` in which each ActNorm not
        yet initialised sets itself from its own input (later layers see earlier layers' new output)."""
        with data_init_mode(self):
            self(x)


def point_flow(kind: Kind, dim: int, layers: int, hidden: list[int], scale: Scale = "tanh",
               scale_bound: float = 2.0, bins: int = 8, tail_bound: float = 3.0, actnorm: bool = False) -> Flow:
    """``layers`` couplings on (N, D), parities alternating (the halves swap roles). ``glow``: each
    step is ActNorm, an invertible linear map in LU form, an affine coupling; ``realnvp``: affine
    couplings (with ``actnorm`` an ActNorm before each); ``spline``: rational-quadratic spline
    couplings with K = ``bins`` on [-tail_bound, tail_bound] (with ``actnorm`` likewise)."""
    seq: list[nn.Module] = []
    for i in range(layers):
        parity = i % 2
        n_cond, n_moved = halves(dim)[parity], halves(dim)[1 - parity]
        if actnorm or kind == "glow":
            seq.append(ActNorm(dim, image=False))
        if kind == "glow":
            seq.append(InvertibleLinearLU(dim))
        if kind == "spline":
            seq.append(SplineCoupling(dim, parity, MLP(n_cond, n_moved * (3 * bins - 1), hidden), bins, tail_bound))
        else:
            seq.append(AffineCoupling(dim, parity, MLP(n_cond, 2 * n_moved, hidden), scale, scale_bound))
    return Flow([seq], [], [(dim,)])


def squeezes(kind: Kind, levels: int) -> int:
    """How often an image flow halves the side: Glow at every level, RealNVP at all but the last."""
    return levels if kind == "glow" else levels - 1


def image_flow(kind: Kind, shape: tuple[int, int, int], levels: int, steps: int, width: int, res_blocks: int = 0,
               scale: Scale = "tanh", scale_bound: float = 2.0, split_prior: bool = False) -> Flow:
    """Multi-scale flows on (C, H, W), half the channels factored out after every level but the last.

    ``realnvp`` (Dinh et al. 2017, section 3.6): per level ``steps`` checkerboard couplings, a squeeze,
    ``steps`` channel couplings (parities alternating); the last level ``steps`` + 1 checkerboard
    couplings. ``glow`` (Kingma & Dhariwal 2018, figure 2): per level a squeeze, then ``steps`` of
    ActNorm, invertible 1×1 convolution (LU), affine coupling on the channel halves. ``split_prior``:
    a learned Gaussian prior on each factored-out half, computed from the kept half (Glow)."""
    c, h, w = shape
    levels_out: list[list[nn.Module]] = []
    splits: list[Split] = []
    latent_shapes: list[tuple[int, ...]] = []

    def coupling(channels: int, parity: int) -> AffineCoupling:
        n_cond, n_moved = halves(channels)[parity], halves(channels)[1 - parity]
        return AffineCoupling(channels, parity, ConvNet(n_cond, 2 * n_moved, width, res_blocks), scale, scale_bound)

    for level in range(levels):
        last = level == levels - 1
        seq: list[nn.Module] = []
        if kind == "glow":
            seq.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
            for _ in range(steps):
                seq += [ActNorm(c, image=True), InvertibleLinearLU(c), coupling(c, 0)]
        else:
            for k in range(steps + 1 if last else steps):
                seq.append(CheckerboardCoupling(h, w, k % 2, ConvNet(c, 2 * c, width, res_blocks), scale, scale_bound))
            if not last:
                seq.append(Squeeze())
                c, h, w = 4 * c, h // 2, w // 2
                seq += [coupling(c, k % 2) for k in range(steps)]
        levels_out.append(seq)
        if not last:
            keep, out = halves(c)
            prior = ZeroConv2d(keep, 2 * out) if split_prior else None
            splits.append(Split(c, prior))
            latent_shapes.append((out, h, w))
            c = keep
    latent_shapes.append((c, h, w))
    return Flow(levels_out, splits, latent_shapes)
