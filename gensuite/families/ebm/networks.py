"""The energy network: a small convolutional net that maps an image to one energy, or to class logits
whose negative log-sum-exp is the energy (JEM). It knows nothing about how it is trained or sampled."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def activation(name: str) -> nn.Module:
    """Smooth or leaky: Langevin dynamics follows ∇ₓE, so a ReLU's dead half would stop chains."""
    return nn.SiLU() if name == "swish" else nn.LeakyReLU(0.2)


def downsampled_side(side: int, levels: int) -> int:
    """The side after ``levels`` 3×3 convolutions of stride 2 and padding 1: ceil-halved each time."""
    for _ in range(levels):
        side = (side + 1) // 2
    return side


class EnergyNet(nn.Module):
    """x (N, C, H, W) in [-1, 1] -> (N, outputs).

    ``levels`` 3×3 convolutions of stride 2, the first to ``width`` channels and each next one
    doubling them (at most 8× ``width``), flattened into an MLP of one hidden layer. Every layer
    downsamples: a chain differentiates the network at each of its steps, so full-resolution layers
    would multiply the cost of every Langevin step. With ``spectral_norm`` every weight is divided by
    its largest singular value (IGEBM), which bounds the network's Lipschitz constant and so the
    gradients the sampler follows."""

    def __init__(self, channels: int, side: int, width: int, levels: int, hidden: int, outputs: int,
                 act: str = "swish", use_spectral_norm: bool = False):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else (lambda layer: layer)
        layers: list[nn.Module] = []
        w_in, w = channels, width
        for _ in range(levels):
            layers += [norm(nn.Conv2d(w_in, w, 3, stride=2, padding=1)), activation(act)]
            w_in, w = w, min(2 * w, 8 * width)
        self.features = nn.Sequential(*layers)
        flat = w_in * downsampled_side(side, levels) ** 2
        self.head = nn.Sequential(nn.Flatten(), norm(nn.Linear(flat, hidden)), activation(act),
                                  norm(nn.Linear(hidden, outputs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class EnergyMLP(nn.Module):
    """Points (N, D) -> (N, outputs): linear layers of widths ``hidden`` with a smooth activation (the
    chains follow ∇ₓE), optionally spectrally normalised like ``EnergyNet``."""

    def __init__(self, dim: int, hidden: list[int], outputs: int, act: str = "swish",
                 use_spectral_norm: bool = False):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else (lambda layer: layer)
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [norm(nn.Linear(dim, width)), activation(act)]
            dim = width
        self.net = nn.Sequential(*layers, norm(nn.Linear(dim, outputs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
