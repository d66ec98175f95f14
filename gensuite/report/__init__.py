"""``gensuite report``: a folder of curves, sample GIFs, tables and an index page for finished runs.

Everything comes from a run's TensorBoard event files (``tb/``) and its ``config.yaml``: scalars
become loss and evaluation curves and the final-metrics table, logged images (``samples/*``,
``figures/*``) become one PNG per step plus an animated GIF, and the job rebuilds the networks for
the architecture table. Several runs, or a sweep root (a folder of run directories), also get a
comparison page: final metrics against the settings that differ, and every curve overlaid.
"""

from __future__ import annotations

from pathlib import Path

from gensuite.report.page import Img, Link, Page, report_run
from gensuite.report.plots import curve_figures, overlay_figures, write_images
from gensuite.report.runs import (NAMESPACES, SPLITS, RunLog, eval_groups, find_runs, is_run_dir,
                                  job_data_spec, network_summary, read_run, run_data_spec, swept_values)
from gensuite.report.sweep import _unique_labels, report_runs

__all__ = [
    "NAMESPACES", "SPLITS", "Img", "Link", "Page", "RunLog", "curve_figures", "eval_groups", "find_runs",
    "is_run_dir", "job_data_spec", "network_summary", "overlay_figures", "read_run", "report_run",
    "report_runs", "run_data_spec", "swept_values", "write_images", "write_report",
]


def write_report(paths: list[str | Path], out: str | Path | None = None) -> Path:
    """The report of one run, or of several runs / sweep roots with a comparison page; returns index.md."""
    found = [find_runs(Path(p)) for p in paths]
    run_dirs = [r for runs, _ in found for r in runs]
    pending = [name for _, p in found for name in p]
    if len(paths) == 1 and run_dirs == [Path(paths[0])]:
        return report_run(read_run(run_dirs[0]), Path(out) if out else run_dirs[0] / "report")
    folder = Path(out) if out else Path(paths[0]) / "report" if len(paths) == 1 else Path("report")
    runs = [read_run(r) for r in run_dirs]
    _unique_labels(runs)
    names = list(dict.fromkeys(r.job.name for r in runs))
    title = (f"Sweep {names[0]}" if len(names) == 1 else "Comparison") + f": {len(runs)} runs"
    return report_runs(runs, folder, title, pending)
