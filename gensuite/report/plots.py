"""The report's matplotlib figures (a run's loss, eval and schedule curves, each loss term's training
and validation curves on one axes; every run's curves overlaid) and the images a run logged, written
out as one PNG per step plus an animated GIF. Each of a run's figures comes with its plotted series as
JSON beside the PNG (``loss-<player>.json``: panel -> label -> [[step, value], ...]).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gensuite.logger import write_gif
from gensuite.report.runs import SPLITS, VALIDATION, RunLog, eval_groups


# -- figures ----------------------------------------------------------------------------------------


def _smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's de-biased exponential moving average."""
    out, last, n = [], 0.0, 0
    for v in values:
        last, n = last * weight + (1 - weight) * v, n + 1
        out.append(last / (1 - weight ** n))
    return out


def _plot(ax, series: list[tuple[int, float]], label: str | None, color=None) -> None:
    steps, values = [s for s, _ in series], [v for _, v in series]
    if len(series) >= 8:  # raw, faint; smoothed on top
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(steps, _smooth(values), color=color, linewidth=1.5, label=label)
    else:
        ax.plot(steps, values, color=color, marker="o", markersize=3, linewidth=1.2, label=label)


def _panels(n: int):
    from matplotlib.figure import Figure

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: Path, title: str, data: dict[str, dict[str, list]] | None = None) -> None:
    """The figure as PNG and, with ``data`` ({panel: {label: [(step, value), ...]}}), what it plots as JSON."""
    if any(len(line.get_xdata()) >= 8 for ax in fig.axes for line in ax.get_lines()):
        title += " (faint: raw; line: smoothed)"
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    if data is not None:
        path.with_suffix(".json").write_text(json.dumps(
            {"title": title, "panels": {p: {k: [list(pair) for pair in v] for k, v in series.items()}
                                        for p, series in data.items()}}))


TRAIN_COLOR, VALIDATION_COLOR = "C0", "C1"


def curve_figures(run: RunLog, folder: Path) -> dict[str, Path]:
    """``{title: png}``: one figure per player (every term: its training curve and, where logged, its
    validation curve on the same axes), the eval metrics, learning rates and throughput."""
    out = {}
    for player, tags in run.loss_panels.items():
        fig, axes = _panels(len(tags))
        data: dict[str, dict[str, list]] = {}
        for ax, tag in zip(axes, tags):
            series = {label: run.scalars[t] for label, t in (("train", tag), ("validation", VALIDATION + tag))
                      if run.scalars.get(t)}
            for label, points in series.items():
                _plot(ax, points, label, TRAIN_COLOR if label == "train" else VALIDATION_COLOR)
            if len(series) > 1:
                ax.legend(fontsize=8)
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("step")
            data[tag] = series
        validated = any("validation" in series for series in data.values())
        title = f"{player} (train and validation)" if validated else f"{player} (train)"
        out[title] = folder / f"loss-{_safe(player)}.png"
        _save(fig, out[title], f"{player}: training and validation terms" if validated else f"{player}: training terms",
              data)
    names = [t.removeprefix("eval/") for t in run.eval_tags]
    if names:
        groups = eval_groups(names, run.job.eval.split)
        fig, axes = _panels(len(groups))
        data = {}
        for ax, (stem, splits) in zip(axes, groups.items()):
            data[f"eval/{stem}"] = {}
            for split, name in sorted(splits.items(), key=lambda kv: SPLITS.index(kv[0]) if kv[0] in SPLITS else 9):
                _plot(ax, run.scalars[f"eval/{name}"], split if len(splits) > 1 else None)
                data[f"eval/{stem}"][split] = run.scalars[f"eval/{name}"]
            ax.set_title(f"eval/{stem}", fontsize=9)
            ax.set_xlabel("step")
            if len(splits) > 1:
                ax.legend(fontsize=8)
        out["evaluation"] = folder / "eval.png"
        _save(fig, out["evaluation"], "evaluation metrics", data)
    other = [t for t in run.scalars if t.split("/", 1)[0] in ("lr", "perf")]
    if other:
        fig, axes = _panels(len(other))
        for ax, tag in zip(axes, other):
            _plot(ax, run.scalars[tag], None)
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("step")
        out["learning rates and throughput"] = folder / "schedule.png"
        _save(fig, out["learning rates and throughput"], "learning rates and throughput",
              {tag: {tag: run.scalars[tag]} for tag in other})
    return out


def overlay_figures(runs: list[RunLog], folder: Path) -> dict[str, Path]:
    """Every loss term and eval metric with one line per run, grouped as in a run's own figures."""
    import matplotlib

    groups: dict[str, list[str]] = {}
    for run in runs:
        for player, tags in run.loss_panels.items():  # each term, then its validation curve
            groups.setdefault(f"loss-{player}", [])
            groups[f"loss-{player}"] += [t for tag in tags for t in (tag, VALIDATION + tag)
                                         if t in run.scalars and t not in groups[f"loss-{player}"]]
        if run.eval_tags:
            groups.setdefault("eval", [])
            groups["eval"] += [t for t in run.eval_tags if t not in groups["eval"]]
    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    out = {}
    for name, tags in groups.items():
        fig, axes = _panels(len(tags))
        for ax, tag in zip(axes, tags):
            for i, run in enumerate(runs):
                if run.scalars.get(tag):
                    _plot(ax, run.scalars[tag], run.label, cmap(i % cmap.N))
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("step")
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=7)
        out[name] = folder / f"{_safe(name)}.png"
        _save(fig, out[name], f"{name.removeprefix('loss-')}: all runs")
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._=,+-" else "_" for c in name)


def write_images(run: RunLog, folder: Path) -> dict[str, dict[str, Any]]:
    """Each image tag's every step as ``<tag>-step<N>.png`` and their progression as ``<tag>.gif``."""
    out = {}
    for tag, frames in run.images.items():
        base = folder / "/".join(_safe(part) for part in tag.split("/"))
        base.parent.mkdir(parents=True, exist_ok=True)
        pngs = []
        for step, data in frames:
            png = base.parent / f"{base.name}-step{step}.png"
            png.write_bytes(data)  # TensorBoard stores the PNG itself
            pngs.append((step, png))
        gif = None
        if len(frames) >= 2:
            gif = base.parent / f"{base.name}.gif"
            write_gif(frames, gif)
        out[tag] = {"pngs": pngs, "gif": gif}
    return out
