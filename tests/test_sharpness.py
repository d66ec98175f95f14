"""The ``sharpness`` metric (variance of the Laplacian): closed forms, blur, the evaluation layer, two
ranks, and the comparison report that shows two runs' grids side by side with their sharpness."""

import io
import math
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite.cli import main
from gensuite.config import EvalConfig, job_from_dict
from gensuite.data.pipeline import read_split
from gensuite.evaluation import EvalContext, evaluate, generated_samples, resolve
from gensuite.evaluation.sharpness import compute, laplacian_variance, sharpness
from gensuite.sampling import load_run
from gensuite.trainer import train

N_SAMPLES, MAX_SAMPLES = 40, 50


def checkerboard(h: int, w: int) -> torch.Tensor:
    return ((torch.arange(h).view(-1, 1) + torch.arange(w).view(1, -1)) % 2).double().view(1, 1, h, w)


def impulse(h: int, w: int, i: int, j: int, amplitude: float = 1.0) -> torch.Tensor:
    x = torch.zeros(1, 1, h, w, dtype=torch.float64)
    x[0, 0, i, j] = amplitude
    return x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A 7×7 normalised Gaussian, applied per channel with reflected borders."""
    t = torch.arange(-3, 4, dtype=torch.float64)
    g = torch.exp(-t**2 / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).view(1, 1, 7, 7)
    n, c, h, w = x.shape
    padded = F.pad(x.reshape(n * c, 1, h, w), (3, 3, 3, 3), mode="reflect")
    return F.conv2d(padded, kernel).view(n, c, h, w)


# -- the statistic ---------------------------------------------------------------------------------


def test_a_constant_image_has_zero_laplacian_variance():
    for value in (0.0, 0.37, 1.0):
        assert laplacian_variance(torch.full((2, 3, 9, 7), value)).tolist() == [0.0, 0.0]
    # a linear ramp has zero Laplacian too
    ramp = (torch.arange(10, dtype=torch.float64) / 9).view(1, 1, 1, 10).expand(1, 1, 6, 10)
    assert laplacian_variance(ramp).item() == pytest.approx(0.0, abs=1e-28)


def test_closed_forms_of_a_checkerboard_and_an_impulse():
    # 0/1 checkerboard: the Laplacian is +4 on the zeros and -4 on the ones; on the 6×6 valid positions
    # of an 8×8 board there are 18 of each, so the mean is 0 and the variance exactly 16.
    assert laplacian_variance(checkerboard(8, 8)).item() == 16.0
    # On a 7×7 board, 5×5 = 25 valid positions: 13 of one sign and 12 of the other, mean ±4/25,
    # variance 16 − 16/25².
    assert laplacian_variance(checkerboard(7, 7)).item() == pytest.approx(16 - 16 / 625, rel=1e-15)
    # An impulse of height a inside the valid region: −4a at it, +a at its 4 neighbours, 0 elsewhere; over
    # n = (H − 2)(W − 2) positions the sum is 0, so the variance is (16 + 4) a² / n.
    assert laplacian_variance(impulse(8, 8, 3, 4)).item() == pytest.approx(20 / 36, rel=1e-15)
    assert laplacian_variance(impulse(10, 12, 5, 5, 0.5)).item() == pytest.approx(20 * 0.25 / 80, rel=1e-15)
    # channels are averaged: a checkerboard and a constant channel give 16 / 2
    two = torch.cat([checkerboard(8, 8), torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)], dim=1)
    assert laplacian_variance(two).item() == 8.0
    # the mean over images
    assert sharpness(torch.cat([checkerboard(8, 8), impulse(8, 8, 3, 4)])) == pytest.approx((16 + 20 / 36) / 2,
                                                                                             rel=1e-15)
    with pytest.raises(ValueError, match="H, W >= 3"):
        laplacian_variance(torch.zeros(1, 1, 2, 8))


def test_gaussian_blur_strictly_lowers_it():
    image = torch.cat([checkerboard(16, 16), impulse(16, 16, 8, 8)], dim=1)  # deterministic, two channels
    image[:, :, 4:12, 2:6] = 0.8  # an edge-rich block
    before = laplacian_variance(image).item()
    blurred = [laplacian_variance(gaussian_blur(image, s)).item() for s in (0.5, 1.0, 2.0)]
    assert before > blurred[0] > blurred[1] > blurred[2] > 0
    assert blurred[2] < 0.01 * before


# -- through the evaluation layer --------------------------------------------------------------------


def raw_job(shard_root, name, conditional=False, metrics=("sharpness",)):
    return {"name": name, "family": "vae", "flavor": "debug", "model": {"conditional": conditional},
            "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
            "train": {"steps": 6, "batch_size": 16, "log_every": 3, "sample_every": 3, "checkpoint_every": 6},
            "eval": {"metrics": list(metrics), "n_samples": N_SAMPLES, "max_samples": MAX_SAMPLES, "batch_size": 16},
            "log": {"grid_size": 16, "progress_bar": False}}


@pytest.fixture(scope="module")
def runs(shard_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("sharpness")
    train(job_from_dict(raw_job(shard_root, "vae")), work / "vae")
    train(job_from_dict(raw_job(shard_root, "cvae", conditional=True)), work / "cvae")
    return work


def context(run_dir, rank=0, world_size=1, sum_across_ranks=lambda t: t):
    run = load_run(run_dir)
    return EvalContext(run.family, run.networks, Path(run.job.data.root) / run.job.data.dataset, run.job.eval,
                       torch.device("cpu"), rank, world_size, sum_across_ranks)


def logged(run_dir) -> dict[str, float]:
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t.removeprefix("eval/"): acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]
            if t.startswith("eval/sharpness")}


def test_the_metric_is_the_direct_function_of_samples_and_split(runs):
    for name in ("vae", "cvae"):
        ctx = context(runs / name)
        values = evaluate(resolve(ctx.cfg, ctx.family), ctx)
        assert set(values) == {"sharpness", "sharpness_real", "sharpness_ratio"}
        samples = torch.cat([s for _, s, _ in generated_samples(ctx)])
        real = read_split(ctx.shard_dir, "test", MAX_SAMPLES, fields=set())["x"]
        assert len(samples) == N_SAMPLES and len(real) == MAX_SAMPLES
        assert samples.min() >= 0 and samples.max() <= 1
        assert values["sharpness"] == pytest.approx(sharpness(samples), rel=1e-12)
        assert values["sharpness_real"] == pytest.approx(sharpness(real), rel=1e-12)
        assert values["sharpness_ratio"] == pytest.approx(sharpness(samples) / sharpness(real), rel=1e-12)
        assert 0 < values["sharpness"] and 0 < values["sharpness_real"]
        # what the trainer logged at the end, from the same EMA weights (TensorBoard stores float32)
        for key, value in logged(runs / name).items():
            assert value == pytest.approx(values[key], rel=1e-6), key


def test_two_ranks_sum_to_the_single_process_values(runs):
    single = compute(context(runs / "vae"))
    partial = []  # each rank's float64 sums, as the all-reduce would receive them
    for rank in (0, 1):
        compute(context(runs / "vae", rank, 2, lambda t: partial.append(t.clone()) or t))
    assert len(partial) == 2 and partial[0][1] + partial[1][1] == N_SAMPLES
    total = partial[0] + partial[1]
    for rank in (0, 1):
        both = compute(context(runs / "vae", rank, 2, lambda t: total))
        for key in single:
            assert both[key] == pytest.approx(single[key], rel=1e-12), key


def test_it_is_opt_in_and_applies_to_image_generators_only(runs):
    family = context(runs / "vae").family
    assert "sharpness" not in [m.name for m in resolve(EvalConfig(), family)]  # draws samples: never a default
    assert [m.name for m in resolve(EvalConfig(metrics=["sharpness"]), family)] == ["sharpness"]


# -- the comparison report ---------------------------------------------------------------------------


def test_report_of_two_runs_shows_both_grids_and_sharpness_side_by_side(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs / "vae"), str(runs / "cvae"), "--out", str(out)]) == 0
    index = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert index == out / "index.md"
    text = index.read_text()
    section = text[text.index("## Samples side by side"):]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["", "vae", "cvae"]
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert list(rows) == ["grid", "step", "`eval/sharpness`", "`eval/sharpness_real`", "`eval/sharpness_ratio`"]
    assert rows["step"] == ["6", "6"]
    for cell, name in zip(rows["grid"], ("vae", "cvae")):
        src = unquote(re.fullmatch(r"!\[[^]]*\]\(([^)]+)\)", cell).group(1))
        assert src == f"{name}/samples/samples-step6.png"
        # the image is the run's last logged grid, byte for byte
        acc = EventAccumulator(str(runs / name / "tb"), size_guidance={"images": 0})
        acc.Reload()
        last = acc.Images("samples/samples")[-1]
        assert last.step == 6 and (out / src).read_bytes() == last.encoded_image_string
        with Image.open(io.BytesIO(last.encoded_image_string)) as im:
            assert im.size[0] > 16  # a grid, not one digit
    for n, name in enumerate(("vae", "cvae")):
        values = logged(runs / name)
        for key in ("sharpness", "sharpness_real", "sharpness_ratio"):
            shown = float(rows[f"`eval/{key}`"][n])
            assert shown == pytest.approx(values[key], rel=1e-5), (name, key)  # 6 significant digits
            assert math.isfinite(shown)
    # the real statistic is the same data for both runs; the final-metrics table has the columns too
    assert rows["`eval/sharpness_real`"][0] == rows["`eval/sharpness_real`"][1]
    assert "`eval/sharpness_ratio`" in text[text.index("## Final metrics"):text.index("## Samples side by side")]
    html = (out / "index.html").read_text()
    assert 'src="vae/samples/samples-step6.png"' in html and 'src="cvae/samples/samples-step6.png"' in html
