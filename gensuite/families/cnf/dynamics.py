"""The ODEs of a continuous normalising flow and how they are solved.

A field f(t, z) (``networks.py``) moves z; the instantaneous change of variables (Chen et al. 2018,
theorem 1) gives d log p(z(t)) / dt = −tr(∂f/∂z). ``CNFDynamics`` integrates the augmented state

    (z, Δ[, K, J])   with   dz/dt = f,  dΔ/dt = −tr ∂f/∂z,  dK/dt = ‖f‖²,  dJ/dt = ‖∂f/∂z‖_F²,

where K and J are the kinetic-energy and Jacobian-Frobenius integrals that RNODE (Finlay et al. 2020)
penalises. The trace is either exact (one autograd row per dimension: D backward passes, fine for
points) or Hutchinson's estimate εᵀ(∂f/∂z)ε with Rademacher or Gaussian probes ε, E[εεᵀ] = I, drawn
once per solve and held fixed along the trajectory (FFJORD); the same vector-Jacobian product εᵀ∂f/∂z
gives ‖εᵀ∂f/∂z‖², an unbiased estimate of ‖∂f/∂z‖_F².

``solve`` integrates with ``torchdiffeq.odeint`` (backpropagation through the solver's operations) or
``odeint_adjoint`` (gradients from a second, backward-in-time ODE: memory independent of the number
of steps). Every evaluation of f increments ``nfe``; ``count_backward`` reports how many of them the
backward pass made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

FIXED_STEP = ("euler", "midpoint", "rk4")
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "adaptive_heun")


def probes(kind: str, shape: tuple[int, ...], generator: torch.Generator | None = None,
           dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Hutchinson probes with E[εεᵀ] = I: Rademacher (±1) or standard Gaussian."""
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    raise ValueError(f"unknown probe kind {kind!r}")


def exact_divergence(f: torch.Tensor, z: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """tr ∂f/∂z and ‖∂f/∂z‖_F² per sample, exactly: row i of the Jacobian is ∇_z f_i (one backward pass
    each, D in all). f and z are (N, *shape)."""
    flat_f = f.flatten(1)
    div = f.new_zeros(len(f))
    frob = f.new_zeros(len(f))
    for i in range(flat_f.shape[1]):
        row = torch.autograd.grad(flat_f[:, i].sum(), z, create_graph=create_graph, retain_graph=True)[0].flatten(1)
        div = div + row[:, i]
        frob = frob + row.pow(2).sum(1)
    return div, frob


def hutchinson_divergence(f: torch.Tensor, z: torch.Tensor, eps: torch.Tensor,
                          create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """εᵀ(∂f/∂z)ε and ‖εᵀ∂f/∂z‖², averaged over the P probes of ``eps`` (P, N, *shape): unbiased for
    tr ∂f/∂z and ‖∂f/∂z‖_F² (one vector-Jacobian product per probe)."""
    div = f.new_zeros(len(f))
    frob = f.new_zeros(len(f))
    for e in eps:
        vjp = torch.autograd.grad(f, z, e, create_graph=create_graph, retain_graph=True)[0]
        div = div + (vjp * e).flatten(1).sum(1)
        frob = frob + vjp.pow(2).flatten(1).sum(1)
    return div / len(eps), frob / len(eps)


class CNFDynamics(nn.Module):
    """The augmented ODE (z, Δ[, K, J]) of a field; ``trace`` "exact" or "hutchinson" (then set
    ``noise`` (P, N, *shape) before each solve). ``regularize`` adds the K and J integrals."""

    def __init__(self, field: nn.Module, trace: str = "exact", regularize: bool = False):
        super().__init__()
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace must be exact or hutchinson, got {trace!r}")
        self.field, self.trace, self.regularize = field, trace, regularize
        self.noise: torch.Tensor | None = None
        self.nfe = 0

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.nfe += 1
        z = state[0]
        # Gradients on: training by direct backprop, and the adjoint's backward pass (which calls this
        # with z requiring grad). Off: evaluation, sampling and the adjoint's forward pass, which still
        # need the Jacobian but no graph of it.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not (create_graph and z.requires_grad):  # a fresh leaf (a view made under no_grad has no graph)
                z = z.detach().requires_grad_(True)
            f = self.field(t, z)
            if self.trace == "exact":
                div, frob = exact_divergence(f, z, create_graph)
            else:
                if self.noise is None:
                    raise RuntimeError("hutchinson trace: set CNFDynamics.noise before solving")
                div, frob = hutchinson_divergence(f, z, self.noise, create_graph)
        out = (f, -div)
        if self.regularize:
            out = out + (f.pow(2).flatten(1).sum(1), frob)
        return out if create_graph else tuple(o.detach() for o in out)


class StateDynamics(nn.Module):
    """dz/dt = f(t, z) alone: sampling needs no trace."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.field(t, z)


@dataclass(frozen=True)
class Solver:
    """How an ODE is integrated: torchdiffeq's method, tolerances (adaptive methods), step size
    (fixed-step methods), and how gradients are computed."""

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float = 0.05  # euler, midpoint, rk4 only
    backprop: str = "adjoint"  # "adjoint" (odeint_adjoint) or "odeint" (through the solver's steps)
    seminorm: bool = False  # adjoint: leave the parameters' adjoint out of the backward error norm

    def options(self) -> dict:
        return {"step_size": self.step_size} if self.method in FIXED_STEP else {}


def solve(func: nn.Module, state, t0: float, t1: float, solver: Solver, adjoint: bool | None = None):
    """The state at t1 from the state at t0 (a tensor or a tuple of tensors, batch first); with
    ``adjoint`` (default: ``solver.backprop == "adjoint"``, and only when gradients are on) the
    gradients come from odeint_adjoint, w.r.t. the parameters of ``func`` that require grad."""
    first = state[0] if isinstance(state, tuple) else state
    times = torch.tensor([t0, t1], dtype=first.dtype, device=first.device)
    kw = dict(rtol=solver.rtol, atol=solver.atol, method=solver.method, options=solver.options())
    if adjoint is None:
        adjoint = solver.backprop == "adjoint"
    if adjoint and torch.is_grad_enabled():
        params = tuple(p for p in func.parameters() if p.requires_grad)
        adjoint_options = dict(solver.options())
        if solver.seminorm and solver.method in ADAPTIVE:
            adjoint_options["norm"] = "seminorm"
        out = odeint_adjoint(func, state, times, adjoint_params=params, adjoint_options=adjoint_options, **kw)
    else:
        out = odeint(func, state, times, **kw)
    return tuple(s[-1] for s in out) if isinstance(state, tuple) else out[-1]


class _AfterBackward(torch.autograd.Function):
    """Identity on x whose backward calls ``callback`` once every gradient that reaches x is computed:
    placed on a solve's initial state, that is after the adjoint's backward solve has finished."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, callback: Callable[[], None]) -> torch.Tensor:
        ctx.callback = callback
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.callback()
        return grad, None, None


class BackwardNFE:
    """Counts the evaluations of ``dynamics`` that a backward pass makes: the adjoint's backward solve,
    or 0 for direct backprop, which replays the recorded graph instead of calling f again.

    ``attach(x)`` goes on the solve's initial state, ``mark()`` right after the forward solve; ``value``
    (a 0-d tensor outside any graph, logged as a loss term) is filled in place when the backward pass
    reaches the initial state, so it holds the count once ``backward()`` has returned (0 without one)."""

    def __init__(self, dynamics: nn.Module, device=None):
        self.dynamics = dynamics
        self.value = torch.zeros((), device=device)
        self._after_forward = 0

    def attach(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return x
        anchor = torch.zeros((), device=x.device, requires_grad=True)  # puts x on the graph if it needs no grad
        return _AfterBackward.apply(x, anchor, self._done)

    def mark(self) -> None:
        self._after_forward = self.dynamics.nfe

    def _done(self) -> None:
        self.value.fill_(self.dynamics.nfe - self._after_forward)
