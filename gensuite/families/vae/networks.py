"""VAE encoders and decoders. They know nothing about the ELBO that trains them."""

from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: list[int], final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (and a one-hot label) -> mean and log-variance of q(z|x[, y])."""

    def __init__(self, shape: tuple[int, ...], latent_dim: int, cond_dim: int, kind: str,
                 hidden: list[int], conv_channels: list[int]):
        super().__init__()
        if kind == "conv":
            layers: list[nn.Module] = []
            channels, size = shape[0], shape[-1]
            for c in conv_channels:  # the assignment's 3x3 conv + ReLU + 2x2 max-pool blocks
                layers += [nn.Conv2d(channels, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
                channels, size = c, size // 2
            self.features = nn.Sequential(*layers, nn.Flatten())
            width = channels * size * size
        else:
            dim = 1
            for s in shape:
                dim *= s
            self.features = nn.Sequential(nn.Flatten(), mlp([dim, *hidden], final_activation=True))
            width = hidden[-1] if hidden else dim
        self.mean = nn.Linear(width + cond_dim, latent_dim)
        self.log_var = nn.Linear(width + cond_dim, latent_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        if cond is not None:
            h = torch.cat([h, cond], dim=1)
        return self.mean(h), self.log_var(h)


class Decoder(nn.Module):
    """z (and a one-hot label) -> parameters of p(x|z): logits (Bernoulli) or the mean (Gaussian).

    ``log_std`` is a learned per-pixel log standard deviation when the variance is learned.
    """

    def __init__(self, shape: tuple[int, ...], latent_dim: int, cond_dim: int, hidden: list[int],
                 learned_variance: bool):
        super().__init__()
        self.shape = tuple(shape)
        dim = 1
        for s in shape:
            dim *= s
        self.net = mlp([latent_dim + cond_dim, *hidden, dim])
        self.log_std = nn.Parameter(torch.zeros(self.shape)) if learned_variance else None

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cond is not None:
            z = torch.cat([z, cond], dim=1)
        return self.net(z).view(len(z), *self.shape), self.log_std
