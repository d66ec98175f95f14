"""The comparison of several runs (a sweep root, or runs given together): a sub-report per run, where
runs logged clf_fid (images) or mmd (points) a leaderboard sorted by it (each row with its sample grid,
cost and provenance), the final metrics against the settings that differ (also as CSV), the runs' last
sample grids side by side with their sharpness and clf_fid, and every curve overlaid.
"""

from __future__ import annotations

import csv
from pathlib import Path

import math

from gensuite.report.page import (Img, Link, Page, _figure_section, _fmt, _rel, grids_side_by_side,
                                  latest_grid, report_run)
from gensuite.report.plots import _safe, overlay_figures
from gensuite.report.runs import RunLog, swept_values


# -- several runs ---------------------------------------------------------------------------------------


def report_runs(runs: list[RunLog], folder: Path, title: str, pending: list[str]) -> Path:
    """A sub-report per run under ``folder/<label>/`` and the comparison page ``folder/index.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    home = Link("comparison of all runs", "../index.md")
    indexes = [report_run(run, folder / run.label, home) for run in runs]
    swept = swept_values([r.job for r in runs])
    finals = [r.final() for r in runs]
    metrics = list(dict.fromkeys(t for f in finals for t in f if t.startswith("eval/")))
    metrics += list(dict.fromkeys(t for f in finals for t in f if not t.startswith("eval/")))
    page = Page(title)
    page.para(f"{len(runs)} runs; each links to its own report. Columns: the settings that differ between "
              f"runs, then the last logged value of every eval metric and loss term.")
    rows = [[Link(r.label, _rel(i, folder)), *[_fmt(swept[k][n]) for k in swept], r.last_step,
             *[_fmt(f[m][1]) if m in f else "—" for m in metrics]]
            for n, (r, i, f) in enumerate(zip(runs, indexes, finals))]
    leaderboard(page, runs, indexes, folder)
    page.heading("Final metrics")
    page.table(["run", *[f"`{k}`" for k in swept], "step", *[f"`{m}`" for m in metrics]], rows)
    with open(folder / "comparison.csv", "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["run", *swept, "step", *metrics])
        table.writerows([r.label, *[swept[k][n] for k in swept], r.last_step,
                         *[fin[m][1] if m in fin else "" for m in metrics]]
                        for n, (r, fin) in enumerate(zip(runs, finals)))
    page.para("As CSV: ", Link("comparison.csv", "comparison.csv"))
    grids_side_by_side(page, runs, [folder / r.label for r in runs], folder)
    if pending:
        page.para("Not started or nothing logged yet: " + ", ".join(pending))
    _figure_section(page, "Curves of all runs", overlay_figures(runs, folder / "comparison"), folder)
    page.heading("Runs")
    for run, index in zip(runs, indexes):
        page.para(Link(run.label, _rel(index, folder)), f": `{run.run_dir.resolve()}`")
    return page.write(folder)


# -- the leaderboard: one protocol, runs of any family ranked by clf_fid (images) or mmd (points) -------

POINTS_TAG = "figures/samples"  # the families' scatter plot of generated points
LEADERBOARD = ["rank", "run", "model", "clf_fid", "precision", "recall", "cond_acc", "mmd", "bits/dim", "nll", "bound", "samples/s",
               "parameters", "train s", "steps", "seed", "budget min", "commit"]
# left out of the table (never the CSV) when no row has them: an image board has no mmd, a points board no clf_fid
MEASURES = ("clf_fid", "precision", "recall", "cond_acc", "mmd", "bits/dim", "nll", "bound")
RANKED_BY = {"clf_fid": "`clf_fid` (classifier-feature FID of generated samples, lower is better)",
             "mmd": "`mmd` (unbiased MMD² between generated and held-out points under a sum of Gaussian kernels, "
                    "see each run's protocol; lower is better, 0 in expectation for the data's distribution)"}
COLUMN_NOTES = {
    "precision": "the fraction of generated samples inside the real samples' k-NN manifold (k = 3) in the "
                 "classifier's features (Kynkäänniemi et al. 2019; fidelity)",
    "recall": "the fraction of real samples inside the generated samples' k-NN manifold (coverage)",
    "cond_acc": "how often a sample drawn for class k is classified as k (conditional models)",
    "bits/dim": "the tightest likelihood bound logged (`bound` names it), where the family has one",
    "nll": "the negative of the tightest log-likelihood bound logged (`bound` names it), in nats per point, where "
           "the family has one",
    "samples/s": "generated samples per second at evaluation", "train s": "seconds spent in training steps",
    "budget min": "`train.time_budget_min`", "commit": "the git commit the run trained at"}


def leaderboard_rows(runs: list[RunLog]) -> list[dict]:
    """One row per run that logged ``eval/clf_fid`` (images) or ``eval/mmd`` (points), best (lowest) first by
    clf_fid where any run has it, else by mmd: its quality, likelihood (the lowest ``eval/*_bpd``: the tightest
    bound or the exact value; as bits/dim for images, as nats per point for points, the 2-D literature's unit),
    sampling speed, size, training time and the seed, time budget and git commit it ran with. Parameters need
    ``report_run`` first."""
    rows = []
    for run in runs:
        final = run.final()
        points = "eval/mmd" in final
        if "eval/clf_fid" not in final and not points:
            continue
        bpd = sorted((v, t.removeprefix("eval/").removesuffix("_bpd")) for t, (_, v) in final.items()
                     if t.endswith("_bpd") and math.isfinite(v))
        seconds = run.scalars.get("perf/train_seconds")
        commits = list(dict.fromkeys(text for _, text in run.texts.get("run/git_commit", [])))
        rows.append({
            "run": run.label, "model": f"{run.job.family}/{run.job.flavor}",
            "clf_fid": final.get("eval/clf_fid", (0, None))[1],
            "precision": final.get("eval/clf_precision", (0, None))[1],
            "recall": final.get("eval/clf_recall", (0, None))[1],
            "cond_acc": final.get("eval/cond_acc", (0, None))[1],
            "mmd": final.get("eval/mmd", (0, None))[1], "bits/dim": bpd[0][0] if bpd and not points else None,
            "nll": -final[f"eval/{bpd[0][1]}"][1] if bpd and points else None, "bound": bpd[0][1] if bpd else None,
            "samples/s": final.get("eval/sampling_samples_per_sec", (0, None))[1],
            "parameters": sum(i["parameters"] for i in run.networks.values()) if run.networks else None,
            "train s": seconds[-1][1] if seconds else None, "steps": run.last_step, "seed": run.job.train.seed,
            "budget min": run.job.train.time_budget_min, "commit": " ".join(commits) or None})
    by = ranked_by(rows)
    rows.sort(key=lambda r: (r[by] is None or not math.isfinite(r[by]),
                             r[by] if r[by] is not None and math.isfinite(r[by]) else 0.0))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def ranked_by(rows: list[dict]) -> str:
    return "clf_fid" if any(row["clf_fid"] is not None for row in rows) else "mmd"


def leaderboard(page: Page, runs: list[RunLog], indexes: list[Path], folder: Path) -> None:
    """The leaderboard table (also ``leaderboard.csv``), each row with the run's last sample grid beside
    it; nothing when no run logged clf_fid or mmd."""
    rows = leaderboard_rows(runs)
    if not rows:
        return
    by_label = {r.label: (r, i) for r, i in zip(runs, indexes)}
    page.heading("Leaderboard")
    columns = [k for k in LEADERBOARD if k not in MEASURES or any(row[k] is not None for row in rows)]
    notes = "; ".join(f"`{k}`: {COLUMN_NOTES[k]}" for k in columns if k in COLUMN_NOTES)
    page.para(f"Runs ranked by {RANKED_BY[ranked_by(rows)]}, all scored by the same evaluation protocol (see each "
              f"run's report). {notes}.")
    table = []
    for row in rows:
        run, index = by_label[row["run"]]
        # images: the sample grid; points: the samples' scatter figure
        grid = latest_grid(run, folder / run.label) or latest_grid(run, folder / run.label, POINTS_TAG)
        cells = [Link(row["run"], _rel(index, folder)) if k == "run" else _cell(k, row[k]) for k in columns]
        table.append([*cells, Img(f"{run.label}: samples at step {grid[0]}", _rel(grid[1], folder))
                      if grid else "—"])
    page.table([*columns, "samples"], table)
    with open(folder / "leaderboard.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(LEADERBOARD)
        out.writerows([["" if row[k] is None else row[k] for k in LEADERBOARD] for row in rows])
    page.para("As CSV: ", Link("leaderboard.csv", "leaderboard.csv"))


def _cell(key: str, value) -> str:
    if value is None:
        return "—"
    if key == "parameters":
        return f"{value:,}"
    if key == "commit":  # short hashes; several when the run was resumed at another commit
        return " ".join(c[:12] + "+dirty" * c.endswith("+dirty") for c in value.split())
    return _fmt(value)


def _unique_labels(runs: list[RunLog]) -> None:
    seen: set[str] = {"comparison"}
    for run in runs:
        base = _safe(run.label) or "run"
        label, n = base, 1
        while label in seen:
            n += 1
            label = f"{base}-{n}"
        run.label = label
        seen.add(label)
