"""GAN losses on discriminator outputs, one shared signature so networks and losses combine freely.

Each ``GANLoss`` has ``d_loss(real_out, fake_out, real_target)`` and ``g_loss(fake_out)``, both means
over the batch, plus what some losses need beyond the two outputs: a penalty on the critic's input
gradient (WGAN-GP), weight clipping after each critic step (WGAN) and whether the critic may use
BatchNorm (a per-sample gradient penalty is wrong when samples are coupled through batch statistics).
With σ the sigmoid and l a logit, −log σ(l) = softplus(−l) and −log(1 − σ(l)) = softplus(l).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GANLoss:
    d_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]
    gradient_penalty: float = 0.0  # λ of E[(‖∇D(x̂)‖ − 1)²] on real/fake interpolates x̂
    clip_weights: float | None = None  # clip every critic parameter to [−c, c] after its step
    critic_norm: str = "batch"  # what the DCGAN critic normalises with by default ("layer": no coupling)
    smoothing: bool = False  # one-sided label smoothing applies (a real *target* exists)


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


def d_least_squares(real: torch.Tensor, fake: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """LSGAN (Mao et al. 2017) with the 0-1 coding: ½E[(D(x) − 1)²] + ½E[D(G(z))²]; at the optimum G
    minimises a Pearson χ² divergence (with the −1/1/0 coding; 0-1 is the paper's practical choice)."""
    return 0.5 * ((real - real_target) ** 2).mean() + 0.5 * (fake ** 2).mean()


def g_least_squares(fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((fake - 1) ** 2).mean()


def d_wasserstein(real: torch.Tensor, fake: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """The critic maximises E[D(x)] − E[D(G(z))], the Kantorovich–Rubinstein dual of W₁ over
    1-Lipschitz D (enforced by clipping or a gradient penalty)."""
    return fake.mean() - real.mean()


def g_wasserstein(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def d_hinge(real: torch.Tensor, fake: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """Hinge (Lim & Ye 2017; Miyato et al. 2018): E[max(0, 1 − D(x))] + E[max(0, 1 + D(G(z)))]."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


LOSSES: dict[str, GANLoss] = {
    "minimax": GANLoss(d_bce, g_minimax, smoothing=True),
    "non_saturating": GANLoss(d_bce, g_non_saturating, smoothing=True),
    "least_squares": GANLoss(d_least_squares, g_least_squares, smoothing=True),
    # Arjovsky et al. 2017: clip 0.01 (with RMSprop 5e-5 and n_critic 5, set in the job).
    "wasserstein": GANLoss(d_wasserstein, g_wasserstein, clip_weights=0.01),
    # Gulrajani et al. 2017: λ = 10, no BatchNorm in the critic (layer normalisation instead).
    "wasserstein_gp": GANLoss(d_wasserstein, g_wasserstein, gradient_penalty=10.0, critic_norm="layer"),
    "hinge": GANLoss(d_hinge, g_wasserstein),
}


def input_gradients(D: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """∂ΣD(x)/∂x per sample, kept in the graph so a penalty on it trains D (double backward)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return grad.flatten(1)


def gradient_penalty(D: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: E[(‖∇D(x̂)‖₂ − 1)²] at x̂ = εx + (1−ε)G(z), ε ~ U[0, 1] per sample."""
    eps = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    mixed = eps * real.detach() + (1 - eps) * fake.detach()
    return ((input_gradients(D, mixed).norm(dim=1) - 1) ** 2).mean()


def r1_penalty(D: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E‖∇D(x)‖² on real data (the job's r1_gamma multiplies it by γ/2)."""
    return input_gradients(D, real).pow(2).sum(dim=1).mean()


@torch.no_grad()
def clip_parameters(module: nn.Module, c: float) -> None:
    for p in module.parameters():
        p.clamp_(-c, c)
