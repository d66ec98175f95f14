"""The contract's hooks through a family that lives outside gensuite (``family: toyfam:ToyGaussian``):
data-dependent initialisation, a post-step callback, sampling that needs gradients, per-rank state that
resumes exactly on two ranks, and the unwrapped view of a DDP network."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gensuite import checkpoint as ckpt
from gensuite.data.pipeline import read_split

ROOT = Path(__file__).resolve().parents[1]

TOY_FAMILY = '''
from dataclasses import dataclass

import torch
from torch import nn

from gensuite.registry import GenerativeFamily


@dataclass
class ToyConfig:
    clip: float = 0.0  # after_step clips log_std to [-clip, clip], as WGAN clips the critic's weights


class Density(nn.Module):
    def __init__(self):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(2))
        self.log_std = nn.Parameter(torch.zeros(2))
        self.register_buffer("data_mean", torch.zeros(2))

    def forward(self, x):
        return torch.distributions.Normal(self.mean, self.log_std.exp()).log_prob(x).sum(-1)

    def unwrapped_only(self):
        return "bare"


class ToyGaussian(GenerativeFamily):
    name = "toy_gaussian"
    config_class = ToyConfig
    flavors = {"debug": {}}
    debug_dataset = "moons"
    sampling_needs_gradients = True
    likelihood_values = ("log_px",)

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        self.after_steps = 0
        self.draws = torch.zeros(0)

    def build_networks(self):
        return {"density": Density()}

    initializes_from_data = True

    def initialize(self, nets, batch):
        nets["density"].data_mean.copy_(batch["x"].mean(0))

    def loss(self, player, nets, batch, step):
        assert nets.bare("density").unwrapped_only() == "bare"
        self.draws = torch.cat([self.draws, torch.rand(1)])  # this rank's own noise stream
        return {"loss": -nets["density"](batch["x"]).mean()}

    def after_step(self, player, nets, step):
        nets.bare("density").log_std.clamp_(-self.cfg.clip, self.cfg.clip)
        self.after_steps += 1

    def state_dict(self):
        return {"after_steps": self.after_steps}

    def load_state_dict(self, state):
        self.after_steps = state["after_steps"]

    def rank_state_dict(self):
        return {"draws": self.draws.clone()}

    def load_rank_state_dict(self, state):
        self.draws = state["draws"].clone()

    def log_likelihood(self, nets, batch, k, seeds):
        return {"log_px": nets.ema("density")(batch["x"])}

    def fixed_inputs(self, n, generator):
        return {"z": torch.randn(n, 2, generator=generator)}

    def sample(self, nets, fixed):
        x = fixed["z"].clone().requires_grad_(True)  # gradient ascent on log p: needs autograd
        for _ in range(3):
            (grad,) = torch.autograd.grad(nets.ema("density")(x).sum(), x)
            x = (x + 0.1 * grad).detach().requires_grad_(True)
        return x.detach()
'''


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    (tmp_path / "toyfam.py").write_text(TOY_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def toy_job(shard_root, **train) -> dict:
    return {"family": "toyfam:ToyGaussian", "flavor": "debug",
            "data": {"dataset": "moons", "root": str(shard_root), "shuffle_buffer": 64},
            "train": {"steps": 6, "batch_size": 32, "log_every": 3, "sample_every": 3, "checkpoint_every": 3,
                      **train},
            "eval": {"metrics": ["likelihood"], "max_samples": 64},
            "log": {"grid_size": 16, "progress_bar": False}}


def test_hooks_of_a_family_outside_gensuite(shard_root, toy, tmp_path):
    from gensuite.config import job_from_dict
    from gensuite.sampling import draw, load_run
    from gensuite.trainer import train

    metrics = train(job_from_dict(toy_job(shard_root)), tmp_path / "run")
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    density = state["networks"]["density"]
    first = read_split(shard_root / "moons", "train", 32)["x"]
    assert torch.equal(density["data_mean"], first.mean(0))  # initialise saw the first stored batch
    assert torch.all(density["log_std"] == 0.0)  # Adam moves it every step; after_step clipped it back each time
    assert not torch.equal(density["mean"], torch.zeros(2))  # while the mean trained
    assert state["family"] == {"after_steps": 6}
    assert len(state["family_ranks"]) == 1 and state["family_ranks"][0]["draws"].shape == (6,)
    assert "final/eval/log_px" in metrics and "final/eval/log_px_bpd" in metrics
    assert (tmp_path / "run" / "samples" / "samples-00000003.png").is_file()  # sampled with gradients
    run = load_run(tmp_path / "run")
    assert draw(run, 8, seed=1).shape == (8, 2)


def test_an_external_family_names_what_is_missing(toy):
    from gensuite.config import job_from_dict
    from gensuite.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^family: 'toyfam:Nope': toyfam has no Nope$"):
        job_from_dict({"family": "toyfam:Nope", "flavor": "debug"})
    with pytest.raises(ConfigError, match=r"^family: 'toyfam:Density': not a gensuite family \(it lacks "
                                          r"config_class, flavors, build_networks, players, loss, sample;"):
        job_from_dict({"family": "toyfam:Density", "flavor": "debug"})
    with pytest.raises(ConfigError, match=r"^family: 'missing_module:X': cannot import missing_module"):
        job_from_dict({"family": "missing_module:X", "flavor": "debug"})


def test_an_installed_package_declares_a_family_by_entry_point(shard_root, toy, tmp_path):
    """What ``pip install`` of a package with ``[project.entry-points."gensuite.families"]`` leaves on
    sys.path: a dist-info folder whose entry_points.txt names the class. A job names the family by the
    entry point's name, and its checkpoint rebuilds through it."""
    from gensuite.config import job_from_dict
    from gensuite.errors import ConfigError
    from gensuite.registry import installed_families
    from gensuite.sampling import draw, load_run
    from gensuite.trainer import train

    info = toy / "toyfam-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyfam\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gensuite.families]\ntoy_gaussian = toyfam:ToyGaussian\n"
                                           "toy_broken = toyfam:Nope\n")
    assert installed_families() == {"toy_gaussian": "toyfam:ToyGaussian", "toy_broken": "toyfam:Nope"}
    job = job_from_dict({**toy_job(shard_root, steps=2), "family": "toy_gaussian"})
    train(job, tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert type(run.family).__name__ == "ToyGaussian" and run.job.family == "toy_gaussian"
    assert draw(run, 4, seed=1).shape == (4, 2)
    with pytest.raises(ConfigError, match=r"^family: 'toyfam:Nope \(entry point toy_broken of group "
                                          r"gensuite.families\)': toyfam has no Nope$"):
        job_from_dict({"family": "toy_broken", "flavor": "debug"})


@pytest.mark.slow
def test_per_rank_state_resumes_exactly_on_two_ranks(shard_root, toy, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{toy}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

    def run(name: str, steps: int) -> None:
        job = tmp_path / f"{name}-{steps}.yaml"
        job.write_text(yaml.safe_dump(toy_job(shard_root, steps=steps)))
        result = subprocess.run([sys.executable, "-m", "gensuite.distributed", "2", "-m", "gensuite.train", str(job),
                                 "--run-dir", str(tmp_path / name)], capture_output=True, text=True, cwd=ROOT,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    run("straight", 6)
    run("split", 3)
    run("split", 6)
    a, b = (ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / n, 6)) for n in ("straight", "split"))
    for rank in (0, 1):
        assert torch.equal(a["family_ranks"][rank]["draws"], b["family_ranks"][rank]["draws"])
        assert a["family_ranks"][rank]["draws"].shape == (6,)
    assert not torch.equal(a["family_ranks"][0]["draws"], a["family_ranks"][1]["draws"])  # each rank its own
    for key, value in a["networks"]["density"].items():
        assert torch.equal(value, b["networks"]["density"][key]), key
    assert a["family"] == b["family"] == {"after_steps": 6}
    sample = subprocess.run([sys.executable, "-m", "gensuite", "sample", str(tmp_path / "split"), "--n", "8",
                             "--out", str(tmp_path / "s.png")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert sample.returncode == 0 and (tmp_path / "s.png").is_file(), sample.stderr[-2000:]
