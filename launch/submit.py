#!/usr/bin/env python
"""``python launch/submit.py JOB.yaml [--set k=v] [--run-dir DIR]``: run a job.

This first version runs the job locally in this process (what the command does on a machine
without SLURM). Submission to SLURM through submitit, array sweeps and requeue are the next
milestone; until then use ``gensuite train`` or ``accelerate launch -m gensuite.train`` directly.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gensuite.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
