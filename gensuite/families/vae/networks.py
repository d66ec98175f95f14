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
    """x (and a one-hot label) -> mean and log-variance of q(z|x[, y]), or (``categorical``) the logits
    of q(z|x[, y]) alone, as a one-tuple.

    ``kind``: ``mlp``, ``conv`` or ``efficientnet_b0`` (torchvision's trunk, ``effnet.EfficientNetTrunk``,
    on images resized to ``resize`` pixels; ``freeze`` keeps its weights fixed)."""

    def __init__(self, shape: tuple[int, ...], latent_dim: int, cond_dim: int, kind: str,
                 hidden: list[int], conv_channels: list[int], categorical: bool = False,
                 resize: int = 64, freeze: bool = False):
        super().__init__()
        if kind == "conv":
            layers: list[nn.Module] = []
            channels, size = shape[0], shape[-1]
            for c in conv_channels:  # the assignment's 3x3 conv + ReLU + 2x2 max-pool blocks
                layers += [nn.Conv2d(channels, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
                channels, size = c, size // 2
            self.features = nn.Sequential(*layers, nn.Flatten())
            width = channels * size * size
        elif kind == "efficientnet_b0":
            from gensuite.families.vae.effnet import FEATURES, EfficientNetTrunk

            self.features = EfficientNetTrunk(shape[0], resize, freeze)
            width = FEATURES
        else:
            dim = 1
            for s in shape:
                dim *= s
            self.features = nn.Sequential(nn.Flatten(), mlp([dim, *hidden], final_activation=True))
            width = hidden[-1] if hidden else dim
        self.heads = ("logits",) if categorical else ("mean", "log_var")
        for name in self.heads:
            setattr(self, name, nn.Linear(width + cond_dim, latent_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        h = self.features(x)
        if cond is not None:
            h = torch.cat([h, cond], dim=1)
        return tuple(getattr(self, name)(h) for name in self.heads)


class Decoder(nn.Module):
    """z (and a one-hot label) -> parameters of p(x|z): logits (Bernoulli) or the mean (Gaussian).

    ``log_std`` is a learned per-pixel log standard deviation when the variance is learned, or, with
    ``std_head``, a per-sample one from a second linear head on the last hidden layer:
    σ(z) = min_std + softplus(NN_β(z)), bounded below so a constant pixel cannot drive the
    likelihood to infinity.
    """

    def __init__(self, shape: tuple[int, ...], latent_dim: int, cond_dim: int, hidden: list[int],
                 learned_variance: bool, std_head: bool = False, min_std: float = 0.01):
        super().__init__()
        self.shape = tuple(shape)
        dim = 1
        for s in shape:
            dim *= s
        self.net = mlp([latent_dim + cond_dim, *hidden, dim])
        self.log_std = nn.Parameter(torch.zeros(self.shape)) if learned_variance else None
        self.std_head = nn.Linear(hidden[-1] if hidden else latent_dim + cond_dim, dim) if std_head else None
        self.min_std = min_std

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cond is not None:
            z = torch.cat([z, cond], dim=1)
        if self.std_head is None:
            return self.net(z).view(len(z), *self.shape), self.log_std
        h = self.net[:-1](z)  # the shared trunk; the mean and the standard deviation are two heads on it
        std = self.min_std + nn.functional.softplus(self.std_head(h))
        return self.net[-1](h).view(len(z), *self.shape), std.log().view(len(z), *self.shape)


class GaussianLayer(nn.Module):
    """z_in -> mean and log-variance of a diagonal Gaussian over z_out: one stochastic layer of a
    hierarchy, used both for q(z_{l+1} | z_l) and for p(z_l | z_{l+1})."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int):
        super().__init__()
        self.features = mlp([in_dim, *hidden], final_activation=True)
        width = hidden[-1] if hidden else in_dim
        self.mean = nn.Linear(width, out_dim)
        self.log_var = nn.Linear(width, out_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(z)
        return self.mean(h), self.log_var(h)


class UpperEncoder(nn.Module):
    """q(z_2 | z_1) ... q(z_L | z_{L-1}): the inference layers above the image encoder (bottom-up)."""

    def __init__(self, sizes: list[int], hidden: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(GaussianLayer(a, hidden, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, z1: torch.Tensor, noise: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(mean, log-variance, draw) of z_2 .. z_L, each drawn as mean + σ · noise[l] from the one below;
        the whole chain in one call, so a DDP-wrapped module runs forward once per step."""
        out, z = [], z1
        for layer, eps in zip(self.layers, noise):
            mean, log_var = layer(z)
            z = mean + (0.5 * log_var).exp() * eps
            out.append((mean, log_var, z))
        return out


class Prior(nn.Module):
    """p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2): N(0, I) or a learned N(μ_z, σ_z² I) on top, and a
    Gaussian layer per conditional below it."""

    def __init__(self, sizes: list[int], hidden: list[int], learned: bool):
        super().__init__()
        # σ_z is one scalar (an isotropic prior); zeros: training starts from N(0, I).
        self.mean = nn.Parameter(torch.zeros(sizes[-1])) if learned else None
        self.log_var = nn.Parameter(torch.zeros(())) if learned else None
        self.layers = nn.ModuleList(GaussianLayer(b, hidden, a) for a, b in zip(sizes[:-1], sizes[1:]))

    def top(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(z_L), broadcast to ``like`` (..., size of z_L)."""
        if self.mean is None:
            return torch.zeros_like(like), torch.zeros_like(like)
        return self.mean.expand_as(like), self.log_var.expand_as(like)

    def forward(self, zs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Mean and log-variance of p(z_l | z_{l+1}) at the given z_2 .. z_L, for l = 1 .. L-1, then of p(z_L)."""
        return [layer(z) for layer, z in zip(self.layers, zs[1:])] + [self.top(zs[-1])]

    @torch.no_grad()
    def sample(self, noise: list[torch.Tensor]) -> list[torch.Tensor]:
        """Ancestral draws z_1 .. z_L from standard normal noise per layer (bottom first), top down."""
        mean, log_var = self.top(noise[-1])
        zs = [mean + (0.5 * log_var).exp() * noise[-1]]
        for layer, eps in zip(reversed(self.layers), reversed(noise[:-1])):
            mean, log_var = layer(zs[0])
            zs.insert(0, mean + (0.5 * log_var).exp() * eps)
        return zs
