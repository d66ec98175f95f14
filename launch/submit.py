#!/usr/bin/env python
"""Run a job on SLURM (or locally where there is none).

    python launch/submit.py JOB.yaml [--set key=value ...] [--run-dir DIR] [--only RUN,...] [--dry-run] [--local]
    python launch/submit.py --status RUN_ROOT

The job's ``launch`` section sets the allocation, its ``sweep`` section the runs: one sbatch job,
or one SLURM array with a task per override set, each task in ``RUN_ROOT/<overrides>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gensuite.errors import GensuiteError  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("job", nargs="?", metavar="JOB.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job field for every run, e.g. --set launch.partition=gpu")
    p.add_argument("--run-dir", help="run root (default runs/<job name>); sweep runs go in sub-folders")
    p.add_argument("--only", metavar="RUN,...", help="only these runs of the sweep (their directory names), e.g. "
                                                    "--only ddpm,ddim to redo two rows of a leaderboard")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the runs; submit nothing")
    p.add_argument("--local", action="store_true", help="run here even if SLURM is available")
    p.add_argument("--status", metavar="RUN_ROOT", help="state, last step and last losses of each submitted run")
    p.add_argument("--json", action="store_true", help="with --status: machine-readable output")
    args = p.parse_args(argv)
    if not args.job and not args.status:
        p.error("give a job file, or --status RUN_ROOT")
    return args


def show_status(run_root: Path, as_json: bool) -> None:
    from gensuite.slurm import status

    rows = status(run_root)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        losses = "  ".join(f"{k}={v:.4g}" for k, v in sorted(row["metrics"].items()))
        print(f"{row['job_id']:>12}  {row['state']:<11} step {row['step'] if row['step'] is not None else '-':>6}  "
              f"{row['name']}  {losses}".rstrip())
        if row["note"]:  # why it failed or stopped, under its row
            print(f"{'':>12}  {row['note']}")


def only(tasks, names: str):
    """The tasks named in ``--only`` (comma-separated), in the sweep's order."""
    from gensuite.errors import ConfigError

    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [t.name for t in tasks]
    for name in wanted:
        if name not in known:
            raise ConfigError("--only", f"{name!r} is not a run of this sweep; its runs: {', '.join(known)}")
    return [t for t in tasks if t.name in wanted]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.status:
        show_status(Path(args.status), args.json)
        return 0

    from gensuite import slurm
    from gensuite.config import load_job
    from gensuite.sweep import expand

    job = load_job(args.job, args.overrides)
    job.data.root = str(Path(job.data.root).absolute())  # tasks may start in another directory
    run_root = Path(args.run_dir or Path("runs") / job.name).absolute()
    tasks = expand(job, run_root)
    if args.only:
        tasks = only(tasks, args.only)
    use_slurm = not args.local and slurm.slurm_available()

    if args.dry_run:
        print(slurm.sbatch_script(job, run_root, sum(t.after is None for t in tasks)))
        print(f"# {len(tasks)} run(s){'' if use_slurm else ' (no SLURM here: they would run locally)'}:")
        for i, t in enumerate(tasks):
            sets = " ".join(f"{k}={v}" for k, v in t.overrides.items())
            after = f"(after {t.after}: a separate job that evaluates its run)" if t.after else ""
            print("  ".join(filter(None, [f"#   [{i}] {t.run_dir}", sets, after])))
        return 0

    from gensuite.trainer import preflight

    for task in tasks:  # fail here, not in the queue: missing shards, a Stage-I run not trained yet
        preflight(task.job)
    if not use_slurm:
        slurm.run_locally(tasks)
        print(f"view with: tensorboard --logdir {run_root}")
        return 0

    jobs = slurm.submit(job, tasks, run_root)
    for task, j in zip(tasks, jobs):
        print(f"submitted {j.job_id}  {task.name or job.name}")
        print(f"    run dir: {task.run_dir}")
        print(f"    log:     {str(j.paths.stdout).replace('%t', '0')}")
    print(f"status:    python launch/submit.py --status {run_root}")
    print(f"view with: tensorboard --logdir {run_root}")
    return 0


if __name__ == "__main__":
    from gensuite.errors import Interrupted

    try:
        sys.exit(main())
    except Interrupted as e:  # a stop signal, after the checkpoint at that step was written
        print(f"{e}; run the same command to resume", file=sys.stderr)
        sys.exit(e.exit_code)
    except GensuiteError as e:
        if str(e):  # empty: the ranks of a local run printed it
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
