"""Classifier FID and conditional accuracy: against scipy and scikit-learn, and on two ranks."""

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite.config import job_from_dict
from gensuite.data.pipeline import read_split
from gensuite.errors import ConfigError
from gensuite.evaluation import EvalContext, evaluate, resolve
from gensuite.evaluation.judged import generated, judge
from gensuite.sampling import load_run
from gensuite.trainer import train
from launchers import digits_job, torchrun_job


@pytest.fixture(scope="module")
def runs(shard_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("judged")
    train(job_from_dict(digits_job(shard_root, "clf", "classifier", 100)), work / "clf")
    eval_cfg = {"classifier": str(work / "clf"), "n_samples": 130, "batch_size": 50,
                "metrics": ["clf_fid", "cond_acc"]}
    cvae = digits_job(shard_root, "cvae", "vae", 30, {"conditional": True}, eval_cfg)
    train(job_from_dict(cvae), work / "cvae")
    return work, cvae


def offline_context(run_dir):
    run = load_run(run_dir)
    return EvalContext(run.family, run.networks, Path(run.job.data.root) / run.job.data.dataset, run.job.eval,
                       torch.device("cpu")), run


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_judged_metrics_match_independent_computations(runs):
    work, _ = runs
    acc = EventAccumulator(str(work / "cvae" / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    logged_fid = acc.Scalars("eval/clf_fid")[-1]
    logged_acc = acc.Scalars("eval/cond_acc")[-1]
    assert logged_fid.step == logged_acc.step == 30
    assert "figures/confusion_generated" in acc.Tags()["images"]

    ctx, run = offline_context(work / "cvae")
    values = evaluate(resolve(ctx.cfg, ctx.family), ctx)
    assert values["clf_fid"] == pytest.approx(logged_fid.value, rel=1e-6)

    clf = judge(ctx)
    real = read_split(ctx.shard_dir, "test", 10_000)["x"]
    samples, labels = zip(*generated(ctx))
    fake, labels = torch.cat(samples), torch.cat(labels)
    assert len(fake) == 130 and torch.bincount(labels[:50], minlength=10).tolist() == [5] * 10  # balanced classes
    with torch.no_grad():
        f_real = clf.family.features(clf.networks, real).double().numpy()
        f_fake = clf.family.features(clf.networks, fake).double().numpy()
        predicted = clf.family.predict(clf.networks, fake).argmax(1)
    assert values["clf_fid"] == pytest.approx(frechet(f_real, f_fake), rel=1e-4)
    assert values["clf_fid"] > 1.0  # 30 steps of a tiny CVAE are far from the data
    assert values["cond_acc"] == pytest.approx((predicted == labels).double().mean().item(), abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero(runs):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from gensuite.evaluation.judged import _PenultimateFeatures

    ctx, _ = offline_context(runs[0] / "cvae")
    real = read_split(ctx.shard_dir, "test", 10_000)["x"]
    fid = FrechetInceptionDistance(feature=_PenultimateFeatures(judge(ctx), real[:2]), normalize=True,
                                   input_img_size=tuple(real.shape[1:]))
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(float(fid.compute())) < 1e-6


@pytest.mark.slow
def test_two_ranks_give_the_single_process_values(runs, tmp_path):
    work, cvae = runs
    cvae = {**cvae, "train": {**cvae["train"], "steps": 4, "log_every": 4, "sample_every": 4, "checkpoint_every": 4}}
    result = torchrun_job(cvae, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    ctx, _ = offline_context(tmp_path / "run")
    single = evaluate(resolve(ctx.cfg, ctx.family), ctx)
    for name in ("clf_fid", "cond_acc"):
        logged = acc.Scalars(f"eval/{name}")[-1].value
        assert abs(logged - single[name]) <= 1e-6 * max(abs(single[name]), 1e-3), name


def test_judged_metrics_explain_what_they_need(runs, shard_root):
    work, _ = runs
    job = job_from_dict(digits_job(shard_root, "g", "gan", 2, eval_cfg={"metrics": ["clf_fid"]}))
    from gensuite.data.shards import data_spec, read_manifest
    from gensuite.registry import get_family

    family = get_family("gan")(job.model, data_spec(read_manifest(shard_root / "digits")))
    with pytest.raises(ConfigError, match=r"^eval.metrics\[0\]: clf_fid needs eval.classifier: the run directory"):
        resolve(job.eval, family)
    with pytest.raises(ConfigError, match=r"^eval.metrics\[0\]: cond_acc does not apply to the gan family"):
        resolve(job_from_dict(digits_job(shard_root, "g", "gan", 2, eval_cfg={
            "metrics": ["cond_acc"], "classifier": str(work / "clf")})).eval, family)
    bad = job_from_dict(digits_job(shard_root, "g", "gan", 2, eval_cfg={"metrics": ["clf_fid"],
                                                                    "classifier": str(work / "cvae")}))
    ctx = EvalContext(family, None, shard_root / "digits", bad.eval, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^eval.classifier: .* is a vae run; name a classifier job's run"):
        judge(ctx)


def test_a_missing_classifier_run_is_refused_before_the_first_step(shard_root, tmp_path):
    """Not at the last step's evaluation, which comes before the final checkpoint: nothing is trained."""
    missing = tmp_path / "no-such-classifier"
    job = job_from_dict(digits_job(shard_root, "g", "gan", 2, eval_cfg={"metrics": ["clf_fid"],
                                                                    "classifier": str(missing)}))
    with pytest.raises(ConfigError, match=rf"^eval.classifier: {missing}: no such run directory or checkpoint "
                                          r"file; train the classifier first"):
        train(job, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    # ... while a job that lists no classifier metric does not look for it
    train(job_from_dict(digits_job(shard_root, "g", "gan", 2, eval_cfg={"metrics": [], "classifier": str(missing)})),
          tmp_path / "run2")
    assert any((tmp_path / "run2" / "checkpoints").iterdir())
