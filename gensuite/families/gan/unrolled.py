"""Unrolled GAN (Metz et al. 2017): the generator's loss is taken against the discriminator as it will
be after k more of its own steps, differentiated through those steps.

D's k gradient steps are functional (``torch.func.functional_call`` on a dict of parameters), so the
unrolled parameters stay functions of G's samples and G's gradient includes how D would react to
them: the term that discourages G from hopping to the one mode D currently misjudges. The real D is
not changed; its optimiser takes its own ordinary steps.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

State = dict[str, torch.Tensor]


def unrolled_state(D: nn.Module, d_loss: Callable[[State], torch.Tensor], steps: int, lr: float) -> State:
    """D's parameters after ``steps`` plain gradient steps of size ``lr`` on ``d_loss(state)``, kept in
    the autograd graph (second order: G's gradient flows through every step), plus D's buffers."""
    params = {n: p.detach().requires_grad_(True) for n, p in D.named_parameters()}
    buffers = dict(D.named_buffers())
    for _ in range(steps):
        grads = torch.autograd.grad(d_loss({**params, **buffers}), list(params.values()), create_graph=True)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    return {**params, **buffers}


def call(D: nn.Module, state: State, *inputs: torch.Tensor) -> torch.Tensor:
    return functional_call(D, state, inputs)
