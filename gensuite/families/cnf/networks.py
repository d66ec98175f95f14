"""Vector fields f(t, z) of continuous normalising flows: nn.Modules that know nothing about the
solver, the trace or the likelihood.

* ``ConcatSquashMLP`` (points): FFJORD's "concatsquash" layers (Grathwohl et al. 2019, code
  ``layers/diffeq_layers``): h ↦ (W h + b) · σ(a_g t + c_g) + a_b t, so time gates and shifts every
  hidden unit.
* ``ConcatMLP`` (points): time concatenated to every layer's input, [h, t] ↦ W [h, t] + b.
* ``ConvField`` (images): 3×3 convolutions with t concatenated as an extra input channel at every
  layer (FFJORD's ``ConcatConv2d``), the last one back to the image's channels.
* ``TanhField``: the course exercise's dynamics f_i(z) = tanh(θ_i · z_{j(i)}^k) with a learnable θ;
  j(i) = i ("self": component-wise, divergence Σ_i θ_i k z_i^{k−1} (1 − tanh²)) or the next component
  ("other": j(i) = i + 1 mod D, so ∂f_i/∂z_i = 0 and the flow preserves volume).

Every field maps (t, z) with t a 0-d tensor and z (N, *shape) to dz/dt of z's shape.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


class ConcatSquashLinear(nn.Module):
    """(W h + b) · sigmoid(a_g t + c_g) + a_b t."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(1, 1).to(h)
        return self.layer(h) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class ConcatLinear(nn.Module):
    """W [h, t] + b."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.layer = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.cat([h, t.reshape(1, 1).to(h).expand(len(h), 1)], 1))


class _TimeMLP(nn.Module):
    layer_class: type = ConcatSquashLinear

    def __init__(self, dim: int, hidden: Sequence[int], activation: str = "tanh"):
        super().__init__()
        widths = [dim, *hidden, dim]
        self.layers = nn.ModuleList(self.layer_class(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


class ConcatSquashMLP(_TimeMLP):
    """FFJORD's toy-data field: concatsquash layers of ``hidden`` widths with ``activation`` between."""

    layer_class = ConcatSquashLinear


class ConcatMLP(_TimeMLP):
    """The same widths with t concatenated to each layer's input."""

    layer_class = ConcatLinear


class ConcatConv2d(nn.Module):
    """3×3 convolution of [t (as a constant channel), h]."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in + 1, c_out, 3, padding=1)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(1, 1, 1, 1).to(h).expand(h.shape[0], 1, *h.shape[2:])
        return self.conv(torch.cat([tt, h], 1))


class ConvField(nn.Module):
    """Images (N, C, H, W): ConcatConv2d layers of ``channels`` widths, ``activation`` between, the last
    back to C channels."""

    def __init__(self, image_channels: int, channels: Sequence[int], activation: str = "softplus"):
        super().__init__()
        widths = [image_channels, *channels, image_channels]
        self.layers = nn.ModuleList(ConcatConv2d(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


class TanhField(nn.Module):
    """f_i(z) = tanh(θ_i · z_{j(i)}^k): autonomous (t is ignored), θ (D,) learnable."""

    def __init__(self, dim: int, power: int = 3, coupling: str = "self", theta: Sequence[float] | None = None):
        super().__init__()
        if coupling not in ("self", "other"):
            raise ValueError(f"coupling must be self or other, got {coupling!r}")
        self.power, self.coupling = power, coupling
        self.theta = nn.Parameter(torch.tensor(list(theta) if theta is not None else [1.0] * dim))

    def driver(self, z: torch.Tensor) -> torch.Tensor:
        """z_{j(i)} for every i."""
        return z if self.coupling == "self" else z.roll(-1, dims=1)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.theta.to(z) * self.driver(z) ** self.power)

    def divergence(self, z: torch.Tensor) -> torch.Tensor:
        """tr ∂f/∂z in closed form (N,): Σ_i θ_i k z_i^{k−1} (1 − tanh²(θ_i z_i^k)) for "self", 0 for
        "other" (each f_i is driven by another component only)."""
        if self.coupling == "other":
            return z.new_zeros(len(z))
        theta = self.theta.to(z)
        return (theta * self.power * z ** (self.power - 1) * (1 - torch.tanh(theta * z ** self.power) ** 2)).sum(1)
