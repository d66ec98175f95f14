"""Evaluation time on 1 vs 2 CPU processes (gloo): classifier FID and Inception FID with random weights.

The same generator (a DCGAN debug run on 32x32 digits) is evaluated by 1 process with 2 threads
and by 2 processes with 1 thread each, in this invocation, so the ratio is free of machine drift.
Each measurement is a full ``evaluate`` call: sample generation, feature extraction, gathering the
statistics and the metric math. The real split's features are computed once beforehand (they are
cached or reused between evaluations in training too) and excluded from the timing.

Inception at 299x299 costs ~0.1 s per image per CPU core, so 10,000 samples take tens of minutes
here; ``--inception-n`` measures fewer and prints the time projected to 10,000 (linear in n: every
sample costs the same forward pass) next to the measured one.

    python benchmarks/eval_speed.py [--n 10000] [--inception-n 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job(shards: Path, name: str, family: str, steps: int, eval_cfg: dict) -> dict:
    return {"name": name, "family": family, "flavor": "debug", "model": {},
            "data": {"dataset": "digits", "root": str(shards), "shuffle_buffer": 256},
            "optim": {"lr": 3e-3},
            "train": {"steps": steps, "batch_size": 64, "log_every": steps, "sample_every": 10**6,
                      "checkpoint_every": steps},
            "eval": eval_cfg, "log": {"grid_size": 16, "progress_bar": False}}


def measure(rank: int, world: int, run_dir: str, eval_cfg: dict, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    from gensuite.config import EvalConfig
    from gensuite.evaluation import EvalContext, evaluate, resolve
    from gensuite.sampling import load_run

    torch.set_num_threads(2 // world)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)

    def sum_across_ranks(t):
        if world > 1:
            dist.all_reduce(t)
        return t

    run = load_run(run_dir)
    cfg = EvalConfig(**eval_cfg)
    ctx = EvalContext(run.family, run.networks, Path(run.job.data.root) / run.job.data.dataset, cfg,
                      torch.device("cpu"), rank, world, sum_across_ranks)
    metrics = resolve(cfg, run.family)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    values = evaluate(metrics, ctx)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        out.put((time.perf_counter() - start, {k: v for k, v in values.items() if isinstance(v, float)}))


def timed(world: int, run_dir: Path, eval_cfg: dict) -> tuple[float, dict]:
    import torch.multiprocessing as mp

    from gensuite.distributed import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=measure, args=(r, world, str(run_dir), eval_cfg, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="generated samples for classifier FID")
    parser.add_argument("--inception-n", type=int, default=10_000, help="generated samples for Inception FID")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args()

    from gensuite.config import job_from_dict
    from gensuite.data.shards import build
    from gensuite.evaluation import inception
    from gensuite.trainer import train

    work = Path(args.work or tempfile.mkdtemp(prefix="eval-speed-"))
    shards = work / "shards"
    build("digits", None, str(shards), progress=False)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    train(job_from_dict(job(shards, "clf", "classifier", 150, {"metrics": ["classification"]})), work / "clf")
    train(job_from_dict(job(shards, "gan", "gan", 50, {"metrics": []})), work / "gan")
    weights = inception.write_random_weights(work / inception.WEIGHTS_FILE, seed=0)

    cases = [("classifier FID", args.n, {"metrics": ["clf_fid"], "classifier": str(work / "clf"), "n_samples": args.n}),
             ("Inception FID", args.inception_n, {"metrics": ["inception"], "inception_weights": str(weights),
                                                  "n_samples": args.inception_n, "batch_size": 64})]
    print(f"{'metric':16s} {'samples':>8s} {'1 process (s)':>14s} {'2 processes (s)':>16s} {'speed-up':>9s}"
          f" {'per 10k, 1 proc':>16s} {'per 10k, 2 procs':>17s}")
    for name, n, cfg in cases:
        if name == "Inception FID":  # real features once, into the cache beside the shards (not timed)
            timed(1, work / "gan", {**cfg, "n_samples": 16})
        one, values_one = timed(1, work / "gan", cfg)
        two, values_two = timed(2, work / "gan", cfg)
        key = "clf_fid" if name == "classifier FID" else "fid"
        assert abs(values_one[key] - values_two[key]) <= 1e-6 * abs(values_one[key]), (values_one, values_two)
        print(f"{name:16s} {n:8d} {one:14.1f} {two:16.1f} {one / two:9.2f} {one * 10_000 / n:16.1f}"
              f" {two * 10_000 / n:17.1f}   ({key} {values_one[key]:.4g} on both)", flush=True)


if __name__ == "__main__":
    main()
