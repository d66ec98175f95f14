"""Weak scaling on the local two-node SLURM cluster: the same debug job on 1 node vs 2 nodes (gloo).

Each rank keeps the same per-rank batch, so 2 nodes process twice the global batch per step.
Efficiency = throughput(2 nodes) / (2 x throughput(1 node)); target >= 0.90. The local cluster's
two nodes share one machine, so the benchmark also runs two independent 1-node jobs at once: their
summed throughput is the ceiling without any communication. Throughput is the
median of the run's logged ``perf/samples_per_sec`` after warm-up. Both runs go through
``launch/submit.py`` on the same cluster in the same invocation; they alternate ``--rounds`` times.

Needs root (it starts munged, slurmctld and two slurmd, installing slurm-wlm when missing).
Note the two "nodes" share this machine's cores: one CPU thread per rank keeps that fair.

    python benchmarks/scaling.py [--steps 150] [--batch 256] [--rounds 2] [--size 16] [--width 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the local cluster harness the launcher tests use

from slurm_cluster import LocalSlurm, ensure_installed  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gensuite.data.shards import build  # noqa: E402


def submit(cluster: LocalSlurm, work: Path, shards: Path, nodes: int, args) -> Path:
    job = {"family": "gan", "flavor": "debug", "name": f"scale{nodes}",
           "model": {"architecture": "dcgan", "ngf": args.width, "ndf": args.width},
           "data": {"dataset": "digits", "root": str(shards), "shuffle_buffer": 256},
           "train": {"steps": args.steps, "batch_size": args.batch * nodes, "log_every": max(5, args.steps // 15),
                     "sample_every": 10**6, "checkpoint_every": 10**6, "resume": "never"},
           "log": {"grid_size": 16, "progress_bar": False},
           "launch": {"nodes": nodes, "tasks_per_node": 1, "cpus_per_task": 1, "timeout_min": 30}}
    path = work / f"scale{nodes}.yaml"
    path.write_text(yaml.safe_dump(job))
    run_dir = work / f"run{nodes}-{time.time_ns()}"
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), str(path), "--run-dir", str(run_dir)],
                         env=cluster.env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return run_dir


def throughput(cluster: LocalSlurm, run_dir: Path) -> float:
    job_id = json.loads((run_dir / "submission.json").read_text())["tasks"][0]["job_id"]
    while subprocess.run(["squeue", "-h", "-j", job_id], env=cluster.env, capture_output=True,
                         text=True).stdout.strip():
        time.sleep(1)
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    rates = [e.value for e in acc.Scalars("perf/samples_per_sec")][2:-1]  # skip warm-up and the last
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=256, help="per-rank batch")
    p.add_argument("--rounds", type=int, default=2)
    # Compute per step grows with batch x pixels, the gradients all-reduced per step only with the
    # widths: larger images or batches show how much of the gap is communication.
    p.add_argument("--size", type=int, default=16, help="digits resized to this many pixels")
    p.add_argument("--width", type=int, default=32, help="DCGAN ngf = ndf")
    args = p.parse_args()
    reason = ensure_installed()
    if reason:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build("digits", None, str(work / "shards"), size=args.size, progress=False)
        cluster = LocalSlurm(work / "slurm").start()
        try:
            one, two, apart = [], [], []
            shards = work / "shards"
            for _ in range(args.rounds):
                one.append(throughput(cluster, submit(cluster, work, shards, 1, args)))
                two.append(throughput(cluster, submit(cluster, work, shards, 2, args)))
                # Two independent 1-node jobs at once: what the shared machine allows without any
                # communication (both "nodes" of the local cluster are the same few cores).
                pair = [submit(cluster, work, shards, 1, args) for _ in range(2)]
                apart.append(sum(throughput(cluster, r) for r in pair))
        finally:
            cluster.stop()
    t1, t2, ceiling = statistics.median(one), statistics.median(two), statistics.median(apart)
    print(f"weak scaling, DCGAN debug {args.size}x{args.size} (ngf = ndf = {args.width}), per-rank batch "
          f"{args.batch}, gloo, {args.steps} steps, {args.rounds} rounds")
    print(f"1 node  x 1 rank : {t1:9.1f} samples/s   (rounds: {', '.join(f'{v:.0f}' for v in one)})")
    print(f"2 nodes x 1 rank : {t2:9.1f} samples/s   (rounds: {', '.join(f'{v:.0f}' for v in two)})")
    print(f"2 x 1 node apart : {ceiling:9.1f} samples/s   (no communication: the shared machine's ceiling)")
    print(f"efficiency       : {t2 / (2 * t1):9.3f}   (target >= 0.90)")
    print(f"ceiling          : {ceiling / (2 * t1):9.3f}   (efficiency of two independent jobs)")
    print(f"DDP vs ceiling   : {t2 / ceiling:9.3f}")
    # Per step: each rank's time at 1 node, and what 2 nodes add (communication and waiting).
    step1, step2 = args.batch / t1, 2 * args.batch / t2
    print(f"ms per step      : {1e3 * step1:9.1f} on 1 node, {1e3 * step2:.1f} on 2 nodes "
          f"(+{1e3 * (step2 - step1):.1f} ms: {100 * (step2 - step1) / step2:.0f}% of a 2-node step)")


if __name__ == "__main__":
    main()
