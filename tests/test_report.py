"""``gensuite report`` on real runs: every file it writes opens, links resolve, numbers match the event files."""

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite.cli import main
from gensuite.config import job_from_dict, load_job
from gensuite.data.shards import data_spec, read_manifest
from gensuite.registry import get_family
from gensuite.report import read_run
from gensuite.sweep import expand
from gensuite.trainer import train


def raw_job(shard_root, family="vae", **train_kw):
    cfg = {"name": f"{family}-report", "family": family, "flavor": "debug",
           "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
           "train": {"steps": 6, "batch_size": 16, "log_every": 2, "sample_every": 2, "checkpoint_every": 6,
                     **train_kw},
           "eval": {"every": 3, "max_samples": 64},
           "log": {"grid_size": 16, "progress_bar": False}}
    if family == "vae":
        cfg["model"] = {"latent_dim": 2}  # the latent scatter is logged as figures/latent
        cfg["eval"]["importance_samples"] = 4
    return cfg


@pytest.fixture(scope="module")
def vae_run(shard_root, tmp_path_factory):
    """A VAE run stopped at step 4 and resumed to step 6: two event files in tb/."""
    run = tmp_path_factory.mktemp("vae") / "run"
    train(job_from_dict(raw_job(shard_root, steps=4, checkpoint_every=4)), run)
    train(job_from_dict(raw_job(shard_root)), run)
    return run


@pytest.fixture(scope="module")
def clf_run(shard_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("clf") / "run"
    train(job_from_dict(raw_job(shard_root, "classifier", sample_every=3)), run)
    return run


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def last_values(run_dir) -> dict[str, float]:
    """The last logged value of every eval/ and loss-term scalar, read straight from the event files."""
    acc = events(run_dir)
    return {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]
            if not t.startswith(("final/", "lr/", "perf/"))}


def run_report(capsys, *args) -> Path:
    """``gensuite report ARGS``; the index path it printed."""
    assert main(["report", *map(str, args)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    index = Path(printed[-1])
    assert index.name == "index.md" and index.is_file()
    return index


def md_table(text: str, first_header: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [h.strip().strip("`") for h in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, (c.strip().strip("`") for c in line.strip().strip("|").split("|")))))
    return rows


def link_text(cell: str) -> str:
    return re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", cell)


def check_folder(folder: Path) -> None:
    """Every PNG opens, every GIF animates, every index links only to files that exist."""
    pngs, gifs = list(folder.rglob("*.png")), list(folder.rglob("*.gif"))
    assert pngs and gifs
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
    for gif in gifs:
        with Image.open(gif) as im:
            assert im.n_frames >= 2, gif
    for index in folder.rglob("index.md"):
        targets = re.findall(r"\]\(([^)]+)\)", index.read_text())
        assert targets
        for target in targets:
            assert (index.parent / unquote(target)).exists(), f"{index}: broken link {target}"
    for page in folder.rglob("index.html"):
        for target in re.findall(r'(?:href|src)="([^"]+)"', page.read_text()):
            assert (page.parent / unquote(target)).exists(), f"{page}: broken link {target}"


def test_run_report_has_curves_animations_tables_and_exact_numbers(vae_run, capsys):
    index = run_report(capsys, vae_run)
    folder = vae_run / "report"
    assert index == folder / "index.md"
    check_folder(folder)
    assert len(list((vae_run / "tb").glob("events.out.tfevents.*"))) == 2  # resumed: two event files

    # Every logged step of every image tag, and their animation with one frame per step.
    for tag in ("samples/samples", "samples/reconstructions", "figures/latent"):
        for step in (2, 4, 6):
            assert (folder / f"{tag}-step{step}.png").is_file()
        with Image.open(folder / f"{tag}.gif") as gif:
            assert gif.n_frames == 3
    for png in ("curves/loss-model.png", "curves/eval.png", "curves/schedule.png"):
        assert (folder / png).is_file()
    text = index.read_text()

    # Final metrics: the event files' last values, to the 6 digits shown and exactly in summary.json.
    logged = last_values(vae_run)
    assert {"eval/elbo", "eval/iwae", "model/loss", "model/kl"} <= logged.keys()
    table = {row["metric"]: row for row in md_table(text, "metric")}
    assert table.keys() == logged.keys()
    summary = json.loads((folder / "summary.json").read_text())
    for tag, value in logged.items():
        assert float(table[tag]["value"]) == pytest.approx(value, rel=1e-5), tag
        assert summary["final"][tag]["value"] == value
    assert table["eval/iwae"]["step"] == "6" and table["model/loss"]["step"] == "6"

    # Networks: the parameter counts of freshly built networks.
    job = load_job(vae_run / "config.yaml")
    nets = get_family(job.family)(job.model, data_spec(read_manifest(Path(job.data.root) / "digits"))).build_networks()
    rows = {row["network"]: row for row in md_table(text, "network")}
    for name, net in nets.items():
        count = sum(p.numel() for p in net.parameters())
        assert int(rows[name]["parameters"].replace(",", "")) == count
        assert summary["networks"][name]["parameters"] == count
        assert f"== {name}: {count:,} parameters" in (folder / "architecture.txt").read_text()
        assert str(net) in (folder / "architecture.txt").read_text()
    assert int(rows["total"]["parameters"].replace(",", "")) == sum(
        p.numel() for net in nets.values() for p in net.parameters())

    hparams = {row["key"]: row["value"] for row in md_table(text, "key")}
    assert hparams["model.latent_dim"] == "2" and hparams["train.batch_size"] == "16"
    assert "likelihood: elbo, iwae (k=" in text  # the eval protocol text


def test_classifier_report_shows_confusion_matrices_and_split_curves(clf_run, tmp_path, capsys):
    index = run_report(capsys, clf_run, "--out", tmp_path / "out")
    assert index == tmp_path / "out" / "index.md"
    check_folder(tmp_path / "out")
    text = index.read_text()
    confusion = text[text.index("## Confusion matrices"):text.index("## Final metrics")]  # first on the page
    assert "(figures/confusion_test-step6.png)" in confusion and "(figures/confusion_train-step6.png)" in confusion
    table = {row["metric"]: float(row["value"]) for row in md_table(text, "metric")}
    logged = last_values(clf_run)
    for tag in ("eval/accuracy", "eval/train_accuracy", "eval/nll", "model/accuracy"):
        assert table[tag] == pytest.approx(logged[tag], rel=1e-5)


def test_last_written_value_wins_for_a_step_logged_twice(vae_run, tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    shutil.copytree(vae_run, run, ignore=shutil.ignore_patterns("report"))
    with SummaryWriter(str(tmp_path / "extra")) as writer:  # a later file re-logging steps 4 and 6
        writer.add_scalar("model/loss", 4.5, 4)
        writer.add_scalar("model/loss", 123.25, 6)
    (extra,) = (tmp_path / "extra").glob("events.out.tfevents.*")
    extra.rename(run / "tb" / "events.out.tfevents.9999999999.later.1.0")  # sorts after the run's files
    first = events(vae_run).Scalars("model/loss")[0].value
    assert read_run(run).scalars["model/loss"] == [(2, first), (4, 4.5), (6, 123.25)]
    summary = json.loads((run_report(capsys, run).parent / "summary.json").read_text())
    assert summary["final"]["model/loss"] == {"step": 6, "value": 123.25}


def test_sweep_root_compares_tasks_against_their_swept_values(shard_root, tmp_path, capsys):
    raw = raw_job(shard_root, steps=4, sample_every=2, checkpoint_every=4)
    raw["eval"]["every"] = None
    raw["sweep"] = {"grid": {"optim.lr": [0.001, 0.002]}}
    root = tmp_path / "sweep"
    tasks = expand(job_from_dict(raw), root)
    for task in tasks:
        train(task.job, task.run_dir)
    (root / "submission.json").write_text(json.dumps({"tasks": [
        *[{"name": t.name, "run_dir": str(t.run_dir)} for t in tasks], {"name": "lr=0.003", "run_dir": "x"}]}))

    index = run_report(capsys, root)
    assert index == root / "report" / "index.md"
    check_folder(root / "report")
    text = index.read_text()
    rows = {link_text(row["run"]): row for row in md_table(text, "run")}
    assert sorted(rows) == ["lr=0.001", "lr=0.002"]
    assert [float(rows[t.name]["optim.lr"]) for t in tasks] == [0.001, 0.002]
    for task in tasks:
        logged = last_values(task.run_dir)
        for tag in ("eval/elbo", "model/loss"):
            assert float(rows[task.name][tag]) == pytest.approx(logged[tag], rel=1e-5)
        assert (root / "report" / task.name / "index.md").is_file()
    assert "Not started or nothing logged yet: lr=0.003" in text
    for png in ("loss-model.png", "eval.png"):
        assert (root / "report" / "comparison" / png).is_file()

    # The same runs named one by one compare the same way.
    out = tmp_path / "explicit"
    index = run_report(capsys, *[t.run_dir for t in tasks], "--out", out)
    rows = {link_text(row["run"]): row for row in md_table(index.read_text(), "run")}
    assert [float(rows[t.name]["optim.lr"]) for t in tasks] == [0.001, 0.002]


def test_a_path_that_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.yaml").write_text("family: vae\n")
    (tmp_path / "file.txt").write_text("x")
    cases = {"empty": "not a run directory (no config.yaml, no tb/)", "config_only": "no tb/ folder",
             "missing": "no such run directory", "file.txt": "not a directory"}
    for name, message in cases.items():
        assert main(["report", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}: ") and message in err, err
        assert len(err.strip().splitlines()) == 1


def test_a_resumed_runs_event_file_sorts_after_the_earlier_one(tmp_path):
    """Two writers started by one process in the same second must not be read out of order
    (writer counter 10 sorts before 9 as text)."""
    import time

    from gensuite.logger import wait_for_later_event_file_name

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now + 1:010d}.host.1.9").write_bytes(b"")
    wait_for_later_event_file_name(tmp_path)
    assert int(time.time()) >= now + 2
    later = f"events.out.tfevents.{int(time.time()):010d}.host.1.10"
    assert sorted([later, f"events.out.tfevents.{now + 1:010d}.host.1.9"])[-1] == later
