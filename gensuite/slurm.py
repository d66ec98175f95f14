"""SLURM through submitit: a job's ``launch`` section -> sbatch parameters, a sweep -> one array.

``launch/submit.py`` is the command; this module holds what it needs: the sbatch parameters, the
callable each SLURM task runs (``TrainTask``: distributed set-up from SLURM's variables, stop on
signals, requeue through submitit), local execution when there is no SLURM, and ``status``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import submitit

from gensuite.config import JobConfig, LaunchConfig
from gensuite.distributed import StopRequest
from gensuite.checkpoint import atomic_write_text
from gensuite.errors import AlreadyReported, GensuiteError, Interrupted
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
    """One sbatch job, or one array for a sweep, plus a job per task that evaluates another task's run
    (``SweepTask.after``, started when that one has finished well); writes ``<run root>/submission.json``."""
    folder = log_folder(job, run_root)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=job.launch.max_requeues, python=ENTRY)
    executor.update_parameters(**sbatch_parameters(job.launch, job.name))
    # those that wait on another task of this submission go in after the rest, each as its own job
    names = {t.name for t in tasks}
    first = [t for t in tasks if t.after not in names]
    if len(first) == 1:
        submitted = [executor.submit(TrainTask(), first[0].job.to_dict(), str(first[0].run_dir))]
    else:
        submitted = executor.map_array(TrainTask(), [t.job.to_dict() for t in first], [str(t.run_dir) for t in first])
    by_name = {t.name: j for t, j in zip(first, submitted)}
    for task in (t for t in tasks if t.after in names):  # each starts once the run it resumes finished well
        params = sbatch_parameters(job.launch, job.name)
        params["additional_parameters"] |= {"dependency": f"afterok:{by_name[task.after].job_id}",
                                            "kill_on_invalid_dep": "yes"}  # not pending forever if it failed
        executor.update_parameters(**params)
        by_name[task.name] = executor.submit(TrainTask(), task.job.to_dict(), str(task.run_dir))
    jobs = [by_name[t.name] for t in tasks]
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
            submitit_handler = stop.previous.get(stop.signal)
            stop.ignore_further()
            if not e.requeue:  # scancel or a preemption: the checkpoint is written, end without a traceback
                if e.announce:
                    print(f"{e}; submit the job again to resume", file=sys.stderr, flush=True)
                raise SystemExit(e.exit_code) from None
            # submitit's own handler: on rank 0 it calls checkpoint() below, requeues and exits (or,
            # out of requeues, raises UncompletedJobError, which slurm_entry reports in one line);
            # other ranks return from it and wait for SLURM to end the step.
            if callable(submitit_handler):
                submitit_handler(stop.signal, None)
            time.sleep(120)
            raise SystemExit(e.exit_code) from None

    def checkpoint(self, job_dict: dict[str, Any], run_dir: str) -> submitit.helpers.DelayedSubmission:
        # The run directory already holds the checkpoint written at the stop; resume from it.
        job_dict = {**job_dict, "train": {**job_dict["train"], "resume": "auto"}}
        return submitit.helpers.DelayedSubmission(TrainTask(), job_dict, run_dir)


# -- without SLURM --------------------------------------------------------------------------------


def run_locally(tasks: list[SweepTask]) -> None:
    """Each run in turn on this machine: in this process, or through torchrun for several ranks."""
    stop = StopRequest().install()  # one for the whole sweep: a stop signal ends it, not just one run
    try:
        for task in tasks:
            _run_one_locally(task, stop)
    finally:
        stop.uninstall()


def _run_one_locally(task: SweepTask, stop: StopRequest) -> None:
    from gensuite.config import dump_yaml
    from gensuite.trainer import train

    ranks = task.job.launch.world_size
    print(f"running {task.name or task.job.name} locally -> {task.run_dir}", file=sys.stderr)
    if ranks == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        train(task.job, task.run_dir, stop)
        return
    task.run_dir.mkdir(parents=True, exist_ok=True)
    job_file = task.run_dir / ".launch-job.yaml"  # the ranks write config.yaml once resume checks pass
    atomic_write_text(job_file, dump_yaml(task.job))
    code = run_forwarding_signals([sys.executable, "-m", "gensuite.distributed", str(ranks), "-m",
                                   "gensuite.train", str(job_file), "--run-dir", str(task.run_dir)])
    if code in {2} | {128 + s for s in StopRequest.SIGNALS}:
        raise AlreadyReported(code)  # the ranks printed the error, or where they stopped
    if code != 0:
        raise GensuiteError(f"{task.run_dir}: local {ranks}-process run failed with exit code {code} "
                            f"(see the output above)")


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run ``cmd`` in its own session and pass it each SIGTERM/SIGINT this process gets, exactly once
    (in its own session a terminal's Ctrl-C does not reach it a second time directly)."""
    import signal

    child = subprocess.Popen(cmd, start_new_session=True)
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- status ---------------------------------------------------------------------------------------


def _queue_states(job_ids: list[str]) -> dict[str, str]:
    if not job_ids or not shutil.which("squeue"):
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(sorted({j.split("_")[0]
                                                                                    for j in job_ids}))],
                         capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)


def _result_state(folder: Path, job_id: str) -> tuple[str | None, str | None]:
    """State from submitit's result file of task 0 (written when the task ended), and a note.

    ``("COMPLETED", None)``, ``("FAILED", last line of the stored traceback)``, ``(None, None)``
    while there is no file, ``(None, why)`` when it cannot be read (a partial copy, another format).
    """
    import pickle

    path = folder / f"{job_id}_0_result.pkl"
    if not path.exists():
        return None, None
    try:
        with open(path, "rb") as f:
            outcome, value = pickle.load(f)  # our own submitit output
    except Exception as e:  # noqa: BLE001 - any unpickling failure: a damaged file, not a crash
        return None, f"cannot read submitit's result file {path} ({type(e).__name__}); state unknown"
    if outcome == "success":
        return "COMPLETED", None
    return "FAILED", _error_line(str(value).splitlines()) if outcome == "error" else None


NOTE_CHARS = 200
STOP_MARKERS = ("stopped by SIGTERM at step", "stopped by SIGINT at step")


def _trim(line: str) -> str:
    line = line.strip()
    return line if len(line) <= NOTE_CHARS else line[:NOTE_CHARS - 3] + "..."


def _error_line(lines: list[str]) -> str | None:
    """The first ``error: ...`` line, else the exception line ending the last Python traceback."""
    for line in lines:
        if line.startswith("error:"):
            return _trim(line)
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        # frames and source lines are indented; the first unindented line after them is the exception
        for line in lines[starts[-1] + 1:]:
            if line.strip() and not line[0].isspace():
                return _trim(line)
    return None


def _log_lines(path: str | None) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines() if path else []
    except OSError:
        return []


def _stop_line(lines: list[str]) -> str | None:
    """The last "stopped by SIGTERM/SIGINT at step N ..." line of a log, from "stopped" on."""
    for line in reversed(lines):
        for marker in STOP_MARKERS:
            if marker in line:
                return _trim(line[line.index(marker):])
    return None


@contextlib.contextmanager
def _quiet(*names: str):
    """Only errors from the named loggers, and no Python warnings, inside the block; then as before.

    TensorBoard's reader logs through Python logging (the ``tensorboard`` logger), e.g. "Detected
    out of order event.step ... Purging expired events" for every resumed run."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, saved):
            logger.setLevel(level)


def last_metrics(run_dir: Path) -> tuple[int | None, dict[str, float]]:
    """Last logged step and the latest value of each loss term, read from the event files."""
    tb = run_dir / "tb"
    if not tb.is_dir():
        return None, {}
    with _quiet("tensorboard", "absl"):  # library chatter would land in the status table
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        acc.Reload()
    metrics, step = {}, None
    for tag in acc.Tags()["scalars"]:
        if tag.endswith("/loss") and not tag.startswith("final/"):
            last = acc.Scalars(tag)[-1]
            metrics[tag] = last.value
            step = max(step or 0, last.step)
    return step, metrics


TASK_FIELDS = ("name", "run_dir", "job_id", "stderr")


def read_submission(run_root: Path) -> dict[str, Any]:
    """``<run root>/submission.json``, checked: a one-line error when it is not one submit wrote."""
    path = run_root / SUBMISSION_FILE
    if not path.is_file():
        raise GensuiteError(f"{path}: no submission record; pass the run root that submit printed")

    def refuse(why: str) -> GensuiteError:
        return GensuiteError(f"{path}: not a submission record written by launch/submit.py ({why}); "
                             f"pass the run root that submit printed, or submit the job again")

    try:
        record = json.loads(path.read_text(errors="replace"))
    except (ValueError, OSError) as e:
        raise refuse(f"not JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(record, dict):
        raise refuse(f"a JSON {type(record).__name__}, not an object")
    for key, kind in (("job", str), ("log_folder", str), ("tasks", list)):
        if not isinstance(record.get(key), kind):
            raise refuse(f"no {key!r} field" if key not in record else f"{key!r} is not a {kind.__name__}")
    if not record["tasks"]:
        raise refuse("'tasks' is empty")
    for i, task in enumerate(record["tasks"]):
        missing = [k for k in TASK_FIELDS if not isinstance(task, dict) or not isinstance(task.get(k), str)]
        if missing:
            raise refuse(f"tasks[{i}] has no {', '.join(repr(k) for k in missing)}")
    return record


def status(run_root: Path) -> list[dict[str, Any]]:
    """Each submitted task: SLURM's state while queued, else its outcome, last step and losses.

    Outcome: submitit's result file (COMPLETED/FAILED), else STOPPED when its log says it was stopped
    by SIGTERM/SIGINT, else UNKNOWN. ``note``: a FAILED task's first error line, a STOPPED task's stop
    line, or why the result file could not be read."""
    record = read_submission(run_root)
    tasks = record["tasks"]
    queued = _queue_states([t["job_id"] for t in tasks])
    rows = []
    for t in tasks:
        state, note = queued.get(t["job_id"]), None
        if state is None:
            state, note = _result_state(Path(record["log_folder"]), t["job_id"])
            lines = _log_lines(t["stderr"])
            if state == "FAILED":
                note = _error_line(lines) or note
            elif state is None and _stop_line(lines):
                state, note = "STOPPED", _stop_line(lines)
        step, metrics = last_metrics(Path(t["run_dir"]))
        rows.append({"name": t["name"] or record["job"], "job_id": t["job_id"], "state": state or "UNKNOWN",
                     "step": step, "metrics": metrics, "run_dir": t["run_dir"], "note": note})
    return rows
