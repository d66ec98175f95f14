"""Backpropagating through a fixed-step ODE solver vs the adjoint method, as the number of steps N grows
(assignment 003 P1b, b5: why differentiating through the solver's operations is a bad idea).

The problem is the course exercise's maximum-likelihood objective: the mean negative log-likelihood of
B points under the CNF f_i(z) = tanh(θ_i z_i^3) at T = 1 (exact trace), in float64, differentiated
w.r.t. θ. For each N, both gradients are computed with rk4 (``odeint(method="rk4",
options={"step_size": T / N})``):

* direct: ``torchdiffeq.odeint``, autograd through every stage of every step;
* adjoint: ``torchdiffeq.odeint_adjoint``, the backward solve with the same method and step.

Columns: the bytes autograd saves for backward (``saved_tensor_bytes``: exact, it is what grows with
N), the peak of live tensor memory during forward + backward (``peak_allocated_bytes``, from
torch.profiler's allocation events; the CPU has no allocator statistics, and tracemalloc does not see
torch's allocations), wall time, function evaluations (forward / backward), and the relative error
‖g − g*‖ / ‖g*‖ of the gradient against g* from the adjoint with dopri5 at rtol = atol = 1e-12.

    python benchmarks/cnf_adjoint_memory.py                    # B = 1024, N = 4 16 64 256
    python benchmarks/cnf_adjoint_memory.py --steps 2 8 32 --batch 256 --method euler

torch.profiler writes lines of its own to stderr (profiler_start/stop); ``2>/dev/null`` leaves the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gensuite.families.cnf.dynamics import CNFDynamics, Solver  # noqa: E402
from gensuite.families.cnf.memory import peak_allocated_bytes, saved_tensor_bytes  # noqa: E402
from gensuite.families.cnf.networks import TanhField  # noqa: E402
from gensuite.families.cnf.objectives import cnf_log_likelihood  # noqa: E402


def gradient(field: TanhField, x: torch.Tensor, solver: Solver, measure: bool = True) -> dict:
    """Loss, dL/dθ, evaluations and time of one forward + backward; with ``measure`` also the saved bytes
    (a forward alone, its graph then dropped) and the peak (a profiled forward + backward), each on
    passes of their own so the timed one runs without hooks or profiler."""
    dynamics = CNFDynamics(field, "exact")

    def forward():
        return -cnf_log_likelihood(dynamics, x, 1.0, solver)["log_px"].mean()

    saved = peak = 0
    if measure:
        _, saved = saved_tensor_bytes(forward)
        _, peak = peak_allocated_bytes(lambda: forward().backward())
    field.theta.grad = None
    before = dynamics.nfe
    start = time.perf_counter()
    loss = forward()
    forward_nfe = dynamics.nfe - before
    loss.backward()
    seconds = time.perf_counter() - start
    return {"loss": loss.item(), "grad": field.theta.grad.clone(), "saved": saved, "peak": peak,
            "seconds": seconds, "nfe": (forward_nfe, dynamics.nfe - before - forward_nfe)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--method", default="rk4", choices=["euler", "midpoint", "rk4"])
    parser.add_argument("--theta", type=float, nargs=2, default=[0.8, 1.3])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 2, dtype=torch.float64) * 1.5
    field = TanhField(2, 3, "self", args.theta).double()

    ref = gradient(field, x, Solver("dopri5", 1e-12, 1e-12, backprop="adjoint"), measure=False)
    g_star = ref["grad"]
    print(f"problem: mean NLL of {args.batch} points under f_i = tanh(θ_i z_i^3), θ = {tuple(args.theta)}, T = 1, "
          f"float64; reference: adjoint dopri5 rtol = atol = 1e-12 ({ref['nfe'][0]} + {ref['nfe'][1]} evaluations), "
          f"loss {ref['loss']:.12f}, dL/dθ = {[f'{v:.10f}' for v in g_star.tolist()]}\n")
    print(f"| N ({args.method}) | backprop | saved for backward | peak allocated | time | evaluations fwd / bwd | "
          f"loss error | gradient rel. error |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in args.steps:
        for backprop in ("odeint", "adjoint"):
            r = gradient(field, x, Solver(args.method, step_size=1.0 / n, backprop=backprop))
            err = float((r["grad"] - g_star).norm() / g_star.norm())
            name = "direct (odeint)" if backprop == "odeint" else "adjoint"
            print(f"| {n} | {name} | {r['saved'] / 2**20:.2f} MiB | {r['peak'] / 2**20:.2f} MiB | "
                  f"{r['seconds']:.2f} s | "
                  f"{r['nfe'][0]} / {r['nfe'][1]} | {abs(r['loss'] - ref['loss']):.1e} | {err:.1e} |")


if __name__ == "__main__":
    main()
