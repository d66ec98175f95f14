"""GPU benchmark: training throughput, MFU, data-loader headroom, StackGAN and DDP scaling, in one table.

Rows (each a training step of gensuite's own family code on a fixed batch resident on the device,
images 3 x 32 x 32 unless said otherwise):

* DDPM (family ``diffusion``, flavor ``cifar10`` = Ho's 35.7M U-Net, batch 128): the family's
  ``loss`` (ε-prediction, linear schedule) + backward + Adam, in fp32, bf16 autocast and
  bf16 autocast + ``torch.compile``; plus a diagnostic row with the family's noise-schedule tables
  moved to the device (the family keeps them on the CPU, which costs a device-host copy per step).
* DCGAN (family ``gan``, flavor ``dcgan``, non-saturating loss, batch 128): one D step and one G step
  as the trainer takes them (the family's ``players`` and ``loss``), same three precisions.
* MFU: FLOPs of one step (forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``)
  x steps/s over the device's dense bf16 peak (a table keyed by the device name, or ``--peak-tflops``).
* data loader: the suite's shard pipeline (``ShardStream`` + ``make_loader``, checks on, as training
  reads it, batches copied to the device) over a synthetic CIFAR-10 set written by ``shards/build.py``'s
  ``build`` into a temporary folder; samples/s with 0 and ``--workers`` workers, and the ratio to the
  fastest DDPM and DCGAN rows' images/s (>= 1: the loader keeps up with the GPU).
* StackGAN: ``benchmarks/stackgan_step.py``'s ``--cuda`` rows (its ``ours_step``: Stage I 64 px batch
  64, Stage II 256 px batch 16; fp32, bf16, paired D, channels_last, compile), images/s.
* DDP: with >= 2 CUDA devices, the DCGAN bf16 step in 2 processes (``torch.multiprocessing`` spawn,
  NCCL, ``DistributedDataParallel`` as Accelerate wraps it), total images/s and scaling efficiency
  against 2 x the single-process row.

Timing: ``--warmup`` untimed steps, then chunks of steps timed with CUDA events (``perf_counter`` on
CPU) for ``--row-s`` seconds; the median chunk gives ms/step. Every row runs under a time limit and
the whole under ``--budget-s`` (a row that no longer fits is skipped and says so); it never prompts.
A row that fails is reported, the others still run, and the exit status is 1 with the failures
listed. A row whose imports need a package that is not installed (e.g. webdataset for the data rows)
is skipped with that reason. ``--json PATH`` writes every row and the settings.

Without CUDA it prints one line and exits 0; ``--dry-run-cpu`` runs every row at tiny sizes on the
CPU instead (fp32 and bf16 autocast; compile only with ``--compile``; no NCCL: ``--ddp-cpu`` runs the
DDP row with gloo) to check the script itself.

    python benchmarks/gpu.py [--json results.json] [--budget-s 420] [--peak-tflops T] [--only ddpm,dcgan]
    python benchmarks/gpu.py --dry-run-cpu [--compile] [--ddp-cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import importlib.abc
import importlib.util
import json
import math
import os
import pickle
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

STARTED = time.monotonic()  # --budget-s counts from here, torch's import included

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # gensuite from this checkout, installed or not

# Dense (no sparsity) bf16 tensor-core peaks, TFLOPS, from NVIDIA's data sheets. Matched against the
# device name's words in this order; the first entry whose words are all present is used.
PEAK_BF16_TFLOPS = (
    ("H200", ("h200",), 989.0),
    ("H100 PCIe", ("h100", "pcie"), 756.0),
    ("H100 NVL", ("h100", "nvl"), 835.0),
    ("H100 SXM", ("h100",), 989.0),
    ("A100", ("a100",), 312.0),
    ("L4", ("l4",), 121.0),
)
GROUPS = ("ddpm", "dcgan", "data", "stackgan", "ddp")
SIZES = {  # defaults of the size options: on the GPU, and for --dry-run-cpu
    "gpu": {"ddpm_flavor": "cifar10", "ddpm_batch": 128, "dcgan_flavor": "dcgan", "dcgan_batch": 128,
            "stackgan_batch1": 64, "stackgan_batch2": 16, "data_samples": 10000, "row_s": 3.0, "warmup": 3,
            "budget_s": 420.0},
    "cpu": {"ddpm_flavor": "small", "ddpm_batch": 4, "dcgan_flavor": "debug", "dcgan_batch": 4,
            "stackgan_batch1": 2, "stackgan_batch2": 2, "data_samples": 256, "row_s": 0.3, "warmup": 1,
            "budget_s": 90.0},
}
# --dry-run-cpu: StackGAN widths small enough for a CPU (text, c, z, G, D widths, Stage-II res blocks).
TINY_STACKGAN = {"TEXT_DIM": 32, "C_DIM": 8, "Z_DIM": 8, "GF_DIM": 16, "DF_DIM": 8, "RES_BLOCKS": 1}
IMAGE_SHAPE = (3, 32, 32)
GAN_LR, GAN_BETAS, DDPM_LR, DDPM_BETAS = 2e-4, (0.5, 0.999), 2e-4, (0.9, 0.999)
EMERGENCY_GRACE_S = 25  # after --budget-s, a hung row ends the run (partial JSON, exit 1)


class RowSkipped(Exception):
    """The row cannot run here (a missing package, too few devices, no budget left); not a failure."""


class RowTimeout(BaseException):
    """A row's time limit (a BaseException, so that no library's ``except Exception`` swallows it)."""


# ---------------------------------------------------------------- imports

class Without(importlib.abc.MetaPathFinder):
    """--without NAME: behave as if a top-level package were not installed."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by --without)", name=fullname)
        return None


def bare_package(name: str) -> None:
    """Register package ``name`` without running its ``__init__.py``, so that importing one of its
    submodules runs only that submodule's imports."""
    if name in sys.modules:
        return
    folder = ROOT.joinpath(*name.split("."))
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(importlib.import_module(parent), child, module)


def prepare_imports(without=()) -> None:
    """``gensuite/families/__init__.py`` imports every family, and through the cnf family's metrics the
    shard pipeline and its webdataset; ``gensuite/families/stackgan/__init__.py`` needs yaml. A row
    imports only what its own family needs: the two packages are registered bare, and
    ``gensuite.families.diffusion`` / ``.gan`` (torch only) are imported as usual."""
    if without and not any(isinstance(f, Without) for f in sys.meta_path):
        sys.meta_path.insert(0, Without(without))
    bare_package("gensuite.families")
    bare_package("gensuite.families.stackgan")


def missing_package(err: BaseException) -> str | None:
    """The third-party package a ModuleNotFoundError is about (None: not one, or gensuite's own)."""
    if isinstance(err, ModuleNotFoundError) and err.name and not err.name.startswith("gensuite"):
        return err.name.partition(".")[0]
    return None


def load_stackgan_step():
    """benchmarks/stackgan_step.py as a module (its ``ours_step`` and row lists)."""
    name = "gensuite_bench_stackgan_step"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "stackgan_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


# ---------------------------------------------------------------- timing and FLOPs

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(step, n: int, device: torch.device) -> float:
    """Seconds for ``n`` calls of ``step``: CUDA events on the GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def measure(step, device: torch.device, per_step: int, row_s: float, warmup: int) -> dict:
    """Warm up, then time chunks of steps (each about row_s / 5) for row_s seconds (>= 3 chunks);
    the median chunk gives the step time."""
    for _ in range(warmup):
        step()
    sync(device)
    first = elapsed(step, 1, device)
    k = max(1, min(1000, round(row_s / 5 / max(first, 1e-6))))
    chunks, t0 = [], time.perf_counter()
    while len(chunks) < 3 or (time.perf_counter() - t0 < row_s and len(chunks) < 50):
        chunks.append(elapsed(step, k, device) / k)
    step_s = statistics.median(chunks)
    return {"step_ms": step_s * 1e3, "throughput": per_step / step_s, "timed_steps": k * len(chunks),
            "chunk_spread": (max(chunks) - min(chunks)) / step_s}


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def peak_tflops(args, device: torch.device) -> tuple[float | None, str]:
    """(peak, where it came from)."""
    if args.peak_tflops:
        return args.peak_tflops, f"--peak-tflops {args.peak_tflops:g}"
    if device.type != "cuda":
        return None, "none on CPU (pass --peak-tflops to compute MFU anyway)"
    name = torch.cuda.get_device_name(device)
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    for entry, needed, tflops in PEAK_BF16_TFLOPS:
        if set(needed) <= words:
            return tflops, f"table entry {entry!r} ({tflops:g} TFLOPS bf16 dense) for device {name!r}"
    return None, f"device {name!r} not in the peak table; pass --peak-tflops to compute MFU"


# ---------------------------------------------------------------- gensuite steps

def image_spec():
    from gensuite.registry import DataSpec

    return DataSpec("synthetic", "image", IMAGE_SHAPE, 10, tuple(str(i) for i in range(10)))


def random_batch(n: int, device: torch.device) -> dict:
    return {"x": torch.rand(n, *IMAGE_SHAPE, device=device), "y": torch.randint(0, 10, (n,), device=device)}


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def family_step(family, bare: dict, wrapped: dict, frozen_wrapped: bool, optimizers: dict, batch: dict, amp):
    """One training iteration as the trainer's ``player_step`` takes it, without its logging: per
    player, the other networks frozen, ``family.loss`` under autocast, backward, Adam, ``after_step``.
    ``wrapped``: the modules the active player trains through (compiled, DDP, or the bare ones);
    ``frozen_wrapped``: frozen networks run through them too (compile) instead of bare (DDP)."""
    from gensuite.registry import Networks

    players = family.players()

    def step() -> None:
        for player in players:
            active = set(player.networks)
            for name, module in bare.items():
                module.requires_grad_(name in active)
            view = Networks({n: wrapped[n] if n in active or frozen_wrapped else bare[n] for n in bare})
            for _ in range(player.steps):
                with amp:
                    loss = family.loss(player.name, view, batch, 0)["loss"]
                optimizer = optimizers[player.name]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    family.after_step(player.name, view, 0)

    return step


def build_family(group: str, flavor: str, device: torch.device):
    """(family, networks on device, optimizers per player) for the DDPM or DCGAN rows."""
    if group == "ddpm":
        from gensuite.families.diffusion import Diffusion, DiffusionConfig as Config
        cls, lr, betas = Diffusion, DDPM_LR, DDPM_BETAS
    else:
        from gensuite.families.gan import GAN as cls, GANConfig as Config
        lr, betas = GAN_LR, GAN_BETAS
    family = cls(Config(**cls.flavors[flavor]), image_spec())
    nets = {name: module.to(device).train() for name, module in family.build_networks().items()}
    optimizers = {p.name: torch.optim.Adam([q for n in p.networks for q in nets[n].parameters()], lr=lr, betas=betas)
                  for p in family.players()}
    return family, nets, optimizers


# ---------------------------------------------------------------- rows

class Bench:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        self.start = STARTED
        self.flops: dict[str, int] = {}  # model key -> FLOPs per step
        self.results: list[dict] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="gensuite-gpu-bench-")
        self._shards = None
        self.peak, self.peak_source = peak_tflops(args, device)

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def result(self, name: str) -> dict | None:
        return next((r for r in self.results if r["name"] == name and r["status"] == "ok"), None)

    def mfu(self, flops: int | None, step_ms: float) -> tuple[float | None, float | None]:
        """(achieved TFLOP/s, MFU against the peak)."""
        if not flops:
            return None, None
        achieved = flops / (step_ms / 1e3) / 1e12
        return achieved, achieved / self.peak if self.peak else None

    # -- DDPM and DCGAN

    def model_row(self, group: str, bf16: bool, compile_: bool, schedule_on_device: bool = False) -> dict:
        args, device = self.args, self.device
        flavor = args.ddpm_flavor if group == "ddpm" else args.dcgan_flavor
        batch_size = args.ddpm_batch if group == "ddpm" else args.dcgan_batch
        torch.manual_seed(0)
        family, nets, optimizers = build_family(group, flavor, device)
        if schedule_on_device:
            family.schedule.to(device)
        batch = random_batch(batch_size, device)
        amp = autocast(device, bf16)
        if group not in self.flops:  # the same FLOPs in every precision; counted on the eager step
            self.flops[group] = count_flops(family_step(family, nets, nets, False, optimizers, batch, amp))
        wrapped = {n: torch.compile(m) for n, m in nets.items()} if compile_ else nets
        step = family_step(family, nets, wrapped, compile_, optimizers, batch, amp)
        out = measure(step, device, batch_size, args.row_s, args.warmup + (2 if compile_ else 0))
        params = sum(p.numel() for m in nets.values() for p in m.parameters())
        return {**out, "batch": batch_size, "unit": "images/s", "flops_per_step": self.flops[group],
                "details": {"flavor": flavor, "params": params, "players": [p.name for p in family.players()]}}

    # -- data loader

    def shard_set(self) -> Path:
        """A synthetic CIFAR-10 (smooth random images) as the python batches, built into shards by
        shards/build.py's ``build``; built once."""
        if self._shards is None:
            import numpy as np

            from gensuite.data.shards import build

            src, out = Path(self.tmp.name) / "cifar-10-batches-py", Path(self.tmp.name) / "shards"
            src.mkdir()
            gen = torch.Generator().manual_seed(0)
            n = self.args.data_samples
            parts = [(f"data_batch_{i}", n // 5 + (i <= n % 5)) for i in range(1, 6)] + [("test_batch", 10)]
            for name, count in parts:
                low = torch.randint(0, 256, (count, 3, 8, 8), generator=gen).float()
                img = torch.nn.functional.interpolate(low, size=32, mode="bicubic", align_corners=False)
                img = (img + 4 * torch.randn(img.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
                data = np.ascontiguousarray(img.reshape(count, 3072).numpy())
                with open(src / name, "wb") as f:
                    pickle.dump({b"data": data, b"labels": [i % 10 for i in range(count)]}, f)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
                build("cifar10", str(src), str(out), shard_size=max(1, n // 4), progress=False)
            self._shards = out / "cifar10"
        return self._shards

    def data_row(self, workers: int) -> dict:
        from gensuite.data.pipeline import ShardStream, make_loader, split_shards
        from gensuite.data.shards import read_manifest

        args, device = self.args, self.device
        folder = self.shard_set()
        manifest = read_manifest(folder)
        shards = split_shards(manifest, folder, "train")
        batch = args.ddpm_batch
        per_epoch = max(1, manifest["splits"]["train"]["samples"] // batch)
        stream = ShardStream(shards, "image", 3, batch, per_epoch, shape=IMAGE_SHAPE)
        it = iter(make_loader(stream, workers))
        try:
            for _ in range(max(1, 2 * workers)):  # worker start-up is not throughput: every worker delivers first
                next(it)
            samples, batches, t0 = 0, 0, time.perf_counter()
            while batches < 3 or time.perf_counter() - t0 < args.row_s:
                x = next(it)["x"].to(device, non_blocking=True)  # as the trainer's to_device
                samples, batches = samples + len(x), batches + 1
            sync(device)
            seconds = time.perf_counter() - t0
        finally:
            del it
        return {"throughput": samples / seconds, "unit": "samples/s", "step_ms": seconds / batches * 1e3,
                "batch": batch, "timed_steps": batches, "flops_per_step": None,
                "details": {"workers": workers, "samples_in_set": manifest["splits"]["train"]["samples"],
                            "shards": len(shards)}}

    # -- StackGAN

    def stackgan_row(self, stage: int, opts: dict) -> dict:
        sg = load_stackgan_step()
        if not self.cuda:
            for key, value in TINY_STACKGAN.items():
                setattr(sg, key, value)
        batch = self.args.stackgan_batch1 if stage == 1 else self.args.stackgan_batch2
        key = f"stackgan{stage}"
        torch.manual_seed(0)
        if key not in self.flops and not opts.get("compile"):
            self.flops[key] = count_flops(sg.ours_step(stage, batch, self.device, opts))
            torch.manual_seed(0)
        step = sg.ours_step(stage, batch, self.device, opts)
        out = measure(step, self.device, batch, self.args.row_s, self.args.warmup + (2 if opts.get("compile") else 0))
        size = sg.IMAGE_SIZE[stage]
        return {**out, "batch": batch, "unit": f"images/s ({size}px)", "flops_per_step": self.flops.get(key),
                "details": {"stage": stage, "options": opts, "image_size": size,
                            "widths": {k: getattr(sg, k) for k in TINY_STACKGAN}}}

    # -- DDP

    def ddp_row(self) -> dict:
        args, world = self.args, 2
        if self.cuda and torch.cuda.device_count() < world:
            raise RowSkipped(f"{torch.cuda.device_count()} CUDA device(s); the DDP row needs {world}")
        if not self.cuda and not args.ddp_cpu:
            raise RowSkipped("no NCCL on the CPU dry run (--ddp-cpu runs this row with gloo)")
        base = self.result("DCGAN bf16 autocast")
        if base is None:
            raise RowSkipped("needs the single-process 'DCGAN bf16 autocast' row, which did not run")
        steps = max(5, min(5000, round(args.row_s / (base["step_ms"] / 1e3))))
        cfg = {"backend": "nccl" if self.cuda else "gloo", "flavor": args.dcgan_flavor, "batch": args.dcgan_batch,
               "warmup": max(3, args.warmup), "steps": steps, "without": list(args.without),
               "timeout_s": max(30, int(self.remaining()))}
        with tempfile.TemporaryDirectory(prefix="gensuite-gpu-ddp-") as out:
            context = torch.multiprocessing.start_processes(ddp_worker, args=(world, free_port(), cfg, out),
                                                            nprocs=world, join=False, start_method="spawn")
            try:
                while not context.join(timeout=0.5):
                    pass
            except BaseException:  # a failed rank, or this row's time limit: end the others
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise
            ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
        seconds = max(r["seconds"] for r in ranks)
        throughput = world * args.dcgan_batch * steps / seconds
        efficiency = throughput / (world * base["throughput"])
        return {"throughput": throughput, "unit": "images/s", "step_ms": seconds / steps * 1e3,
                "batch": args.dcgan_batch, "timed_steps": steps, "flops_per_step": self.flops.get("dcgan"),
                "scaling_efficiency": efficiency,
                "details": {"world_size": world, "backend": cfg["backend"], "per_rank_batch": args.dcgan_batch,
                            "baseline_row": base["name"], "baseline_images_per_s": base["throughput"],
                            "rank_seconds": [r["seconds"] for r in ranks]}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    """One rank of the DDP row (spawned): the DCGAN bf16 step with each player's networks wrapped in
    DistributedDataParallel (defaults, as Accelerate's prepare_model) and the frozen ones bare."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    prepare_imports(cfg["without"])
    cuda = cfg["backend"] == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
        torch.backends.cudnn.benchmark = True
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(cfg["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg["timeout_s"]))
    try:
        torch.manual_seed(0)
        family, nets, optimizers = build_family("dcgan", cfg["flavor"], device)
        wrapped = {n: DDP(m, device_ids=[rank] if cuda else None) for n, m in nets.items()}
        torch.manual_seed(1 + rank)
        step = family_step(family, nets, wrapped, False, optimizers, random_batch(cfg["batch"], device),
                           autocast(device, True))
        for _ in range(cfg["warmup"]):
            step()
        sync(device)
        dist.barrier()
        seconds = elapsed(step, cfg["steps"], device)
        dist.barrier()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"seconds": seconds}))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- plan, run, report

def plan(bench: Bench) -> list[dict]:
    """Rows in table order; "order" is the order they run in (compile rows last: the slowest to
    start, so a tight budget drops them first); "kind" sets their minimum time and time limit."""
    args, cuda = bench.args, bench.cuda
    compile_ok = cuda or args.compile
    rows = []

    def add(name, group, kind, fn, order):
        rows.append({"name": name, "group": group, "kind": kind, "fn": fn, "order": order})

    for order, group, label in ((10, "ddpm", "DDPM"), (20, "dcgan", "DCGAN")):
        add(f"{label} fp32", group, "eager", lambda g=group: bench.model_row(g, False, False), order)
        add(f"{label} bf16 autocast", group, "eager", lambda g=group: bench.model_row(g, True, False), order + 1)
        if compile_ok:
            add(f"{label} bf16 autocast + compile", group, "compile", lambda g=group: bench.model_row(g, True, True),
                order + 80)
        if group == "ddpm":
            add("DDPM bf16 autocast, schedule on device", group, "eager",
                lambda: bench.model_row("ddpm", True, False, schedule_on_device=True), order + 2)
    add("data loader, 0 workers", "data", "data", lambda: bench.data_row(0), 30)
    add(f"data loader, {args.workers} worker{'s' if args.workers != 1 else ''}", "data", "data",
        lambda: bench.data_row(args.workers), 31)
    try:
        stackgan_rows = load_stackgan_step().OURS_CUDA
    except Exception:  # one row that fails with the same error
        stackgan_rows = []
        add("StackGAN", "stackgan", "eager", load_stackgan_step, 40)
    for stage in (1, 2):
        for label, opts in stackgan_rows:
            if opts.get("compile") and not compile_ok:
                continue
            name = f"StackGAN {'I' if stage == 1 else 'II'} {label.removeprefix('ours ')}"
            add(name, "stackgan", "compile" if opts.get("compile") else "eager",
                lambda s=stage, o=opts: bench.stackgan_row(s, o), 95 + stage if opts.get("compile") else 40 + stage)
    add("DCGAN bf16 autocast, DDP 2 x " + ("NCCL" if cuda else "gloo"), "ddp", "ddp", bench.ddp_row, 50)
    only = set(args.only or GROUPS)
    return [r for r in rows if r["group"] in only]


def limits(bench: Bench, kind: str) -> tuple[float, float]:
    """(seconds a row of this kind needs left to start, its time limit)."""
    row_s, cuda = bench.args.row_s, bench.cuda
    if kind == "compile":
        return (45.0 if cuda else 10.0), 240.0
    if kind == "ddp":
        return (30.0 if cuda else 10.0), 150.0
    if kind == "data":
        return 2 * row_s + (10.0 if cuda else 2.0), 120.0
    return 2 * row_s + (5.0 if cuda else 0.5), 120.0


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise RowTimeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]


def run_row(bench: Bench, row: dict) -> dict:
    base = {"name": row["name"], "group": row["group"], "compile": row["kind"] == "compile",
            "status": "ok", "reason": None, "throughput": None, "unit": None, "step_ms": None, "batch": None,
            "flops_per_step": None, "tflops": None, "mfu": None, "seconds": None}
    need, cap = limits(bench, row["kind"])
    left = bench.remaining()
    budget_bound = False
    t0 = time.monotonic()
    try:
        if left < need:
            raise RowSkipped(f"over budget: {left:.0f} s of --budget-s {bench.args.budget_s:g} left, "
                             f"the row needs ~{need:.0f} s")
        if bench.cuda:
            torch.cuda.reset_peak_memory_stats()
        budget_bound = left < cap  # the row's limit is what is left of --budget-s, not its own
        with time_limit(min(cap, left)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = row["fn"]()
        base.update(out)
        base["tflops"], base["mfu"] = bench.mfu(out.get("flops_per_step"), out["step_ms"])
        if bench.cuda:
            base["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if not (isinstance(base["throughput"], float) and math.isfinite(base["throughput"])
                and base["throughput"] > 0):
            raise RuntimeError(f"throughput {base['throughput']!r} is not a positive number")
    except RowSkipped as err:
        base.update(status="skipped", reason=str(err))
    except Exception as err:
        package = missing_package(err)
        if package:
            base.update(status="skipped", reason=f"needs {package}, which is not installed ({one_line(err)})")
        else:
            base.update(status="failed", reason=one_line(err), traceback=traceback.format_exc(limit=8))
    except RowTimeout as err:  # stopped by the end of --budget-s: skipped; by its own limit: failed
        if budget_bound:
            base.update(status="skipped", reason=f"over budget: stopped when --budget-s {bench.args.budget_s:g} "
                                                 f"ran out ({err}); raise it or run it alone with --only")
        else:
            base.update(status="failed", reason=f"{err} (the row's own limit)")
    finally:
        base["seconds"] = time.monotonic() - t0
        if bench.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
        if row["kind"] == "compile":
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
    return base


def add_ratios(results: list[dict]) -> None:
    """Data rows: samples/s over the fastest DDPM and DCGAN rows' images/s."""
    for row in results:
        if row["group"] != "data" or row["status"] != "ok":
            continue
        row["ratio_vs_consumption"] = {}
        for group in ("ddpm", "dcgan"):
            models = [r for r in results if r["group"] == group and r["status"] == "ok"]
            if models:
                best = max(models, key=lambda r: r["throughput"])
                row["ratio_vs_consumption"][group] = {"row": best["name"], "images_per_s": best["throughput"],
                                                      "ratio": row["throughput"] / best["throughput"]}


def notes(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status'].upper()}: {row['reason']}"
    if "ratio_vs_consumption" in row:
        return "loader / GPU: " + "; ".join(f"{v['ratio']:.2f}x {v['row']} ({v['images_per_s']:,.0f} images/s)"
                                            for v in row["ratio_vs_consumption"].values())
    if "scaling_efficiency" in row:
        d = row["details"]
        return (f"scaling efficiency {row['scaling_efficiency']:.0%} vs 2 x {d['baseline_row']} "
                f"({d['baseline_images_per_s']:,.0f} images/s)")
    return ""


def table(results: list[dict]) -> str:
    lines = ["| row | batch | throughput | ms/step | GFLOP/step | TFLOP/s | MFU | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ok = r["status"] == "ok"
        through = f"{r['throughput']:,.1f} {r['unit']}" if ok else "-"
        flops = f"{r['flops_per_step'] / 1e9:,.2f}" if ok and r.get("flops_per_step") else "-"
        tflops = f"{r['tflops']:.3g}" if ok and r.get("tflops") is not None else "-"
        mfu = f"{r['mfu']:.1%}" if ok and r.get("mfu") is not None else "-"
        step = f"{r['step_ms']:.2f}" if ok else "-"
        lines.append(f"| {r['name']} | {r.get('batch') or '-'} | {through} | {step} | {flops} | {tflops} | {mfu} | "
                     f"{notes(r)} |")
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "python": sys.version.split()[0],
           "device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        env.update(name=torch.cuda.get_device_name(device), device_count=torch.cuda.device_count(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   cudnn=torch.backends.cudnn.version(), float32_matmul_precision=torch.get_float32_matmul_precision())
        with warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32  # fp32 rows: convolutions may use TF32
    for package in ("torchvision", "numpy", "PIL", "webdataset", "tqdm", "yaml", "triton"):
        try:
            module = importlib.import_module(package)
            env[package] = getattr(module, "__version__", "?")
        except Exception as err:
            env[package] = f"not importable ({type(err).__name__})"
    return env


def report(bench: Bench, results: list[dict], extra: dict | None = None) -> dict:
    return {"script": "benchmarks/gpu.py", "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": time.monotonic() - bench.start, "budget_s": bench.args.budget_s,
            "dry_run_cpu": bench.args.dry_run_cpu, "environment": environment(bench.device),
            "peak_tflops": bench.peak, "peak_source": bench.peak_source,
            "settings": {k: v for k, v in vars(bench.args).items() if k != "json"},
            "rows": [{k: v for k, v in r.items()} for r in results],
            "failures": [r["name"] for r in results if r["status"] == "failed"], **(extra or {})}


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--budget-s", type=float, default=None, help="whole run (GPU: 420; dry run: 90)")
    parser.add_argument("--row-s", type=float, default=None, help="timed seconds per row (GPU: 3; dry run: 0.3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row (+2 for compile rows)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (else the table)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated groups to run: {','.join(GROUPS)}")
    parser.add_argument("--ddpm-flavor", default=None, help="diffusion flavor (GPU: cifar10; dry run: small)")
    parser.add_argument("--ddpm-batch", type=int, default=None, help="also the data loader's batch (GPU: 128)")
    parser.add_argument("--dcgan-flavor", default=None, help="gan flavor (GPU: dcgan; dry run: debug)")
    parser.add_argument("--dcgan-batch", type=int, default=None, help="per process (GPU: 128)")
    parser.add_argument("--stackgan-batch1", type=int, default=None, help="Stage I (GPU: 64)")
    parser.add_argument("--stackgan-batch2", type=int, default=None, help="Stage II (GPU: 16)")
    parser.add_argument("--data-samples", type=int, default=None, help="synthetic shard set size (GPU: 10000)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the second data row (default min(8, CPUs))")
    parser.add_argument("--dry-run-cpu", action="store_true", help="every row at tiny sizes on the CPU")
    parser.add_argument("--compile", action="store_true", help="dry run: add the torch.compile rows")
    parser.add_argument("--ddp-cpu", action="store_true", help="dry run: run the DDP row with gloo")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--without", type=lambda s: s.split(","), default=[],
                        help="act as if these packages were not installed (checks the skipped rows)")
    args = parser.parse_args(argv)
    for key, value in SIZES["cpu" if args.dry_run_cpu else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.only or ()) - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown group(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA device (torch {torch.__version__}, cuda available: "
              f"{torch.cuda.is_available()}); nothing to measure")
        write_json(args.json, {"script": "benchmarks/gpu.py", "rows": [], "failures": [],
                               "no_cuda": True, "torch": torch.__version__})
        return 0
    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    prepare_imports(args.without)
    bench = Bench(args, device)
    rows = plan(bench)
    results: dict[str, dict] = {}

    def ordered() -> list[dict]:
        return [results[r["name"]] for r in rows if r["name"] in results]

    def emergency() -> None:  # a row stuck where the time limit cannot reach it (C code, a hung collective)
        try:
            done = ordered() + [
                {"name": r["name"], "group": r["group"], "status": "failed", "throughput": None, "mfu": None,
                 "reason": f"unfinished when the run was stopped {EMERGENCY_GRACE_S} s past --budget-s"}
                for r in rows if r["name"] not in results]
            print(table(done), flush=True)
            print(f"benchmarks/gpu.py: over --budget-s {args.budget_s:g} by {EMERGENCY_GRACE_S} s; stopped "
                  f"with {len(rows) - len(results)} row(s) unfinished", file=sys.stderr, flush=True)
            write_json(args.json, report(bench, done, {"aborted": "budget exceeded"}))
        finally:
            os._exit(1)

    watchdog = threading.Timer(args.budget_s + EMERGENCY_GRACE_S, emergency)
    watchdog.daemon = True
    watchdog.start()
    env = environment(device)
    print(f"benchmarks/gpu.py on {env.get('name', 'CPU (dry run)')}, torch {torch.__version__}, "
          f"{len(rows)} rows, budget {args.budget_s:g} s; peak: {bench.peak_source}", file=sys.stderr, flush=True)
    for row in sorted(rows, key=lambda r: r["order"]):
        result = run_row(bench, row)
        bench.results.append(result)
        results[row["name"]] = result
        shown = (f"{result['throughput']:,.1f} {result['unit']}" if result["status"] == "ok"
                 else f"{result['status']}: {result['reason']}")
        print(f"[{time.monotonic() - bench.start:6.1f} s] {row['name']}: {shown}", file=sys.stderr, flush=True)
    watchdog.cancel()
    done = ordered()
    add_ratios(done)
    bench.tmp.cleanup()
    wall = time.monotonic() - bench.start
    title = env.get("name", "CPU dry run (tiny sizes)")
    print(f"\n### benchmarks/gpu.py: {title}, torch {torch.__version__}, {wall:.0f} s\n")
    print(f"MFU: FLOPs per step (FlopCounterMode, forward + backward) x steps/s over {bench.peak_source}; "
          f"fp32 rows against the bf16 peak too.\n")
    print(table(done))
    write_json(args.json, report(bench, done))
    failures = [r for r in done if r["status"] == "failed"]
    skipped = [r for r in done if r["status"] == "skipped"]
    if skipped:
        print("\nskipped: " + "; ".join(f"{r['name']} ({r['reason']})" for r in skipped))
    if failures:
        print(f"\nFAILED ({len(failures)}): " + "; ".join(f"{r['name']}: {r['reason']}" for r in failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
