"""The EBM's objective as plain functions of energies.

With p(x) = exp(−E(x)) / Z, the log-likelihood's gradient is −∇E(x⁺) − ∇log Z and
∇log Z = E_p[−∇E(x)] (assignment 003 P2). Contrastive divergence replaces that expectation with
samples x⁻ from the model (Langevin chains), so minimising E(x⁺) − E(x⁻) over a batch follows an
estimate of −∇log p(x⁺); its bias and its cost come from how far the chains are from p."""

from __future__ import annotations

import torch


def energy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """JEM: logits f(x) define p(x, y) ∝ exp(f(x)[y]), so p(x) ∝ Σ_y exp(f(x)[y]) and
    E(x) = −logsumexp_y f(x)[y]."""
    return -torch.logsumexp(logits, dim=1)


def contrastive_divergence(e_pos: torch.Tensor, e_neg: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """Terms of mean E(x⁺) − mean E(x⁻) + α (mean E(x⁺)² + mean E(x⁻)²).

    The energy² term (IGEBM) keeps the energies near 0: E is only defined up to a constant, and
    without it the two energies drift apart without bound while their difference stays small."""
    cd = e_pos.mean() - e_neg.mean()
    reg = alpha * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
    return {"loss": cd + reg, "cd": cd, "reg": reg, "E_pos": e_pos.mean(), "E_neg": e_neg.mean()}
