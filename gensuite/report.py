"""``gensuite report``: a folder of curves, sample GIFs, tables and an index page for finished runs.

Everything comes from a run's TensorBoard event files (``tb/``) and its ``config.yaml``: scalars
become loss and evaluation curves and the final-metrics table, logged images (``samples/*``,
``figures/*``) become one PNG per step plus an animated GIF, and the job rebuilds the networks for
the architecture table. Several runs, or a sweep root (a folder of run directories), also get a
comparison page: final metrics against the settings that differ, and every curve overlaid.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gensuite.config import JobConfig, load_job, to_dict
from gensuite.errors import GensuiteError
from gensuite.logger import flatten, hparams_of, write_gif

NAMESPACES = ("lr", "perf", "eval", "final")  # scalar tags that are not a player's loss terms
SPLITS = ("train", "validation", "test")  # eval/<split>_<value> prefixes (classification)


# -- networks: shared with ``gensuite summary`` ---------------------------------------------------


def job_data_spec(job: JobConfig):
    """The data the job's networks are shaped for: its shard manifest, else the dataset's static facts."""
    from gensuite.data.shards import data_spec, read_manifest, static_data_spec

    try:
        return data_spec(read_manifest(Path(job.data.root) / job.data.dataset))
    except GensuiteError:  # no shards (yet, or here): the dataset's static facts are enough to build networks
        return static_data_spec(job.data.dataset)


def network_summary(job: JobConfig, spec=None) -> dict[str, dict[str, Any]]:
    """Each network the job trains, built as the trainer builds it: parameter counts and ``str(module)``."""
    import torch

    from gensuite.registry import get_family

    family = get_family(job.family)(job.model, spec if spec is not None else job_data_spec(job))
    torch.manual_seed(job.train.seed)
    trained = {n for player in family.players() for n in player.networks}  # the rest are frozen (StackGAN's G1)
    return {
        name: {"parameters": sum(p.numel() for p in net.parameters()),
               "trainable": sum(p.numel() for p in net.parameters()) if name in trained else 0,
               "architecture": str(net)}
        for name, net in family.build_networks().items()
    }


def run_data_spec(run_dir: Path, job: JobConfig):
    """The shape the run trained on, from its latest checkpoint (memory-mapped), else as for the job."""
    import torch

    from gensuite import checkpoint as ckpt
    from gensuite.sampling import data_spec_from_state

    path = ckpt.latest_checkpoint(run_dir)
    if path is not None:
        try:
            return data_spec_from_state(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception:  # unreadable or older checkpoint: fall back on the shards
            pass
    return job_data_spec(job)


# -- reading a run --------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "tb").is_dir()


def find_runs(path: Path) -> tuple[list[Path], list[str]]:
    """The run directories ``path`` stands for (itself, or a sweep root's tasks) and tasks not started yet."""
    if not path.exists():
        raise GensuiteError(f"{path}: no such run directory")
    if not path.is_dir():
        raise GensuiteError(f"{path}: not a directory; give a run directory (config.yaml + tb/) or a sweep root")
    if is_run_dir(path):
        return [path], []
    children = sorted(c for c in path.iterdir() if c.is_dir())
    runs = [c for c in children if is_run_dir(c)]
    if runs:
        pending = [c.name for c in children if (c / "config.yaml").is_file() and c not in runs]
        submission = path / "submission.json"  # a SLURM sweep: tasks that have not written a thing yet
        if submission.is_file():
            try:
                tasks = json.loads(submission.read_text()).get("tasks", [])
            except (ValueError, AttributeError):
                tasks = []
            pending += [t["name"] for t in tasks if isinstance(t, dict) and t.get("name")
                        and not (path / t["name"]).exists()]
        return runs, pending
    if (path / "config.yaml").is_file():
        raise GensuiteError(f"{path}: no tb/ folder of TensorBoard event files; has the run started?")
    if (path / "tb").is_dir():
        raise GensuiteError(f"{path}: no config.yaml next to tb/; not a gensuite run directory")
    raise GensuiteError(f"{path}: not a run directory (no config.yaml, no tb/) and no sub-directory is one "
                        f"(not a sweep root)")


def _by_step(pairs) -> list[tuple[int, Any]]:
    """One value per step, the last one written (a resumed run may log a step twice), in step order."""
    out: dict[int, Any] = {}
    for step, value in pairs:
        out[step] = value
    return sorted(out.items())


@dataclass
class RunLog:
    """What a report shows about one run: its job and everything its event files hold."""

    run_dir: Path
    job: JobConfig
    event_files: int
    scalars: dict[str, list[tuple[int, float]]]
    images: dict[str, list[tuple[int, bytes]]]
    texts: dict[str, list[tuple[int, str]]]
    label: str = ""
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def players(self) -> dict[str, list[str]]:
        """``{player: [its scalar tags]}`` for the loss terms (``G/loss``, ``D/loss_real``, ``model/kl``)."""
        out: dict[str, list[str]] = {}
        for tag in self.scalars:
            head = tag.split("/", 1)[0]
            if "/" in tag and head not in NAMESPACES:
                out.setdefault(head, []).append(tag)
        return out

    @property
    def eval_tags(self) -> list[str]:
        return [t for t in self.scalars if t.startswith("eval/")]

    @property
    def last_step(self) -> int:
        steps = [s[-1][0] for s in [*self.scalars.values(), *self.images.values()] if s]
        return max(steps, default=0)

    def final(self) -> dict[str, tuple[int, float]]:
        """The last ``(step, value)`` of every eval/ scalar, then of every loss term."""
        tags = self.eval_tags + [t for tags in self.players.values() for t in tags]
        return {t: self.scalars[t][-1] for t in tags if self.scalars[t]}


def read_run(run_dir: Path) -> RunLog:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    files = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
    if not files:
        raise GensuiteError(f"{run_dir / 'tb'}: no TensorBoard event files; has the run logged anything yet?")
    job = load_job(run_dir / "config.yaml")
    # One accumulator over the folder reads every file of a resumed run in order and drops what a
    # crashed run logged past the checkpoint it resumed from (purge_step).
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: _by_step((e.step, e.value) for e in acc.Scalars(t))
               for t in tags["scalars"] if not t.startswith("final/")}  # final/ repeats the last values
    images = {t: _by_step((e.step, e.encoded_image_string) for e in acc.Images(t)) for t in tags["images"]}
    texts = {t.removesuffix("/text_summary"): _by_step(
                 (e.step, b"\n".join(e.tensor_proto.string_val).decode("utf-8", "replace")) for e in acc.Tensors(t))
             for t in tags["tensors"] if t.endswith("/text_summary")}
    return RunLog(run_dir, job, len(files), scalars, images, texts, label=run_dir.name)


# -- pages: one small block model, rendered as Markdown and as HTML -------------------------------


@dataclass
class Link:
    text: str
    href: str


@dataclass
class Img:
    alt: str
    src: str



def _figure_section(page, heading: str, figures: dict[str, Path], folder: Path) -> None:
    """A heading and each figure as a link plus the image; nothing when there are none."""
    if figures:
        page.heading(heading)
        for title, png in figures.items():
            page.para(Link(title, _rel(png, folder)))
            page.para(Img(title, _rel(png, folder)))

def _parts(parts) -> list:
    return list(parts) if isinstance(parts, (list, tuple)) else [parts]


def _md(parts) -> str:
    out = []
    for p in _parts(parts):
        if isinstance(p, Link):
            out.append(f"[{p.text}]({quote(p.href)})")
        elif isinstance(p, Img):
            out.append(f"![{p.alt}]({quote(p.src)})")
        else:
            out.append(str(p))
    return "".join(out)


def _html(parts) -> str:
    out = []
    for p in _parts(parts):
        if isinstance(p, Link):  # the HTML pages link to each other
            href = p.href.removesuffix("index.md") + "index.html" if p.href.endswith("index.md") else p.href
            out.append(f'<a href="{escape(quote(href))}">{escape(p.text)}</a>')
        elif isinstance(p, Img):
            out.append(f'<img src="{escape(quote(p.src))}" alt="{escape(p.alt)}" title="{escape(p.alt)}">')
        else:
            out.append(escape(str(p)).replace("`", ""))
    return "".join(out)


class Page:
    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def para(self, *parts) -> None:
        self.blocks.append(("p", parts))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        if rows:
            self.blocks.append(("table", headers, rows))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif kind == "p":
                lines += [_md(block[1]), ""]
            elif kind == "table":
                cell = lambda c: _md(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                lines.append("| " + " | ".join(block[1]) + " |")
                lines.append("|" + "|".join("---" for _ in block[1]) + "|")
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block[2]]
                lines.append("")
            else:
                lines += ["```", block[1], "```", ""]
        return "\n".join(lines)

    def html(self) -> str:
        body = [f"<h1>{escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_html(block[1])}</p>")
            elif kind == "table":
                head = "".join(f"<th>{escape(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{_html(c)}</td>" for c in row) + "</tr>" for row in block[2])
                body.append(f"<table><tr>{head}</tr>{rows}</table>")
            else:
                body.append(f"<pre>{escape(block[1])}</pre>")
        style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
                 "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
                 "img{max-width:100%;vertical-align:top;margin:2px}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

    def write(self, folder: Path) -> Path:
        (folder / "index.html").write_text(self.html())
        index = folder / "index.md"
        index.write_text(self.markdown())
        return index


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


def _save(fig, path: Path, title: str) -> None:
    if any(len(line.get_xdata()) >= 8 for ax in fig.axes for line in ax.get_lines()):
        title += " (faint: raw; line: smoothed)"
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def eval_groups(names: list[str], default_split: str) -> dict[str, dict[str, str]]:
    """``{stem: {split: name}}``: ``accuracy``, ``validation_accuracy``, ``train_accuracy`` share one axes."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        head, _, rest = name.partition("_")
        split, stem = (head, rest) if head in SPLITS and rest else (default_split, name)
        group = groups.setdefault(stem, {})
        group[split if split not in group else name] = name
    return groups


def curve_figures(run: RunLog, folder: Path) -> dict[str, Path]:
    """``{title: png}``: one figure per player (every term), the eval metrics, learning rates and throughput."""
    out = {}
    for player, tags in run.players.items():
        fig, axes = _panels(len(tags))
        for ax, tag in zip(axes, tags):
            _plot(ax, run.scalars[tag], None)
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("step")
        out[f"{player} (train)"] = folder / f"loss-{_safe(player)}.png"
        _save(fig, out[f"{player} (train)"], f"{player}: training terms")
    names = [t.removeprefix("eval/") for t in run.eval_tags]
    if names:
        groups = eval_groups(names, run.job.eval.split)
        fig, axes = _panels(len(groups))
        for ax, (stem, splits) in zip(axes, groups.items()):
            for split, name in sorted(splits.items(), key=lambda kv: SPLITS.index(kv[0]) if kv[0] in SPLITS else 9):
                _plot(ax, run.scalars[f"eval/{name}"], split if len(splits) > 1 else None)
            ax.set_title(f"eval/{stem}", fontsize=9)
            ax.set_xlabel("step")
            if len(splits) > 1:
                ax.legend(fontsize=8)
        out["evaluation"] = folder / "eval.png"
        _save(fig, out["evaluation"], "evaluation metrics")
    other = [t for t in run.scalars if t.split("/", 1)[0] in ("lr", "perf")]
    if other:
        fig, axes = _panels(len(other))
        for ax, tag in zip(axes, other):
            _plot(ax, run.scalars[tag], None)
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("step")
        out["learning rates and throughput"] = folder / "schedule.png"
        _save(fig, out["learning rates and throughput"], "learning rates and throughput")
    return out


def overlay_figures(runs: list[RunLog], folder: Path) -> dict[str, Path]:
    """Every loss term and eval metric with one line per run, grouped as in a run's own figures."""
    import matplotlib

    groups: dict[str, list[str]] = {}
    for run in runs:
        for player, tags in run.players.items():
            groups.setdefault(f"loss-{player}", [])
            groups[f"loss-{player}"] += [t for t in tags if t not in groups[f"loss-{player}"]]
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


# -- one run's report -------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value)


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def report_run(run: RunLog, folder: Path, home: Link | None = None) -> Path:
    """Write ``folder/index.md`` (and everything it shows) for one run; returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    job = run.job
    run.networks = network_summary(job, run_data_spec(run.run_dir, job))
    final = run.final()
    page = Page(f"{job.name or run.label}: {job.family}/{job.flavor} on {job.data.dataset}")
    if home is not None:
        page.para("← ", home)
    page.para(f"Run directory `{run.run_dir.resolve()}`, last logged step {run.last_step}; built from "
              f"{run.event_files} TensorBoard event file(s) in tb/ and config.yaml.")

    images = write_images(run, folder)
    confusion = {t: v for t, v in images.items() if t.startswith("figures/confusion_")}
    if confusion:
        page.heading("Confusion matrices")
        for tag, files in confusion.items():
            step, png = files["pngs"][-1]
            page.para(Link(f"{tag.removeprefix('figures/')} (step {step})", _rel(png, folder)))
            page.para(Img(f"{tag} at step {step}", _rel(png, folder)))

    page.heading("Final metrics")
    page.table(["metric", "value", "step"], [[f"`{t}`", _fmt(v), s] for t, (s, v) in final.items()])
    if not final:
        page.para("No scalars logged yet.")

    _figure_section(page, "Curves", curve_figures(run, folder / "curves"), folder)

    if images:  # every image tag, the confusion matrices last
        page.heading("Samples and figures")
    for tag, files in sorted(images.items(), key=lambda kv: kv[0] in confusion):
        step, png = files["pngs"][-1]
        page.heading(f"{tag}", 3)
        if files["gif"] is not None:
            page.para(Img(f"{tag}: steps {files['pngs'][0][0]} to {step}", _rel(files["gif"], folder)), " ",
                      Img(f"{tag} at step {step}", _rel(png, folder)))
            page.para("Animation: ", Link(_rel(files["gif"], folder), _rel(files["gif"], folder)))
        else:
            page.para(Img(f"{tag} at step {step}", _rel(png, folder)))
        steps = [part for s, p in files["pngs"] for part in (" · ", Link(str(s), _rel(p, folder)))][1:]
        page.para("Steps: ", *steps)

    page.heading("Networks")
    (folder / "architecture.txt").write_text("".join(
        f"== {name}: {info['parameters']:,} parameters ({info['trainable']:,} trainable)\n{info['architecture']}\n\n"
        for name, info in run.networks.items()))
    total = sum(i["parameters"] for i in run.networks.values())
    page.table(["network", "parameters", "trainable"],
               [[n, f"{i['parameters']:,}", f"{i['trainable']:,}"] for n, i in run.networks.items()]
               + [["total", f"{total:,}", f"{sum(i['trainable'] for i in run.networks.values()):,}"]])
    page.para("Architectures: ", Link("architecture.txt", "architecture.txt"))

    protocol = run.texts.get("eval/protocol")
    if protocol:
        page.heading("Evaluation protocol")
        page.para(protocol[-1][1])

    page.heading("Hyperparameters")
    hparams = hparams_of(job)
    page.table(["key", "value"], [[f"`{k}`", str(v)] for k, v in hparams.items()])
    (folder / "summary.json").write_text(json.dumps({
        "run_dir": str(run.run_dir.resolve()), "job": job.name, "family": job.family, "flavor": job.flavor,
        "last_step": run.last_step, "final": {t: {"step": s, "value": v} for t, (s, v) in final.items()},
        "networks": {n: {k: i[k] for k in ("parameters", "trainable")} for n, i in run.networks.items()},
        "hparams": hparams}, indent=2))
    page.para("Machine-readable: ", Link("summary.json", "summary.json"), "; config: ",
              Link("config.yaml", _relpath(run.run_dir / "config.yaml", folder)))
    return page.write(folder)


def _relpath(target: Path, folder: Path) -> str:
    return Path(os.path.relpath(target.resolve(), folder.resolve())).as_posix()


# -- several runs ---------------------------------------------------------------------------------------


def swept_values(jobs: list[JobConfig]) -> dict[str, list[Any]]:
    """``{key: [value per run]}`` for every job setting that is not the same in all runs."""
    skip = {"name", "launch", "sweep"}
    if len({j.family for j in jobs}) > 1:  # other families' model settings do not line up: family/flavor say it
        skip.add("model")
    flat = [{k: v for k, v in flatten(to_dict(j)).items() if k.split(".")[0] not in skip} for j in jobs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1}


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
