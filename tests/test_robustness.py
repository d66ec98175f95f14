"""Faults a user meets: stop signals, damaged or foreign checkpoints, a full disk, jobs that name what
a family does not have. Each gives one line and the right exit code, and earlier checkpoints load."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gensuite import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
GENSUITE = [sys.executable, "-m", "gensuite"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def job_file(path: Path, shard_root: Path, family="vae", **sections) -> Path:
    job = {"family": family, "flavor": "debug",
           "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
           "train": {"steps": 6, "batch_size": 16, "log_every": 2, "sample_every": 100, "checkpoint_every": 2},
           "log": {"grid_size": 16, "progress_bar": False}}
    for key, value in sections.items():
        job.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(job))
    return path


def run(*args, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)


def one_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single stderr line of a refused command (no traceback, nothing else)."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one error line of a run that stopped after it started (log lines come before it)."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def steps_of(run_dir: Path) -> list[int]:
    return [ckpt.load_checkpoint(p)["step"] for p in ckpt.list_checkpoints(run_dir)]


# -- stop signals outside SLURM ------------------------------------------------------------------------------


def start_and_signal(cmd: list[str], signum: int, marker: str = "steps 0->", **popen) -> tuple[int, str]:
    """Start ``cmd``, wait until its stderr shows ``marker`` and a little training, send ``signum``;
    (exit code, stderr)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=ENV,
                            **popen)
    seen = []
    deadline = time.time() + 240
    for line in proc.stderr:
        seen.append(line)
        if marker in line or time.time() > deadline:
            break
    time.sleep(1.5)  # some steps past the start
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=240)
    return proc.returncode, "".join(seen) + rest


LONG = {"steps": 100_000, "checkpoint_every": 100_000, "log_every": 50}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_current_step_and_the_same_command_resumes(shard_root, tmp_path, signum):
    job = job_file(tmp_path / "job.yaml", shard_root, train=LONG)
    cmd = [*GENSUITE, "train", str(job), "--run-dir", str(tmp_path / "run")]
    code, err = start_and_signal(cmd, signum)
    name = signal.Signals(signum).name
    assert code == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    stops = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(stops) == 1, err[-3000:]
    step = int(stops[0].split(" at step ")[1].split(";")[0])
    path = ckpt.checkpoint_path(tmp_path / "run", step)
    assert stops[0] == f"stopped by {name} at step {step}; checkpoint {path}; run the same command to resume"
    assert step > 0 and steps_of(tmp_path / "run") == [step]  # the step it stopped at, nothing else
    # The same command continues from there (a few more steps to keep the test short).
    resumed = run(*cmd, "--set", f"train.steps={step + 3}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {path} at step {step}" in resumed.stderr
    assert steps_of(tmp_path / "run")[-1] == step + 3


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step(shard_root, tmp_path):
    job = job_file(tmp_path / "job.yaml", shard_root, train=LONG)
    cmd = [sys.executable, "-m", "gensuite.distributed", "2", "-m", "gensuite.train", str(job),
           "--run-dir", str(tmp_path / "run")]
    code, err = start_and_signal(cmd, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    assert len(stops) == 1, err[-3000:]  # rank 0 says it once
    assert "Traceback" not in err, err[-3000:]
    step = int(stops[0].split(" at step ")[1].split(";")[0])
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "run", step))
    assert state["data"]["world_size"] == 2 and len(state["rng"]) == 2  # written collectively


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_checkpoints(shard_root, tmp_path):
    job = job_file(tmp_path / "job.yaml", shard_root, train=LONG)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gensuite.train", str(job),
           "--run-dir", str(tmp_path / "run")]
    code, err = start_and_signal(cmd, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    assert len(stops) == 1 and "Traceback" not in err, err[-3000:]
    step = int(stops[0].split(" at step ")[1].split(";")[0])
    assert steps_of(tmp_path / "run") == [step]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_to_submit_local_stops_the_run_and_the_sweep(shard_root, tmp_path, ranks):
    job = job_file(tmp_path / "job.yaml", shard_root, train=LONG, launch={"tasks_per_node": ranks},
                   sweep={"grid": {"train.seed": [1, 2]}})
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py"), str(job), "--local", "--run-dir", str(tmp_path / "r")]
    code, err = start_and_signal(cmd, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    assert len(stops) == 1 and "Traceback" not in err, err[-3000:]
    step = int(stops[0].split(" at step ")[1].split(";")[0])
    assert steps_of(tmp_path / "r" / "seed=1") == [step]
    assert not (tmp_path / "r" / "seed=2").exists()  # the sweep stopped with its first run


def test_stop_request_takes_the_first_signal_and_restores_handlers():
    from gensuite.distributed import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a repeat through another route is ignored
        assert stop.requested and stop.signal == signal.SIGTERM and not stop.requeue
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


# -- checkpoints -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(shard_root, tmp_path_factory) -> Path:
    """A finished 6-step VAE run with checkpoints at steps 2, 4, 6 (copied by each test)."""
    work = tmp_path_factory.mktemp("trained")
    job = job_file(work / "job.yaml", shard_root)
    result = run(*GENSUITE, "train", job, "--run-dir", work / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return work


def copy_run(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "job.yaml", tmp_path / "run"


def write_job_copy(trained: Path, tmp_path: Path, **train) -> Path:
    job = yaml.safe_load((trained / "job.yaml").read_text())
    job["train"].update(train)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return tmp_path / "job.yaml"


def test_an_unreadable_newest_checkpoint_is_skipped_named_and_kept(trained, tmp_path):
    _, run_dir = copy_run(trained, tmp_path)
    job = write_job_copy(trained, tmp_path, steps=8)
    newest = ckpt.checkpoint_path(run_dir, 6)
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy that stopped halfway
    result = run(*GENSUITE, "train", job, "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: skipping {newest}: not a readable gensuite checkpoint" in result.stderr
    assert f"resumed from {ckpt.checkpoint_path(run_dir, 4)} at step 4" in result.stderr
    kept = newest.with_name(newest.name + ".unreadable")
    assert kept.stat().st_size == 1000  # never deleted, never overwritten by the new step 6
    assert steps_of(run_dir)[-3:] == [4, 6, 8] and "Traceback" not in result.stderr


def test_sample_falls_back_to_the_newest_readable_checkpoint(trained, tmp_path):
    _, run_dir = copy_run(trained, tmp_path)
    newest = ckpt.checkpoint_path(run_dir, 6)
    newest.write_bytes(b"\0" * 64)
    result = run(*GENSUITE, "sample", run_dir, "--n", "4", "--out", tmp_path / "s.png")
    assert result.returncode == 0, result.stderr
    assert f"warning: skipping {newest}" in result.stderr
    assert f"of {ckpt.checkpoint_path(run_dir, 4)})" in result.stdout and (tmp_path / "s.png").is_file()
    assert newest.is_file()  # sampling only reads


def test_when_no_checkpoint_loads_the_error_names_the_newest(trained, tmp_path):
    job, run_dir = copy_run(trained, tmp_path)
    for path in ckpt.list_checkpoints(run_dir):
        path.write_bytes(b"not a checkpoint")
    job = write_job_copy(trained, tmp_path, steps=8)
    config = (run_dir / "config.yaml").read_text()
    result = run(*GENSUITE, "train", job, "--run-dir", run_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {ckpt.checkpoint_path(run_dir, 6)}: not a readable gensuite checkpoint")
    assert last.endswith("no older checkpoint of " + str(run_dir) + " loads either (train.resume: never starts "
                                                                    "afresh, or use another --run-dir)")
    assert (run_dir / "config.yaml").read_text() == config


def test_a_foreign_torch_file_is_not_a_checkpoint(tmp_path, shard_root):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    job = job_file(tmp_path / "job.yaml", shard_root, train={"resume": str(path)})
    line = one_line(run(*GENSUITE, "train", job, "--run-dir", tmp_path / "run"))
    assert line == f"error: {path}: not a gensuite checkpoint (no 'step' entry)"


def test_weights_that_do_not_fit_name_the_tensor_and_both_shapes(trained, tmp_path):
    job, run_dir = copy_run(trained, tmp_path)
    raw = yaml.safe_load((trained / "job.yaml").read_text())
    raw["model"] = {"hidden": [48]}
    raw["train"]["steps"] = 8
    job.write_text(yaml.safe_dump(raw))
    config = (run_dir / "config.yaml").read_text()
    line = one_line(run(*GENSUITE, "train", job, "--run-dir", run_dir))
    assert line.startswith(f"error: {ckpt.checkpoint_path(run_dir, 6)}: tensor encoder.")
    assert "has shape (32, 256) in the checkpoint but (48, 256) in this job's network" in line
    assert (run_dir / "config.yaml").read_text() == config  # not overwritten by the refused job
    assert steps_of(run_dir) == [2, 4, 6]


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(trained, tmp_path):
    _, run_dir = copy_run(trained, tmp_path)
    job = write_job_copy(trained, tmp_path, steps=8)
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    host = socket.gethostname()
    stale = ckpt.checkpoint_dir(run_dir) / f".step-00000008.pt.tmp-{host}-{dead.pid}"
    elsewhere = run_dir / f".config.yaml.tmp-other-host-{os.getpid()}"
    live = ckpt.checkpoint_dir(run_dir) / f".step-00000010.pt.tmp-{host}-{os.getpid()}"
    for path in (stale, elsewhere, live):
        path.write_bytes(b"partial")
    result = run(*GENSUITE, "train", job, "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not stale.exists() and not elsewhere.exists() and live.exists()
    assert f"removed {stale}, left by an interrupted write" in result.stderr


def test_a_failed_atomic_write_leaves_no_temporary(tmp_path, monkeypatch):
    final = tmp_path / "step-00000001.pt"
    final.write_bytes(b"old")

    def fail(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        ckpt.atomic_write_bytes(final, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"] and final.read_bytes() == b"old"


# -- a full disk ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int):
    """A real tmpfs of ``size_kb`` at ``path`` (the tests run as root, as CI does)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a small tmpfs for the disk-full tests: {mounted.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave_pages: int) -> None:
    """Fill ``disk`` but ``leave_pages`` 4 KiB pages."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave_pages * 4096))


def rewind_to_step_2(run_dir: Path) -> None:
    """As if the 4-step run had stopped after step 2: its later checkpoint and grids removed."""
    ckpt.checkpoint_path(run_dir, 4).unlink()
    for png in (run_dir / "samples").glob("*-0000000[34].png"):
        png.unlink()


@pytest.mark.parametrize("what, leave", [
    ("checkpoint", 60),  # grids and events (~36 pages) fit, the step-4 checkpoint (57 pages) does not
    ("grid", 1),  # the new event file takes the last page; the step-3 grid finds none
    ("events", 0),  # not one page: TensorBoard's first record fails
])
def test_a_full_disk_stops_with_one_line_and_keeps_every_checkpoint(shard_root, tmp_path, what, leave):
    with small_disk(tmp_path / "disk", 4096) as disk:
        run_dir = disk / "run"
        job = job_file(tmp_path / "job.yaml", shard_root, train={"steps": 4, "sample_every": 3})
        first = run(*GENSUITE, "train", job, "--run-dir", run_dir)
        assert first.returncode == 0, first.stderr[-3000:]
        rewind_to_step_2(run_dir)
        fill(disk, leave)
        line = error_line(run(*GENSUITE, "train", job, "--run-dir", run_dir))  # the same job resumes at step 2
        last = ckpt.checkpoint_path(run_dir, 2)
        written = {"checkpoint": ckpt.checkpoint_path(run_dir, 4),
                   "grid": run_dir / "samples" / "samples-00000003.png"}.get(what)
        if written is not None:
            assert line == f"error: no space left on device writing {written}; last complete checkpoint: {last}"
            assert not written.exists()
        else:
            assert line.startswith(f"error: no space left on device writing {run_dir / 'tb'}/events.out.")
            assert line.endswith(f"; last complete checkpoint: {last}")
        assert not [p for p in run_dir.rglob(".*.tmp-*")]  # no temporary left behind
        assert steps_of(run_dir) == [2]


@pytest.mark.slow
def test_a_full_disk_under_two_ranks_ends_both_without_a_hang(shard_root, tmp_path):
    with small_disk(tmp_path / "disk", 4096) as disk:
        job = job_file(tmp_path / "job.yaml", shard_root, train={"steps": 4, "sample_every": 3})
        cmd = [sys.executable, "-m", "gensuite.distributed", "2", "-m", "gensuite.train", str(job),
               "--run-dir", str(disk / "run")]
        assert run(*cmd).returncode == 0
        rewind_to_step_2(disk / "run")
        fill(disk, 60)
        line = error_line(run(*cmd, timeout=240))
        assert line == (f"error: no space left on device writing {ckpt.checkpoint_path(disk / 'run', 4)}; "
                        f"last complete checkpoint: {ckpt.checkpoint_path(disk / 'run', 2)}")
        assert steps_of(disk / "run") == [2]


# -- jobs that name what the family does not have --------------------------------------------------------------


@pytest.mark.parametrize("sections, expected", [
    ({"optim": {"players": {"Dd": {"lr": 1e-4}}}},
     "error: optim.players.Dd: no such player (did you mean D?); the gan family has D, G"),
    ({"optim": {"players": {"D": {"lrr": 1e-4}}}},
     "error: optim.players.D.lrr: unknown key; did you mean optim.players.D.lr?"),
    ({"optim": {"players": {"G": {"lr": -1}}}}, "error: optim.players.G.lr: must be > 0"),
    ({"optim": {"players": {"G": {"betas": [0.5, 1.5]}}}}, "error: optim.players.G.betas: each beta must be in [0, 1)"),
    ({"train": {"ema": {"networks": ["g"]}}},
     "error: train.ema.networks[0]: unknown network 'g' (did you mean G?); the gan family has D, G"),
    ({"train": {"batch_size": 15}, "launch": {"tasks_per_node": 2}},
     "error: train.batch_size: 15 is not divisible by the 2 ranks; use a multiple of 2"),
])
def test_validate_refuses_what_the_trainer_would(shard_root, tmp_path, sections, expected):
    job = job_file(tmp_path / "job.yaml", shard_root, family="gan", **sections)
    assert one_line(run(*GENSUITE, "validate", job)) == expected
    # and the launcher, before anything is queued or run
    assert one_line(run(sys.executable, ROOT / "launch" / "submit.py", job, "--local",
                        "--run-dir", tmp_path / "r")) == expected


def test_validate_data_catches_a_batch_larger_than_the_training_split(shard_root, tmp_path):
    job = job_file(tmp_path / "job.yaml", shard_root, train={"batch_size": 4096})
    expected = "error: train.batch_size: 4096 exceeds the 1500 training samples of digits; use at most 1500"
    assert one_line(run(*GENSUITE, "validate", job, "--data")) == expected
    assert one_line(run(*GENSUITE, "validate", job)) == expected  # the manifest is there: it is read
    assert one_line(run(*GENSUITE, "train", job, "--run-dir", tmp_path / "run")) == expected
    # Shards not built yet: validate checks the job alone; --data says what is missing.
    elsewhere = job_file(tmp_path / "later.yaml", tmp_path / "no-shards", train={"batch_size": 4096})
    assert run(*GENSUITE, "validate", elsewhere).returncode == 0
    assert one_line(run(*GENSUITE, "validate", elsewhere, "--data")) == (
        f"error: {tmp_path / 'no-shards' / 'digits' / 'manifest.json'}: shard set not found; build it with: "
        f"python shards/build.py digits --out {tmp_path / 'no-shards'}")
