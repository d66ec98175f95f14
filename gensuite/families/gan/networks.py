"""GAN generators and discriminators: the vanilla MLP pair and DCGAN (Radford et al., 2016).

Options beyond the originals: the generator's hidden activation (ReLU or LeakyReLU, to watch ReLU units
die), the critic's normalisation (BatchNorm, layer normalisation or none: WGAN-GP's penalty is per
sample) and PacGAN packing (the discriminator's input holds ``pack`` samples side by side).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _upsamplings(image_size: int) -> int:
    return int(math.log2(image_size // 4))


def activation(name: str) -> nn.Module:
    return nn.ReLU(True) if name == "relu" else nn.LeakyReLU(0.2, True)


def critic_norm(name: str, channels: int) -> list[nn.Module]:
    """BatchNorm2d; "layer": GroupNorm with one group (normalises each sample over C, H, W); "none"."""
    if name == "batch":
        return [nn.BatchNorm2d(channels)]
    return [nn.GroupNorm(1, channels)] if name == "layer" else []


class DeadUnits:
    """Fraction of a generator's hidden units that are "dead" on a batch: a unit (a feature of an MLP
    layer, a channel of a conv layer) is dead when its activation input is ≤ 0 for every sample (and
    position), so a ReLU passes neither value nor gradient. With LeakyReLU such units still learn.

    Hooks read the activations' outputs during the generator's ordinary forward: no extra pass."""

    def __init__(self, generator: nn.Module):
        self.alive: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._record) for m in generator.modules()
                        if isinstance(m, (nn.ReLU, nn.LeakyReLU))]

    def _record(self, module, inputs, output):
        with torch.no_grad():
            positive = output.detach() > 0  # ReLU and LeakyReLU keep the sign of their input
            self.alive.append(positive.transpose(0, 1).flatten(1).any(dim=1))

    def fraction(self) -> torch.Tensor:
        for h in self.handles:
            h.remove()
        if not self.alive:
            return torch.zeros(())
        alive = torch.cat(self.alive)
        return 1 - alive.float().mean()


class DCGANGenerator(nn.Module):
    """z -> 4x4 by a stride-1 transposed conv, then stride-2 transposed convs doubling the size;
    BatchNorm + ReLU everywhere but the tanh output layer."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, ngf: int, act: str = "relu"):
        super().__init__()
        n = _upsamplings(image_size)
        width = ngf * 2 ** (n - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, width, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(width), activation(act)]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       activation(act)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent_dim = latent_dim
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(len(z), self.latent_dim, 1, 1))


class DCGANDiscriminator(nn.Module):
    """Strided convs halving the size down to 4x4, LeakyReLU(0.2), BatchNorm (or ``norm``) except on
    the input layer, then a 4x4 conv to one logit. No pooling, no fully connected hidden layers.
    ``channels`` counts every packed sample's channels."""

    def __init__(self, channels: int, image_size: int, ndf: int, norm: str = "batch"):
        super().__init__()
        n = _upsamplings(image_size)
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width = ndf
        for _ in range(n - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=norm == "none"), *critic_norm(norm, width * 2),
                       nn.LeakyReLU(0.2, True)]
            width *= 2
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


class MLPGenerator(nn.Module):
    """Linear + activation per hidden width, then Linear to the sample; tanh for images in [−1, 1],
    nothing for points (their coordinates are unbounded)."""

    def __init__(self, latent_dim: int, shape: tuple[int, ...], hidden: list[int], act: str = "leaky_relu",
                 bounded: bool = True):
        super().__init__()
        self.shape = tuple(shape)
        layers: list[nn.Module] = []
        width = latent_dim
        for h in hidden:
            layers += [nn.Linear(width, h), activation(act)]
            width = h
        layers += [nn.Linear(width, math.prod(shape))] + ([nn.Tanh()] if bounded else [])
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.flatten(1)).view(len(z), *self.shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, shape: tuple[int, ...], hidden: list[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2, True)] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        layers += [nn.Linear(width, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()
