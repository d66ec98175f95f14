"""DDPM training-step time of gensuite's U-Net vs two public U-Nets, and DDIM-50 vs DDPM-1000 sampling.

Training: one step is forward + backward + Adam step of the ε-prediction DDPM loss
(``diffusion_loss`` on ``NoiseSchedule.linear()``, T = 1000, uniform weighting) on a fixed random
batch of B images at R x R. Three networks take that same step:

* gensuite: ``gensuite.families.diffusion.networks.UNet`` with the widths of ``--flavor``;
* lucidrains: ``denoising_diffusion_pytorch.Unet`` (``dim`` and ``init_dim`` chosen to match
  gensuite's parameter count; same ``dim_mults``, full attention at the same resolutions, linear
  attention elsewhere as that network always has; its attention heads and dropout left at their
  defaults bar the flavor's dropout);
* diffusers: ``diffusers.UNet2DModel`` (same widths, res blocks, attention resolutions, one
  attention head, which is the same parameter count as gensuite's by construction).

Each model's parameter count and its difference from gensuite's are printed. Rows: fp32 and bf16
autocast for each model, plus ``torch.compile`` (fp32 and bf16) on CUDA. Within a row every model
first takes ``--warmup`` untimed steps, then the models take turns in ``--rounds`` rounds of
``--steps`` timed steps (A, B, C, A, B, C, ...) so machine noise hits all alike; the median step
time is reported with the ratio peer / gensuite (>= 1 means gensuite is faster).

Sampling: wall time of ``ddim_sample`` (50 steps, η = 0) and ``ddpm_sample`` (all 1000 steps) with
gensuite's raw U-Net (no EMA; only the few steps of the training rows on random data, which does
not change the cost of a step) on ``--sample-n`` samples in fp32, and the speed-up (target >= 15x).
DDIM runs before and after DDPM; its mean is used.

The peers are never gensuite dependencies: they live in their own folder (``--peers``, default
~/.cache/gensuite-bench-peers), which is put first on sys.path. When one is missing the script
prints the pip command that installs them there and still runs the rest:

    .venv/bin/python -m pip install --target ~/.cache/gensuite-bench-peers denoising-diffusion-pytorch \\
        diffusers ema-pytorch requests urllib3 charset-normalizer certifi --no-deps

With other work on the machine, pass ``--threads 1``: oversubscribed intra-op threads make CPU
step times swing by 10x or more. Never asserted by tests.

    python benchmarks/diffusion_step.py [--flavor small|mnist|cifar10] [--batch 16] [--resolution 32]
        [--channels 1] [--steps 10] [--warmup 3] [--rounds 3] [--sample-n 4] [--skip-sampling]
        [--device cpu|cuda | --cuda] [--threads N] [--peers DIR]

    # smoke run (~20 s on one core)
    python benchmarks/diffusion_step.py --steps 2 --warmup 1 --rounds 1 --sample-n 2 --resolution 16 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gensuite.families.diffusion import Diffusion  # noqa: E402
from gensuite.families.diffusion.networks import UNet, group_count  # noqa: E402
from gensuite.families.diffusion.objectives import diffusion_loss  # noqa: E402
from gensuite.families.diffusion.samplers import ddim_sample, ddpm_sample  # noqa: E402
from gensuite.families.diffusion.schedules import NoiseSchedule  # noqa: E402

DEFAULT_PEERS = Path.home() / ".cache" / "gensuite-bench-peers"
# The two peers plus what they import that the gensuite venv lacks (all else: torch, torchvision,
# einops, accelerate, huggingface_hub, safetensors, scipy, ... already come with gensuite).
PEER_PACKAGES = ("denoising-diffusion-pytorch", "diffusers", "ema-pytorch", "requests", "urllib3",
                 "charset-normalizer", "certifi")
FLAVOR_DEFAULTS = {"cifar10": {"channels": 3, "batch": 8}}  # others: 1 channel (digits), batch 16
LR, BETAS = 2e-4, (0.9, 0.999)
DDIM_STEPS = 50


def install_command(peers: Path) -> str:
    return f"{sys.executable} -m pip install --target {peers} {' '.join(PEER_PACKAGES)} --no-deps"


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the three networks
# Each builder returns (module, forward(x, t) -> ε̂, description); modules are built on the meta
# device first where a parameter count has to be searched.

class Spec:
    def __init__(self, flavor: str, channels: int, resolution: int):
        cfg = Diffusion.flavors[flavor]
        self.flavor, self.channels, self.resolution = flavor, channels, resolution
        self.base = cfg["base_channels"]
        self.mults = tuple(cfg["channel_mults"])
        self.blocks = cfg["num_res_blocks"]
        self.attention = tuple(cfg["attention_resolutions"])
        self.dropout = cfg["dropout"]
        if resolution % 2 ** (len(self.mults) - 1):
            raise SystemExit(f"--resolution {resolution} must be divisible by {2 ** (len(self.mults) - 1)} "
                             f"for channel_mults {self.mults}")
        # the side of each level's feature maps, top level first
        self.sides = [resolution // 2 ** i for i in range(len(self.mults))]

    def describe(self) -> str:
        return (f"base {self.base}, mults {self.mults}, {self.blocks} res block(s), attention at "
                f"{self.attention}, dropout {self.dropout}")


def build_gensuite(spec: Spec):
    net = UNet(spec.channels, spec.base, spec.mults, spec.blocks, spec.attention, spec.resolution, spec.dropout)
    return net, net, f"UNet({spec.describe()})"


def build_lucidrains(spec: Spec, target: int, module):
    """lucidrains' Unet always has 2 res blocks per level (3 up with the final block), linear
    attention at every level and 4 heads x 32; ``dim`` (even: its sinusoidal embedding has width
    dim) and ``init_dim`` are searched for the parameter count closest to ``target``."""
    full_attn = tuple(side in spec.attention for side in spec.sides)

    def make(dim: int, init_dim: int):
        return module.Unet(dim, init_dim=init_dim, dim_mults=spec.mults, channels=spec.channels,
                           dropout=spec.dropout, full_attn=full_attn)

    def size(dim: int, init_dim: int) -> int:
        with torch.device("meta"):
            return count(make(dim, init_dim))

    def closest(values: list[int], params) -> list[int]:
        """The two values around where the (increasing) parameter count crosses target."""
        lo, hi = 0, len(values) - 1
        while lo < hi:  # first value whose count reaches target
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if params(values[mid]) < target else (lo, mid)
        return values[max(lo - 1, 0):lo + 1]

    dims = closest(list(range(2, 8 * spec.base + 1, 2)), lambda d: size(d, d))
    best = min(((d, d) for d in dims), key=lambda c: abs(size(*c) - target))
    if abs(size(*best) - target) > 0.002 * target:  # fine-tune with the width of the first level
        candidates = [(d, i) for d in dims
                      for i in closest(list(range(max(1, d // 2), 2 * d + 1)), lambda i, d=d: size(d, i))]
        best = min(candidates + [best], key=lambda c: (abs(size(*c) - target), abs(c[1] - c[0])))
    dim, init_dim = best
    net = make(dim, init_dim)
    desc = (f"Unet(dim={dim}, init_dim={init_dim}, dim_mults={spec.mults}, full_attn={full_attn}, "
            f"attn_heads=4, attn_dim_head=32, dropout={spec.dropout})")
    return net, net, desc


def build_diffusers(spec: Spec, target: int, module):
    """UNet2DModel is Ho's layout already: same widths, res blocks (+1 on the way up), attention
    levels and one head (attention_head_dim=None) give gensuite's parameter count exactly. One
    GroupNorm group count for all layers: gensuite's for the base width."""
    down = tuple("AttnDownBlock2D" if side in spec.attention else "DownBlock2D" for side in spec.sides)
    up = tuple("AttnUpBlock2D" if side in spec.attention else "UpBlock2D" for side in reversed(spec.sides))
    kwargs = dict(sample_size=spec.resolution, in_channels=spec.channels, out_channels=spec.channels,
                  block_out_channels=tuple(spec.base * m for m in spec.mults), layers_per_block=spec.blocks,
                  down_block_types=down, up_block_types=up, attention_head_dim=None,
                  norm_num_groups=group_count(spec.base), dropout=spec.dropout)
    net = module.UNet2DModel(**kwargs)

    def forward(x, t, _net=net):
        return _net(x, t, return_dict=False)[0]

    shown = {k: v for k, v in kwargs.items() if k not in ("sample_size", "in_channels", "out_channels")}
    return net, forward, "UNet2DModel(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"


PEERS = {  # name: (module to import, builder)
    "lucidrains": ("denoising_diffusion_pytorch", build_lucidrains),
    "diffusers": ("diffusers", build_diffusers),
}


def import_peer(module_name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # requests' version chatter, deprecation notes
        module = importlib.import_module(module_name)
    version = getattr(module, "__version__", None)
    if version is None:
        with contextlib.suppress(Exception):
            version = importlib.import_module(module_name + ".version").__version__
    return module, version or "?"


# ---------------------------------------------------------------- timing

def make_step(forward, net, x0, schedule, device, bf16: bool):
    opt = torch.optim.Adam(net.parameters(), lr=LR, betas=BETAS)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> float:
        with autocast:
            loss = diffusion_loss(forward, schedule, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # synchronises on CUDA

    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run_row(label: str, models: dict, args, device, x0, schedule, bf16: bool, compile_: bool) -> dict:
    """models: name -> (module, forward). Returns name -> list of step times or an error string."""
    steps, results = {}, {}
    for name, (net, forward) in models.items():
        try:
            net.train()
            if compile_:
                compiled = torch.compile(net)
                forward = compiled if forward is net else (lambda x, t, _c=compiled: _c(x, t, return_dict=False)[0])
            steps[name] = make_step(forward, net, x0, schedule, device, bf16)
            for _ in range(args.warmup):
                steps[name]()
            sync(device)
            results[name] = []
        except Exception as err:  # a peer that cannot take this row still leaves the others
            results[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
            steps.pop(name, None)
    for r in range(args.rounds):
        for name in list(steps):
            try:
                results[name] += [timed(steps[name]) for _ in range(args.steps)]
            except Exception as err:
                results[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
                del steps[name]
        progress = ", ".join(f"{n} {statistics.median(v) * 1e3:.1f}" for n, v in results.items()
                             if isinstance(v, list) and v)
        print(f"  [{label}] round {r + 1}/{args.rounds}: median ms/step {progress}", flush=True)
    return results


def sampling(net, spec: Spec, schedule, args, device) -> dict:
    net.eval()
    shape = (args.sample_n, spec.channels, spec.resolution, spec.resolution)
    gen = torch.Generator(device)

    def run(kind: str) -> float:
        gen.manual_seed(0)
        sync(device)
        start = time.perf_counter()
        if kind == "ddim":
            ddim_sample(net, schedule, shape, steps=DDIM_STEPS, generator=gen)
        else:
            ddpm_sample(net, schedule, shape, generator=gen)
        sync(device)
        return time.perf_counter() - start

    with torch.no_grad():  # warm-up forward passes at the sampling batch
        for _ in range(3):
            net(torch.randn(shape, device=device), torch.full((shape[0],), 500, device=device))
    first = run("ddim")
    print(f"  DDIM-{DDIM_STEPS}: {first:.2f} s", flush=True)
    ddpm = run("ddpm")
    print(f"  DDPM-{schedule.T}: {ddpm:.2f} s", flush=True)
    second = run("ddim")
    print(f"  DDIM-{DDIM_STEPS}: {second:.2f} s", flush=True)
    return {"ddim": (first + second) / 2, "ddpm": ddpm}


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small", choices=sorted(Diffusion.flavors),
                        help="gensuite U-Net widths (debug: tiny, for smoke runs)")
    parser.add_argument("--batch", type=int, default=None, help="default 16 (cifar10: 8)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=None, help="default 1, digits (cifar10: 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model and row first")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of interleaved models")
    parser.add_argument("--sample-n", type=int, default=4, help="samples drawn by DDIM and DDPM")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cuda", action="store_true", help="shorthand for --device cuda (adds compile rows)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--peers", type=Path, default=DEFAULT_PEERS,
                        help="folder the peer packages are installed in (pip install --target)")
    args = parser.parse_args()

    device = torch.device("cuda" if args.cuda else args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = FLAVOR_DEFAULTS.get(args.flavor, {})
    batch = args.batch or defaults.get("batch", 16)
    channels = args.channels or defaults.get("channels", 1)
    spec = Spec(args.flavor, channels, args.resolution)
    schedule = NoiseSchedule.linear().to(device)

    # -- networks, parameter counts
    torch.manual_seed(0)
    gensuite_net, gensuite_fwd, desc = build_gensuite(spec)
    target = count(gensuite_net)
    print(f"DDPM ε-loss training step, batch {batch} x {channels} x {spec.resolution}^2, device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"flavor {spec.flavor}: {spec.describe()}")
    print(f"  gensuite    {target / 1e6:8.3f}M params  {desc}")
    models, params, missing = {"gensuite": (gensuite_net, gensuite_fwd)}, {"gensuite": target}, {}
    short = {}  # the reasons, short enough for a table cell
    peers_dir = args.peers.expanduser().resolve()
    sys.path.insert(0, str(peers_dir))
    for name, (module_name, builder) in PEERS.items():
        try:
            module, version = import_peer(module_name)
        except Exception as err:
            missing[name] = f"cannot import {module_name} from {peers_dir} ({type(err).__name__}: {err})"
            short[name] = f"missing: {module_name} not importable ({type(err).__name__})"
            print(f"  {name:<11} missing: {missing[name]}")
            continue
        try:
            torch.manual_seed(0)
            net, forward, desc = builder(spec, target, module)
        except Exception as err:
            missing[name] = f"{module_name} {version} could not build the matched network ({type(err).__name__}: {err})"
            short[name] = f"missing: {module_name} {version} build failed ({type(err).__name__})"
            print(f"  {name:<11} missing: {missing[name]}")
            continue
        models[name], params[name] = (net, forward), count(net)
        print(f"  {name:<11} {params[name] / 1e6:8.3f}M params  ({(params[name] - target) / target:+.1%} vs gensuite)"
              f"  {module_name} {version}: {desc}")
    if missing:
        print(f"\nto install the peers (never into the gensuite venv):\n  {install_command(peers_dir)}\n")
    for name, (net, _) in models.items():
        net.to(device)

    # -- training rows
    torch.manual_seed(1)
    x0 = torch.rand(batch, channels, spec.resolution, spec.resolution, device=device) * 2 - 1
    rows = [("fp32", False, False), ("bf16 autocast", True, False)]
    if device.type == "cuda":
        rows += [("fp32 + compile", False, True), ("bf16 autocast + compile", True, True)]
    print(f"\nmedian of {args.rounds} x {args.steps} timed steps per model after {args.warmup} warm-up, "
          f"models interleaved by round", flush=True)
    table = []
    for label, bf16, compile_ in rows:
        results = run_row(label, models, args, device, x0, schedule, bf16, compile_)
        ours = results.get("gensuite")
        ours_ms = statistics.median(ours) * 1e3 if isinstance(ours, list) and ours else None
        timings = {}
        for name in ("gensuite", *PEERS):
            if name in missing:
                table.append((label, name, None, None, short[name]))
                continue
            value = results[name]
            if isinstance(value, str) or not value:
                table.append((label, name, None, None, f"failed: {value or 'no timed steps'}"))
                continue
            ms = statistics.median(value) * 1e3
            timings[name] = ms
            ratio = ms / ours_ms if ours_ms and name != "gensuite" else None
            table.append((label, name, ms, ratio, ""))
        peers_timed = {n: ms for n, ms in timings.items() if n != "gensuite"}
        line = f"{label}: gensuite {ours_ms:.1f} ms/step" if ours_ms else f"{label}: gensuite failed"
        for name, ms in peers_timed.items():
            line += f", {name} {ms:.1f} ms ({ms / ours_ms:.2f}x)" if ours_ms else f", {name} {ms:.1f} ms"
        if peers_timed:
            fastest = min(peers_timed, key=peers_timed.get)
            line += f"; faster peer: {fastest}"
        print(line, flush=True)

    # -- sampling
    sample = None
    if not args.skip_sampling:
        print(f"\nsampling {args.sample_n} x {channels} x {spec.resolution}^2 with gensuite's raw U-Net, fp32",
              flush=True)
        sample = sampling(gensuite_net, spec, schedule, args, device)
        speedup = sample["ddpm"] / sample["ddim"]
        print(f"DDIM-{DDIM_STEPS} speed-up over DDPM-{schedule.T}: {speedup:.1f}x   (target >= 15x)")

    # -- markdown summary
    print(f"\n### DDPM training step: {spec.flavor} flavor, batch {batch} x {channels} x {spec.resolution}^2, "
          f"{device}, {torch.get_num_threads()} threads\n")
    print("| precision | model | params | vs gensuite | ms/step | peer / gensuite |")
    print("|---|---|---:|---:|---:|---:|")
    for label, name, ms, ratio, note in table:
        n = params.get(name)
        size = f"{n / 1e6:.3f}M" if n else "-"
        diff = f"{(n - target) / target:+.1%}" if n and name != "gensuite" else "-"
        if ms is None:
            print(f"| {label} | {name} | {size} | {diff} | {note} | - |")
        else:
            print(f"| {label} | {name} | {size} | {diff} | {ms:.1f} | {f'{ratio:.2f}x' if ratio else '-'} |")
    if sample:
        print("\n| sampler | network evaluations | samples | wall s | speed-up |\n|---|---:|---:|---:|---:|")
        print(f"| DDPM | {schedule.T} | {args.sample_n} | {sample['ddpm']:.2f} | 1.0x |")
        print(f"| DDIM (η = 0) | {DDIM_STEPS} | {args.sample_n} | {sample['ddim']:.2f} | "
              f"{sample['ddpm'] / sample['ddim']:.1f}x |")
    if missing:
        print(f"\n(missing rows: install the peers with `{install_command(peers_dir)}`)")


if __name__ == "__main__":
    main()
