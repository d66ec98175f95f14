"""`launch/submit.py --status` without a SLURM cluster: hand-written submission records, a really
resumed run's event files, failed, stopped and damaged tasks, and records that are not records.

The job ids are made up: with no ``squeue`` (or for ids SLURM does not know) no task is queued, so
each state comes from submitit's result file and the task's log."""

import json
import logging
import pickle
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite import checkpoint as ckpt
from gensuite.config import job_from_dict
from gensuite.slurm import _queue_states
from gensuite.trainer import train
from launchers import ROOT

IDS = ["987650001", "987650002_0", "987650002_1", "987650003", "987650004", "987650005"]


def status(root, *extra):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "--status", str(root), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def task(root, job_id, run_dir, name=""):
    return {"name": name, "overrides": {}, "run_dir": str(run_dir), "job_id": job_id,
            "stdout": str(root / "slurm" / f"{job_id}_0_log.out"), "stderr": str(root / "slurm" / f"{job_id}_0_log.err")}


def write_record(root, tasks, job="status-test"):
    (root / "slurm").mkdir(parents=True, exist_ok=True)
    (root / "submission.json").write_text(json.dumps(
        {"job": job, "submitted": "2024-05-01 12:00:00", "log_folder": str(root / "slurm"), "tasks": tasks}))


def write_result(root, job_id, outcome, value):
    with open(root / "slurm" / f"{job_id}_0_result.pkl", "wb") as f:
        pickle.dump((outcome, value), f)


@pytest.fixture(scope="module")
def resumed_run(shard_root, tmp_path_factory):
    """4 steps, the step-4 checkpoint lost, resumed from step 2 to 8: steps 3-4 are logged twice."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    raw = {"name": "resumed", "family": "vae", "flavor": "debug",
           "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
           "train": {"steps": 4, "batch_size": 16, "log_every": 1, "sample_every": 100, "checkpoint_every": 2},
           "log": {"grid_size": 16, "progress_bar": False, "save_png": False}}
    train(job_from_dict(raw), run_dir)
    (run_dir / "checkpoints" / "step-00000004.pt").unlink()
    train(job_from_dict({**raw, "train": {**raw["train"], "steps": 8}}), run_dir)
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["step"] == 8
    return run_dir


def test_fake_job_ids_are_not_queued():
    assert _queue_states(IDS) == {}


def test_a_resumed_run_shows_its_last_step_without_tensorboard_chatter(resumed_run, tmp_path, caplog):
    # the events really are out of order: TensorBoard's reader says so through Python logging
    with caplog.at_level(logging.WARNING, logger="tensorboard"):
        acc = EventAccumulator(str(resumed_run / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
    assert any("Detected out of order event.step" in r.getMessage() for r in caplog.records)
    loss = acc.Scalars("model/loss")[-1]
    assert loss.step == 8

    write_record(tmp_path, [task(tmp_path, IDS[0], resumed_run)], job="resumed")
    write_result(tmp_path, IDS[0], "success", {"final/model/loss": loss.value})
    result = status(tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    val_loss = acc.Scalars("val/model/loss")[-1]  # the validation curve's last point, beside the training loss
    assert val_loss.step == 8
    assert result.stdout.splitlines() == [f"   987650001  COMPLETED   step      8  resumed  model/loss={loss.value:.4g}"
                                          f"  val/model/loss={val_loss.value:.4g}"]
    # the levels are restored after the read
    from gensuite.slurm import last_metrics

    before = logging.getLogger("tensorboard").level
    assert last_metrics(resumed_run) == (8, {"model/loss": loss.value, "val/model/loss": val_loss.value})
    assert logging.getLogger("tensorboard").level == before


TRACEBACK = """\
submitit INFO (2024-05-01 12:00:01,000) - Starting with JobEnvironment(job_id=1, hostname=node1, local_rank=0(1), node=0(1), global_rank=0(1))
Traceback (most recent call last):
  File "/opt/gensuite/trainer.py", line 300, in run
    batches = self._next_batches(data)
              ^^^^^^^^^^^^^^^^^^^^^^^^
KeyError: 'x'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/opt/gensuite/slurm.py", line 150, in __call__
    return train(job, run_dir, stop)
RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB
  (the second line of the message)
submitit ERROR (2024-05-01 12:00:02,000) - Submitted job triggered an exception
"""


def test_failed_stopped_and_damaged_tasks(tmp_path):
    root = tmp_path
    slurm = root / "slurm"
    write_record(root, [task(root, IDS[1], root / "a", "seed=1"), task(root, IDS[2], root / "b", "seed=2"),
                        task(root, IDS[3], root / "c", "seed=3"), task(root, IDS[4], root / "d", "seed=4"),
                        task(root, IDS[5], root / "e", "seed=5")])
    # FAILED with a traceback in its log: the exception line of the last traceback
    write_result(root, IDS[1], "error", "Traceback (most recent call last):\nValueError: from the pickle")
    (slurm / f"{IDS[1]}_0_log.err").write_text(TRACEBACK)
    # FAILED with a gensuite error line (long): that line, trimmed
    write_result(root, IDS[2], "error", "Traceback (most recent call last):\nValueError: from the pickle")
    long_error = "error: data.root: no shard set at /data/" + "x" * 300
    (slurm / f"{IDS[2]}_0_log.err").write_text(f"starting\n{long_error}\n{TRACEBACK}")
    # ended without a result file, its log saying it was stopped by scancel
    (slurm / f"{IDS[3]}_0_log.err").write_text(
        "[gensuite node1 rank 0/1] step 40/100  2.1 steps/s  ETA 0:28  model/loss=180.2\n"
        "[gensuite node1 rank 0/1] stopped by SIGTERM at step 42; checkpoint /runs/c/checkpoints/step-00000042.pt\n")
    # a damaged result file
    (slurm / f"{IDS[4]}_0_result.pkl").write_bytes(b"\x80\x04\x95garbage")
    # FAILED with no log at all: the stored traceback's last line
    write_result(root, IDS[5], "error", "Traceback (most recent call last):\n  File \"x\", line 1\nOSError: disk full")

    result = status(root)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [
        " 987650002_0  FAILED      step      -  seed=1",
        "              RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
        " 987650002_1  FAILED      step      -  seed=2",
        f"              {long_error[:197]}...",
        "   987650003  STOPPED     step      -  seed=3",
        "              stopped by SIGTERM at step 42; checkpoint /runs/c/checkpoints/step-00000042.pt",
        "   987650004  UNKNOWN     step      -  seed=4",
        f"              cannot read submitit's result file {slurm / (IDS[4] + '_0_result.pkl')} (UnpicklingError); "
        "state unknown",
        "   987650005  FAILED      step      -  seed=5",
        "              OSError: disk full",
    ]
    rows = json.loads(status(root, "--json").stdout)
    assert [r["state"] for r in rows] == ["FAILED", "FAILED", "STOPPED", "UNKNOWN", "FAILED"]
    assert len(rows[1]["note"]) == 200


def test_a_result_file_outranks_a_stop_line(tmp_path):
    write_record(tmp_path, [task(tmp_path, IDS[0], tmp_path / "run")])
    (tmp_path / "slurm" / f"{IDS[0]}_0_log.err").write_text("stopped by SIGINT at step 3\nall done\n")
    write_result(tmp_path, IDS[0], "success", {})
    assert status(tmp_path).stdout.splitlines() == ["   987650001  COMPLETED   step      -  status-test"]


GOOD = {"job": "j", "log_folder": "/tmp/logs", "tasks": [{"name": "", "run_dir": "/tmp/r", "job_id": "1",
                                                          "stderr": "/tmp/logs/1_0_log.err"}]}


@pytest.mark.parametrize("text, why", [
    ("{\"job\": \"j\", \"tasks\": [", "not JSON: Expecting value: line 1 column 24 (char 23)"),
    ("\x00\x01binary", "not JSON: Expecting value: line 1 column 1 (char 0)"),
    ("[1, 2]", "a JSON list, not an object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "tasks"}), "no 'tasks' field"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "log_folder"}), "no 'log_folder' field"),
    (json.dumps({**GOOD, "job": None}), "'job' is not a str"),
    (json.dumps({**GOOD, "tasks": []}), "'tasks' is empty"),
    (json.dumps({**GOOD, "tasks": [{"name": "", "run_dir": "/tmp/r"}]}), "tasks[0] has no 'job_id', 'stderr'"),
    (json.dumps({**GOOD, "tasks": ["1"]}), "tasks[0] has no 'name', 'run_dir', 'job_id', 'stderr'"),
])
def test_a_record_that_is_not_one_is_a_one_line_error(tmp_path, text, why):
    path = tmp_path / "submission.json"
    path.write_text(text)
    result = status(tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {path}: not a submission record written by launch/submit.py ({why}); "
        "pass the run root that submit printed, or submit the job again"]


def test_a_folder_without_a_record_is_a_one_line_error(tmp_path):
    result = status(tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'submission.json'}: no submission record; pass the run root that submit printed"]
