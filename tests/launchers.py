"""Starting jobs on several local ranks from tests."""

import os
import socket
import subprocess
import sys
from pathlib import Path

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
