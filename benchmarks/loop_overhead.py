"""Step time of gensuite's loop vs a bare hand-written PyTorch loop: same DCGAN, batch and data.

Both loops run in this process, alternating in segments so machine noise hits both alike. The
suite's step time is read from per-step timestamps (the final checkpoint and grids are excluded);
the bare loop draws batches from the same shard stream and does the same D then G Adam steps.
Prints the median over paired rounds of the step-time ratio (target <= 1.05). Never asserted by tests.

    python benchmarks/loop_overhead.py [--steps 60] [--rounds 4] [--batch 64]
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


def suite_step_times(job, run_dir: Path) -> list[float]:
    trainer = Trainer(job, run_dir)
    stamps = []
    update_ema = trainer.update_ema

    def stamped():  # called once at the end of every step
        update_ema()
        stamps.append(time.perf_counter())

    trainer.update_ema = stamped
    trainer.run()
    trainer.logger.close()
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]  # skip the first (warm-up) step


def bare_step_times(job, shard_dir: Path, steps: int) -> list[float]:
    manifest = read_manifest(shard_dir)
    spec = data_spec(manifest)
    torch.manual_seed(job.train.seed)
    nets = get_family("gan")(job.model, spec).build_networks()
    G, D = nets["G"], nets["D"]
    opt_g = torch.optim.Adam(G.parameters(), lr=job.optim.lr, betas=job.optim.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=job.optim.lr, betas=job.optim.betas)
    stream = ShardStream(split_shards(manifest, shard_dir, "train"), spec.kind, spec.channels,
                         job.train.batch_size, spec.samples["train"] // job.train.batch_size,
                         shuffle_buffer=job.data.shuffle_buffer)
    data = iter(make_loader(stream, job.data.workers))
    z_dim = job.model.latent_dim
    stamps = []
    for _ in range(steps):
        x = next(data)["x"] * 2 - 1
        z = torch.randn(len(x), z_dim, 1, 1)
        with torch.no_grad():
            fake = G(z)
        d_loss = F.softplus(-D(x)).mean() + F.softplus(D(fake)).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        for p in D.parameters():
            p.requires_grad_(False)
        g_loss = F.softplus(-D(G(torch.randn(len(x), z_dim, 1, 1)))).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        for p in D.parameters():
            p.requires_grad_(True)
        d_loss.item(), g_loss.item()  # the suite logs both every step
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per segment")
    parser.add_argument("--rounds", type=int, default=10, help="paired suite/bare segments")
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
            # Alternate which loop goes first, so a drift in machine speed does not favour one.
            first_suite = r % 2 == 0
            if not first_suite:
                b = bare_step_times(job, root / "digits", args.steps)
            s = suite_step_times(job, Path(tmp) / f"run{r}")
            if first_suite:
                b = bare_step_times(job, root / "digits", args.steps)
            suite += s
            bare += b
            ratios.append(statistics.median(s) / statistics.median(b))
            print(f"round {r + 1}/{args.rounds}: suite {statistics.median(s) * 1e3:.1f} ms/step, "
                  f"bare {statistics.median(b) * 1e3:.1f} ms/step, ratio {ratios[-1]:.3f}", flush=True)
    ratio = statistics.median(ratios)
    print(f"DCGAN {args.batch}x1x32x32, {torch.get_num_threads()} threads, device cpu")
    print(f"median step time: suite {statistics.median(suite) * 1e3:.2f} ms, bare {statistics.median(bare) * 1e3:.2f} ms")
    print(f"loop overhead ratio (suite / bare), median of {args.rounds} paired rounds: {ratio:.3f} "
          f"(rounds {min(ratios):.3f}..{max(ratios):.3f}; target <= 1.05)")


if __name__ == "__main__":
    main()
