"""``gensuite sample``: a run's checkpoint alone (no shards) rebuilds the sampler."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from gensuite.config import job_from_dict
from gensuite.registry import Networks
from gensuite.sampling import draw, load_run
from gensuite.trainer import load_network, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cvae_run(shard_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("cvae")
    shutil.copytree(shard_root / "digits", work / "shards" / "digits")
    job = job_from_dict({"name": "cvae", "family": "vae", "flavor": "debug", "model": {"conditional": True},
                         "data": {"dataset": "digits", "root": str(work / "shards"), "shuffle_buffer": 64},
                         "train": {"steps": 6, "batch_size": 16, "checkpoint_every": 6, "sample_every": 6,
                                   "ema": {"networks": ["decoder"], "decay": 0.9}},
                         "log": {"grid_size": 16, "progress_bar": False}})
    train(job, work / "run")
    shutil.rmtree(work / "shards")  # sampling must not need the data
    return work / "run"


def sample_cli(*args):
    return subprocess.run([sys.executable, "-m", "gensuite", "sample", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_samples_come_from_the_ema_weights_without_the_dataset(cvae_run):
    run = load_run(cvae_run)
    assert run.step == 6 and run.family.data.shape == (1, 16, 16) and run.family.data.num_classes == 10
    decoder = run.family.build_networks()["decoder"]
    decoder.load_state_dict(load_network(str(cvae_run), "decoder"))  # the EMA copy
    ema_only = Networks({"encoder": run.networks["encoder"], "decoder": decoder})
    fixed = run.family.fixed_inputs(20, torch.Generator().manual_seed(4))
    fixed = {k: v[:20] for k, v in fixed.items()}
    assert torch.equal(draw(run, 20, seed=4), run.family.sample(ema_only, fixed))
    trained = run.family.sample(Networks(dict(run.networks.items())), fixed)
    assert not torch.equal(draw(run, 20, seed=4), trained)  # EMA differs from the raw weights


def test_class_seed_and_grid(cvae_run, tmp_path):
    run = load_run(cvae_run)
    three, four = draw(run, 12, seed=1, label=3), draw(run, 12, seed=1, label=4)
    assert three.shape == (12, 1, 16, 16) and not torch.equal(three, four)
    assert torch.equal(three, draw(run, 12, seed=1, label=3)) and not torch.equal(three, draw(run, 12, 2, 3))

    result = sample_cli(cvae_run, "--n", 12, "--class", 3, "--seed", 1, "--out", tmp_path / "g.png")
    assert result.returncode == 0, result.stderr
    assert "EMA weights" in result.stdout
    grid = Image.open(tmp_path / "g.png")
    nrow = run.family.grid_nrow(12)  # 1 per class row: 12 // 10 = 1 image per row
    rows = -(-12 // nrow)
    assert grid.size == (nrow * 18 + 2, rows * 18 + 2)  # 16 px images, 2 px padding

    result = sample_cli(cvae_run, "--class", 10)
    assert result.returncode == 2 and result.stderr.startswith("error: --class: 10 is not a class of digits")
    result = sample_cli(cvae_run.parent / "missing")
    assert result.returncode == 2
    assert result.stderr == f"error: {cvae_run.parent / 'missing'}: no such run directory or checkpoint file\n"
    result = sample_cli(cvae_run.parent)  # a folder without checkpoints
    assert result.returncode == 2 and "no checkpoints in this run directory" in result.stderr
