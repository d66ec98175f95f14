"""``python -m gensuite.train JOB [--set k=v] [--run-dir DIR]`` (the form ``accelerate launch -m`` needs)."""

import os
import sys
from pathlib import Path

from gensuite.cli import main


def requested_ranks_without_a_launcher() -> int:
    """Ranks asked of ``accelerate launch --num_processes N`` that it did not start.

    Accelerate 1.15's launcher, on a machine without GPUs and without ``--multi_gpu``, runs its
    CPU path, which expects mpirun and otherwise starts one process whatever ``--num_processes``
    says. Its child gets ACCELERATE_USE_CPU and no WORLD_SIZE; the request is in the parent's argv.
    """
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:
        return 1
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return 1
    for i, arg in enumerate(argv):
        if arg == "--num_processes" and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if arg.startswith("--num_processes="):
            return int(arg.split("=", 1)[1])
    return 1


if __name__ == "__main__":
    ranks = requested_ranks_without_a_launcher()
    if ranks > 1:  # start them the way `--multi_gpu` would have: torchrun over gloo
        from gensuite.distributed import run_ranks

        sys.exit(run_ranks(ranks, ["-m", "gensuite.train", *sys.argv[1:]]))
    from gensuite.distributed import exit_rank

    exit_rank(main(["train", *sys.argv[1:]]))
