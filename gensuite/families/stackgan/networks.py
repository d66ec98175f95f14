"""StackGAN networks (Zhang et al., 2017): text-conditioned Stage-I (64 px) and Stage-II (256 px) pairs.

Module names and parameter shapes follow the authors' StackGAN-Pytorch model.py, so their released
state_dicts load with load_state_dict (Stage II without the `STAGE1_G.` prefix: the family keeps the
frozen Stage-I generator as a separate network). Differences that do not change the function:
the nearest-neighbour up-blocks run as one transposed conv, the discriminator heads return logits
(the caller's BCE-with-logits replaces Sigmoid + BCELoss) and the discriminators' BatchNorm can
normalise a concatenated real/fake batch part by part, so one conv call serves both.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLE_MODES = ("nearest_conv", "pixelshuffle")


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class NearestUpConv2d(nn.Conv2d):
    """Nearest x2 upsampling then a bias-free 3x3 pad-1 conv, computed as one stride-2 4x4 transposed conv.

    Along each axis, output 2m sees inputs (m-1, m, m) through taps (w0, w1, w2) and output 2m+1 sees
    (m, m, m+1), so the transposed-conv taps are K = A w with A = [[0,0,1],[0,1,1],[1,1,0],[1,0,0]]
    (2-D: A W Aᵀ). 16 instead of 36 multiply-adds per input pixel, and the 4x larger upsampled map is
    never stored. The parameter stays the 3x3 weight, so state_dicts match the original Upsample+Conv.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, 1, 1, bias=False)

    @staticmethod
    def _expand_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = weight.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    def transposed_kernel(self) -> torch.Tensor:
        """(in, out, 4, 4) kernel for conv_transpose2d, built from the (out, in, 3, 3) weight."""
        return self._expand_taps(self._expand_taps(self.weight.transpose(0, 1), 2), 3)  # stack: contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.transposed_kernel()
        if _is_channels_last(x) or _is_channels_last(self.weight):
            kernel = kernel.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(x, kernel, stride=2, padding=1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, nearest x2 + 3x3 conv as one 4x4 stride-2 transposed conv"


def up_block(in_channels: int, out_channels: int, mode: str) -> nn.Sequential:
    """Doubles the side. Keys "1" (conv) and "2" (BatchNorm) match the original's upBlock, whose "0"
    was the parameter-free nn.Upsample."""
    if mode == "nearest_conv":
        layers = [("1", NearestUpConv2d(in_channels, out_channels))]
    elif mode == "pixelshuffle":
        layers = [("1", conv3x3(in_channels, 4 * out_channels)), ("shuffle", nn.PixelShuffle(2))]
    else:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
    return nn.Sequential(OrderedDict(layers + [("2", nn.BatchNorm2d(out_channels)), ("3", nn.ReLU(True))]))


def icnr_(weight: torch.Tensor, scale: int = 2, std: float = 0.02) -> None:
    """ICNR (Aitken et al., 2017): the scale² sub-pixel filters of each output channel start equal, so
    conv + PixelShuffle begins as nearest upsampling of one conv (no checkerboard)."""
    with torch.no_grad():
        base = torch.empty_like(weight[:: scale * scale]).normal_(0.0, std)
        weight.copy_(base.repeat_interleave(scale * scale, dim=0))


def init_weights(module: nn.Module) -> None:
    """The original weights_init (conv weights N(0, 0.02), conv biases left at PyTorch's default;
    BatchNorm scale N(1, 0.02), shift 0; Linear N(0, 0.02), bias 0), then ICNR on pixelshuffle convs
    so the general draw does not overwrite it."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, nn.Sequential) and "shuffle" in m._modules:
            icnr_(m[0].weight, m.shuffle.upscale_factor)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(conv3x3(channels, channels), nn.BatchNorm2d(channels), nn.ReLU(True),
                                   conv3x3(channels, channels), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        out += x  # in place, as the original: BatchNorm's backward does not need its output
        return F.relu(out, inplace=True)


CA_ACTIVATIONS = ("relu", "leaky_relu")
REFINEMENTS = ("full", "residual")  # Stage II: redraw the image (the paper) or correct the upsampled Stage I


class ConditioningAugmentation(nn.Module):
    """Text embedding -> Gaussian N(mu, exp(logvar)) over a small condition code, sampled by
    reparametrisation: smooths the sparse embedding manifold (the KL term keeps it near N(0, I)).

    ``activation`` after the linear layer: "relu" as StackGAN-Pytorch (mu, logvar >= 0, so the code's
    noise is never below unit scale), or "leaky_relu" (slope 0.2) as the authors' TensorFlow StackGAN,
    which lets logvar go negative and the text dominate the code."""

    def __init__(self, text_dim: int, c_dim: int, activation: str = "relu"):
        super().__init__()
        if activation not in CA_ACTIVATIONS:
            raise ValueError(f"activation must be one of {CA_ACTIVATIONS}, got {activation!r}")
        self.c_dim, self.activation = c_dim, activation
        self.fc = nn.Linear(text_dim, 2 * c_dim)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.fc(embedding)
        h = F.relu(h) if self.activation == "relu" else F.leaky_relu(h, 0.2)
        mu, logvar = h.split(self.c_dim, dim=1)
        c = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return c, mu, logvar


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that can normalise a concatenated batch group by group: each with its own statistics,
    running stats updated group after group, exactly as separate calls in that order would, while the
    convs around it run once on the whole batch. `groups`: a number of equal parts, or the part sizes."""

    def forward(self, x: torch.Tensor, groups: int | Sequence[int] = 1) -> torch.Tensor:
        if groups == 1 or not (self.training or self.running_mean is None):
            return super().forward(x)
        if isinstance(groups, int):
            if len(x) % groups:
                raise ValueError(f"a batch of {len(x)} does not split into {groups} equal groups")
            groups = [len(x) // groups] * groups
        normalise = super().forward
        return torch.cat([normalise(part) for part in x.split(list(groups))])


def _run(layers: nn.Sequential, x: torch.Tensor, groups: int | Sequence[int]) -> torch.Tensor:
    for layer in layers:
        x = layer(x, groups) if isinstance(layer, GroupedBatchNorm2d) else layer(x)
    return x


class DiscriminatorHead(nn.Module):
    """Discriminator head (the original D_GET_LOGITS) without its Sigmoid: (N, 8ndf, 4, 4) features,
    optionally joined with the condition tiled to 4x4, -> (N,) logits."""

    def __init__(self, ndf: int, c_dim: int, conditional: bool = True):
        super().__init__()
        self.c_dim = c_dim if conditional else 0
        head: list[nn.Module] = []
        if conditional:
            head += [conv3x3(ndf * 8 + c_dim, ndf * 8), GroupedBatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, True)]
        head += [nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4)]
        self.outlogits = nn.Sequential(*head)

    def forward(self, features: torch.Tensor, c: torch.Tensor | None = None,
                groups: int | Sequence[int] = 1) -> torch.Tensor:
        if self.c_dim:
            tiled = c.view(len(c), self.c_dim, 1, 1).expand(-1, -1, *features.shape[2:])
            features = torch.cat([features, tiled.to(features.dtype)], 1)
        return _run(self.outlogits, features, groups).flatten()


def _power_of_two_steps(image_size: int, minimum: int) -> int:
    steps = int(math.log2(image_size // 4)) if image_size >= 4 else 0
    if image_size < minimum or 4 * 2 ** steps != image_size:
        raise ValueError(f"image_size must be a power of two >= {minimum}, got {image_size}")
    return steps


def _encoder(widths: list[int]) -> list[nn.Module]:
    """Stride-2 4x4 convs 3 -> widths[0] -> ... with LeakyReLU(0.2), BatchNorm on all but the first."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for cin, cout in zip(widths, widths[1:]):
        layers += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), GroupedBatchNorm2d(cout), nn.LeakyReLU(0.2, True)]
    return layers


class _Discriminator(nn.Module):
    def features(self, images: torch.Tensor, groups: int | Sequence[int] = 1) -> torch.Tensor:
        """(N, 8ndf, 4, 4). groups=2 on torch.cat([real, fake]) equals two separate calls, BatchNorm included."""
        return _run(self.encode_img, images, groups)

    forward = features

    def cond_logits(self, features: torch.Tensor, c: torch.Tensor,
                    groups: int | Sequence[int] = 1) -> torch.Tensor:
        """(N,) logits of image-text matching. The original's real, wrong and fake calls can share one
        call: groups=(n, n - 1, n) on the concatenated features and conditions."""
        return self.get_cond_logits(features, c, groups)


class Stage1Discriminator(_Discriminator):
    """64 px: convs ndf, 2ndf, 4ndf, 8ndf down to 4x4. Other sizes keep those last four widths
    (fewer layers drop the first ones, more layers add ndf-wide ones in front)."""

    uncond_logits = None  # Stage I has only the image-text matching head

    def __init__(self, c_dim: int, ndf: int, image_size: int = 64):
        super().__init__()
        n = _power_of_two_steps(image_size, 8)
        widths = [ndf * 2 ** max(0, 3 - (n - 1 - k)) for k in range(n)]
        self.encode_img = nn.Sequential(*_encoder(widths))
        self.get_cond_logits = DiscriminatorHead(ndf, c_dim)
        self.get_uncond_logits = None
        init_weights(self)


class Stage2Discriminator(_Discriminator):
    """256 px: convs ndf .. 32ndf down to 4x4, then 3x3 convs 16ndf, 8ndf. Other sizes: log2(size/4)
    stride-2 convs doubling from ndf (shifted up so the last is at least 8ndf), then 3x3 convs
    halving to 8ndf. Adds an unconditional realism head."""

    def __init__(self, c_dim: int, ndf: int, image_size: int = 256):
        super().__init__()
        n = _power_of_two_steps(image_size, 16)
        widths = [ndf * 2 ** (k + max(0, 4 - n)) for k in range(n)]
        layers = _encoder(widths)
        width = widths[-1]
        while width > ndf * 8:
            layers += [conv3x3(width, width // 2), GroupedBatchNorm2d(width // 2), nn.LeakyReLU(0.2, True)]
            width //= 2
        self.encode_img = nn.Sequential(*layers)
        self.get_cond_logits = DiscriminatorHead(ndf, c_dim)
        self.get_uncond_logits = DiscriminatorHead(ndf, c_dim, conditional=False)
        init_weights(self)

    def uncond_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.get_uncond_logits(features)


class Stage1Generator(nn.Module):
    """(z, text embedding) -> image in [-1, 1] at 4 * 2**upsamples px (paper: 4 -> 64), plus the
    conditioning mu/logvar for the KL term."""

    def __init__(self, z_dim: int, c_dim: int, text_dim: int, ngf: int, upsamples: int = 4,
                 upsample: str = "nearest_conv", ca_activation: str = "relu"):
        super().__init__()
        width = ngf * 8
        self.width, self.out_size = width, 4 * 2 ** upsamples
        self.ca_net = ConditioningAugmentation(text_dim, c_dim, ca_activation)
        self.fc = nn.Sequential(nn.Linear(z_dim + c_dim, width * 16, bias=False), nn.BatchNorm1d(width * 16),
                                nn.ReLU(True))
        for i in range(1, upsamples + 1):
            self.add_module(f"upsample{i}", up_block(width, width // 2, upsample))
            width //= 2
        self.upsamples = upsamples
        self.img = nn.Sequential(conv3x3(width, 3), nn.Tanh())
        init_weights(self)

    def forward(self, z: torch.Tensor, embedding: torch.Tensor):
        c, mu, logvar = self.ca_net(embedding)
        h = self.fc(torch.cat([z, c], 1)).view(len(z), self.width, 4, 4)
        for i in range(1, self.upsamples + 1):
            h = getattr(self, f"upsample{i}")(h)
        return self.img(h), mu, logvar


class Stage2Generator(nn.Module):
    """(Stage-I image, text embedding) -> image at 4x the side (paper 64 -> 256): encode to 1/4 side,
    join with the re-sampled condition, residual blocks, four up-blocks. The frozen Stage-I generator
    is not part of it. ``refine="residual"`` corrects the upsampled Stage-I image instead of redrawing it."""

    def __init__(self, c_dim: int, text_dim: int, ngf: int, res_blocks: int = 4, upsample: str = "nearest_conv",
                 ca_activation: str = "relu", refine: str = "full"):
        super().__init__()
        if refine not in REFINEMENTS:
            raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
        self.c_dim, self.refine = c_dim, refine
        self.ca_net = ConditioningAugmentation(text_dim, c_dim, ca_activation)
        self.encoder = nn.Sequential(
            conv3x3(3, ngf), nn.ReLU(True),
            nn.Conv2d(ngf, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.Conv2d(ngf * 2, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True))
        self.hr_joint = nn.Sequential(conv3x3(c_dim + ngf * 4, ngf * 4), nn.BatchNorm2d(ngf * 4), nn.ReLU(True))
        self.residual = nn.Sequential(*[ResBlock(ngf * 4) for _ in range(res_blocks)])
        self.upsample1 = up_block(ngf * 4, ngf * 2, upsample)
        self.upsample2 = up_block(ngf * 2, ngf, upsample)
        self.upsample3 = up_block(ngf, ngf // 2, upsample)
        self.upsample4 = up_block(ngf // 2, ngf // 4, upsample)
        self.img = nn.Sequential(conv3x3(ngf // 4, 3), nn.Tanh())
        init_weights(self)

    def forward(self, stage1_image: torch.Tensor, embedding: torch.Tensor):
        encoded = self.encoder(stage1_image)
        c, mu, logvar = self.ca_net(embedding)
        tiled = c.view(len(c), self.c_dim, 1, 1).expand(-1, -1, *encoded.shape[2:]).to(encoded.dtype)
        h = self.residual(self.hr_joint(torch.cat([encoded, tiled], 1)))
        h = self.upsample4(self.upsample3(self.upsample2(self.upsample1(h))))
        if self.refine == "full":
            return self.img(h), mu, logvar
        # residual: the last conv's output is added before the tanh to the Stage-I image, upsampled and
        # mapped back through the tanh, so Stage II starts as a copy of Stage I and learns a correction.
        coarse = F.interpolate(stage1_image.float(), size=h.shape[-2:], mode="bilinear", align_corners=False)
        prior = torch.atanh(coarse.clamp(-0.99, 0.99)).to(h.dtype)
        return torch.tanh(self.img[0](h) + prior), mu, logvar


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

