"""The classifier family and the classification metric, checked against scikit-learn."""

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite.config import job_from_dict
from gensuite.data.pipeline import read_split
from gensuite.sampling import draw, load_run
from gensuite.errors import GensuiteError
from gensuite.trainer import train


def job(shard_root, dataset="digits", **train_kw):
    return job_from_dict({"name": "clf", "family": "classifier", "flavor": "debug",
                          "data": {"dataset": dataset, "root": str(shard_root), "shuffle_buffer": 256},
                          "optim": {"lr": 3e-3},
                          "train": {"steps": 120, "batch_size": 64, "log_every": 20, "sample_every": 120,
                                    "checkpoint_every": 120, **train_kw},
                          "eval": {"every": 60, "best": "accuracy"},
                          "log": {"grid_size": 16, "progress_bar": False}})


def test_classifier_learns_digits_and_metrics_match_sklearn(shard_root, tmp_path):
    train(job(shard_root), tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("eval/accuracy")}
    nll = {e.step: e.value for e in acc.Scalars("eval/nll")}
    assert sorted(logged) == [60, 120]
    assert "figures/confusion_test" in acc.Tags()["images"]
    assert "model/accuracy" in acc.Tags()["scalars"]  # the training-batch accuracy curve

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
