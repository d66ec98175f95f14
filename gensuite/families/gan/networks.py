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
        with torch.no_grad():  # ReLU and LeakyReLU keep the sign of their input: alive iff some output > 0
            out = output.detach()  # (N, units) or (N, channels, H, W): a max over all but the unit axis,
            peak = out.flatten(2).amax(2) if out.dim() > 2 else out  # contiguous reductions first (5x cheaper
            self.alive.append(peak.amax(0) > 0)  # than a boolean copy of the whole map on a CPU)

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


class ProjectionDiscriminator(nn.Module):
    """Miyato & Koyama (2018): D(x, y) = ψ(φ(x)) + ⟨embed(y), Σ_positions φ(x)⟩, where φ is a plain
    discriminator without its last layer and ψ that layer: the label enters by an inner product with
    D's features instead of as extra input channels."""

    def __init__(self, base: nn.Module, num_classes: int):
        super().__init__()
        self.body, self.head = base.net[:-1], base.net[-1]
        width = self.head.in_channels if isinstance(self.head, nn.Conv2d) else self.head.in_features
        self.embed = nn.Embedding(num_classes, width)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        pooled = features.sum(dim=(2, 3)) if features.dim() == 4 else features
        return self.head(features).flatten() + (self.embed(y) * pooled).sum(dim=1)


class GaussianNoise(nn.Module):
    """Adds N(0, std²) to its input in training mode only (the ACGAN table's "activation noise")."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x) if self.training and self.std else x


class ACGANGenerator(nn.Module):
    """The ACGAN generator of assignment 002 (after Odena et al. 2017's CIFAR-10 network): z and the
    one-hot label (110) -> Linear to 384·4·4 + ReLU -> ConvT 5×5 stride 2 to 192 (BN, ReLU) -> to 96
    (BN, ReLU) -> to the image's channels (tanh). The table's "Linear 384" cannot reach 32×32 through
    three stride-2 layers from 1×1: the linear layer produces a 4×4 map of 384 channels, and padding 2
    with output padding 1 makes each layer double the side exactly: 4 -> 8 -> 16 -> 32."""

    def __init__(self, input_dim: int, channels: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(input_dim, 384 * 4 * 4), nn.ReLU(True))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(384, 192, 5, 2, 2, output_padding=1), nn.BatchNorm2d(192), nn.ReLU(True),
            nn.ConvTranspose2d(192, 96, 5, 2, 2, output_padding=1), nn.BatchNorm2d(96), nn.ReLU(True),
            nn.ConvTranspose2d(96, channels, 5, 2, 2, output_padding=1), nn.Tanh())
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z).view(len(z), 384, 4, 4))


class ACGANDiscriminator(nn.Module):
    """The ACGAN discriminator of assignment 002: six 3×3 convs (strides 2,1,2,1,2,1; channels 16 ...
    512; BatchNorm on all but the first), each followed by LeakyReLU(0.2) and Dropout(0.5), then one
    linear layer to 1 source logit and ``num_classes`` class logits, returned as (B, 1 + classes).
    ``noise_std`` adds Gaussian noise to the input of every conv in training."""

    def __init__(self, channels: int, num_classes: int, noise_std: float = 0.0, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        width, side = channels, image_size
        for i, (out, stride) in enumerate(zip((16, 32, 64, 128, 256, 512), (2, 1, 2, 1, 2, 1))):
            layers += [GaussianNoise(noise_std), nn.Conv2d(width, out, 3, stride, 1)]
            layers += ([nn.BatchNorm2d(out)] if i else []) + [nn.LeakyReLU(0.2, True), nn.Dropout(0.5)]
            width, side = out, side // stride
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * side * side, 1 + num_classes))
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
