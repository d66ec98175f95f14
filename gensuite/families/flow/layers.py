"""Invertible layers. Each maps x -> (y, log |det ∂y/∂x|) in ``forward`` (per sample, shape (N,))
and y -> x in ``inverse``; the data flow towards the base distribution (forward = x to z), as in
RealNVP and Glow. Inputs are points (N, D) or images (N, C, H, W); the conditioners a coupling layer
uses are passed in (``networks.py``), so these layers know nothing about network design.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gensuite.families.flow.splines import rational_quadratic_spline, spline_parameters

Scale = Literal["tanh", "sigmoid"]


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def bounded_log_scale(h: torch.Tensor, form: Scale, bound: float) -> torch.Tensor:
    """An affine coupling's log-scale from the conditioner's raw output h, bounded so a step cannot
    blow up: ``tanh``: bound · tanh(h / bound), the identity near 0 and |log s| < bound (RealNVP's
    tanh, as a soft clamp); ``sigmoid``: log sigmoid(h + 2), s in (0, 1) and s = 0.88 at h = 0
    (Glow's released code)."""
    if form == "tanh":
        return bound * torch.tanh(h / bound)
    return F.logsigmoid(h + 2.0)


class ActNorm(nn.Module):
    """y = (x - loc) · exp(-log_scale) per channel (Glow, section 3.1). Data-dependent
    initialisation: inside ``data_init_mode`` the first forward sets loc and log_scale so that the
    batch's outputs have zero mean and unit variance per channel, and marks the layer initialised (a
    buffer, so checkpoints carry it): a layer that was initialised, or loaded from one that was, is
    never initialised again."""

    def __init__(self, channels: int, image: bool):
        super().__init__()
        shape = (1, channels, 1, 1) if image else (1, channels)
        self.loc = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros(()))  # 1.0 once set from data (float: EMA-safe)
        self.init_pending = False  # set by data_init_mode; not state

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))  # every axis but the channel's
        self.loc.copy_(x.mean(dims, keepdim=True))
        self.log_scale.copy_(x.std(dims, keepdim=True, unbiased=False).clamp_min(1e-6).log())
        self.initialized.fill_(1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.init_pending and not bool(self.initialized):
            self._initialize(x)
        pixels = x[0, 0].numel()  # H·W for images, 1 for points
        log_det = (-self.log_scale.sum() * pixels).expand(len(x))
        return (x - self.loc) * torch.exp(-self.log_scale), log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(self.log_scale) + self.loc


@contextmanager
def data_init_mode(module: nn.Module):
    """Within the block, every ActNorm in ``module`` that is not yet initialised initialises itself
    from the first input it sees."""
    layers = [m for m in module.modules() if isinstance(m, ActNorm)]
    for m in layers:
        m.init_pending = True
    try:
        yield
    finally:
        for m in layers:
            m.init_pending = False


class InvertibleLinearLU(nn.Module):
    """Glow's invertible 1×1 convolution in LU form (section 3.2): W = P L (U + diag(sign · exp(log_s)))
    with P a fixed permutation, L unit lower-triangular, U strictly upper-triangular; log |det W| =
    Σ log_s per pixel, and W is invertible for any parameter values. Initialised from a random
    rotation. On points (N, D) it is the invertible linear map x -> W x."""

    def __init__(self, channels: int):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(diag.abs().log())

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, U with its diagonal, I)."""
        eye = torch.eye(len(self.log_s), dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * torch.exp(self.log_s))
        return lower, upper, eye

    def weight(self) -> torch.Tensor:
        lower, upper, _ = self._factors()
        return self.permutation @ lower @ upper

    def inverse_weight(self) -> torch.Tensor:
        """W⁻¹ = U⁻¹ L⁻¹ Pᵀ by triangular solves (never a general inverse)."""
        lower, upper, eye = self._factors()
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return upper_inv @ lower_inv @ self.permutation.T

    def _multiply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x @ w.T
        return F.conv2d(x, w[:, :, None, None])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = x[0, 0].numel()
        return self._multiply(x, self.weight()), (self.log_s.sum() * pixels).expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._multiply(y, self.inverse_weight())


def halves(n: int) -> tuple[int, int]:
    """How a coupling splits n channels (or coordinates): the first n // 2 and the rest."""
    return n // 2, n - n // 2


class _HalvesCoupling(nn.Module):
    """Splits dimension 1 into (first n // 2, rest); ``parity`` 0 conditions on the first half and
    moves the second, 1 the other way round."""

    def __init__(self, channels: int, parity: int, net: nn.Module):
        super().__init__()
        self.split, self.parity, self.net = halves(channels), parity, net

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.split(self.split, dim=1)
        return (a, b) if self.parity == 0 else (b, a)  # (conditioning, moved)

    def _join(self, cond: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        return torch.cat([cond, moved] if self.parity == 0 else [moved, cond], dim=1)


class AffineCoupling(_HalvesCoupling):
    """Split along dimension 1 (points: coordinates; images: channels) into (a, b); one half passes
    through and conditions an affine map of the other: y = x · exp(log s(c)) + t(c). ``parity`` 0
    transforms the second half given the first, 1 the first given the second, so alternating parities
    update every coordinate. ``net`` maps the conditioning half to 2× the transformed half's channels
    (raw log-scale, then shift)."""

    def __init__(self, channels: int, parity: int, net: nn.Module, scale: Scale = "tanh", bound: float = 2.0):
        super().__init__(channels, parity, net)
        self.scale, self.bound = scale, bound

    def _scale_shift(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, shift = self.net(cond).chunk(2, dim=1)
        return bounded_log_scale(h, self.scale, self.bound), shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, moved = self._parts(x)
        log_s, shift = self._scale_shift(cond)
        return self._join(cond, moved * torch.exp(log_s) + shift), _per_sample(log_s)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        cond, moved = self._parts(y)
        log_s, shift = self._scale_shift(cond)
        return self._join(cond, (moved - shift) * torch.exp(-log_s))


def checkerboard(height: int, width: int, parity: int) -> torch.Tensor:
    """(1, 1, H, W) mask of ones where (row + column + parity) is even: RealNVP's spatial checkerboard."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((rows + cols + parity) % 2 == 0).float()[None, None]


class CheckerboardCoupling(nn.Module):
    """RealNVP's masked affine coupling on images with a checkerboard mask m: y = m·x + (1 - m)·(x ·
    exp(log s(m·x)) + t(m·x)); ``net`` maps C channels to 2C (raw log-scale, then shift)."""

    def __init__(self, height: int, width: int, parity: int, net: nn.Module, scale: Scale = "tanh",
                 bound: float = 2.0):
        super().__init__()
        self.register_buffer("mask", checkerboard(height, width, parity), persistent=False)
        self.net, self.scale, self.bound = net, scale, bound

    def _scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, shift = self.net(x * self.mask).chunk(2, dim=1)
        free = 1 - self.mask
        return bounded_log_scale(h, self.scale, self.bound) * free, shift * free

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_s, shift = self._scale_shift(x)
        return x * torch.exp(log_s) + shift, _per_sample(log_s)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        log_s, shift = self._scale_shift(y)  # the masked half is unchanged, so the conditioner sees the same
        return (y - shift) * torch.exp(-log_s)


class SplineCoupling(_HalvesCoupling):
    """A coupling layer (as ``AffineCoupling``, on points) whose transform of the moved half is a
    monotonic rational-quadratic spline on [-bound, bound] with linear (identity) tails (Durkan et al.
    2019); ``net`` maps the conditioning half to (3K - 1) raw values per moved coordinate."""

    def __init__(self, channels: int, parity: int, net: nn.Module, bins: int, bound: float):
        super().__init__(channels, parity, net)
        self.bins, self.bound = bins, bound

    def _transform(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cond, moved = self._parts(x)
        raw = self.net(cond).view(len(x), moved.shape[1], 3 * self.bins - 1)
        out, log_det = rational_quadratic_spline(moved, *spline_parameters(raw, self.bins), self.bound, inverse)
        return self._join(cond, out), log_det.sum(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(x, inverse=False)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._transform(y, inverse=True)[0]


class Squeeze(nn.Module):
    """(C, H, W) -> (4C, H/2, W/2): each 2×2 block of pixels becomes 4 channels (a permutation,
    log-det 0)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        y = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(n)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        n, c4, h, w = y.shape
        c = c4 // 4
        return y.view(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, 2 * h, 2 * w)


class Split(nn.Module):
    """Multi-scale factoring out (RealNVP section 3.6, Glow's split): the second half of the
    channels leaves the flow. With ``net`` (Glow's learned prior) it is standardised by a Gaussian
    whose mean and log-std are computed from the kept half, z = (x_out - μ(x_keep)) · exp(-log σ(x_keep))
    (log-det -Σ log σ), so the factored-out z is compared with N(0, I); without, z = x_out."""

    def __init__(self, channels: int, net: nn.Module | None = None):
        super().__init__()
        self.split = halves(channels)
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (kept half, factored-out z, log-det)."""
        keep, out = x.split(self.split, dim=1)
        if self.net is None:
            return keep, out, x.new_zeros(len(x))
        mean, log_std = self.net(keep).chunk(2, dim=1)
        return keep, (out - mean) * torch.exp(-log_std), -_per_sample(log_std)

    def inverse(self, keep: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.net is not None:
            mean, log_std = self.net(keep).chunk(2, dim=1)
            z = z * torch.exp(log_std) + mean
        return torch.cat([keep, z], dim=1)


