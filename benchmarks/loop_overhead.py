"""Step time of gensuite's loop vs a bare hand-written PyTorch loop: same DCGAN, batch and data.

Both loops run in this process. By default their steps alternate one by one (the bare step runs
inside the suite's end-of-step hook, outside the suite's timing), so a change in machine speed hits
both alike; ``--pairing segment`` runs a whole suite run, then as many bare steps. The suite's step
time is read from per-step timestamps (the final checkpoint and grids are excluded); the bare loop
draws batches from the same shard stream and does the same D then G Adam steps. Prints the median
over rounds of the step-time ratio (target <= 1.05). Never asserted by tests.

    python benchmarks/loop_overhead.py [--steps 60] [--rounds 12] [--batch 64] [--pairing step|segment]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gensuite.config import job_from_dict  # noqa: E402
from gensuite.data.pipeline import ShardStream, make_loader, split_shards  # noqa: E402
from gensuite.data.shards import build, data_spec, read_manifest  # noqa: E402
from gensuite.registry import get_family  # noqa: E402
from gensuite.trainer import Trainer  # noqa: E402


class BareLoop:
    """The hand-written loop: same networks, optimisers and shard stream; one step per ``step()``."""

    def __init__(self, job, shard_dir: Path):
        manifest = read_manifest(shard_dir)
        spec = data_spec(manifest)
        torch.manual_seed(job.train.seed)
        nets = get_family("gan")(job.model, spec).build_networks()
        self.G, self.D = nets["G"], nets["D"]
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=job.optim.lr, betas=job.optim.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=job.optim.lr, betas=job.optim.betas)
        stream = ShardStream(split_shards(manifest, shard_dir, "train"), spec.kind, spec.channels,
                             job.train.batch_size, spec.samples["train"] // job.train.batch_size,
                             shuffle_buffer=job.data.shuffle_buffer)
        self.data = iter(make_loader(stream, job.data.workers))
        self.z_dim = job.model.latent_dim

    def step(self) -> None:
        G, D = self.G, self.D
        x = next(self.data)["x"] * 2 - 1
        z = torch.randn(len(x), self.z_dim, 1, 1)
        with torch.no_grad():
            fake = G(z)
        d_loss = F.softplus(-D(x)).mean() + F.softplus(D(fake)).mean()
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        for p in D.parameters():
            p.requires_grad_(False)
        g_loss = F.softplus(-D(G(torch.randn(len(x), self.z_dim, 1, 1)))).mean()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        for p in D.parameters():
            p.requires_grad_(True)
        d_loss.item(), g_loss.item()  # the suite reads its loss terms once per player step


def run_suite(job, run_dir: Path, after_each_step) -> None:
    """Train ``job`` with gensuite's Trainer, calling ``after_each_step()`` at the end of every step."""
    trainer = Trainer(job, run_dir)
    update_ema = trainer.update_ema

    def hooked():  # the trainer calls update_ema once at the end of every step
        update_ema()
        after_each_step()

    trainer.update_ema = hooked
    trainer.run()
    trainer.logger.close()


def segment_round(job, shard_dir: Path, run_dir: Path, suite_first: bool) -> tuple[list[float], list[float]]:
    """One segment of suite steps and one of bare steps, back to back."""
    stamps: list[float] = []

    def bare_segment() -> list[float]:
        loop, times = BareLoop(job, shard_dir), []
        for _ in range(job.train.steps):
            began = time.perf_counter()
            loop.step()
            times.append(time.perf_counter() - began)
        return times[1:]  # the first step warms up

    bare = None if suite_first else bare_segment()
    run_suite(job, run_dir, lambda: stamps.append(time.perf_counter()))
    suite = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # from the end of the (warm-up) first step
    return suite, bare if bare is not None else bare_segment()


def interleaved_round(job, shard_dir: Path, run_dir: Path) -> tuple[list[float], list[float]]:
    """Suite and bare steps alternating one by one: each suite step is timed from the end of the bare
    step before it, so a change in machine speed lasting longer than a step hits both alike."""
    loop = BareLoop(job, shard_dir)
    suite: list[float] = []
    bare: list[float] = []
    resumed_at: list[float] = []

    def bare_step() -> None:
        ended = time.perf_counter()
        if resumed_at:
            suite.append(ended - resumed_at[-1])
        loop.step()
        resumed_at.append(time.perf_counter())
        bare.append(resumed_at[-1] - ended)

    run_suite(job, run_dir, bare_step)
    return suite[1:], bare[1:]  # the first bare step warms up; suite[0] is the second suite step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="suite steps per round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds (one suite run each)")
    parser.add_argument("--pairing", choices=["step", "segment"], default="step",
                        help="step: suite and bare steps alternate one by one (default); "
                             "segment: a suite run, then as many bare steps (or the reverse)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shards", default=None, help="shard root (default: a temporary digits build)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.shards or tmp)
        build("digits", None, str(root), size=32, progress=False)
        job = job_from_dict({
            "name": "bench", "family": "gan", "flavor": "dcgan",
            "data": {"dataset": "digits", "root": str(root)},
            "model": {"latent_dim": 64, "ngf": 32, "ndf": 32, "loss": "non_saturating"},
            "optim": {"lr": 2e-4, "betas": [0.5, 0.999]},
            "train": {"steps": args.steps, "batch_size": args.batch, "log_every": 10,
                      "sample_every": 10**9, "checkpoint_every": 10**9, "resume": "never"},
            "log": {"progress_bar": False},
        })
        suite, bare, ratios = [], [], []
        for r in range(args.rounds):
            run_dir = Path(tmp) / f"run{r}"
            if args.pairing == "step":
                s, b = interleaved_round(job, root / "digits", run_dir)
            else:  # alternate which loop goes first, so a drift in machine speed does not favour one
                s, b = segment_round(job, root / "digits", run_dir, suite_first=r % 2 == 0)
            suite += s
            bare += b
            ratios.append(statistics.median(s) / statistics.median(b))
            print(f"round {r + 1}/{args.rounds}: suite {statistics.median(s) * 1e3:.1f} ms/step, "
                  f"bare {statistics.median(b) * 1e3:.1f} ms/step, ratio {ratios[-1]:.3f}", flush=True)
    ratio = statistics.median(ratios)
    print(f"DCGAN {args.batch}x1x32x32, {torch.get_num_threads()} threads, device cpu, pairing by {args.pairing}")
    print(f"median step time: suite {statistics.median(suite) * 1e3:.2f} ms, bare {statistics.median(bare) * 1e3:.2f} ms")
    print(f"loop overhead ratio (suite / bare), median of {args.rounds} rounds: {ratio:.3f} "
          f"(rounds {min(ratios):.3f}..{max(ratios):.3f}; target <= 1.05)")


if __name__ == "__main__":
    main()
