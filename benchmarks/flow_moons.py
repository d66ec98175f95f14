"""Two moons: test NLL and training steps/s of gensuite's flows against zuko's and normflows' at an equal budget.

Data (everyone alike): the moons shards' points, from the same reader (``gensuite.data.sources.read_moons``,
scikit-learn's ``make_moons``): 10,000 training points (noise 0.05, ``random_state`` 0) and the 2,000
held-out test points (``random_state`` 1). The flow and cnf families model points as they are (no
standardisation), so by default every model sees the raw points; ``--standardize`` makes every model
see (x - mean) / std of the training points instead and reports the NLL in the original space (the
log-det of the standardisation, Σ log std, added identically for all). Batches of ``--batch`` (256)
are drawn without replacement, epoch by epoch, in one fixed order (``--seed``) that every model
walks through.

Models:

* gensuite ``realnvp``, ``spline`` (family ``flow``) and ``ffjord`` (family ``cnf``, flavor ``points``),
  built through their family classes with the flavors' settings (``build_networks``); the loss is the
  family's own ``loss`` (the cnf one integrates with ``odeint_adjoint``, dopri5 at 1e-5, exact trace),
  ActNorm is initialised by the family's ``initialize`` on the first ``--batch`` training points in
  stored order (as the trainer does), and the test NLL is the family's ``log_likelihood``;
* zuko: ``zuko.flows.RealNVP(features=2, transforms=8, hidden_features=(64, 64))`` and
  ``zuko.flows.NSF(features=2, transforms=6, bins=8, hidden_features=(64, 64))``;
* normflows: RealNVP with ActNorm, 8 blocks of ``[AffineCouplingBlock(MLP([1, 64, 64, 2],
  init_zeros=True)), Permute(2, mode="swap"), ActNorm((2,))]`` on a fixed ``DiagGaussian(2)``; its
  ActNorm initialises on the same first batch as gensuite's (one ``log_prob`` before training).

Every model: ``--steps`` (2,000) steps of Adam (``--lr`` 2e-3, betas 0.9/0.999) with cosine decay to
0 at its last step (gensuite's ``trainer.lr_factor``, as ``jobs/flow_moons.yaml``), loss −mean log p
on the batch. FFJORD costs far more per step: ``--ffjord-steps`` (default ``--steps``) or
``--skip-ffjord``; the table says when its budget differs. Initial weights come from ``--seed`` too.

Timing: the steps themselves are timed (forward, backward, Adam step, scheduler step). Training is
split into ``--rounds`` rounds in which the models take turns (the first model rotates every round),
each running its share of its budget, so machine noise hits all alike; the first ``--warmup`` steps of
each model (at most half its budget) are left out and the median of the rest gives steps/s. The test
NLL (mean −log p over the test points, nats) comes after the last step, from the trained weights (no
EMA for anyone).

Output: parameter counts, per-round progress, a markdown table (model | params | test NLL | steps/s |
ratio vs the fastest peer) and the two targets of issue 16: our best flow's test NLL is lower than
every peer's at the same budget; our RealNVP trains at >= 1.0x the fastest peer's steps/s.

The peers are never gensuite dependencies: they live in their own folder (``--peers``, default
~/.cache/gensuite-bench-peers), put first on sys.path. When one is missing its rows are marked and the
install command is printed; both need nothing beyond torch and numpy:

    .venv/bin/python -m pip install --target ~/.cache/gensuite-bench-peers zuko normflows --no-deps

With other work on the machine, pass ``--threads 1`` (and OMP_NUM_THREADS=1). Never asserted by tests.

    python benchmarks/flow_moons.py [--steps 2000] [--ffjord-steps N | --skip-ffjord] [--batch 256]
        [--lr 2e-3] [--rounds 10] [--warmup 20] [--seed 0] [--standardize] [--device cpu|cuda]
        [--threads N] [--peers DIR]

    # smoke run (~1 min on one core)
    OMP_NUM_THREADS=1 python benchmarks/flow_moons.py --steps 50 --ffjord-steps 5 --rounds 2 --warmup 5 --threads 1
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gensuite.config import OptimizerSpec, from_dict  # noqa: E402
from gensuite.data.sources import DATASETS, read_moons  # noqa: E402
from gensuite.families.cnf import CNF, CNFConfig  # noqa: E402
from gensuite.families.flow import FlowConfig, NormalizingFlow  # noqa: E402
from gensuite.registry import DataSpec, Networks  # noqa: E402
from gensuite.trainer import lr_factor  # noqa: E402

DEFAULT_PEERS = Path.home() / ".cache" / "gensuite-bench-peers"
PEER_PACKAGES = ("zuko", "normflows")  # both need only torch and numpy, which gensuite has
MOONS = DATASETS["moons"].params  # n, noise, seed of the shards (shards/build.py moons)


def install_command(peers: Path) -> str:
    return f"{sys.executable} -m pip install --target {peers} {' '.join(PEER_PACKAGES)} --no-deps"


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_error(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]


# ---------------------------------------------------------------- data

def moons(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) float32 points exactly as the moons shards hold them (test: n // 5 points)."""
    split = {"train": [], "test": []}
    for name, point, _label in read_moons(None, n=n, noise=noise, seed=seed):
        split[name].append(point)
    return torch.from_numpy(np.stack(split["train"])), torch.from_numpy(np.stack(split["test"]))


def batch_order(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch) indices: epochs of a fixed random permutation each, the last partial batch dropped."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = n // batch
    if per_epoch < 1:
        raise SystemExit(f"--batch {batch} exceeds the {n} training points")
    rows = []
    while len(rows) < steps:
        perm = torch.randperm(n, generator=g)
        rows += list(perm[:per_epoch * batch].view(per_epoch, batch))
    return torch.stack(rows[:steps])


# ---------------------------------------------------------------- the models
# Each builder returns a Model: the module whose parameters Adam trains, loss(x, step) -> (loss,
# extras), log_prob(x) -> (N,), and an optional ActNorm initialisation from a batch.

@dataclass
class Model:
    name: str
    source: str  # "gensuite" or the peer package
    module: nn.Module
    loss: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]]
    log_prob: Callable[[torch.Tensor], torch.Tensor]
    desc: str
    init: Optional[Callable[[torch.Tensor], None]] = None
    steps: int = 0
    # filled while training
    times: list = field(default_factory=list)
    nfe: list = field(default_factory=list)
    done: int = 0
    seconds: float = 0.0  # all its steps, warm-up included
    last_loss: float = float("nan")
    failed: Optional[str] = None
    nll: Optional[float] = None


POINTS = DataSpec("moons", "points", (2,), num_classes=2, class_names=("upper", "lower"))


def gensuite_flow(flavor: str) -> Model:
    cfg = from_dict(FlowConfig, dict(NormalizingFlow.flavors[flavor]), "model")
    family = NormalizingFlow(cfg, POINTS)
    nets = Networks(family.build_networks())

    def loss(x, step):
        return family.loss("model", nets, {"x": x}, step)["loss"], {}

    def log_prob(x):
        return family.log_likelihood(nets, {"x": x}, 1, torch.arange(len(x)))["log_px"]

    def init(x):
        family.initialize(nets, {"x": x})

    c = cfg
    if c.kind == "spline":
        desc = f"{c.layers} RQ-spline couplings, {c.bins} bins on [-{c.tail_bound:g}, {c.tail_bound:g}], MLP {c.hidden}"
    else:
        desc = f"{c.layers} affine couplings, MLP {c.hidden}, log-scale {c.scale_bound:g}·tanh(h/{c.scale_bound:g})"
    desc += ", ActNorm before each" if c.actnorm else ""
    return Model(f"gensuite {flavor}", "gensuite", nets["flow"], loss, log_prob, f"flow/{flavor}: {desc}",
                 init if family.initializes_from_data else None)


def gensuite_ffjord() -> Model:
    cfg = from_dict(CNFConfig, dict(CNF.flavors["points"]), "model")
    family = CNF(cfg, POINTS)
    nets = Networks(family.build_networks())

    def loss(x, step):
        terms = family.loss("model", nets, {"x": x}, step)
        return terms["loss"], {"nfe_forward": terms["nfe_forward"], "nfe_backward": terms["nfe_backward"]}

    def log_prob(x):
        return family.log_likelihood(nets, {"x": x}, 1, torch.arange(len(x)))["log_px"]

    c = cfg
    desc = (f"cnf/points: {c.field} field {c.hidden}, {c.activation}, T={c.integration_time:g}, {c.solver} "
            f"rtol=atol={c.rtol:g} ({c.backprop}), {family.train_trace} trace; eval {c.eval_rtol:g}")
    return Model("gensuite ffjord", "gensuite", nets["field"], loss, log_prob, desc)


def zuko_realnvp(zuko) -> Model:
    flow = zuko.flows.RealNVP(features=2, transforms=8, hidden_features=(64, 64))
    return Model("zuko RealNVP", "zuko", flow, lambda x, step: (-flow().log_prob(x).mean(), {}),
                 lambda x: flow().log_prob(x),
                 "RealNVP(features=2, transforms=8, hidden_features=(64, 64)): affine couplings, "
                 "soft-clipped log-scale")


def zuko_nsf(zuko) -> Model:
    flow = zuko.flows.NSF(features=2, transforms=6, bins=8, hidden_features=(64, 64))
    return Model("zuko NSF", "zuko", flow, lambda x, step: (-flow().log_prob(x).mean(), {}),
                 lambda x: flow().log_prob(x),
                 "NSF(features=2, transforms=6, bins=8, hidden_features=(64, 64)): autoregressive RQ splines "
                 "on [-5, 5]")


def normflows_realnvp(nf) -> Model:
    flows = []
    for _ in range(8):
        flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP([1, 64, 64, 2], init_zeros=True)),
                  nf.flows.Permute(2, mode="swap"), nf.flows.ActNorm((2,))]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)

    def init(x):  # ActNorm initialises itself on the first batch it sees (here: gensuite's init batch)
        with torch.no_grad():
            model.log_prob(x)

    return Model("normflows RealNVP+ActNorm", "normflows", model,
                 lambda x, step: (-model.log_prob(x).mean(), {}), model.log_prob,
                 "8 x [AffineCouplingBlock(MLP([1, 64, 64, 2], init_zeros=True)), Permute(2, 'swap'), "
                 "ActNorm((2,))], DiagGaussian(2, trainable=False); exp log-scale", init)


PEERS = {  # package: builders
    "zuko": (zuko_realnvp, zuko_nsf),
    "normflows": (normflows_realnvp,),
}


def import_peer(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    return module, getattr(module, "__version__", "?")


# ---------------------------------------------------------------- training and timing

def make_step(model: Model, lr: float, device: torch.device):
    opt = torch.optim.Adam(model.module.parameters(), lr=lr, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(OptimizerSpec(lr=lr, schedule="cosine"), model.steps))

    def step(x: torch.Tensor, i: int):
        sync(device)
        start = time.perf_counter()
        loss, extras = model.loss(x, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        sync(device)
        return time.perf_counter() - start, loss, extras

    return step


def shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


def train(models: list[Model], train_x: torch.Tensor, order: torch.Tensor, args, device) -> None:
    steps = {m.name: make_step(m, args.lr, device) for m in models}
    plan = {m.name: shares(m.steps, args.rounds) for m in models}
    warmup = {m.name: min(args.warmup, m.steps // 2) for m in models}  # a short budget still times half its steps
    for r in range(args.rounds):
        turn = models[r % len(models):] + models[:r % len(models)]
        for m in turn:
            if m.failed:
                continue
            for _ in range(plan[m.name][r]):
                i = m.done
                try:
                    seconds, loss, extras = steps[m.name](train_x[order[i]], i)
                except Exception as err:
                    m.failed = f"step {i}: {short_error(err)}"
                    break
                m.done += 1
                m.last_loss = loss.item()
                if not math.isfinite(m.last_loss):
                    m.failed = f"step {i}: loss {m.last_loss}"
                    break
                m.seconds += seconds
                if i >= warmup[m.name]:
                    m.times.append(seconds)
                if extras:
                    m.nfe.append((float(extras["nfe_forward"]), float(extras["nfe_backward"])))
        parts = []
        for m in models:
            if m.failed:
                parts.append(f"{m.name} FAILED")
            elif m.times:
                parts.append(f"{m.name} {statistics.median(m.times) * 1e3:.1f} ms (loss {m.last_loss:.3f})")
            else:
                parts.append(f"{m.name} {m.done} steps (warm-up)")
        print(f"  round {r + 1}/{args.rounds}: median ms/step " + ", ".join(parts), flush=True)


def test_nll(model: Model, test_x: torch.Tensor, log_std_sum: float) -> float:
    model.module.eval()
    with torch.no_grad():
        log_p = torch.cat([model.log_prob(chunk) for chunk in test_x.split(1000)])
    model.module.train()
    return float(-(log_p.double().mean()) + log_std_sum)


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps of every discrete flow")
    parser.add_argument("--ffjord-steps", type=int, default=None, help="FFJORD's steps (default: --steps)")
    parser.add_argument("--skip-ffjord", action="store_true")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam, cosine decay to 0 at each model's last step")
    parser.add_argument("--rounds", type=int, default=10, help="rounds in which the models take turns")
    parser.add_argument("--warmup", type=int, default=20, help="first steps of each model left out of the timing")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    parser.add_argument("--n-train", type=int, default=MOONS["n"], help="training points (test: a fifth as many)")
    parser.add_argument("--noise", type=float, default=MOONS["noise"])
    parser.add_argument("--data-seed", type=int, default=MOONS["seed"], help="make_moons random_state (test: +1)")
    parser.add_argument("--standardize", action="store_true",
                        help="train every model on standardised points; NLL still in the data space")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--peers", type=Path, default=DEFAULT_PEERS,
                        help="folder the peer packages are installed in (pip install --target)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be >= 1")
    ffjord_steps = 0 if args.skip_ffjord else (args.steps if args.ffjord_steps is None else args.ffjord_steps)

    # -- data
    train_x, test_x = moons(args.n_train, args.noise, args.data_seed)
    log_std_sum = 0.0
    if args.standardize:
        mean, std = train_x.mean(0), train_x.std(0)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        log_std_sum = float(std.double().log().sum())
    order = batch_order(len(train_x), args.batch, max(args.steps, ffjord_steps), args.seed)
    init_batch = train_x[:args.batch]  # the trainer's ActNorm batch: the first batch_size points in stored order
    train_x, test_x, order, init_batch = (t.to(device) for t in (train_x, test_x, order, init_batch))

    print(f"two moons (noise {args.noise:g}): {len(train_x)} training / {len(test_x)} test points"
          f"{', standardised' if args.standardize else ', raw (as the family)'}; batch {args.batch}, "
          f"Adam {args.lr:g} cosine, {args.steps} steps (FFJORD: "
          f"{ffjord_steps if ffjord_steps else 'skipped'}); device {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")

    # -- models
    builders: list[tuple[str, str, Callable]] = [("gensuite", "realnvp", lambda: gensuite_flow("realnvp")),
                                                 ("gensuite", "spline", lambda: gensuite_flow("spline"))]
    if ffjord_steps:
        builders.append(("gensuite", "ffjord", gensuite_ffjord))
    peers_dir = args.peers.expanduser().resolve()
    sys.path.insert(0, str(peers_dir))
    missing: dict[str, str] = {}
    versions = {"gensuite": "(this checkout)"}
    for package, peer_builders in PEERS.items():
        try:
            module, versions[package] = import_peer(package)
        except Exception as err:
            missing[package] = f"cannot import {package} from {peers_dir} ({short_error(err)})"
            continue
        builders += [(package, b.__name__, lambda b=b, m=module: b(m)) for b in peer_builders]

    models: list[Model] = []
    for source, what, build in builders:
        torch.manual_seed(args.seed)
        try:
            model = build()
        except Exception as err:
            missing[f"{source} {what}"] = f"build failed: {short_error(err)}"
            continue
        model.steps = ffjord_steps if model.name == "gensuite ffjord" else args.steps
        model.module.to(device).train()
        if model.init is not None:
            model.init(init_batch)
        models.append(model)
        print(f"  {model.name:<26} {count(model.module):>7,} params  {source} {versions[source]}: {model.desc}")
    for what, why in missing.items():
        print(f"  {what:<26} missing: {why}")
    if missing:
        print(f"\nto install the peers (never into the gensuite venv):\n  {install_command(peers_dir)}\n")

    # -- training, interleaved
    print(f"\ntraining in {args.rounds} rounds, models taking turns; steps/s from the median step after "
          f"{args.warmup} warm-up steps", flush=True)
    start = time.perf_counter()
    train(models, train_x, order, args, device)
    print(f"training wall time {time.perf_counter() - start:.1f} s", flush=True)

    # -- test NLL
    for m in models:
        if m.failed:
            print(f"  {m.name}: FAILED ({m.failed})")
            continue
        t0 = time.perf_counter()
        try:
            m.nll = test_nll(m, test_x, log_std_sum)
        except Exception as err:
            m.failed = f"test NLL: {short_error(err)}"
            print(f"  {m.name}: {m.failed}")
            continue
        extra = ""
        if m.nfe:
            fwd, bwd = zip(*m.nfe[-min(len(m.nfe), 20):])
            extra = f", last steps' NFE forward {statistics.mean(fwd):.1f} / backward {statistics.mean(bwd):.1f}"
        print(f"  {m.name}: test NLL {m.nll:.4f} nats; {m.done} steps in {m.seconds:.1f} s, "
              f"{time.perf_counter() - t0:.1f} s to evaluate{extra}")

    # -- summary
    def rate(m: Model) -> Optional[float]:
        return 1 / statistics.median(m.times) if m.times and not m.failed else None

    peers = [m for m in models if m.source != "gensuite" and rate(m)]
    fastest = max(peers, key=rate) if peers else None
    print(f"\n### Two moons, {args.steps} steps of {args.batch}, Adam {args.lr:g} cosine, {device}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| model | params | test NLL (nats) | steps/s | ratio vs fastest peer |")
    print("|---|---:|---:|---:|---:|")
    footnote = False
    for m in models:
        label = m.name
        if m.steps != args.steps:
            label += f" ({m.steps} steps)†"
            footnote = True
        if m.failed:
            print(f"| {label} | {count(m.module):,} | failed: {m.failed} | - | - |")
            continue
        r = rate(m)
        ratio = f"{r / rate(fastest):.2f}x" if r and fastest else "-"
        print(f"| {label} | {count(m.module):,} | {m.nll:.4f} | {r:.1f} | {ratio} |" if r else
              f"| {label} | {count(m.module):,} | {m.nll:.4f} | - (no step past warm-up) | - |")
    for what in missing:
        print(f"| {what} | - | missing | - | - |")
    if footnote:
        print(f"\n† a budget other than the {args.steps} steps of the other rows (its own cosine schedule); "
              f"left out of the NLL target")
    if args.standardize:
        print(f"\n(trained on standardised points; NLL in the data space: + Σ log std = {log_std_sum:+.4f} nats)")

    # -- targets
    ours = [m for m in models if m.source == "gensuite" and m.nll is not None and m.steps == args.steps]
    rivals = [m for m in models if m.source != "gensuite" and m.nll is not None]
    print()
    if ours and rivals:
        best, best_peer = min(ours, key=lambda m: m.nll), min(rivals, key=lambda m: m.nll)
        met = all(best.nll < m.nll for m in rivals)
        print(f"target 1 (our best flow's test NLL < every peer's, {args.steps} steps): "
              f"{'met' if met else 'not met'}: {best.name} {best.nll:.4f} vs best peer {best_peer.name} "
              f"{best_peer.nll:.4f} nats ({best.nll - best_peer.nll:+.4f})")
    else:
        print("target 1 (our best flow's test NLL < every peer's): cannot check"
              f" ({'no peer trained' if not rivals else 'no gensuite flow trained'})")
    ours_realnvp = next((m for m in models if m.name == "gensuite realnvp" and rate(m)), None)
    if ours_realnvp and fastest:
        ratio = rate(ours_realnvp) / rate(fastest)
        print(f"target 2 (our RealNVP steps/s >= 1.0x the fastest peer's): {'met' if ratio >= 1.0 else 'not met'}: "
              f"{rate(ours_realnvp):.1f} vs {fastest.name} {rate(fastest):.1f} steps/s ({ratio:.2f}x)")
    else:
        print("target 2 (our RealNVP steps/s >= 1.0x the fastest peer's): cannot check"
              f" ({'no peer timed' if not fastest else 'gensuite realnvp not timed'})")
    if missing:
        print(f"\n(missing rows: install the peers with `{install_command(peers_dir)}`)")


if __name__ == "__main__":
    main()
