"""The comparison of several runs (a sweep root, or runs given together): a sub-report per run, the
final metrics against the settings that differ (also as CSV), the runs' last sample grids side by side
with their sharpness and clf_fid, and every curve overlaid.
"""

from __future__ import annotations

import csv
from pathlib import Path

from gensuite.report.page import Link, Page, _figure_section, _fmt, _rel, grids_side_by_side, report_run
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
