"""Progress output of `gensuite train`: plain lines when stderr is a file, the live bar on a terminal."""

import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from fcntl import ioctl

import yaml

from gensuite.logger import PROGRESS_SECONDS_ENV
from launchers import ROOT

LINE = re.compile(r"^\[gensuite [^]]+\] step (\d+)/6  ([0-9.e+]+) steps/s  ETA (\d+:\d\d)  model/loss=(\S+)$")


def write_job(shard_root, tmp_path, steps=6):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "progress", "family": "vae", "flavor": "debug",
        "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
        "train": {"steps": steps, "batch_size": 16, "log_every": 2, "sample_every": 100, "checkpoint_every": 100},
        "log": {"grid_size": 16, "progress_bar": True, "save_png": False}}))
    return job


def train_into_file(job, tmp_path, seconds):
    log = tmp_path / "train.err"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{PROGRESS_SECONDS_ENV: seconds})
    with open(log, "wb") as err:
        result = subprocess.run([sys.executable, "-m", "gensuite", "train", str(job), "--run-dir", str(tmp_path / "run")],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env, timeout=300)
    return result.returncode, log.read_bytes()


def progress_lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_a_log_file_gets_plain_lines_at_each_log_step_when_the_period_allows(shard_root, tmp_path):
    code, raw = train_into_file(write_job(shard_root, tmp_path), tmp_path, "0")
    assert code == 0, raw.decode()[-3000:]
    assert b"\r" not in raw
    text = raw.decode()
    lines = progress_lines(text)
    # the first step, then every log step (log_every 2): a period of 0 s never holds a line back
    assert [int(m[1]) for m in lines] == [1, 2, 4, 6], text
    assert all(float(m[2]) > 0 and float(m[4]) == float(m[4]) for m in lines)
    assert lines[-1][3] == "0:00"
    assert len([s for s in text.splitlines() if " step " in s and "/6" in s]) == 4  # no other progress output


def test_a_long_period_leaves_only_the_first_and_last_step(shard_root, tmp_path):
    code, raw = train_into_file(write_job(shard_root, tmp_path), tmp_path, "3600")
    assert code == 0, raw.decode()[-3000:]
    assert b"\r" not in raw
    assert [int(m[1]) for m in progress_lines(raw.decode())] == [1, 6]


def test_a_bad_period_is_a_one_line_error(shard_root, tmp_path):
    code, raw = train_into_file(write_job(shard_root, tmp_path), tmp_path, "soon")
    assert code == 2
    assert raw.decode().strip().splitlines()[-1] == (
        f"error: ${PROGRESS_SECONDS_ENV}='soon' is not a number of seconds; set it to e.g. 30, or unset it")
    assert "Traceback" not in raw.decode()


def test_a_terminal_still_gets_the_live_bar(shard_root, tmp_path):
    job = write_job(shard_root, tmp_path)
    master, slave = pty.openpty()
    ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1", **{PROGRESS_SECONDS_ENV: "0"})
    proc = subprocess.Popen([sys.executable, "-m", "gensuite", "train", str(job), "--run-dir", str(tmp_path / "run")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    chunks = []

    def read():  # until the child closes the terminal (EIO), so it never blocks on a full buffer
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    assert proc.wait(timeout=300) == 0
    reader.join(timeout=30)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "6/6" in text and "step/s" in text and "model:loss=" in text, text[-3000:]
    assert not progress_lines(text.replace("\r", "\n"))
