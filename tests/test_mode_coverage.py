"""Gaussian-mixture datasets (ring, grid) and the ``modes`` metric: data points score the closed forms,
a collapsed generator scores one mode and KL = log K, far-off samples score nothing, ranks add up, and the
shards record the std the metric uses."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.multiprocessing as mp

from gensuite import evaluation
from gensuite.config import EvalConfig
from gensuite.data.pipeline import read_split
from gensuite.data.shards import build, data_spec, open_shard_set
from gensuite.data.shards import main as shards_main
from gensuite.data.sources import DATASETS, READERS, mixture_modes
from gensuite.errors import ConfigError, GensuiteError
from gensuite.evaluation.modes import compute, describe, mode_statistics
from gensuite.registry import DataSpec, Networks
from launchers import free_port, gloo_rank

ROOT = Path(__file__).resolve().parents[1]
HIGH_QUALITY = 1 - math.exp(-9 / 2)  # P(||N(0, s^2 I_2)|| <= 3 s): the squared radius / s^2 is chi-square(2)
MODES = {"ring": 8, "grid": 25}
N_SHARD = 400  # training points of the shard sets built here (test: 80)


def five_sd(n: int) -> float:
    """5 binomial standard deviations of a fraction of n samples at the high-quality rate."""
    return 5 * math.sqrt(HIGH_QUALITY * (1 - HIGH_QUALITY) / n)


class MixtureSampler:
    """A stand-in generative family on mixture data: draws the mixture itself ("data", std ``std``), puts every
    sample on mode 3 ("collapse"), or 100 away from every mode ("far"); one chunk per ``fixed_inputs`` call."""

    name = "mixture_sampler"
    sampling_needs_gradients = False
    conditional = False

    def __init__(self, data: DataSpec, behaviour: str = "data", std: float | None = None):
        self.data, self.behaviour = data, behaviour
        self.centres, self.std = mixture_modes(data.dataset, std)

    def fixed_inputs(self, n, generator):
        return {"u": torch.rand(n, generator=generator), "z": torch.randn(n, 2, generator=generator)}

    def sample(self, nets, fixed):
        k = (fixed["u"] * len(self.centres)).long().clamp(max=len(self.centres) - 1)
        if self.behaviour == "collapse":
            k = torch.full_like(k, 3)
        if self.behaviour == "far":
            return fixed["z"] + 100.0
        return (self.centres[k] + self.std * fixed["z"].double()).float()


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory) -> Path:
    """ring (default std 0.02), grid (default std 0.05, seed 5), wide/ring: ring built with std 0.1; and moons."""
    root = tmp_path_factory.mktemp("mixtures")
    build("ring", None, str(root), n=N_SHARD, progress=False)
    build("grid", None, str(root), n=N_SHARD, seed=5, progress=False)
    build("ring", None, str(root / "wide"), n=N_SHARD, std=0.1, progress=False)
    build("moons", None, str(root), n=100, progress=False)
    return root


def context(shard_dir: Path, family, n_samples: int, batch_size: int = 1000, **kw) -> evaluation.EvalContext:
    cfg = EvalConfig(metrics=["modes"], n_samples=n_samples, batch_size=batch_size, seed=7)
    return evaluation.EvalContext(family, Networks({}), shard_dir, cfg, torch.device("cpu"), **kw)


def scalars(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, float)}


# -- geometry and data ------------------------------------------------------------------------------


def test_mixture_geometry_is_the_papers():
    ring, std = mixture_modes("ring")
    assert ring.shape == (8, 2) and ring.dtype == torch.float64 and std == 0.02
    assert torch.allclose(ring.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    angles = torch.atan2(ring[:, 1], ring[:, 0]) % (2 * math.pi)
    assert torch.allclose(angles, torch.arange(8, dtype=torch.float64) * math.pi / 4, atol=1e-12)
    grid, std = mixture_modes("grid")
    assert grid.shape == (25, 2) and std == 0.05
    assert {tuple(c) for c in grid.tolist()} == {(x, y) for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)}
    assert mixture_modes("grid", 0.3)[1] == 0.3
    with pytest.raises(GensuiteError, match="not a Gaussian-mixture dataset"):
        mixture_modes("moons")
    with pytest.raises(GensuiteError, match=r"^--std: must be a positive number"):
        mixture_modes("ring", 0.0)
    for name, k in MODES.items():
        assert DATASETS[name].class_names == tuple(str(i) for i in range(k)) and DATASETS[name].kind == "points"


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_reader_points_cover_every_mode_at_the_closed_form_rate(name):
    records = list(READERS[name](None))  # defaults: 20000 training points, 4000 test points, seed 0
    train = [r for r in records if r[0] == "train"]
    assert len(train) == 20000 and len(records) - len(train) == 4000
    points = torch.from_numpy(np.stack([r[1] for r in train]))
    labels = torch.tensor([r[2] for r in train])
    assert points.dtype == torch.float32 and points.shape == (20000, 2)
    centres, std = mixture_modes(name)
    k = MODES[name]
    # the label is the mode drawn from; the modes sit >= 33 std apart, so it is also the nearest one
    assert torch.equal((points.double()[:, None] - centres).norm(dim=2).argmin(1), labels)
    counts = torch.bincount(labels, minlength=k)
    assert scipy.stats.chisquare(counts.numpy()).pvalue > 1e-4  # equal mode probabilities
    values = mode_statistics(points, centres, std)
    assert values["modes_covered"] == values["modes_total"] == k
    assert abs(values["high_quality"] - HIGH_QUALITY) < five_sd(20000)
    # 2 n KL(p_hat || uniform) is asymptotically chi-square with K - 1 degrees of freedom for balanced modes
    n_good = values["high_quality"] * 20000
    assert 0 <= 2 * n_good * values["mode_kl"] < scipy.stats.chi2.ppf(1 - 1e-6, k - 1)


def test_building_ring_and_grid_shards_records_the_geometry(mixtures, tmp_path, capsys):
    for name, root, std in (("ring", mixtures, 0.02), ("grid", mixtures, 0.05), ("ring", mixtures / "wide", 0.1)):
        manifest = open_shard_set(root / name)
        assert manifest["kind"] == "points" and manifest["shape"] == [2]
        assert manifest["num_classes"] == MODES[name]
        assert manifest["class_names"] == [str(i) for i in range(MODES[name])]
        assert manifest["params"]["std"] == std and manifest["params"]["n"] == N_SHARD
        assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": N_SHARD, "test": N_SHARD // 5}
        spec = data_spec(manifest)
        assert spec.dataset == name and spec.shape == (2,) and spec.num_classes == MODES[name]
    # the shards hold the reader's points exactly
    grid = read_split(mixtures / "grid", "test", 1000)
    expected = [r for r in READERS["grid"](None, n=N_SHARD, seed=5) if r[0] == "test"]
    assert torch.equal(grid["x"], torch.from_numpy(np.stack([r[1] for r in expected])))
    assert grid["y"].tolist() == [r[2] for r in expected]
    # the command line: --n, --seed and --std reach the reader and the manifest
    result = subprocess.run([sys.executable, str(ROOT / "shards" / "build.py"), "ring", "--n", "50", "--seed", "3",
                             "--std", "0.07", "--out", str(tmp_path), "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "ring" / "manifest.json").read_text())
    assert manifest["params"] == {"n": 50, "std": 0.07, "seed": 3, "validation": 0.0, "shard_size": 10000}
    ring = read_split(tmp_path / "ring", "train", 100)
    expected = [r for r in READERS["ring"](None, n=50, std=0.07, seed=3) if r[0] == "train"]
    assert torch.equal(ring["x"], torch.from_numpy(np.stack([r[1] for r in expected])))
    assert shards_main(["grid", "--std", "-1", "--out", str(tmp_path), "--no-progress"]) == 2  # the same parser
    assert capsys.readouterr().err.strip() == "error: --std: must be a positive number, got -1.0"
    assert not (tmp_path / "grid" / "manifest.json").exists()


# -- the metric --------------------------------------------------------------------------------------


def test_samples_of_the_mixture_cover_every_mode_with_the_std_the_shards_were_built_with(mixtures):
    shard_dir = mixtures / "wide" / "ring"  # std 0.1, not the default 0.02
    family = MixtureSampler(data_spec(open_shard_set(shard_dir)), "data", std=0.1)
    assert [m.name for m in evaluation.resolve(EvalConfig(metrics=["modes"]), family)] == ["modes"]
    assert "modes" in [m.name for m in evaluation.resolve(EvalConfig(), family)]  # a default where it applies
    ctx = context(shard_dir, family, n_samples=20000)
    values = compute(ctx)
    assert values["modes_covered"] == values["modes_total"] == 8
    # at 3 x 0.02 the rate would be 1 - exp(-0.18) = 0.165: the metric uses the manifest's std
    assert abs(values["high_quality"] - HIGH_QUALITY) < five_sd(20000)
    assert 0 <= 2 * values["high_quality"] * 20000 * values["mode_kl"] < scipy.stats.chi2.ppf(1 - 1e-6, 7)
    figure = values.pop("mode_samples")
    assert figure.axes and len(figure.axes[0].patches) == 8  # one 3-sigma circle per mode
    import matplotlib.pyplot as plt

    plt.close(figure)
    assert "std 0.1" in describe(ctx) and "20000 generated samples" in describe(ctx)


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_a_generator_on_one_mode_covers_one_mode_at_kl_log_k(mixtures, name):
    family = MixtureSampler(data_spec(open_shard_set(mixtures / name)), "collapse")
    values = scalars(compute(context(mixtures / name, family, n_samples=3000)))
    k = MODES[name]
    assert values == pytest.approx({"modes_covered": 1.0, "modes_total": float(k), "high_quality": HIGH_QUALITY,
                                    "mode_kl": math.log(k)}, abs=five_sd(3000))
    assert values["modes_covered"] == 1.0 and values["mode_kl"] == pytest.approx(math.log(k), abs=1e-12)


def test_samples_far_from_every_mode_are_not_high_quality(mixtures):
    family = MixtureSampler(data_spec(open_shard_set(mixtures / "grid")), "far")
    values = scalars(compute(context(mixtures / "grid", family, n_samples=1000)))
    assert values == {"modes_covered": 0.0, "modes_total": 25.0, "high_quality": 0.0, "mode_kl": math.log(25)}


def test_two_simulated_ranks_add_up_to_one(mixtures):
    """Each rank draws its own chunks; the float64 sums of the two partial tensors are those of one rank,
    and values computed from them are identical (uneven: 7 chunks of 300, the last one of 100)."""
    family = MixtureSampler(data_spec(open_shard_set(mixtures / "ring")), "data")
    whole = []
    single = compute(context(mixtures / "ring", family, 1900, 300, sum_across_ranks=lambda t: whole.append(t) or t))
    parts = []
    for rank in (0, 1):
        compute(context(mixtures / "ring", family, 1900, 300, rank=rank, world_size=2,
                        sum_across_ranks=lambda t: parts.append(t.clone()) or t))
    assert torch.equal(parts[0] + parts[1], whole[0])
    assert parts[0][8] + parts[1][8] == 1900 and 0 < parts[1][8] < parts[0][8]  # samples per rank: 1000, 900
    for rank, other in ((0, parts[1]), (1, parts[0])):  # each rank as if the all-reduce had added the other
        values = compute(context(mixtures / "ring", family, 1900, 300, rank=rank, world_size=2,
                                 sum_across_ranks=lambda t: t + other))
        assert scalars(values) == scalars(single) and ("mode_samples" in values) == (rank == 0)
    import matplotlib.pyplot as plt

    plt.close("all")


def _rank_main(rank, world, port, shard_dir, out_dir):
    with gloo_rank(rank, world, port) as all_reduce:
        family = MixtureSampler(data_spec(open_shard_set(shard_dir)), "data")
        values = compute(context(Path(shard_dir), family, 1900, 300, rank=rank, world_size=world,
                                 sum_across_ranks=all_reduce))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(scalars(values)))


@pytest.mark.slow
def test_two_gloo_ranks_give_the_values_of_one(mixtures, tmp_path):
    family = MixtureSampler(data_spec(open_shard_set(mixtures / "ring")), "data")
    single = scalars(compute(context(mixtures / "ring", family, 1900, 300)))
    mp.start_processes(_rank_main, args=(2, free_port(), str(mixtures / "ring"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single
    import matplotlib.pyplot as plt

    plt.close("all")


def test_modes_applies_only_to_generators_on_mixture_data(mixtures):
    from gensuite.evaluation import METRICS

    evaluation._load_builtin()
    moons = MixtureSampler.__new__(MixtureSampler)
    moons.data = data_spec(open_shard_set(mixtures / "moons"))
    moons.fixed_inputs = lambda n, generator: {"z": torch.zeros(n, 2)}
    assert not METRICS["modes"].applies(moons)
    with pytest.raises(ConfigError, match=r"^eval.metrics\[0\]: modes does not apply to the mixture_sampler family"):
        evaluation.resolve(EvalConfig(metrics=["modes"]), moons)
    ring = MixtureSampler(data_spec(open_shard_set(mixtures / "ring")))
    assert METRICS["modes"].applies(ring)
    ring.fixed_inputs = lambda n, generator: {}  # draws nothing (a classifier)
    assert not METRICS["modes"].applies(ring)
    # shards of another dataset than the family's: refused, not silently measured against other modes
    grid_family = MixtureSampler(data_spec(open_shard_set(mixtures / "grid")))
    with pytest.raises(GensuiteError, match=r"hold ring; the family was built for grid"):
        compute(context(mixtures / "ring", grid_family, 10))
