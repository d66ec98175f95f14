"""What backpropagating through an ODE solve costs in memory, measured on any device including the CPU
(``benchmarks/cnf_adjoint_memory.py``, ``tests/test_cnf.py``).

* ``saved_tensor_bytes``: the bytes of the distinct storages autograd keeps for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks`` sees every tensor saved, custom Functions' included;
  only those still held when the forward pass returns count).
  Exact and deterministic: it is what a graph holds between forward and backward, the part that grows
  with the number of solver steps when backpropagating through them.
* ``peak_allocated_bytes``: the peak of live tensor memory allocated while a function runs, from the
  allocation events of ``torch.profiler`` (``profile_memory=True``): forward, backward and their
  transients. Python's ``tracemalloc`` would not see these: torch allocates outside Python's allocator.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, Callable

import torch


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), bytes of the distinct storages that the graphs still alive when fn returns saved for
    backward). Graphs built and dropped inside fn (a Jacobian computed under ``enable_grad`` in an
    adjoint's no-grad forward pass) hold nothing by then and are not counted.

    The pack hook hands autograd a detached alias (same storage): autograd re-attaches the graph when
    it unpacks, and holding the tensor itself, whose grad_fn holds the hook's result, would make every
    saved output a reference cycle through C++ that outlives its graph."""
    held: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        alias = t.detach()
        held.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda alias: alias):
        out = fn()
    gc.collect()
    storages = {}
    for ref in held:
        alias = ref()
        if alias is not None:
            storage = alias.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return out, sum(storages.values())


def peak_allocated_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), the peak over time of the bytes allocated inside fn and not yet freed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return out, peak
