"""The family contract and its declared abilities, over every registered family, plus a toy family
with an exact likelihood that the likelihood metric must measure without knowing what it is."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from gensuite.config import EvalConfig
from gensuite.data.pipeline import read_split
from gensuite.data.shards import data_spec, read_manifest
from gensuite.errors import ConfigError
from gensuite.evaluation import EvalContext, evaluate, resolve
from gensuite.registry import (Classifies, Family, GenerativeFamily, HasLikelihood, Networks, TextConditioned,
                               families, per_sample_normal)


def debug_family(name: str, shard_root: Path):
    cls = families()[name]
    spec = data_spec(read_manifest(shard_root / cls.debug_dataset))
    from gensuite.config import job_from_dict

    job = job_from_dict({"family": name, "flavor": "debug"})
    return cls(job.model, spec), spec


@pytest.mark.parametrize("name", sorted(families()))
def test_every_family_conforms_and_its_abilities_work(shard_root, name):
    family, spec = debug_family(name, shard_root)
    assert isinstance(family, Family)
    torch.manual_seed(0)
    nets = family.build_networks()
    owned = {n for p in family.players() for n in p.networks}
    assert owned <= set(nets) and owned, name
    batch = read_split(shard_root / spec.dataset, "test", 8)
    view = Networks(nets)
    for net in nets.values():
        net.eval()
    with torch.no_grad():
        if isinstance(family, Classifies):
            logits = family.predict(view, batch["x"])
            assert logits.shape == (8, spec.num_classes) and torch.isfinite(logits).all()
            assert family.features(view, batch["x"]).shape[0] == 8
        if isinstance(family, HasLikelihood):
            seeds = torch.arange(8) + 100
            first = family.log_likelihood(view, batch, 4, seeds)
            again = family.log_likelihood(view, batch, 4, seeds)
            assert set(first) == set(family.likelihood_values) and family.likelihood_values
            for value in family.likelihood_values:
                assert first[value].shape == (8,) and torch.isfinite(first[value]).all()
                assert torch.equal(first[value], again[value])  # the seeds fix every draw


@pytest.mark.parametrize("name, classifies, likelihood, text", [
    ("classifier", True, False, False), ("vae", False, True, False), ("gan", False, False, False),
    ("stackgan", False, False, True), ("diffusion", False, True, False),
    ("cnf", False, True, False), ("flow", False, True, False), ("ebm", False, False, False)])
def test_abilities_are_what_each_family_declares(shard_root, name, classifies, likelihood, text):
    from gensuite.evaluation import METRICS, _load_builtin

    family, _ = debug_family(name, shard_root)
    assert isinstance(family, Classifies) is classifies and isinstance(family, HasLikelihood) is likelihood
    assert isinstance(family, TextConditioned) is text
    _load_builtin()
    assert METRICS["classification"].applies(family) is classifies
    assert METRICS["likelihood"].applies(family) is likelihood


def test_per_sample_noise_depends_only_on_the_seed():
    together = per_sample_normal(torch.tensor([7, 8, 9]), 2, 3)
    apart = torch.cat([per_sample_normal(torch.tensor([7]), 2, 3), per_sample_normal(torch.tensor([8, 9]), 2, 3)])
    assert together.shape == (3, 2, 3) and torch.equal(together, apart)
    assert not torch.equal(together[0], together[1])


# -- a family the likelihood metric has never seen -------------------------------------------------------------


@dataclass
class GaussianConfig:
    pass


class Gaussian(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mean = nn.Parameter(torch.tensor([0.5, 0.25][:dim]))
        self.log_std = nn.Parameter(torch.tensor([-0.2, -0.7][:dim]))


class ExactGaussian(GenerativeFamily):
    """log p(x) of a diagonal Gaussian, in closed form: what a normalising flow reports."""

    name = "exact_gaussian_for_tests"
    config_class = GaussianConfig
    likelihood_values = ("log_px",)

    def build_networks(self):
        return {"density": Gaussian(self.data.dim)}

    def log_likelihood(self, nets, batch, k, seeds):
        g = nets.ema("density")
        return {"log_px": torch.distributions.Normal(g.mean, g.log_std.exp()).log_prob(batch["x"]).sum(1)}

    def loss(self, player, nets, batch, step):
        return {"loss": -self.log_likelihood(nets, batch, 1, None)["log_px"].mean()}

    def fixed_inputs(self, n, generator):
        return {}

    def sample(self, nets, fixed):
        raise NotImplementedError


def test_the_likelihood_metric_measures_any_family_that_declares_it(shard_root):
    shard_dir = shard_root / "moons"
    family = ExactGaussian(GaussianConfig(), data_spec(read_manifest(shard_dir)))
    assert isinstance(family, HasLikelihood) and not isinstance(family, Classifies)
    nets = Networks(family.build_networks())
    cfg = EvalConfig(batch_size=37)
    metrics = resolve(cfg, family)
    assert [m.name for m in metrics] == ["likelihood"]
    values = evaluate(metrics, EvalContext(family, nets, shard_dir, cfg, torch.device("cpu")))
    x = read_split(shard_dir, "test", 10_000)["x"].double().numpy()
    expected = scipy.stats.norm(np.array([0.5, 0.25]), np.exp([-0.2, -0.7])).logpdf(x).sum(1).mean()
    # float32 log-densities of O(1..10) summed in float64: agreement to float32 rounding
    assert values["log_px"] == pytest.approx(expected, rel=1e-6)
    assert values["log_px_bpd"] == pytest.approx(-expected / (2 * np.log(2)), rel=1e-6)
    assert set(values) == {"log_px", "log_px_bpd"}
    # eval.best is checked against what this family's likelihood produces
    assert resolve(EvalConfig(best="log_px"), family)
    with pytest.raises(ConfigError, match=r"^eval.best: 'elbo' is not computed by this job's metrics; choose one of "
                                          r"log_px, log_px_bpd"):
        resolve(EvalConfig(best="elbo"), family)


@pytest.mark.parametrize("name", sorted(families()))
def test_every_family_resumes_bit_for_bit(shard_root, tmp_path, name):
    """The debug flavor trained 4 steps straight, and 2 + 2 with a resume in between, ends in the same
    checkpoint: networks, optimisers, family state (shared and per rank), data position and RNG."""
    from test_trainer import _assert_bitwise_equal, make_job

    from gensuite import checkpoint as ckpt
    from gensuite.trainer import train

    dataset = families()[name].debug_dataset
    train(make_job(shard_root, name, dataset=dataset, steps=4, checkpoint_every=100), tmp_path / "straight")
    train(make_job(shard_root, name, dataset=dataset, steps=2, checkpoint_every=100), tmp_path / "split")
    train(make_job(shard_root, name, dataset=dataset, steps=4, checkpoint_every=100), tmp_path / "split")
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / n)) for n in ("straight", "split"))
    assert a["step"] == b["step"] == 4
    for key in ("networks", "ema", "optimizers", "schedulers", "family", "family_ranks", "data", "rng"):
        _assert_bitwise_equal(a[key], b[key], key)


def test_a_family_is_one_folder_importing_no_other_family():
    # What several families share lives outside gensuite/families (gensuite/figures.py, registry.py),
    # so a family folder can be added, moved or removed alone.
    import ast

    root = Path(__file__).resolve().parents[1] / "gensuite" / "families"
    folders = sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists())
    assert len(folders) >= 8
    crossing = []
    for folder in folders:
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                for name in names:
                    parts = name.split(".")
                    if parts[:2] == ["gensuite", "families"] and len(parts) > 2 and parts[2] != folder:
                        crossing.append(f"{path.relative_to(root)}: {name}")
    assert crossing == []
