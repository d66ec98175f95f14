"""Starting jobs on several local ranks from tests, and the small digits jobs they start."""

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

ROOT = Path(__file__).resolve().parents[1]


def torchrun_job(raw_job: dict, work: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    """Write ``raw_job`` to work/job.yaml and train it on ``ranks`` gloo processes into work/run."""
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(raw_job))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), "-m", "gensuite.train", str(path), "--run-dir", str(work / "run")],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)


def free_port() -> int:
    """A TCP port nobody listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits_job(shard_root, name: str, family: str, steps: int, model: dict | None = None,
               eval_cfg: dict | None = None) -> dict:
    """A debug-flavor job on the digits shards, logging, sampling and checkpointing once, at its end."""
    return {"name": name, "family": family, "flavor": "debug", "model": model or {},
            "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 256},
            "optim": {"lr": 3e-3},
            "train": {"steps": steps, "batch_size": 32, "log_every": steps, "sample_every": steps,
                      "checkpoint_every": steps},
            "eval": eval_cfg or {}, "log": {"grid_size": 16, "progress_bar": False}}


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """This process as ``rank`` of a gloo group on 127.0.0.1:``port`` (one CPU thread); yields an
    in-place sum all-reduce; waits for every rank before leaving the group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    try:
        yield all_reduce
        dist.barrier()
    finally:
        dist.destroy_process_group()
