"""Report pages: a small block model (headings, paragraphs of text, ``Link`` and ``Img``, tables,
preformatted text) rendered as Markdown and as HTML, its formatting helpers, and the single-run page
``report_run`` built with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gensuite.logger import hparams_of
from gensuite.report.plots import _safe, curve_figures, write_images
from gensuite.report.runs import RunLog, network_summary, run_data_spec


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


# -- several runs: their latest sample grids side by side ------------------------------------------

GRID_TAG = "samples/samples"
GRID_VALUES = ("eval/sharpness", "eval/sharpness_real", "eval/sharpness_ratio", "eval/clf_fid")


def latest_grid(run: RunLog, run_folder: Path, tag: str = GRID_TAG) -> tuple[int, Path] | None:
    """(step, PNG) of the run's last ``tag`` image as ``write_images`` wrote it under ``run_folder``."""
    frames = run.images.get(tag)
    if not frames:
        return None
    step = frames[-1][0]
    base = run_folder / "/".join(_safe(part) for part in tag.split("/"))
    png = base.parent / f"{base.name}-step{step}.png"
    return (step, png) if png.is_file() else None


def grids_side_by_side(page: Page, runs: list[RunLog], folders: list[Path], folder: Path) -> None:
    """One column per run: its latest sample grid, the step, then its sharpness values and clf_fid
    where logged (``GRID_VALUES``); nothing when no run logged a grid."""
    grids = [latest_grid(run, f) for run, f in zip(runs, folders)]
    if not any(grids):
        return
    finals = [run.final() for run in runs]
    rows = [["grid", *[Img(f"{r.label}: {GRID_TAG} at step {g[0]}", _rel(g[1], folder)) if g else "—"
                       for r, g in zip(runs, grids)]],
            ["step", *[g[0] if g else "—" for g in grids]]]
    rows += [[f"`{tag}`", *[_fmt(f[tag][1]) if tag in f else "—" for f in finals]]
             for tag in GRID_VALUES if any(tag in f for f in finals)]
    page.heading("Samples side by side")
    page.para(f"Each run's last `{GRID_TAG}` grid. `sharpness` is the mean variance of the 3×3 Laplacian of "
              f"generated samples, `sharpness_real` the same on the evaluation split, `sharpness_ratio` their "
              f"ratio (below 1: blurrier than the data).")
    page.table(["", *[r.label for r in runs]], rows)
