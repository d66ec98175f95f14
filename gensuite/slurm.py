"""SLURM through submitit: a job's ``launch`` section -> sbatch parameters, a sweep -> one array.

``launch/submit.py`` is the command; this module holds what it needs: the sbatch parameters, the
callable each SLURM task runs (``TrainTask``: distributed set-up from SLURM's variables, stop on
signals, requeue through submitit), local execution when there is no SLURM, and ``status``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from gensuite.config import JobConfig, LaunchConfig
from gensuite.distributed import StopRequest
from gensuite.errors import GensuiteError, Interrupted
from gensuite.sweep import SweepTask

SUBMISSION_FILE = "submission.json"
# What each task runs before submitit's own entry point (see gensuite/slurm_entry.py).
ENTRY = f"{shlex.quote(sys.executable)} -m gensuite.slurm_entry"


def slurm_available() -> bool:
    """sbatch is installed and a controller answers (an installed client alone is not a cluster)."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def sbatch_parameters(launch: LaunchConfig, job_name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (they become ``#SBATCH`` lines, each value shell-quoted)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": launch.nodes,
        "ntasks_per_node": launch.ranks_per_node,
        "cpus_per_task": launch.cpus_per_task,
        "time": launch.timeout_min,
        "signal_delay_s": launch.signal_delay,
        "array_parallelism": launch.array_parallelism,
        "setup": list(launch.setup),
        # Requeue on timeout needs it where the cluster's JobRequeue default is 0.
        "additional_parameters": {"requeue": True, **launch.sbatch_args},
    }
    optional = {"partition": launch.partition, "account": launch.account, "qos": launch.qos,
                "constraint": launch.constraint, "gpus_per_node": launch.gpus_per_node or None,
                "mem": f"{launch.mem_gb:g}GB" if launch.mem_gb else None, "exclusive": launch.exclusive or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def log_folder(job: JobConfig, run_root: Path) -> Path:
    return Path(job.launch.log_folder).absolute() if job.launch.log_folder else run_root / "slurm"


def sbatch_script(job: JobConfig, run_root: Path, n_tasks: int) -> str:
    """The script ``submit`` would hand to sbatch (``--dry-run``); needs no SLURM installation."""
    from submitit.slurm.slurm import _make_sbatch_string  # the text SlurmExecutor itself submits

    folder = log_folder(job, run_root)
    command = f"{ENTRY} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=n_tasks if n_tasks > 1 else None,
                               **sbatch_parameters(job.launch, job.name))


def submit(job: JobConfig, tasks: list[SweepTask], run_root: Path) -> list[submitit.Job]:
    """One sbatch job, or one array for a sweep; writes ``<run root>/submission.json``."""
    folder = log_folder(job, run_root)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=job.launch.max_requeues, python=ENTRY)
    executor.update_parameters(**sbatch_parameters(job.launch, job.name))
    payloads = [t.job.to_dict() for t in tasks]
    run_dirs = [str(t.run_dir) for t in tasks]
    if len(tasks) == 1:
        jobs = [executor.submit(TrainTask(), payloads[0], run_dirs[0])]
    else:
        jobs = executor.map_array(TrainTask(), payloads, run_dirs)
    record = {
        "job": job.name,
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
        "log_folder": str(folder),
        "tasks": [{"name": t.name, "overrides": t.overrides, "run_dir": str(t.run_dir), "job_id": j.job_id,
                   "stdout": str(j.paths.stdout).replace("%t", "0"), "stderr": str(j.paths.stderr).replace("%t", "0")}
                  for t, j in zip(tasks, jobs)],
    }
    run_root.mkdir(parents=True, exist_ok=True)
    (run_root / SUBMISSION_FILE).write_text(json.dumps(record, indent=2))
    return jobs


# -- inside a SLURM task --------------------------------------------------------------------------


def _node_address(name: str) -> str:
    """An address for node ``name``: DNS when it resolves, else SLURM's NodeAddr for it."""
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True, timeout=30)
        for field in out.stdout.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
        raise GensuiteError(f"cannot resolve the address of node {name!r} (DNS and scontrol both failed)")


def export_distributed_env() -> int:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM for env:// rendezvous; returns world size."""
    dist = submitit.helpers.TorchDistributedEnvironment()
    if dist.world_size > 1:
        os.environ.update({
            "MASTER_ADDR": _node_address(dist.master_addr), "MASTER_PORT": str(dist.master_port),
            "RANK": str(dist.rank), "WORLD_SIZE": str(dist.world_size), "LOCAL_RANK": str(dist.local_rank),
            "LOCAL_WORLD_SIZE": str(dist.local_world_size),
        })
    return dist.world_size


class TrainTask(submitit.helpers.Checkpointable):
    """What every SLURM task runs: train the job on its rank; on SIGUSR2 checkpoint and requeue."""

    def __call__(self, job_dict: dict[str, Any], run_dir: str) -> dict[str, float]:
        import torch

        from gensuite.config import job_from_dict
        from gensuite.trainer import train

        export_distributed_env()
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:
            # One thread per allocated CPU. OMP_NUM_THREADS too: without it Accelerate resets the
            # thread count to the node's cores / local ranks, oversubscribing shared nodes.
            os.environ.setdefault("OMP_NUM_THREADS", cpus)
            torch.set_num_threads(int(cpus))
        job = job_from_dict(job_dict)
        stop = StopRequest().install()
        try:
            return train(job, run_dir, stop)
        except Interrupted as e:
            if not e.requeue:
                raise
            submitit_handler = stop.previous.get(stop.signal)
            stop.ignore_further()
            # submitit's own handler: on rank 0 it calls checkpoint() below, requeues and exits;
            # other ranks return from it and wait for SLURM to end the step.
            if callable(submitit_handler):
                submitit_handler(stop.signal, None)
            time.sleep(120)
            raise

    def checkpoint(self, job_dict: dict[str, Any], run_dir: str) -> submitit.helpers.DelayedSubmission:
        # The run directory already holds the checkpoint written at the stop; resume from it.
        job_dict = {**job_dict, "train": {**job_dict["train"], "resume": "auto"}}
        return submitit.helpers.DelayedSubmission(TrainTask(), job_dict, run_dir)


# -- without SLURM --------------------------------------------------------------------------------


def run_locally(tasks: list[SweepTask]) -> None:
    """Each run in turn on this machine: in this process, or through torchrun for several ranks."""
    from gensuite.config import dump_yaml
    from gensuite.trainer import train

    for task in tasks:
        ranks = task.job.launch.world_size
        print(f"running {task.name or task.job.name} locally -> {task.run_dir}", file=sys.stderr)
        if ranks == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            train(task.job, task.run_dir)
            continue
        task.run_dir.mkdir(parents=True, exist_ok=True)
        config = task.run_dir / "config.yaml"
        config.write_text(dump_yaml(task.job))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "gensuite.train", str(config), "--run-dir", str(task.run_dir)]
        if subprocess.run(cmd).returncode != 0:
            raise GensuiteError(f"{task.run_dir}: local {ranks}-process run failed (see the output above)")


# -- status ---------------------------------------------------------------------------------------


def _queue_states(job_ids: list[str]) -> dict[str, str]:
    if not job_ids or not shutil.which("squeue"):
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(sorted({j.split("_")[0]
                                                                                    for j in job_ids}))],
                         capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)


def _result_state(folder: Path, job_id: str) -> str | None:
    """submitit's result file of task 0: written when the task ended (success or error)."""
    import pickle

    path = folder / f"{job_id}_0_result.pkl"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        outcome, _ = pickle.load(f)  # our own submitit output
    return "COMPLETED" if outcome == "success" else "FAILED"


def last_metrics(run_dir: Path) -> tuple[int | None, dict[str, float]]:
    """Last logged step and the latest value of each loss term, read from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run_dir / "tb"
    if not tb.is_dir():
        return None, {}
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    metrics, step = {}, None
    for tag in acc.Tags()["scalars"]:
        if tag.endswith("/loss") and not tag.startswith("final/"):
            last = acc.Scalars(tag)[-1]
            metrics[tag] = last.value
            step = max(step or 0, last.step)
    return step, metrics


def status(run_root: Path) -> list[dict[str, Any]]:
    record_path = run_root / SUBMISSION_FILE
    if not record_path.is_file():
        raise GensuiteError(f"{record_path}: no submission record; pass the run root that submit printed")
    record = json.loads(record_path.read_text())
    tasks = record["tasks"]
    queued = _queue_states([t["job_id"] for t in tasks])
    rows = []
    for t in tasks:
        state = queued.get(t["job_id"]) or _result_state(Path(record["log_folder"]), t["job_id"]) or "UNKNOWN"
        step, metrics = last_metrics(Path(t["run_dir"]))
        rows.append({"name": t["name"] or record["job"], "job_id": t["job_id"], "state": state, "step": step,
                     "metrics": metrics, "run_dir": t["run_dir"]})
    return rows
