"""Validation curves: every player's training objective on held-out batches (``val/<player>/<term>``),
recomputed independently, reproducible across a resume, computed alike on any number of ranks, leaving
training bitwise unchanged, and drawn by ``gensuite report`` on the training curve's axes.

(That every registered family logs them, finite and paired with its training terms, is checked where
each family's debug flavor already trains: ``test_trainer.test_every_family_debug_flavor_trains_through_the_loop``.)
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite import checkpoint as ckpt
from gensuite.cli import main
from gensuite.config import EvalConfig, job_from_dict
from gensuite.data.pipeline import read_split
from gensuite.data.shards import data_spec, read_manifest
from gensuite.errors import ConfigError
from gensuite.evaluation import EvalContext
from gensuite.evaluation.validation import ValidationPlan, batch_seed, validation_values
from gensuite.registry import Networks, get_family
from gensuite.trainer import train


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(run_dir, prefix: str = "") -> dict[str, dict[int, float]]:
    acc = events(run_dir)
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"] if t.startswith(prefix)}


def raw_job(root, family="vae", steps=4, eval_cfg=None, **train_kw):
    return {"name": f"{family}-validation", "family": family, "flavor": "debug",
            "data": {"dataset": "digits", "root": str(root), "shuffle_buffer": 64},
            "train": {"steps": steps, "batch_size": 16, "log_every": 1, "sample_every": 100,
                      "checkpoint_every": 2, "keep_checkpoints": 10, "seed": 5, **train_kw},
            "eval": {"every": 2, "batch_size": 64, "validation_batches": 3, "metrics": [], **(eval_cfg or {})},
            "log": {"grid_size": 4, "progress_bar": False, "save_png": False}}


@pytest.fixture(scope="module")
def vae_run(validation_root, tmp_path_factory) -> Path:
    """4 VAE steps, validated at steps 2 and 4 on the validation split: 150 samples in batches of 64, so
    2 full batches (the 22 left over are not used; validation_batches: 3 asks for at most 3)."""
    run = tmp_path_factory.mktemp("vae_validation") / "run"
    train(job_from_dict(raw_job(validation_root)), run)
    return run


def recompute(run: Path, shard_dir: Path, step: int, seed_offset: int = 0) -> dict[str, float]:
    """The objective at ``step`` by hand: the checkpoint's raw networks in eval mode, the split's first
    128 samples in stored order as two batches of 64, each batch's noise from its own seed."""
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(run, step))
    job = job_from_dict(state["config"])
    family = get_family(job.family)(job.model, data_spec(read_manifest(shard_dir)))
    nets = family.build_networks()
    for name, net in nets.items():
        net.load_state_dict(state["networks"][name])
        net.eval()
    data = read_split(shard_dir, "validation", 128)
    totals: dict[str, float] = {}
    for j in range(2):
        batch = {k: v[64 * j:64 * (j + 1)] for k, v in data.items()}
        torch.manual_seed(batch_seed(job.eval.seed, step, j) + seed_offset)
        with torch.no_grad():
            terms = family.loss("model", Networks(nets), batch, step)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v) / 2
    return totals


def test_logged_validation_loss_is_the_objective_recomputed_on_the_same_batches(vae_run, validation_root):
    logged = scalars(vae_run, "val/")
    assert set(logged) == {f"val/model/{t}" for t in ("loss", "recon", "kl", "elbo", "bpd")}
    assert all(sorted(v) == [2, 4] for v in logged.values())  # eval.every: 2, and the last step
    training = scalars(vae_run, "model/")
    assert {t.removeprefix("val/") for t in logged} <= set(training)  # each paired with its training curve
    shard_dir = validation_root / "digits"
    for step in (2, 4):
        expected = recompute(vae_run, shard_dir, step)
        for term in ("loss", "recon", "kl", "elbo", "bpd"):
            # Same networks, batches, seeds and float32 operations: only a float32 reassociation (a BLAS
            # kernel summing in another order) and TensorBoard's float32 storage (2^-24 relative) may
            # differ, far below 1e-5 relative; other noise or other samples move these values by > 1e-3.
            assert logged[f"val/model/{term}"][step] == pytest.approx(expected[term], rel=1e-5, abs=1e-6), (step, term)
    other_noise = recompute(vae_run, shard_dir, 4, seed_offset=1)
    assert logged["val/model/loss"][4] != pytest.approx(other_noise["loss"], rel=1e-5)  # the comparison can fail
    protocol = events(vae_run).Tensors("val/protocol/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "first 128 samples of the validation split in 2 batch(es) of 64" in protocol


def test_validation_is_the_same_after_a_resume(vae_run, validation_root, tmp_path):
    run = tmp_path / "run"
    train(job_from_dict(raw_job(validation_root, steps=2)), run)
    train(job_from_dict(raw_job(validation_root, steps=4)), run)  # resumes at step 2
    assert scalars(run, "val/") == scalars(vae_run, "val/")  # float for float


def test_two_and_three_ranks_compute_the_single_process_values(vae_run, validation_root):
    """Each rank's share summed as the all-reduce would (a rank without a batch learns the term names
    from the others): the same batches and noise, so equal up to float64 addition order."""
    shard_dir = validation_root / "digits"
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(vae_run, 4))
    job = job_from_dict(state["config"])
    family = get_family("vae")(job.model, data_spec(read_manifest(shard_dir)))
    nets = family.build_networks()
    for name, net in nets.items():
        net.load_state_dict(state["networks"][name])
        net.eval()
    plan = ValidationPlan.of(job.eval, family.data.samples)
    assert plan == ValidationPlan("validation", 64, 2)

    def values(rank=0, world=1, reduce=lambda t: t, gather=lambda names: [names]):
        ctx = EvalContext(family, Networks(nets), shard_dir, job.eval, torch.device("cpu"), rank, world, reduce)
        return validation_values(ctx, plan, 4, gather_object=gather)

    single = values()
    assert single["model/loss"] == pytest.approx(scalars(vae_run)["val/model/loss"][4], rel=1e-6)
    for world in (2, 3):  # 2 batches: with 3 ranks, rank 2 has none
        everyone = [sorted(single), sorted(single), []][:world]  # the term names each rank computed
        parts, given = {}, {}

        def gather(names, rank):
            given[rank] = names
            return everyone

        for rank in range(1, world):
            values(rank, world, lambda t, r=rank: parts.setdefault(r, t.clone()), lambda n, r=rank: gather(n, r))
        together = values(0, world, lambda t: t + sum(parts.values()), lambda n: gather(n, 0))
        assert given == dict(enumerate(everyone))
        assert together.keys() == single.keys()
        for k in single:
            assert together[k] == pytest.approx(single[k], rel=1e-12), (world, k)


@pytest.mark.parametrize("family, train_kw", [
    ("gan", dict(ema={"networks": ["G"], "decay": 0.9})),  # BatchNorm in both networks, two players, EMA
    ("ebm", dict()),  # SGLD chains from the per-rank replay buffer, with gradients
])
def test_validating_every_step_leaves_training_bitwise_unchanged(shard_root, tmp_path, capsys, family, train_kw):
    from test_trainer import _assert_bitwise_equal

    checksums = {}
    for name, batches in (("validated", 2), ("plain", 0)):
        raw = raw_job(shard_root, family, steps=5, eval_cfg={"every": 1, "batch_size": 32,
                                                             "validation_batches": batches}, **train_kw)
        train(job_from_dict(raw), tmp_path / name)
        checksums[name] = re.findall(r"parameter checksum (\w+)", capsys.readouterr().err)[-1]
    logged = scalars(tmp_path / "validated", "val/")
    assert logged and all(sorted(v) == [1, 2, 3, 4, 5] for v in logged.values())
    assert all(math.isfinite(x) for v in logged.values() for x in v.values())
    assert not scalars(tmp_path / "plain", "val/")
    assert checksums["validated"] == checksums["plain"]
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / n)) for n in ("validated", "plain"))
    for key in ("networks", "ema", "optimizers", "family", "family_ranks", "data", "rng"):
        _assert_bitwise_equal(a[key], b[key], key)  # BatchNorm statistics and the replay buffer included


def test_report_draws_training_and_validation_on_one_axes(vae_run, capsys):
    assert main(["report", str(vae_run)]) == 0
    index = Path(capsys.readouterr().out.strip().splitlines()[-1])
    text = index.read_text()
    assert "[model (train and validation)](curves/loss-model.png)" in text
    assert (index.parent / "curves" / "loss-model.png").is_file()
    plotted = json.loads((index.parent / "curves" / "loss-model.json").read_text())
    assert plotted["title"].startswith("model: training and validation terms")
    logged = scalars(vae_run)
    for term in ("loss", "kl", "recon"):
        panel = plotted["panels"][f"model/{term}"]
        assert set(panel) == {"train", "validation"}
        assert panel["train"] == [[s, v] for s, v in sorted(logged[f"model/{term}"].items())]
        assert panel["validation"] == [[s, v] for s, v in sorted(logged[f"val/model/{term}"].items())]
        assert [s for s, _ in panel["validation"]] == [2, 4] and [s for s, _ in panel["train"]] == [1, 2, 3, 4]
    assert set(plotted["panels"]["model/grad_norm"]) == {"train"}  # no validation counterpart
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["final"]["val/model/loss"] == {"step": 4, "value": logged["val/model/loss"][4]}


def test_validation_plan_and_its_setting():
    plan = ValidationPlan.of
    cfg = EvalConfig(batch_size=64, validation_batches=3)
    assert plan(cfg, {"train": 1000, "validation": 150, "test": 300}) == ValidationPlan("validation", 64, 2)
    assert plan(cfg, {"train": 1000, "test": 300}) == ValidationPlan("test", 64, 3)  # eval.split: test
    assert plan(EvalConfig(batch_size=64, max_samples=100), {"test": 300}) == ValidationPlan("test", 64, 1)
    assert plan(cfg, {"train": 1000, "test": 24}) == ValidationPlan("test", 24, 1)  # smaller than one batch
    assert plan(cfg, {"train": 1000}) is None  # nothing held out
    assert plan(EvalConfig(validation_batches=0), {"test": 300}) is None  # turned off
    assert EvalConfig().validation_batches == 4
    with pytest.raises(ConfigError, match=r"^eval.validation_batches: -1 is negative; use the number of held-out "
                                          r"batches for the validation curves \(e.g. 4\), or 0 to turn them off$"):
        job_from_dict({"family": "vae", "flavor": "debug", "eval": {"validation_batches": -1}})
    with pytest.raises(ConfigError, match=r"^eval.validation_batches: expected an integer, got str 'all'$"):
        job_from_dict({"family": "vae", "flavor": "debug", "eval": {"validation_batches": "all"}})


def test_the_default_hook_puts_back_the_state_a_loss_changes(shard_root):
    """A loss with side effects on the family's checkpointed state (here a count and a record of its
    draws, shared and per rank) leaves none after validation_terms; the terms are detached."""
    from dataclasses import dataclass

    from torch import nn

    from gensuite.registry import GenerativeFamily

    @dataclass
    class Config:
        pass

    class Counting(GenerativeFamily):
        name = "counting_for_tests"
        config_class = Config

        def __init__(self, cfg, data):
            super().__init__(cfg, data)
            self.calls, self.draws = 0, torch.zeros(0)

        def build_networks(self):
            return {"net": nn.Linear(2, 1)}

        def loss(self, player, nets, batch, step):
            self.calls += 1
            self.draws = torch.cat([self.draws, torch.rand(1)])
            return {"loss": nets["net"](batch["x"]).pow(2).mean()}

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["calls"]

        def rank_state_dict(self):
            return {"draws": self.draws.clone()}

        def load_rank_state_dict(self, state):
            self.draws = state["draws"].clone()

    family = Counting(Config(), data_spec(read_manifest(shard_root / "moons")))
    nets = Networks(family.build_networks())
    batch = read_split(shard_root / "moons", "test", 8)
    family.loss("model", nets, batch, 1)  # training: one call, one draw
    terms = family.validation_terms(nets, batch, 1)
    assert set(terms) == {"model"} and not terms["model"]["loss"].requires_grad
    assert family.calls == 1 and family.draws.shape == (1,)
