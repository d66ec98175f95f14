"""Drawing from p(x) ∝ exp(−E(x)): stochastic-gradient Langevin dynamics and the persistent replay
buffer its training chains start from."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from gensuite.errors import ConfigError, GensuiteError

Energy = Callable[[torch.Tensor], torch.Tensor]  # (N, ...) -> (N,)


def sgld(energy: Energy, x: torch.Tensor, steps: int, step_size: float, noise: float,
         grad_clip: Optional[float] = None, bounds: Optional[tuple[float, float]] = (-1.0, 1.0),
         generator: Optional[torch.Generator] = None,
         progress: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """``steps`` updates x ← clamp(x − (ε/2)·clip(∇ₓE(x)) + s·ξ), ξ ~ N(0, I), from ``x``.

    With s = √ε and no clipping or clamping this is the Langevin discretisation whose stationary
    law tends to p as ε → 0; EBM practice (IGEBM, JEM) takes a much smaller s, which samples a
    colder p^(1/T) and mostly descends the energy. ``grad_clip`` clamps each element of ∇ₓE (large
    early gradients would throw pixels far outside the data); ``bounds`` keeps x in the data's
    range. Noise comes from ``generator`` when given (reproducible samples), else from the torch RNG.
    ``progress(k, x)`` sees the state after step k. Only ∇ₓ is taken: parameter gradients are left
    untouched, and the result is detached."""
    if not torch.is_grad_enabled():  # the contract runs sample() with autograd on for such families
        raise GensuiteError("sgld: Langevin dynamics differentiates the energy; call it with gradients enabled "
                            "(gensuite.registry.sampling_mode(family) does so for sampling_needs_gradients)")
    x = x.detach()
    for k in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(x).sum(), x)
        if grad_clip is not None:
            grad = grad.clamp(-grad_clip, grad_clip)
        xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x.detach() - 0.5 * step_size * grad + noise * xi
        if bounds is not None:
            x = x.clamp(*bounds)
        if progress is not None:
            progress(k + 1, x)
    return x.detach()


class ReplayBuffer:
    """``size`` past chain ends (IGEBM's persistent chains), on the CPU, with a generator of its own.

    Each training step draws a batch of distinct entries, restarts each from uniform noise with
    probability ``reinit_prob`` (so the buffer keeps exploring), runs the chains from there and
    writes their ends back. Its contents and its generator's state are the buffer's whole state:
    saved per rank, they make a resumed run continue bit for bit."""

    def __init__(self, size: int, shape: tuple[int, ...], reinit_prob: float,
                 bounds: tuple[float, float] = (-1.0, 1.0)):
        self.size, self.shape, self.reinit_prob, self.bounds = size, tuple(shape), reinit_prob, bounds
        self.samples: Optional[torch.Tensor] = None  # (size, *shape), filled by start()
        self.generator = torch.Generator()

    @property
    def started(self) -> bool:
        return self.samples is not None

    def start(self, seed: int) -> None:
        """Seed the generator and fill the buffer with uniform noise over the data's range."""
        self.generator.manual_seed(seed)
        self.samples = self.uniform(self.size)

    def uniform(self, n: int) -> torch.Tensor:
        low, high = self.bounds
        return torch.rand(n, *self.shape, generator=self.generator) * (high - low) + low

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, starting points) of ``n`` distinct entries, a ``reinit_prob`` share of them
        replaced by fresh noise. Distinct, so writing the chains back is one unambiguous copy."""
        if n > self.size:
            raise ConfigError("model.buffer_size", f"{self.size} entries cannot give a batch of {n} distinct "
                                                   f"chains; use at least the per-rank batch size ({n})")
        index = torch.randperm(self.size, generator=self.generator)[:n]
        start = self.samples[index].clone()
        fresh = torch.rand(n, generator=self.generator) < self.reinit_prob
        start[fresh] = self.uniform(int(fresh.sum()))
        return index, start

    def peek(self, n: int) -> torch.Tensor:
        """``n`` starting points drawn like ``draw``'s (entries, a ``reinit_prob`` share replaced by
        noise) but from the torch RNG and with replacement (any ``n``): the buffer and its generator are
        left as they are (validation must not change the training chains)."""
        low, high = self.bounds
        start = self.samples[torch.randint(0, self.size, (n,))].clone()
        fresh = torch.rand(n) < self.reinit_prob
        start[fresh] = torch.rand(int(fresh.sum()), *self.shape) * (high - low) + low
        return start

    def store(self, index: torch.Tensor, x: torch.Tensor) -> None:
        self.samples[index] = x.detach().to("cpu", torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.started:
            return {}
        return {"samples": self.samples.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.samples = None
            return
        if tuple(state["samples"].shape) != (self.size, *self.shape):
            raise GensuiteError(f"replay buffer: the checkpoint holds {tuple(state['samples'].shape)}, this model "
                                f"keeps {(self.size, *self.shape)}; resume with the run's model.buffer_size")
        self.samples = state["samples"].clone()
        self.generator.set_state(state["generator"])
