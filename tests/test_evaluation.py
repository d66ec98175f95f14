"""The evaluation layer: likelihood metrics logged during training, best checkpoint, any rank count."""

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite import checkpoint as ckpt
from gensuite.config import job_from_dict
from gensuite.errors import ConfigError
from gensuite.evaluation import EvalContext, evaluate, resolve
from gensuite.sampling import load_run
from gensuite.trainer import train



def vae_job(shard_root, **eval_cfg):
    return {"name": "vae-eval", "family": "vae", "flavor": "debug",
            "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
            "train": {"steps": 6, "batch_size": 16, "log_every": 3, "checkpoint_every": 6, "sample_every": 6},
            "eval": {"every": 2, "importance_samples": 8, "best": "iwae", **eval_cfg},
            "log": {"grid_size": 16, "progress_bar": False}}


def scalars(run_dir, tag):
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {e.step: e.value for e in acc.Scalars(tag)}


def offline_eval(run_dir_or_file, cfg_overrides=None):
    run = load_run(run_dir_or_file)
    cfg = run.job.eval
    for k, v in (cfg_overrides or {}).items():
        setattr(cfg, k, v)
    ctx = EvalContext(run.family, run.networks, Path(run.job.data.root) / run.job.data.dataset, cfg,
                      torch.device("cpu"))
    return evaluate(resolve(cfg, run.family), ctx)


def test_likelihood_metrics_are_logged_and_best_is_kept(shard_root, tmp_path):
    train(job_from_dict(vae_job(shard_root)), tmp_path)
    acc, iwae = scalars(tmp_path, "eval/iwae")
    _, elbo = scalars(tmp_path, "eval/elbo")
    _, bpd = scalars(tmp_path, "eval/iwae_bpd")
    assert sorted(iwae) == [2, 4, 6] and sorted(elbo) == [2, 4, 6]
    dim = 16 * 16
    for step in iwae:
        assert iwae[step] >= elbo[step]  # on the same draws, per sample
        assert bpd[step] == pytest.approx(-iwae[step] / (dim * math.log(2)), rel=1e-6)
        assert -400 < elbo[step] < 0  # nats per 256-pixel sample: a real bound, not a placeholder
    assert "eval/protocol/text_summary" in acc.Tags()["tensors"]
    best_step = max(iwae, key=iwae.get)
    best = ckpt.load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == best_step and best["best"]["value"] == pytest.approx(iwae[best_step], rel=1e-6)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000006.pt"]  # best is not resumed from
    # Re-evaluating the final checkpoint offline gives the logged value.
    assert offline_eval(tmp_path)["iwae"] == pytest.approx(iwae[6], rel=1e-6)  # TensorBoard stores float32


def test_more_importance_samples_tighten_the_bound(shard_root, tmp_path):
    train(job_from_dict(vae_job(shard_root, every=None)), tmp_path)
    k1, k64 = offline_eval(tmp_path, {"importance_samples": 1}), offline_eval(tmp_path, {"importance_samples": 64})
    assert k1["iwae"] == pytest.approx(k1["elbo"], rel=1e-9)  # one draw: the bound is the ELBO
    assert k64["iwae"] > k1["iwae"] + 0.1 and k64["elbo"] == pytest.approx(k1["elbo"], abs=2.0)


@pytest.mark.slow
def test_two_ranks_evaluate_exactly_like_one(shard_root, tmp_path):
    from launchers import torchrun_job

    job = vae_job(shard_root, every=None, best=None, importance_samples=16)
    job["train"]["steps"] = 4
    result = torchrun_job(job, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _, logged = scalars(tmp_path / "run", "eval/iwae")
    single = offline_eval(tmp_path / "run")  # one process, all 297 test samples
    assert abs(logged[4] - single["iwae"]) <= 1e-6 * abs(single["iwae"])
    _, elbo = scalars(tmp_path / "run", "eval/elbo")
    assert abs(elbo[4] - single["elbo"]) <= 1e-6 * abs(single["elbo"])


def test_metric_errors_name_the_field(shard_root):
    base = vae_job(shard_root)
    with pytest.raises(ConfigError, match=r"^eval.metrics\[0\]: unknown metric 'fidd'; available: "
                                          r"active_units, caption_match, classification, clf_fid, clf_prc, cond_acc, density_grid, "
                                          r"inception, likelihood, mmd, modes, sampling_speed, sharpness$"):
        resolve(job_from_dict({**base, "eval": {"metrics": ["fidd"]}}).eval, _family(base))
    gan = {**base, "family": "gan", "eval": {"metrics": ["likelihood"]}}
    with pytest.raises(ConfigError, match=r"^eval.metrics\[0\]: likelihood does not apply to the gan family"):
        resolve(job_from_dict(gan).eval, _family(gan))
    with pytest.raises(ConfigError, match=r"^eval.best: 'fid' is not computed"):
        resolve(job_from_dict({**base, "eval": {"best": "fid"}}).eval, _family(base))


def _family(raw):
    from gensuite.data.shards import data_spec, read_manifest
    from gensuite.registry import get_family

    job = job_from_dict(raw)
    return get_family(job.family)(job.model, data_spec(read_manifest(Path(job.data.root) / job.data.dataset)))


def _counting_sample_draws(shard_root, tmp_path):
    """A trained debug VAE evaluated by sharpness and sampling_speed (40 samples in chunks of 16), with the
    sizes of its family.sample calls recorded."""
    raw = vae_job(shard_root, metrics=["sharpness", "sampling_speed"], n_samples=40, batch_size=16)
    raw["eval"].pop("best")
    train(job_from_dict(raw), tmp_path)
    run = load_run(tmp_path)
    calls = []
    sample = run.family.sample
    run.family.sample = lambda nets, fixed: calls.append(len(next(iter(fixed.values())))) or sample(nets, fixed)
    return run, calls


def test_metrics_share_one_draw_and_its_timing(shard_root, tmp_path):
    """Metrics that read generated samples (here sharpness and sampling_speed) share one draw per
    evaluation: family.sample runs once per chunk, and the speed is that draw's own rate."""
    run, calls = _counting_sample_draws(shard_root, tmp_path)
    cfg = run.job.eval
    ctx = EvalContext(run.family, run.networks, Path(run.job.data.root) / run.job.data.dataset, cfg, torch.device("cpu"))
    values = evaluate(resolve(cfg, run.family), ctx)
    assert calls == [16, 16, 8]  # 40 samples in chunks of eval.batch_size, each drawn once for both metrics
    timed = [(len(x), s) for _, x, _, s in ctx.drawn]
    assert [n for n, _ in timed] == [16, 16, 8] and all(s > 0 for _, s in timed)
    # the first chunk is the warm-up; the rate is that of the other two
    assert values["sampling_samples_per_sec"] == pytest.approx(24 / (timed[1][1] + timed[2][1]), rel=1e-12)
    assert values["sharpness"] > 0


def test_samples_too_large_to_share_are_drawn_again(shard_root, tmp_path, monkeypatch):
    import gensuite.evaluation as evaluation

    run, calls = _counting_sample_draws(shard_root, tmp_path)
    monkeypatch.setattr(evaluation, "SHARED_SAMPLES_BYTES", 16 * 16 * 16 * 4 * 2 - 1)  # under two chunks
    cfg = run.job.eval
    ctx = EvalContext(run.family, run.networks, Path(run.job.data.root) / run.job.data.dataset, cfg, torch.device("cpu"))
    shared = evaluate(resolve(cfg, run.family), ctx)
    assert calls == [16, 16, 8] * 2 and ctx.drawn is None
    assert shared["sharpness"] == offline_eval(tmp_path, {"metrics": ["sharpness"]})["sharpness"]
