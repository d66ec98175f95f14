"""The DDPM U-Net (Ho et al. 2020, appendix B) for ε-, x0- or v-prediction and NCSN scores.

Layout, following the paper's description of its PixelCNN++-style backbone:

* the timestep (an integer index in [0, T) or any real noise level, e.g. log σ) goes through the
  Transformer sinusoidal embedding of width ``base_channels`` and a 2-layer MLP
  (ch → 4ch, SiLU, 4ch → 4ch); an optional class embedding (4ch) is added to it;
* a 3x3 conv in; per resolution level ``num_res_blocks`` residual blocks (each followed by
  self-attention where the current resolution is in ``attention_resolutions``) and, except at the
  last level, a stride-2 3x3 conv downsample; every output on the way down is kept as a skip;
* middle: residual block, attention, residual block;
* on the way up ``num_res_blocks + 1`` residual blocks per level, each taking the concatenation
  of the running features and one popped skip, then nearest-neighbour ×2 upsampling + 3x3 conv;
* GroupNorm, SiLU, 3x3 conv out.

Residual block: GN, SiLU, conv3x3, + Linear(SiLU(temb)), GN, SiLU, dropout, conv3x3, plus a
1x1-conv shortcut when the channel count changes. The second conv of each residual block, the
attention output projection and the final conv start at zero (as in Ho's code), so an untrained
network outputs exactly 0 and every residual branch starts as the identity.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_count(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """The largest divisor of ``channels`` that is ≤ ``max_groups`` and leaves at least
    ``min_group_size`` channels per group: 32 for Ho's widths (≥ 128), fewer for narrow layers.

    The floor matters: the timestep/class embedding enters a residual block as a per-channel bias
    just before GroupNorm, and with one channel per group the norm subtracts that bias exactly,
    so the network would ignore t and y. Four is Ho's narrowest group (128 channels / 32)."""
    for g in range(min(max_groups, channels // min_group_size), 0, -1):
        if channels % g == 0:
            return g
    return 1


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of real-valued t, shape (N,) → (N, dim): [sin(t ω_k), cos(t ω_k)] with
    ω_k = max_period^(−k/(half−1)), k = 0..half−1 (Ho's convention); zero-padded when dim is odd."""
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H·W positions: GN, 1x1 q/k/v, softmax(q kᵀ/√d) v, 1x1 out, residual.
    ``heads`` = 1 is Ho's single head (d = C)."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, hgt * wid).unbind(1)
        # (N, heads, HW, d) for scaled_dot_product_attention, whose default scale is 1/√d.
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(n, c, hgt, wid)
        return x + self.proj(out)


class Downsample(nn.Module):
    """3x3 conv with stride 2. TensorFlow 'SAME' padding on an even size pads one row/column at the
    bottom/right only, as in Ho's original; the output is exactly half the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ε/x0/v-prediction U-Net. ``forward(x, t, y=None)``: x (N, C, H, W); t (N,) (or a scalar),
    integer timesteps or real noise levels, embedded as floats; y (N,) class indices in
    [0, num_classes], where index ``num_classes`` is the "null" (unconditional) class used by
    classifier-free guidance. With ``num_classes`` set, y=None means the null class."""

    def __init__(self, in_channels: int, base_channels: int, channel_mults: Sequence[int],
                 num_res_blocks: int, attention_resolutions: Sequence[int], image_size: int,
                 dropout: float, num_classes: int | None = None, heads: int = 1,
                 out_channels: int | None = None):
        super().__init__()
        levels = len(channel_mults)
        if levels < 1 or image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{levels - 1} "
                             f"for channel_mults {tuple(channel_mults)}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.base_channels = base_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.levels = levels
        ch, temb_ch = base_channels, 4 * base_channels
        attn_res = set(attention_resolutions)

        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.class_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, image_size
        for i, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                out = ch * mult
                layer = nn.ModuleList([ResBlock(cur, out, temb_ch, dropout)])
                if res in attn_res:
                    layer.append(AttnBlock(out, heads))
                self.down.append(layer)
                skips.append(out)
                cur = out
            if i != levels - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_ch, dropout), AttnBlock(cur, heads),
                                  ResBlock(cur, cur, temb_ch, dropout)])

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = ch * mult
                layer = nn.ModuleList([ResBlock(cur + skips.pop(), out, temb_ch, dropout)])
                if res in attn_res:
                    layer.append(AttnBlock(out, heads))
                self.up.append(layer)
                cur = out
            if i != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2
        assert not skips

        self.norm_out = norm(cur)
        self.conv_out = nn.Conv2d(cur, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        n, _, hgt, wid = x.shape
        step = 2 ** (self.levels - 1)
        if hgt % step or wid % step:
            raise ValueError(f"input size {hgt}x{wid} is not divisible by {step}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(n)
        temb = self.temb(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((n,), self.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.class_emb(y)
        elif y is not None:
            raise ValueError("class labels given to an unconditional UNet (num_classes=None)")

        hs = [self.conv_in(x)]
        for layer in self.down:
            h = hs[-1]
            for m in layer:
                h = m(h, temb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        h = hs[-1]
        for m in self.mid:
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        for layer in self.up:
            for m in layer:
                h = m(torch.cat([h, hs.pop()], dim=1), temb) if isinstance(m, ResBlock) else m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLPDenoiser(nn.Module):
    """ε/x0/v-prediction for points (N, D), same calling convention as ``UNet``: ``forward(x, t, y=None)``.

    t goes through the sinusoidal embedding (width ``hidden[0]``) and a 2-layer SiLU MLP; an optional
    class embedding (index ``num_classes`` is the null class of classifier-free guidance) is added to
    it. The embedding is concatenated to x and fed through SiLU layers of widths ``hidden``; the last
    linear layer starts at zero, as the U-Net's output conv, so an untrained network outputs 0."""

    def __init__(self, dim: int, hidden: Sequence[int], num_classes: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = hidden[0]
        self.temb = nn.Sequential(nn.Linear(self.embed_dim, self.embed_dim), nn.SiLU(),
                                  nn.Linear(self.embed_dim, self.embed_dim))
        self.class_emb = nn.Embedding(num_classes + 1, self.embed_dim) if num_classes is not None else None
        layers: list[nn.Module] = []
        width = dim + self.embed_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        out = nn.Linear(width, dim)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(len(x))
        temb = self.temb(timestep_embedding(t, self.embed_dim).to(x.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((len(x),), self.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.class_emb(y)
        elif y is not None:
            raise ValueError("class labels given to an unconditional MLPDenoiser (num_classes=None)")
        return self.net(torch.cat([x, temb], dim=1))
