"""Improved precision and recall (k = 3) in the judge's features: closed forms, a brute-force reference, and
the metric through training and offline evaluation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite.config import job_from_dict
from gensuite.data.pipeline import iterate_split, read_split
from gensuite.errors import ConfigError
from gensuite.evaluation import EvalContext, evaluate, protocol, resolve
from gensuite.evaluation import judged
from gensuite.evaluation.judged import generated, judge, precision_recall
from gensuite.sampling import load_run
from gensuite.trainer import train
from launchers import digits_job, torchrun_job


def knn_precision_recall(fake: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The paper's definition written out: a sample is inside a set's manifold when it lies within the
    distance from some member of the set to that member's k-th nearest other member."""
    def radii(points):
        return np.sort(np.linalg.norm(points[:, None] - points[None], axis=-1), axis=1)[:, k]

    def inside(queries, points):
        return (np.linalg.norm(queries[:, None] - points[None], axis=-1) <= radii(points)).any(axis=1)

    return float(inside(fake, real).mean()), float(inside(real, fake).mean())


def test_identical_sets_have_precision_and_recall_one():
    points = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(points, points.clone()) == (1.0, 1.0)


def test_far_apart_sets_have_precision_and_recall_zero():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(40, 2, generator=g), torch.randn(60, 2, generator=g) + 100.0
    assert precision_recall(fake, real) == (0.0, 0.0)


def test_hand_computed_one_dimensional_example():
    """Radius = distance to the 3rd nearest other member of the same set.
    real {0, 1, 2, 3}: radii 3, 2, 2, 3, balls [-3, 3], [-1, 3], [0, 4], [0, 6].
    generated {3.5, 4, 5, 6} and {100, 101, 102, 103}: radii 2.5, 2, 1.5, 2.5 (balls [1, 6], [2, 6], [3.5, 6.5],
    [3.5, 8.5]) and 3, 2, 2, 3 around 100..103.
    precision: 3.5, 4 (on the edge of 2's ball), 5 and 6 (on the edge of 3's ball) are inside the real balls,
    100..103 are not: 4 / 8. recall: 1 (on the edge of 3.5's ball), 2 and 3 are inside the generated balls,
    0 is not (3.5 away from 3.5, whose radius is 2.5): 3 / 4. The edges count (closed balls, as in the paper)."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[3.5], [4.0], [5.0], [6.0], [100.0], [101.0], [102.0], [103.0]])
    assert precision_recall(fake, real) == (0.5, 0.75)
    assert knn_precision_recall(fake.numpy(), real.numpy()) == (0.5, 0.75)
    assert precision_recall(real, fake) == (0.75, 0.5)  # the generated set goes first


def test_dropping_half_of_the_modes_halves_recall_only():
    """Real: a 3x3 grid of spacing 1 around each of 4 corners 100 apart; a grid point's radius is 1 (edge
    midpoints, centre) or sqrt(2) (corners). Generated: the 4 cell centres of the grids at 2 of the corners;
    their radius is sqrt(2) (3rd nearest of a unit square's corners). Each cell centre is sqrt(0.5) from a real
    grid point and each real grid point of a kept mode sqrt(0.5) from a cell centre, so precision is 8 / 8
    and recall 18 / 36 exactly; the margins (>= 0.29) leave rounding nowhere near an edge."""
    grid = torch.cartesian_prod(torch.arange(3.0), torch.arange(3.0))
    cells = torch.cartesian_prod(torch.arange(2.0), torch.arange(2.0)) + 0.5
    corners = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    real = torch.cat([grid + c for c in corners])
    fake = torch.cat([cells + c for c in corners[:2]])
    assert precision_recall(fake, real) == (1.0, 0.5)
    assert knn_precision_recall(fake.numpy(), real.numpy()) == (1.0, 0.5)


def test_matches_the_brute_force_definition_on_random_sets():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(120, 5, generator=g), 0.8 * torch.randn(90, 5, generator=g) + 0.5
    precision, recall = precision_recall(fake, real)
    expected = knn_precision_recall(fake.double().numpy(), real.double().numpy())
    assert (round(precision * 90), round(recall * 120)) == (round(expected[0] * 90), round(expected[1] * 120))
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0  # the case is not a trivial one


@pytest.fixture(scope="module")
def runs(shard_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("prc")
    train(job_from_dict(digits_job(shard_root, "clf", "classifier", 100)), work / "clf")
    gan = digits_job(shard_root, "gan", "gan", 4, eval_cfg={"classifier": str(work / "clf"), "n_samples": 130,
                                                         "batch_size": 50, "metrics": ["clf_prc"]})
    train(job_from_dict(gan), work / "gan")
    return work, gan


def offline_context(run_dir):
    run = load_run(run_dir)
    return EvalContext(run.family, run.networks, Path(run.job.data.root) / run.job.data.dataset, run.job.eval,
                       torch.device("cpu"))


def logged(run_dir, name):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(f"eval/{name}")[-1]


def test_metric_through_training_matches_the_definition(runs):
    work, _ = runs
    ctx = offline_context(work / "gan")
    values = evaluate(resolve(ctx.cfg, ctx.family), ctx)
    assert set(values) == {"clf_precision", "clf_recall"}
    for name in values:
        assert logged(work / "gan", name).step == 4
        assert logged(work / "gan", name).value == pytest.approx(values[name], abs=1e-6)
        assert 0.0 <= values[name] <= 1.0

    clf = judge(ctx)
    real = read_split(ctx.shard_dir, "test", 10_000)["x"]
    fake = torch.cat([samples for samples, _ in generated(ctx)])
    with torch.no_grad():
        f_real = clf.family.features(clf.networks, real).double().numpy()
        f_fake = clf.family.features(clf.networks, fake.float()).double().numpy()
    precision, recall = knn_precision_recall(f_fake, f_real)
    # float32 fractions (torch-fidelity averages in the features' dtype) of 130 and 297 samples
    assert (values["clf_precision"], values["clf_recall"]) == pytest.approx((precision, recall), abs=1e-7)
    assert "k = 3" in protocol(resolve(ctx.cfg, ctx.family), ctx)
    assert "130 generated samples (seed 1234) against 297 samples of the test split" in protocol(
        resolve(ctx.cfg, ctx.family), ctx)


def test_the_real_split_as_generated_scores_one(runs, monkeypatch):
    ctx = offline_context(runs[0] / "gan")

    def real_split_as_generated(ctx, with_start=False):
        for indices, batch in iterate_split(ctx.shard_dir, ctx.cfg.split, ctx.cfg.batch_size, ctx.rank,
                                            ctx.world_size, ctx.cfg.max_samples):
            yield int(indices[0]), batch["x"], None

    monkeypatch.setattr(judged, "generated", real_split_as_generated)
    assert evaluate(resolve(ctx.cfg, ctx.family), ctx) == {"clf_precision": 1.0, "clf_recall": 1.0}


def test_opt_in_and_refuses_too_few_samples(runs, shard_root):
    work, gan = runs
    job = job_from_dict({**gan, "eval": {"classifier": str(work / "clf")}})
    assert "clf_prc" not in [m.name for m in resolve(job.eval, offline_context(work / "gan").family)]
    tiny = job_from_dict({**gan, "eval": {**gan["eval"], "n_samples": 3}})
    with pytest.raises(ConfigError, match=r"^eval.n_samples: 3 is too few for clf_prc: its k-NN radii \(k = 3\) "
                                          r"need at least 4 samples$"):
        train(tiny, work / "tiny")
    assert not (work / "tiny" / "checkpoints").exists() or not any((work / "tiny" / "checkpoints").iterdir())


@pytest.mark.slow
def test_two_ranks_give_the_single_process_values(runs, tmp_path):
    _, gan = runs
    result = torchrun_job(gan, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ctx = offline_context(tmp_path / "run")
    single = evaluate(resolve(ctx.cfg, ctx.family), ctx)
    for name, value in single.items():
        assert logged(tmp_path / "run", name).value == pytest.approx(value, abs=1e-6), name
