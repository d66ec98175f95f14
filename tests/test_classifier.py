"""The classifier family and the classification metric, checked against scikit-learn."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite import checkpoint as ckpt
from gensuite.config import job_from_dict
from gensuite.data.pipeline import read_split
from gensuite.evaluation import EvalContext
from gensuite.evaluation.classification import VALUES, compute, describe
from gensuite.sampling import draw, load_run
from gensuite.errors import ConfigError, GensuiteError
from gensuite.trainer import train


def job(shard_root, dataset="digits", eval_cfg=None, **train_kw):
    return job_from_dict({"name": "clf", "family": "classifier", "flavor": "debug",
                          "data": {"dataset": dataset, "root": str(shard_root), "shuffle_buffer": 256},
                          "optim": {"lr": 3e-3},
                          "train": {"steps": 120, "batch_size": 64, "log_every": 20, "sample_every": 120,
                                    "checkpoint_every": 120, **train_kw},
                          "eval": {"every": 60, "best": "accuracy", **(eval_cfg or {})},
                          "log": {"grid_size": 16, "progress_bar": False}})


def test_classifier_learns_digits_and_metrics_match_sklearn(shard_root, tmp_path):
    train(job(shard_root), tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("eval/accuracy")}
    nll = {e.step: e.value for e in acc.Scalars("eval/nll")}
    assert sorted(logged) == [60, 120]
    assert "figures/confusion_test" in acc.Tags()["images"] and "figures/confusion_train" in acc.Tags()["images"]
    assert "model/accuracy" in acc.Tags()["scalars"]  # the training-batch accuracy curve
    assert sorted(e.step for e in acc.Scalars("eval/train_accuracy")) == [60, 120]  # no validation split here
    assert "eval/validation_accuracy" not in acc.Tags()["scalars"]

    run = load_run(tmp_path)
    test = read_split(Path(shard_root) / "digits", "test", 10_000)
    with torch.no_grad():
        logits = run.family.predict(run.networks, test["x"]).double()
    y, predicted = test["y"].numpy(), logits.argmax(1).numpy()
    assert len(y) == 297
    assert logged[120] == pytest.approx(accuracy_score(y, predicted), abs=1e-6)
    assert nll[120] == pytest.approx(log_loss(y, logits.softmax(1).numpy(), labels=list(range(10))), rel=1e-5)
    assert logged[120] > 0.8  # 120 steps of a 32-unit MLP on 16x16 digits
    assert confusion_matrix(y, predicted).trace() == round(logged[120] * 297)
    png = sorted((tmp_path / "samples").glob("confusion_test-*.png"))
    assert [p.name for p in png] == ["confusion_test-00000060.png", "confusion_test-00000120.png"]
    assert Image.open(png[-1]).size[0] > 300
    with pytest.raises(GensuiteError, match="does not generate samples"):
        draw(run, 4)


def test_classifier_on_points_trains_and_separates_the_moons(shard_root, tmp_path):
    train(job(shard_root, "moons", steps=150), tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    final = acc.Scalars("eval/accuracy")[-1]
    assert final.step == 150 and final.value > 0.85 and math.isfinite(acc.Scalars("eval/nll")[-1].value)


@pytest.fixture(scope="module")
def validation_run(validation_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clf_validation")
    train(job(validation_root, steps=60, eval_cfg={"every": 30, "best": "validation_accuracy"}), run_dir)
    return run_dir


def predictions(run, shard_dir, split, limit=10_000):
    data = read_split(shard_dir, split, limit)
    with torch.no_grad():
        logits = run.family.predict(run.networks, data["x"]).double()
    return data["y"].numpy(), logits


def test_train_validation_and_test_values_match_sklearn_and_best_follows_validation(validation_root,
                                                                                      validation_run):
    acc = EventAccumulator(str(validation_run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    logged = {name: {e.step: e.value for e in acc.Scalars(f"eval/{name}")} for name in VALUES}
    assert all(sorted(steps) == [30, 60] for steps in logged.values()), logged
    assert {f"figures/confusion_{s}" for s in ("train", "validation", "test")} <= set(acc.Tags()["images"])
    assert sorted(p.name for p in (validation_run / "samples").glob("confusion_*-00000060.png")) == [
        "confusion_test-00000060.png", "confusion_train-00000060.png", "confusion_validation-00000060.png"]

    run = load_run(validation_run)
    assert run.step == 60
    shard_dir = Path(validation_root) / "digits"
    for split, prefix in (("validation", "validation_"), ("train", "train_"), ("test", "")):
        y, logits = predictions(run, shard_dir, split)
        assert len(y) == {"validation": 150, "train": 1350, "test": 297}[split]
        assert logged[f"{prefix}accuracy"][60] == pytest.approx(accuracy_score(y, logits.argmax(1).numpy()), abs=1e-6)
        assert logged[f"{prefix}nll"][60] == pytest.approx(
            log_loss(y, logits.softmax(1).numpy(), labels=list(range(10))), rel=1e-5)
    assert logged["validation_accuracy"][60] > 0.5
    best = ckpt.load_checkpoint(validation_run / "checkpoints" / "best.pt")
    validation = logged["validation_accuracy"]
    assert best["step"] == max(sorted(validation), key=validation.get)
    assert best["best"]["value"] == pytest.approx(validation[best["step"]], abs=1e-6)


def test_two_ranks_and_max_samples_give_the_single_process_values(validation_root, validation_run):
    import matplotlib.pyplot as plt

    run = load_run(validation_run)
    shard_dir = Path(validation_root) / "digits"
    cfg = dataclasses.replace(run.job.eval, max_samples=100, batch_size=32)

    def context(rank=0, world_size=1, reduce=lambda t: t, **overrides):
        return EvalContext(run.family, run.networks, shard_dir, dataclasses.replace(cfg, **overrides),
                           torch.device("cpu"), rank, world_size, reduce)

    single = compute(context())
    assert "also train, validation" in describe(context())
    parts = {}
    compute(context(1, 2, lambda t: parts.setdefault(1, t.clone())))  # rank 1's share, captured
    two = compute(context(0, 2, lambda t: t + parts[1]))  # rank 0 adds it, as all-reduce would
    assert set(two) == set(single) == set(VALUES) | {f"confusion_{s}" for s in ("train", "validation", "test")}
    for name in VALUES:
        assert two[name] == pytest.approx(single[name], rel=1e-12, abs=1e-12)
    # max_samples caps every split: the first 100 training samples
    y, logits = predictions(run, shard_dir, "train", 100)
    assert single["train_accuracy"] == pytest.approx(accuracy_score(y, logits.argmax(1).numpy()), abs=1e-12)
    # eval.split: validation makes validation the main split; the test split is then test_accuracy
    on_validation = compute(context(split="validation", best=None))
    assert on_validation["accuracy"] == pytest.approx(single["validation_accuracy"], abs=1e-12)
    assert {"test_accuracy", "test_nll", "train_accuracy", "confusion_validation"} <= set(on_validation)
    with pytest.raises(ConfigError, match=r"^eval.best: 'validation_accuracy' needs a 'validation' split other "
                                          r"than eval.split \(validation\)"):
        compute(context(split="validation"))
    plt.close("all")


def test_best_on_a_missing_validation_split_is_a_one_line_error(shard_root, tmp_path):
    with pytest.raises(ConfigError, match=r"^eval.best: 'validation_accuracy' needs a 'validation' split other than "
                                          r"eval.split \(test\); .*manifest.json has test, train; rebuild it with: "
                                          r"python shards/build.py digits --validation FRACTION$"):
        train(job(shard_root, steps=2, eval_cfg={"every": None, "best": "validation_accuracy"}), tmp_path)
