"""Inception metrics through torch-fidelity with a randomly initialised weights file written here:
against scipy, the real-feature cache, missing or broken weights, and two ranks."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite.config import job_from_dict
from gensuite.data.pipeline import read_split
from gensuite.errors import ConfigError, GensuiteError
from gensuite.evaluation import EvalContext, evaluate, resolve, skipped
from gensuite.evaluation import inception
from gensuite.evaluation.judged import generated
from gensuite.sampling import load_run
from gensuite.trainer import train
from launchers import ROOT, torchrun_job

N = 48  # real and generated images: Inception at 299x299 costs ~0.1 s per image on a CPU core


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return inception.write_random_weights(tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE, seed=0)


@pytest.fixture(scope="module")
def shards(shard_root, tmp_path_factory) -> Path:
    """A private copy of the digits shards, so the feature cache starts empty."""
    root = tmp_path_factory.mktemp("inception-shards")
    shutil.copytree(shard_root / "digits", root / "digits")
    return root


def gan_job(shard_root, weights, steps=2, **eval_cfg):
    return {"name": "gan", "family": "gan", "flavor": "debug", "model": {},
            "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
            "train": {"steps": steps, "batch_size": 16, "log_every": steps, "sample_every": steps,
                      "checkpoint_every": steps},
            "eval": {"metrics": ["inception"], "n_samples": N, "max_samples": N, "batch_size": 32,
                     "inception_weights": str(weights), **eval_cfg},
            "log": {"grid_size": 16, "progress_bar": False}}


@pytest.fixture(scope="module")
def gan_run(shards, weights, tmp_path_factory):
    raw = gan_job(shards, weights)
    run_dir = tmp_path_factory.mktemp("inception-run") / "run"
    train(job_from_dict(raw), run_dir)
    return raw, run_dir


def context(run_dir) -> EvalContext:
    run = load_run(run_dir)
    return EvalContext(run.family, run.networks, Path(run.job.data.root) / run.job.data.dataset, run.job.eval,
                       torch.device("cpu"))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_logged_values_match_an_independent_frechet_distance(gan_run, weights):
    _, run_dir = gan_run
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    logged = {name: acc.Scalars(f"eval/{name}")[-1].value for name in ("fid", "is", "kid", "precision", "recall")}
    protocol = acc.Tensors("eval/protocol/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"{N} generated samples" in protocol and "299x299" in protocol and "the test (first 48) split" in protocol

    ctx = context(run_dir)
    net = inception.extractor(weights, ctx.device)
    real = read_split(ctx.shard_dir, "test", N)["x"]
    fake = torch.cat([s for s, _ in generated(ctx)])
    assert fake.shape == (N, 1, 16, 16)
    with torch.no_grad():
        f_real = net(inception.to_uint8_rgb(real))[0].double().numpy()
        f_fake, logits = (t.double() for t in net(inception.to_uint8_rgb(fake)))
    reference = frechet(f_fake.numpy(), f_real)
    assert reference > 1.0
    assert logged["fid"] == pytest.approx(reference, rel=1e-4)
    # IS by its definition, exp E_x KL(p(y|x) || p(y)), averaged over 10 splits of torch-fidelity's seeded shuffle
    order = np.random.RandomState(inception.RNG_SEED).permutation(N)
    p = logits[order].softmax(1)
    split_scores = [torch.exp((part * (part.log() - part.mean(0, keepdim=True).log())).sum(1).mean()).item()
                    for part in (p[i * N // 10:(i + 1) * N // 10] for i in range(10))]
    assert logged["is"] == pytest.approx(float(np.mean(split_scores)), rel=1e-5)
    assert 0.0 <= logged["precision"] <= 1.0 and 0.0 <= logged["recall"] <= 1.0
    assert logged["kid"] > 0
    # the logged float32 values are the evaluation's float64 ones
    values = evaluate(resolve(ctx.cfg, ctx.family), ctx)
    for name, value in logged.items():
        assert value == pytest.approx(values[name], rel=1e-6), name


def test_frechet_distance_of_a_set_with_itself_is_zero(gan_run, weights):
    ctx = context(gan_run[1])
    real = inception.real_features(ctx, weights)
    logits = torch.randn(len(real), 1008, generator=torch.Generator().manual_seed(0))
    same = inception.scores({"2048": real, "logits_unbiased": logits}, real)
    scale = float(torch.cov(real.double().T).trace())
    # 48 samples in 2048 dimensions: the covariance is singular and the square roots of its ~0
    # eigenvalues leave ~1e-6 of the trace; a real FID here is ~1e2 times the trace
    assert abs(same["fid"]) < 1e-5 * scale and scale > 1.0
    assert same["precision"] == same["recall"] == 1.0


def test_real_features_are_cached_beside_the_shards_and_reused(gan_run, weights, monkeypatch):
    ctx = context(gan_run[1])
    cached = sorted((ctx.shard_dir / ".stats").glob("inception-test-48-*.pt"))
    assert len(cached) == 1  # written by the training run's evaluation
    first = torch.load(cached[0], weights_only=True)["2048"]

    def no_reading(*args, **kwargs):
        raise AssertionError("the real split was read again")

    monkeypatch.setattr("gensuite.data.pipeline.iterate_split", no_reading)
    again = inception.real_features(ctx, weights)
    assert torch.equal(again, first) and again.shape == (N, 2048)
    # another sample cap, or other weights, is another key
    other = inception.stats_cache_path(ctx.shard_dir, "test", 47, weights)
    assert other != cached[0]
    copy = weights.with_name("other.pth")
    shutil.copy(weights, copy)
    torch.save({**torch.load(copy, weights_only=True), "fc.bias": torch.ones(1008)}, copy)
    assert inception.stats_cache_path(ctx.shard_dir, "test", 48, copy) != cached[0]


def test_missing_weights_name_the_file(gan_run, shards, tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    raw, _ = gan_run
    asked = job_from_dict({**raw, "eval": {**raw["eval"], "inception_weights": None}})
    family = context(gan_run[1]).family
    expected = str(tmp_path / "hub" / "checkpoints" / inception.WEIGHTS_FILE)
    with pytest.raises(ConfigError, match=r"^eval.metrics\[0\]: inception needs Inception weights not found at "
                                          + expected.replace(".", r"\.")):
        resolve(asked.eval, family)
    # not asked for: left out with a note, training goes on
    default = job_from_dict({**raw, "eval": {"n_samples": N}})
    assert "inception" not in [m.name for m in resolve(default.eval, family)]
    assert any(note.startswith(f"inception: needs Inception weights not found at {expected}")
               for note in skipped(default.eval, family))
    # the environment variable is the second place looked at
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(ConfigError, match=r"env\.pth \(\$GENSUITE_INCEPTION_WEIGHTS\)"):
        inception.weights_path(None)

    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({**raw, "eval": {**raw["eval"], "inception_weights": str(tmp_path / "no.pth")}}))
    result = subprocess.run([sys.executable, "-m", "gensuite", "train", str(job_file), "--run-dir", str(tmp_path / "r")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: eval.metrics[0]: inception needs Inception weights not found at {tmp_path / 'no.pth'} "
        f"(eval.inception_weights); copy torch-fidelity's {inception.WEIGHTS_FILE} there, or point "
        f"eval.inception_weights or ${inception.WEIGHTS_ENV} at it"]


def test_a_file_that_is_not_inception_weights_is_named(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(GensuiteError, match=rf"^{bad}: not torch-fidelity InceptionV3 weights"):
        inception.extractor(bad, torch.device("cpu"))


@pytest.mark.slow
def test_two_ranks_give_the_single_process_values(shards, weights, tmp_path):
    raw = gan_job(shards, weights, max_samples=N - 1)  # an odd real count: ranks get unequal shares
    result = torchrun_job(raw, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    ctx = context(tmp_path / "run")
    shutil.rmtree(ctx.shard_dir / ".stats")  # recompute the real features in this single process too
    single = evaluate(resolve(ctx.cfg, ctx.family), ctx)
    for name in ("fid", "is", "kid", "precision", "recall"):
        logged = acc.Scalars(f"eval/{name}")[-1].value
        assert abs(logged - single[name]) <= 1e-6 * max(abs(single[name]), 1e-3), name


def test_fid_command_compares_folders_shard_sets_and_runs(gan_run, weights, tmp_path):
    from torchvision.utils import save_image

    from gensuite.cli import main

    _, run_dir = gan_run
    ctx = context(run_dir)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(read_split(ctx.shard_dir, "test", 20)["x"]):
        save_image(image, folder / f"{i:03d}.png")
    # the same 20 images as PNG files and as shards: identical uint8 pixels, so FID ~ 0
    values, about = inception.compare(str(folder), str(ctx.shard_dir), str(weights), n=20)
    assert about == [f"20 images in folder {folder}", f"20 images of the test split of shard set {ctx.shard_dir}"]
    assert abs(values["fid"]) < 1e-3 and values["precision"] == values["recall"] == 1.0
    # a run against its shards: the number the training run logged for the same protocol
    values, about = inception.compare(str(run_dir), str(ctx.shard_dir), str(weights), n=N)
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert values["fid"] == pytest.approx(acc.Scalars("eval/fid")[-1].value, rel=1e-6)
    assert values["is"] == pytest.approx(acc.Scalars("eval/is")[-1].value, rel=1e-6)
    assert about[0].startswith(f"{N} samples (seed 1234) of run ")

    assert main(["fid", str(tmp_path / "nowhere"), str(folder), "--weights", str(weights)]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["fid", str(tmp_path / "empty"), str(folder), "--weights", str(weights)]) == 2


def test_fid_command_line(gan_run, weights, tmp_path):
    _, run_dir = gan_run
    shard_dir = context(run_dir).shard_dir
    result = subprocess.run([sys.executable, "-m", "gensuite", "fid", str(shard_dir), str(shard_dir), "--n", "24",
                             "--weights", str(weights), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    import json

    out = json.loads(result.stdout)
    assert abs(out["values"]["fid"]) < 1e-3 and "is" not in out["values"]
    result = subprocess.run([sys.executable, "-m", "gensuite", "fid", str(shard_dir), str(shard_dir), "--weights",
                             str(tmp_path / "missing.pth")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"Inception weights not found at {tmp_path / 'missing.pth'}" in result.stderr
