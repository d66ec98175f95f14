"""StackGAN's losses (Zhang et al. 2017, and the authors' StackGAN-Pytorch ``miscc/utils.py``).

The original discriminators end in a sigmoid and train with ``BCELoss``; ours return logits and use
BCE-with-logits: the same function, numerically stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) averaged over the elements of the batch, as the original
    (a mean, not a per-sample sum: the weight 2.0 is relative to that)."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())


def discriminator_loss(real: torch.Tensor, wrong: torch.Tensor, fake: torch.Tensor,
                       uncond_real: torch.Tensor | None = None,
                       uncond_fake: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Matching-aware loss: real image with its text -> 1; real image with another class's text
    (wrong) and generated image with its text (fake) -> 0. Stage I: real + (wrong + fake)/2.
    Stage II adds unconditional logits: (real + u_real)/2 + (fake + wrong + u_fake)/3.
    Logged terms as the original reports them (Stage II: real and fake averaged with their
    unconditional counterparts)."""
    err_real, err_wrong, err_fake = bce(real, 1.0), bce(wrong, 0.0), bce(fake, 0.0)
    if uncond_real is None:
        return {"loss": err_real + 0.5 * (err_wrong + err_fake), "real": err_real, "wrong": err_wrong,
                "fake": err_fake}
    u_real, u_fake = bce(uncond_real, 1.0), bce(uncond_fake, 0.0)
    loss = (err_real + u_real) / 2 + (err_fake + err_wrong + u_fake) / 3
    return {"loss": loss, "real": (err_real + u_real) / 2, "wrong": err_wrong, "fake": (err_fake + u_fake) / 2}


def generator_loss(fake: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_weight: float,
                   uncond_fake: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Non-saturating: generated images with their text -> 1 (plus the unconditional logit in
    Stage II), plus ``kl_weight`` times the conditioning augmentation's KL term."""
    adversarial = bce(fake, 1.0) + (bce(uncond_fake, 1.0) if uncond_fake is not None else 0.0)
    kl = kl_to_standard_normal(mu, logvar)
    return {"loss": adversarial + kl_weight * kl, "adversarial": adversarial, "kl": kl}
