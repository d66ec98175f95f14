"""The cross-family leaderboard (jobs/leaderboard_digits.yaml): the training time budget, sweep
variants that change the family, and a two-family miniature from training to the report's table."""

import csv
import math
import re
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite import checkpoint as ckpt
from gensuite.config import job_from_dict, load_job
from gensuite.errors import ConfigError
from gensuite.sweep import expand
from gensuite.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def raw_job(shard_root, name, family, steps, model=None, eval_cfg=None, train_cfg=None):
    return {"name": name, "family": family, "flavor": "debug", "model": model or {},
            "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 256},
            "optim": {"lr": 3e-3},
            "train": {"steps": steps, "batch_size": 32, "log_every": steps, "sample_every": steps,
                      "checkpoint_every": steps, **(train_cfg or {})},
            "eval": eval_cfg or {"metrics": []}, "log": {"grid_size": 16, "progress_bar": False}}


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


# -- train.time_budget_min ------------------------------------------------------------------------


def test_a_time_budget_must_be_positive(shard_root):
    with pytest.raises(ConfigError, match=r"^train.time_budget_min: must be > 0 minutes"):
        job_from_dict(raw_job(shard_root, "v", "vae", 10, train_cfg={"time_budget_min": 0}))


def test_a_spent_time_budget_ends_the_run_as_at_its_last_step(shard_root, tmp_path):
    # ~60 microseconds: spent by the first step, long before train.steps (1000)
    raw = raw_job(shard_root, "v", "vae", 1000, eval_cfg={"metrics": ["likelihood"]},
                  train_cfg={"time_budget_min": 1e-6, "log_every": 500, "sample_every": 500,
                             "checkpoint_every": 500})
    run = tmp_path / "v"
    train(job_from_dict(raw), run)
    # a checkpoint, the final grids and the final evaluation at step 1, as at a last step
    assert [p.name for p in ckpt.list_checkpoints(run)] == [ckpt.checkpoint_path(run, 1).name]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert state["step"] == 1 and state["train_seconds"] >= 1e-6 * 60
    evaluated = [t for t in _tags(run) if t.startswith("eval/")]
    assert evaluated and all([s for s, _ in scalars(run, t)] == [1] for t in evaluated)
    assert scalars(run, "perf/train_seconds")[-1][0] == 1
    assert any(p.name.startswith("samples-00000001") for p in (run / "samples").iterdir())
    # resumed, the spent budget trains nothing more
    train(job_from_dict(raw), run)
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["step"] == 1


def test_an_unspent_time_budget_changes_nothing(shard_root, tmp_path):
    raw = raw_job(shard_root, "v", "vae", 3, train_cfg={"time_budget_min": 60.0})
    train(job_from_dict(raw), tmp_path / "v")
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "v"))["step"] == 3


def test_two_ranks_end_on_rank_0s_clock_at_the_same_step(shard_root, tmp_path):
    from launchers import torchrun_job

    raw = raw_job(shard_root, "v", "vae", 100_000, eval_cfg={"metrics": ["likelihood"]},
                  train_cfg={"time_budget_min": 0.005, "log_every": 1000, "sample_every": 1000,
                             "checkpoint_every": 1000})
    result = torchrun_job(raw, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    step = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))["step"]
    assert 0 < step < 100_000
    assert scalars(tmp_path / "run", "eval/iwae")[-1][0] == step  # evaluated at the step the ranks stopped


def _tags(run: Path) -> list[str]:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Tags()["scalars"]


# -- sweep variants: one task per family --------------------------------------------------------------


def test_variants_change_the_family_and_start_from_its_flavor(shard_root, tmp_path):
    raw = raw_job(shard_root, "board", "vae", 10, {"latent_dim": 3}, {"metrics": []})
    raw["sweep"] = {"variants": {"vae": {}, "gan": {"family": "gan", "flavor": "debug", "model": {"ngf": 4},
                                                     "train": {"ema": {"networks": ["G"]}}}},
                    "grid": {"train.seed": [0, 1]}}
    tasks = expand(job_from_dict(raw), tmp_path)
    assert [t.name for t in tasks] == ["vae,seed=0", "vae,seed=1", "gan,seed=0", "gan,seed=1"]
    vae, gan = tasks[0].job, tasks[3].job
    assert (vae.family, vae.model.latent_dim, vae.train.ema.networks) == ("vae", 3, [])
    # the gan's model: the debug flavor's settings and its own, none of the vae's
    assert (gan.family, gan.model.ngf, gan.model.ndf, gan.train.seed, gan.train.ema.networks) == ("gan", 4, 8, 1, ["G"])
    assert gan.data.root == str(shard_root) and gan.train.steps == 10  # the rest is the job's
    raw["sweep"]["variants"]["gan"]["model"]["ngff"] = 4
    with pytest.raises(ConfigError, match=r"^sweep.variants.gan with sweep.grid: model.ngff: unknown key; "
                                          r"did you mean model.ngf\?"):
        expand(job_from_dict(raw), tmp_path)
    raw["sweep"]["variants"] = {"a b": {}}
    with pytest.raises(ConfigError, match=r"^sweep.variants.a b: a variant's name is its run directory"):
        job_from_dict(raw)


def test_the_leaderboard_job_is_one_task_per_family():
    tasks = expand(load_job(ROOT / "jobs" / "leaderboard_digits.yaml"), Path("runs/leaderboard_digits"))
    assert {t.job.family for t in tasks} == {"vae", "gan", "diffusion", "flow", "cnf", "ebm"}
    assert len({t.job.train.time_budget_min for t in tasks}) == 1
    assert len({(t.job.data.dataset, t.job.train.seed, t.job.eval.classifier, t.job.eval.n_samples)
                for t in tasks}) == 1
    assert all({"clf_fid", "sampling_speed"} <= set(t.job.eval.metrics) for t in tasks)


# -- a two-family miniature, from `launch/submit.py --local` to the report's table -----------------


def test_a_two_family_leaderboard_end_to_end(shard_root, tmp_path):

    from gensuite.report import write_report

    clf = tmp_path / "clf"
    train(job_from_dict(raw_job(shard_root, "clf", "classifier", 60)), clf)
    raw = raw_job(shard_root, "board", "vae", 100_000,
                  eval_cfg={"metrics": ["clf_fid", "sampling_speed", "likelihood"], "classifier": str(clf),
                            "n_samples": 100, "batch_size": 50, "importance_samples": 4},
                  train_cfg={"time_budget_min": 0.01, "log_every": 20, "sample_every": 1000,
                             "checkpoint_every": 1000})
    raw["sweep"] = {"variants": {"vae": {}, "gan": {"family": "gan", "flavor": "debug",
                                                     "eval": {"metrics": ["clf_fid", "sampling_speed"]}}}}
    root = _run_board(raw, tmp_path)

    index = write_report([root])
    rows = list(csv.DictReader(open(index.parent / "leaderboard.csv")))
    assert sorted(r["run"] for r in rows) == ["gan", "vae"]
    fids = [float(r["clf_fid"]) for r in rows]
    assert fids == sorted(fids) and [r["rank"] for r in rows] == ["1", "2"]
    for row in rows:
        for key in ("clf_fid", "samples/s", "parameters", "train s"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (row["run"], key, row[key])
        assert row["budget min"] == "0.01" and row["seed"] == "0"
        assert re.match(r"^([0-9a-f]{40}|unknown)", row["commit"])
        assert 0 < int(row["steps"]) < 100_000  # the budget ended the run
    vae = next(r for r in rows if r["run"] == "vae")
    assert vae["bound"] == "iwae" and math.isfinite(float(vae["bits/dim"]))
    text = index.read_text()
    board = text[text.index("## Leaderboard"):text.index("## Final metrics")]
    assert [line.split("|")[3].strip() for line in board.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")] == [f"{r['model']}" for r in rows]
    assert board.count("![") == 2  # a sample grid beside each row


def test_a_two_family_points_leaderboard_ranks_by_mmd(shard_root, tmp_path):

    from gensuite.report import write_report

    raw = raw_job(shard_root, "board", "gan", 6, eval_cfg={"metrics": ["mmd"], "n_samples": 200, "batch_size": 100},
                  train_cfg={"log_every": 3, "sample_every": 6, "checkpoint_every": 6})
    raw.update(flavor="points", data={**raw["data"], "dataset": "moons"})
    raw["sweep"] = {"variants": {"gan": {}, "flow": {"family": "flow", "flavor": "debug",
                                                     "eval": {"metrics": ["mmd", "likelihood"]}}}}
    root = _run_board(raw, tmp_path)

    index = write_report([root])
    rows = list(csv.DictReader(open(index.parent / "leaderboard.csv")))
    assert sorted(r["run"] for r in rows) == ["flow", "gan"]
    mmds = [float(r["mmd"]) for r in rows]
    assert mmds == sorted(mmds) and [r["rank"] for r in rows] == ["1", "2"]
    for row in rows:
        assert float(row["mmd"]) == scalars(root / row["run"], "eval/mmd")[-1][1]  # the logged value, unrounded
        assert row["clf_fid"] == row["bits/dim"] == "" and row["steps"] == "6"
    flow = next(r for r in rows if r["run"] == "flow")
    gan = next(r for r in rows if r["run"] == "gan")
    assert flow["bound"] == "log_px" and float(flow["nll"]) == -scalars(root / "flow", "eval/log_px")[-1][1]
    assert gan["nll"] == gan["bound"] == ""
    text = index.read_text()
    board = text[text.index("## Leaderboard"):text.index("## Final metrics")]
    assert "Runs ranked by `mmd`" in board
    header = next(line for line in board.splitlines() if line.startswith("| rank"))
    # the image columns no row fills are left out of the table
    assert [c.strip() for c in header.split("|")[1:7]] == ["rank", "run", "model", "mmd", "nll", "bound"]
    assert [line.split("|")[3].strip() for line in board.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")] == [r["model"] for r in rows]
    # beside each row its samples' scatter figure (points runs log no image grid)
    assert re.findall(r"!\[(\w+): samples at step 6\]\((\w+)/figures/samples-step6.png\)", board) == [
        (r["run"], r["run"]) for r in rows]


# -- a variant that evaluates another's run (the DDIM row of the DDPM run) ----------------------------


def _diffusion_board(shard_root, steps=4):
    raw = raw_job(shard_root, "board", "diffusion", steps, eval_cfg={"metrics": ["sampling_speed"], "n_samples": 8,
                                                                     "batch_size": 4})
    raw["sweep"] = {"variants": {
        "ddim": {"train": {"resume": "variant:ddpm"}, "eval": {"sampler": "ddim", "sampler_steps": 5}},
        "ddpm": {}, "vae": {"family": "vae", "flavor": "debug"}}}
    return raw


def test_a_variant_resuming_another_runs_after_it(shard_root, tmp_path):
    raw = _diffusion_board(shard_root)
    tasks = expand(job_from_dict(raw), tmp_path)
    assert [(t.name, t.after) for t in tasks] == [("ddpm", None), ("vae", None), ("ddim", "ddpm")]
    assert tasks[2].job.train.resume == str(tmp_path / "ddpm") and tasks[0].job.train.resume == "auto"
    raw["sweep"]["grid"] = {"train.seed": [0, 1]}  # each seed's ddim evaluates that seed's ddpm
    tasks = expand(job_from_dict(raw), tmp_path)
    assert [(t.name, t.job.train.resume) for t in tasks if t.after] == [
        ("ddim,seed=0", str(tmp_path / "ddpm,seed=0")), ("ddim,seed=1", str(tmp_path / "ddpm,seed=1"))]
    for bad, message in (("variant:ddim", r"names no other variant of this sweep; choose one of ddpm, vae"),
                         ("variant:nope", r"names no other variant of this sweep; choose one of ddpm, vae")):
        raw["sweep"]["variants"]["ddim"]["train"]["resume"] = bad
        with pytest.raises(ConfigError, match=rf"^sweep.variants.ddim.train.resume: '{bad}' {message}$"):
            expand(job_from_dict(raw), tmp_path)
    raw["sweep"]["variants"]["ddim"]["train"]["resume"] = "variant:vae"
    raw["sweep"]["variants"]["vae"]["train"] = {"resume": "variant:ddpm"}
    with pytest.raises(ConfigError, match=r"^sweep.variants.ddim.train.resume: variant 'vae' itself resumes a "
                                          r"variant; name the one that trains$"):
        expand(job_from_dict(raw), tmp_path)


def test_the_ddim_row_evaluates_the_trained_ddpm_run(shard_root, tmp_path, capsys):
    submit = _submit_module()
    job_file = tmp_path / "board.yaml"
    job_file.write_text(yaml.safe_dump(_diffusion_board(shard_root)))
    root = tmp_path / "runs"
    assert submit.main([str(job_file), "--local", "--run-dir", str(root), "--dry-run"]) == 0
    assert f"#   [2] {root / 'ddim'}  (after ddpm: a separate job that evaluates its run)" in capsys.readouterr().out
    assert submit.main([str(job_file), "--local", "--run-dir", str(root), "--only", "ddim,ddpm"]) == 0
    assert not (root / "vae").exists()
    ddpm = ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "ddpm"))
    assert ddpm["step"] == 4
    assert not (root / "ddim" / "checkpoints").exists() or not ckpt.list_checkpoints(root / "ddim")  # trained nothing
    assert [s for s, _ in scalars(root / "ddim", "eval/sampling_samples_per_sec")] == [4]
    protocols = {run: _text(root / run, "eval/protocol") for run in ("ddpm", "ddim")}
    assert protocols["ddpm"].endswith("generated samples drawn with ddpm")
    assert protocols["ddim"].endswith("generated samples drawn with ddim, 5 steps, η=0")
    checksums = re.findall(r"finished at step 4; parameter checksum (\w+)", capsys.readouterr().err)
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # the ddpm run's own weights
    with pytest.raises(ConfigError, match=r"^--only: 'ddin' is not a run of this sweep; its runs: ddpm, vae, ddim$"):
        submit.main([str(job_file), "--local", "--run-dir", str(root), "--only", "ddin"])


def _run_board(raw: dict, tmp_path: Path) -> Path:
    """``launch/submit.py BOARD.yaml --local``: the runs' root."""
    job_file = tmp_path / "board.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    root = tmp_path / "runs"
    assert _submit_module().main([str(job_file), "--local", "--run-dir", str(root)]) == 0
    return root


def _submit_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("submit", ROOT / "launch" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    return submit


def _text(run: Path, tag: str) -> str:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    return " ".join(e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary"))
