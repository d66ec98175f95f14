"""GAN losses on discriminator logits, one shared signature so networks and losses combine freely.

Each entry: ``d_loss(real_logits, fake_logits, real_target)`` and ``g_loss(fake_logits)``, both
means over the batch. With σ the sigmoid and l a logit, −log σ(l) = softplus(−l) and
−log(1 − σ(l)) = softplus(l).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class GANLoss(NamedTuple):
    d_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]


def d_bce(real: torch.Tensor, fake: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy: −E[t log σ(D(x)) + (1−t) log(1−σ(D(x)))] − E[log(1 − σ(D(G(z))))].
    ``real_target`` < 1 is one-sided label smoothing."""
    return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_target))
            + F.softplus(fake).mean())


def g_minimax(fake: torch.Tensor) -> torch.Tensor:
    """The original game: G minimises E[log(1 − σ(D(G(z))))] = −E[softplus(l)] (saturates early on)."""
    return -F.softplus(fake).mean()


def g_non_saturating(fake: torch.Tensor) -> torch.Tensor:
    """G maximises E[log σ(D(G(z)))] instead: minimises E[softplus(−l)], strong gradients early on."""
    return F.softplus(-fake).mean()


LOSSES: dict[str, GANLoss] = {
    "minimax": GANLoss(d_bce, g_minimax),
    "non_saturating": GANLoss(d_bce, g_non_saturating),
}
