"""``launch/submit.py`` against a real two-node SLURM cluster on 127.0.0.1 (see slurm_cluster.py)."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = [sys.executable, str(ROOT / "launch" / "submit.py")]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from slurm_cluster import LocalSlurm, ensure_installed

    reason = ensure_installed()
    if reason:
        pytest.fail(reason)  # a missing cluster is a failure, never a silent skip
    c = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def write_job(path: Path, shard_root: Path, **sections) -> Path:
    job = {"family": "gan", "flavor": "debug",
           "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
           "train": {"steps": 20, "batch_size": 16, "log_every": 5, "sample_every": 10, "checkpoint_every": 10},
           "log": {"grid_size": 16, "progress_bar": False},
           "launch": {"cpus_per_task": 1, "timeout_min": 10}}
    for key, value in sections.items():
        job.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(job))
    return path


def submit(cluster, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*SUBMIT, *map(str, args)], env=cluster.env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def wait_for(cluster, run_root: Path, timeout: float) -> dict:
    record = json.loads((run_root / "submission.json").read_text())
    ids = {t["job_id"].split("_")[0] for t in record["tasks"]}
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%i %r", "-j", ",".join(ids)], env=cluster.env,
                             capture_output=True, text=True).stdout
        if not out.strip():
            return record
        for line in out.splitlines():
            job_id, reason = line.split(maxsplit=1)
            if reason == "BeginTime":  # SLURM holds a requeued job for 2 minutes; release it to save CI time
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=cluster.env,
                               capture_output=True)
        time.sleep(2)
    pytest.fail(f"jobs {ids} still queued after {timeout}s\n{cluster.logs()}")


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def task_logs(record: dict, task: int = 0) -> str:
    out = Path(record["tasks"][task]["stdout"])
    return out.read_text() + out.with_suffix(".err").read_text()


def test_sweep_runs_as_one_array(cluster, shard_root, tmp_path):
    job = write_job(tmp_path / "sweep.yaml", shard_root, sweep={"grid": {"train.seed": [1, 2, 3]}},
                    launch={"array_parallelism": 2})
    r = submit(cluster, job, "--run-dir", tmp_path / "runs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tensorboard --logdir" in r.stdout
    record = wait_for(cluster, tmp_path / "runs", 300)
    ids = [t["job_id"] for t in record["tasks"]]
    assert len({i.split("_")[0] for i in ids}) == 1 and sorted(i.split("_")[1] for i in ids) == ["0", "1", "2"]
    seeds, checksums = [], []
    for task in record["tasks"]:
        run_dir = Path(task["run_dir"])
        assert run_dir.name == f"seed={task['overrides']['train.seed']}"
        assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["step"] == 20
        assert scalar_steps(run_dir, "D/loss") == [5, 10, 15, 20]
        seeds.append(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"])
        checksums.append(re.search(r"parameter checksum (\w+)", task_logs(record, ids.index(task["job_id"])))[1])
    assert seeds == [1, 2, 3]
    assert len(set(checksums)) == 3  # different seeds really trained different models

    status = submit(cluster, "--status", tmp_path / "runs", "--json", cwd=tmp_path)
    rows = json.loads(status.stdout)
    assert [r["state"] for r in rows] == ["COMPLETED"] * 3 and [r["step"] for r in rows] == [20] * 3


def test_two_nodes_train_with_ddp_over_gloo(cluster, shard_root, tmp_path):
    job = write_job(tmp_path / "ddp.yaml", shard_root, launch={"nodes": 2, "tasks_per_node": 1})
    r = submit(cluster, job, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    record = wait_for(cluster, tmp_path / "run", 300)
    folder = Path(record["log_folder"])
    job_id = record["tasks"][0]["job_id"]
    logs = [(folder / f"{job_id}_{rank}_log.err").read_text() for rank in (0, 1)]
    found = [re.search(r"\[gensuite (node\d) rank (\d)/(\d)\] finished at step 20; parameter checksum (\w+)", log)
             for log in logs]
    assert all(found), logs
    assert [(m[1], m[2], m[3]) for m in found] == [("node1", "0", "2"), ("node2", "1", "2")]
    assert found[0][4] == found[1][4]  # both ranks hold bitwise-identical parameters
    assert "global batch 16 = 2 ranks x 1 x 8" in logs[0]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))["data"]["world_size"] == 2


def long_job(path: Path, shard_root: Path, **launch) -> Path:
    """About 2.5 minutes of DCGAN steps on this CPU, under a 1-minute time limit."""
    return write_job(path, shard_root, model={"architecture": "dcgan", "ngf": 32, "ndf": 32},
                     train={"steps": 5000, "batch_size": 64, "log_every": 25, "sample_every": 10_000,
                            "checkpoint_every": 10_000},
                     launch={"timeout_min": 1, **launch})


def test_timeout_checkpoints_requeues_and_finishes(cluster, shard_root, tmp_path):
    # About 2.5 minutes of work under a 1-minute limit: SLURM's USR2 warning makes every rank
    # checkpoint after the current step, submitit requeues, and the run resumes from that step.
    job = long_job(tmp_path / "long.yaml", shard_root, max_requeues=30)
    r = submit(cluster, job, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    record = wait_for(cluster, tmp_path / "run", 900)
    logs = task_logs(record)
    resumes = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", logs)]
    assert len(resumes) >= 1, logs[-3000:]
    assert "finished at step 5000" in logs and "Traceback" not in logs  # requeues are expected stops
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))["step"] == 5000
    # Each stop checkpoints exactly where it stopped: no logged step is missing or repeated.
    assert scalar_steps(tmp_path / "run", "G/loss") == list(range(25, 5001, 25))


def catches(pid: str, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone, or not a pid
        return False
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M)
    return bool(caught and int(caught.group(1), 16) >> (signum - 1) & 1)


def test_warning_during_start_up_is_not_lost(cluster, shard_root, tmp_path):
    # SLURM may send the time-limit warning while the task is still importing torch. It must not
    # kill the task: it is recorded, the run stops after its first step, checkpoints and requeues.
    # The signal goes out the moment the task's first handler (gensuite.slurm_entry's, installed
    # before any heavy import) is in place; the interpreter's own start-up before that, tens of
    # milliseconds, is a window no Python code can cover.
    job = write_job(tmp_path / "early.yaml", shard_root, train={"steps": 30},
                    launch={"timeout_min": 5, "max_requeues": 1})
    r = submit(cluster, job, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job_id = json.loads((tmp_path / "run" / "submission.json").read_text())["tasks"][0]["job_id"]
    deadline, ready = time.time() + 60, False
    while not ready and time.time() < deadline:
        listed = subprocess.run(["scontrol", "listpids", job_id], env=cluster.env, capture_output=True, text=True)
        pids = [line.split()[0] for line in listed.stdout.splitlines()[1:] if line.split()[0].isdigit()]
        for pid in pids:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            ready = ready or ("gensuite.slurm_entry" in command and catches(pid, signal.SIGUSR2))
        time.sleep(0.005)
    assert ready, "the task never started or never installed its SIGUSR2 handler"
    subprocess.run(["scancel", "--signal=USR2", job_id], env=cluster.env, check=True)
    record = wait_for(cluster, tmp_path / "run", 300)
    logs = task_logs(record)
    assert "rank 0/1] signal received; stopping after step 1 " in logs, logs[-2000:]
    assert "at step 1\n" in logs and "finished at step 30" in logs
    assert scalar_steps(tmp_path / "run", "D/loss") == [5, 10, 15, 20, 25, 30]


def test_max_requeues_is_honoured(cluster, shard_root, tmp_path):
    # max_requeues: 0 -> the first time-limit warning still checkpoints, but the job ends there.
    job = long_job(tmp_path / "once.yaml", shard_root, max_requeues=0)
    r = submit(cluster, job, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    record = wait_for(cluster, tmp_path / "run", 300)
    logs = task_logs(record)
    assert "timed-out too many times" in logs and "Traceback" not in logs
    assert "error: Job not requeued because: timed-out too many times. (the last checkpoint is kept: submit the " \
           "job again to continue)" in logs
    assert logs.count("steps 0->5000") == 1 and "resumed from" not in logs  # started once, never requeued
    stopped = int(re.search(r"stopping after step (\d+)", logs)[1])
    assert 0 < stopped < 5000
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))["step"] == stopped
    rows = json.loads(submit(cluster, "--status", tmp_path / "run", "--json", cwd=tmp_path).stdout)
    # The warning may come during start-up (SLURM sends it up to a minute early): then it is
    # replayed and the loop stops after step 1, before anything is logged.
    assert rows[0]["state"] == "FAILED" and rows[0]["step"] == (stopped // 25 * 25 or None)


def test_scancel_checkpoints_both_ranks_without_a_traceback(cluster, shard_root, tmp_path):
    # scancel sends SIGTERM to every task: each rank stops after the same step, rank 0 writes the
    # checkpoint and says so in one line; neither .err log holds a traceback; --status says STOPPED.
    job = long_job(tmp_path / "cancel.yaml", shard_root, timeout_min=10, nodes=2, tasks_per_node=1)
    r = submit(cluster, job, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "run" / "submission.json").read_text())
    job_id = record["tasks"][0]["job_id"]
    err = Path(record["tasks"][0]["stderr"])
    deadline = time.time() + 180
    while time.time() < deadline and not (err.is_file() and "steps 0->5000" in err.read_text()):
        time.sleep(1)
    time.sleep(5)  # some steps in
    subprocess.run(["scancel", job_id], env=cluster.env, check=True)
    wait_for(cluster, tmp_path / "run", 120)
    logs = [(Path(record["log_folder"]) / f"{job_id}_{rank}_log.err").read_text() for rank in (0, 1)]
    assert not any("Traceback" in log for log in logs), logs[0][-3000:] + logs[1][-3000:]
    stops = re.findall(r"^stopped by SIGTERM at step (\d+); checkpoint (\S+); submit the job again to resume$",
                       logs[0], re.M)
    assert len(stops) == 1 and "stopped by" not in logs[1], logs[0][-3000:]
    step, path = int(stops[0][0]), stops[0][1]
    assert f"rank 1/2] signal received; stopping after step {step} " in logs[1]
    assert 0 < step < 5000 and path == str(ckpt.checkpoint_path(tmp_path / "run", step))
    state = ckpt.load_checkpoint(path)
    assert state["step"] == step and state["data"]["world_size"] == 2
    rows = json.loads(submit(cluster, "--status", tmp_path / "run", "--json", cwd=tmp_path).stdout)
    assert rows[0]["state"] == "STOPPED" and rows[0]["note"].startswith(f"stopped by SIGTERM at step {step}")


def test_dry_run_prints_sbatch_lines_and_refuses_injection(shard_root, tmp_path):
    job = write_job(tmp_path / "job.yaml", shard_root, launch={
        "partition": "gpu", "account": "proj-42", "qos": "high", "nodes": 2, "gpus_per_node": 4,
        "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 120, "constraint": "a100&ib", "exclusive": True,
        "setup": ["module load cuda/12.1"], "sbatch_args": {"mail-type": "END"}},
        sweep={"grid": {"model.loss": ["minimax", "non_saturating"]}, "sets": [{"optim.lr": 1e-4}, {"optim.lr": 2e-4}]})
    r = subprocess.run([*SUBMIT, str(job), "--dry-run", "--run-dir", str(tmp_path / "r")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    for line in ["#SBATCH --partition=gpu", "#SBATCH --account=proj-42", "#SBATCH --qos=high", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=64GB", "#SBATCH --time=120", "#SBATCH --constraint='a100&ib'",
                 "#SBATCH --exclusive", "#SBATCH --array=0-3%4", "#SBATCH --signal=USR2@90", "#SBATCH --requeue",
                 "#SBATCH --mail-type=END", "module load cuda/12.1"]:
        assert line in r.stdout.splitlines(), line
    runs = re.findall(r"^#   \[\d\] (\S+)", r.stdout, re.M)
    assert [Path(p).name for p in runs] == ["loss=minimax,lr=0.0001", "loss=minimax,lr=0.0002",
                                            "loss=non_saturating,lr=0.0001", "loss=non_saturating,lr=0.0002"]

    for bad in ["gpu;rm -rf ~", "gpu\nrm -rf ~", "$(reboot)"]:
        write_job(job, shard_root, launch={"partition": bad})
        r = subprocess.run([*SUBMIT, str(job), "--dry-run"], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.startswith("error: launch.partition:") and len(r.stderr.strip().splitlines()) == 1
    write_job(job, shard_root, launch={"partition": "gpu", "setup": ["echo ok\nrm -rf ~"]})
    r = subprocess.run([*SUBMIT, str(job), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "launch.setup[0]" in r.stderr


def _checksums(record: dict) -> list[str]:
    folder, job_id = Path(record["log_folder"]), record["tasks"][0]["job_id"]
    logs = [(folder / f"{job_id}_{rank}_log.err").read_text() for rank in (0, 1)]
    return [re.findall(r"rank \d/2\] finished at step 8; parameter checksum (\w+)", log)[-1] for log in logs]


def test_deepspeed_zero2_gan_and_vae_resume_exactly(cluster, shard_root, tmp_path):
    # Two CPU ranks under ZeRO-2 with gradient accumulation: 8 steps straight, and 4 steps then a
    # second submission that resumes from DeepSpeed's partitioned checkpoint, end bitwise equal.
    runs = {}
    for family, extra in [("gan", {"ema": {"networks": ["G"]}}), ("vae", {})]:
        train = {"steps": 8, "micro_batch_size": 4, "checkpoint_every": 4, "strategy": "deepspeed",
                 "deepspeed": {"zero_stage": 2}, **extra}
        job = write_job(tmp_path / f"{family}.yaml", shard_root, train=train, launch={"tasks_per_node": 2})
        job_text = job.read_text().replace("family: gan", f"family: {family}")
        job.write_text(job_text)
        for name, steps in [("straight", 8), ("resumed", 4)]:
            r = submit(cluster, job, "--run-dir", tmp_path / family / name, "--set", f"train.steps={steps}",
                       cwd=tmp_path)
            assert r.returncode == 0, r.stderr
        runs[family] = job
    for family in runs:
        for name in ("straight", "resumed"):
            wait_for(cluster, tmp_path / family / name, 600)
    for family, job in runs.items():
        r = submit(cluster, job, "--run-dir", tmp_path / family / "resumed", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    for family in runs:
        straight = wait_for(cluster, tmp_path / family / "straight", 600)
        resumed = wait_for(cluster, tmp_path / family / "resumed", 600)
        assert "resumed from" in task_logs(resumed) and "at step 4" in task_logs(resumed)
        a, b = _checksums(straight), _checksums(resumed)
        assert a[0] == a[1] and b[0] == b[1], (family, a, b)  # ranks agree
        assert a == b, family  # resume is exact
        sharded = tmp_path / family / "resumed" / "checkpoints" / "sharded" / "step-00000008"
        players = ["D", "G"] if family == "gan" else ["model"]
        for player in players:
            assert len(list((sharded / player).glob("zero_pp_rank_*_optim_states.pt"))) == 2
        state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / family / "resumed"))
        assert state["strategy"] == "deepspeed" and state["step"] == 8
