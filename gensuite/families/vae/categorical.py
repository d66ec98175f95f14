"""Categorical latents for the VAE with the Gumbel-softmax (Concrete) relaxation (assignment 000, Q2).

z is N independent categorical variables of K categories each, one-hot coded: (…, N, K), flattened to
N·K decoder inputs. The prior p(z) is uniform; the encoder gives the logits of q(z|x) = Π_n Cat(π_n).

Training (Jang, Gu, Poole 2017; Maddison, Mnih, Teh 2017): the one-hot draw is replaced by the
Gumbel-softmax sample y = softmax((logits + g) / λ), g ~ Gumbel(0, 1), which is differentiable in the
logits and tends to the one-hot draw argmax(logits + g) as the temperature λ → 0 (at the price of a
gradient whose variance grows as λ shrinks). ``straight_through`` uses the hard one-hot in the forward
pass and the soft sample's gradient. λ follows max(λ_min, λ₀ · exp(−r · step)).

The KL term against the uniform prior is exact: KL(q ‖ p) = Σ_n Σ_k q_nk log q_nk + N log K.

Likelihood bounds are those of the *discrete* model that ``sample`` draws from (one-hot codes from the
uniform prior into the decoder): importance weights log p(x|z) + log p(z) − log q(z|x) at exact one-hot
draws z ~ q(z|x) (Gumbel-max), so ELBO ≤ IWAE_k ≤ log p(x) of that model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def temperature(step: int, initial: float, minimum: float, rate: float) -> float:
    """λ = max(λ_min, λ₀ · exp(−r · step)) at training step ``step`` (1-based, as the loop counts)."""
    return max(minimum, initial * math.exp(-rate * step))


def gumbel_from_normal(eps: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) variates from standard normals: g = −log(−log Φ(ε)), in float64 (the evaluation draws
    its noise per sample as normals, ``registry.per_sample_normal``)."""
    return -torch.log(-torch.special.log_ndtr(eps.double()))


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool = False,
                   gumbel: torch.Tensor | None = None) -> torch.Tensor:
    """A relaxed one-hot sample y = softmax((logits + g) / τ) over the last dimension, g ~ Gumbel(0, 1)
    (fresh from the torch RNG unless given). ``hard``: the one-hot argmax in the forward pass with the soft
    sample's gradient (straight-through)."""
    if gumbel is None:
        u = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
        gumbel = -torch.log(-torch.log(u))
    y = ((logits + gumbel.to(logits.dtype)) / tau).softmax(-1)
    if not hard:
        return y
    one_hot = F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)
    return one_hot - y.detach() + y  # forward: exactly one-hot (0 and 1 are exact in float); backward: ∂y


def kl_uniform_units(logits: torch.Tensor) -> torch.Tensor:
    """KL(Cat(softmax(logits)) ‖ uniform) per variable: (…, N, K) -> (…, N), Σ_k q log q + log K."""
    log_q = logits.log_softmax(-1)
    return (log_q.exp() * log_q).sum(-1) + math.log(logits.shape[-1])


def kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) ‖ p(z)) per sample for N independent categoricals: (B, N, K) -> (B,),
    Σ_n Σ_k q log q + N log K."""
    return kl_uniform_units(logits).sum(-1)


def prior_codes(n: int, variables: int, categories: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` one-hot codes from the uniform prior, flattened: (n, N·K)."""
    index = torch.randint(categories, (n, variables), generator=generator)
    return F.one_hot(index, categories).float().flatten(1)


def mode_codes(logits: torch.Tensor) -> torch.Tensor:
    """The most probable code of q(z|x): the one-hot argmax of each variable, (B, N, K) -> (B, N·K)."""
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype).flatten(1)


def discrete_draws(logits: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact draws z ~ q(z|x) by Gumbel-max from standard normal noise ``eps`` (k, B, N·K), and their
    log q(z|x) − log p(z): one-hot codes (k, B, N·K) and (k, B). ``logits``: (B, N, K)."""
    k, (b, variables, categories) = len(eps), logits.shape
    index = (logits.double() + gumbel_from_normal(eps).view(k, b, variables, categories)).argmax(-1)  # (k, B, N)
    log_q = logits.log_softmax(-1).expand(k, -1, -1, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1).sum(-1)
    codes = F.one_hot(index, categories).to(logits.dtype).flatten(2)
    return codes, log_q + variables * math.log(categories)
