"""Rank-0 run output: progress bar, TensorBoard scalars/images/text/hparams and PNG sample grids."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gensuite.checkpoint import writing
from gensuite.config import JobConfig, dump_yaml, to_dict
from gensuite.errors import GensuiteError


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit(folder: Path | None = None) -> str:
    """The commit of the gensuite checkout that runs (``+dirty``: tracked files changed since), or ``unknown``."""
    folder = folder or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        lines = head.stdout.split()
        # an installed copy inside some other repository (a virtual environment's) is not that repository's code
        if head.returncode or len(lines) != 2 or Path(lines[0]).resolve() != folder.parent:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return lines[1] + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def hparams_of(job: JobConfig) -> dict[str, Any]:
    """Scalar job settings for TensorBoard's HParams view (lists become strings)."""
    flat = flatten({k: v for k, v in to_dict(job).items() if k not in ("launch", "sweep", "eval")})
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def _quiet_event_writer_failures(previous):
    """TensorBoard's writer thread re-raises a failed write (a full disk) after storing it, and the
    thread's default hook prints that traceback into the run's log. The stored error surfaces at the
    writer's next call, where the logger turns it into one line; only the thread's copy is dropped."""

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    return hook


threading.excepthook = _quiet_event_writer_failures(threading.excepthook)


def wait_for_later_event_file_name(tb_dir: Path) -> None:
    """Make the next event file sort after the existing ones.

    TensorBoard reads a folder's event files in name order, and a name is
    ``events.out.tfevents.<unix second>.<host>.<pid>.<writer counter>``: two writers started in the
    same second by one process sort by the counter as text, so writer 10 would be read before writer 9
    and a resumed run's values would be overwritten by the older ones. Waiting for the next second
    (only ever needed when a run resumes within a second, as in tests) keeps name order = time order.
    """
    latest = max((int(f.name.split(".")[3]) for f in Path(tb_dir).glob("events.out.tfevents.*")
                  if f.name.split(".")[3].isdigit()), default=-1)
    while int(time.time()) <= latest:
        time.sleep(0.05)


PROGRESS_SECONDS_ENV = "GENSUITE_PROGRESS_SECONDS"


class PlainProgress:
    """The progress bar as plain lines, for stderr that is a file (SLURM's .err log, CI, ``2> file``).

    A line (step/total, steps/s, ETA, latest losses) is printed at the first step, at a log step
    (``train.log_every``) when at least ``$GENSUITE_PROGRESS_SECONDS`` (default 30) have passed
    since the previous line, at the last step, and at a stop before the last step: the less
    frequent of the two intervals, with losses that are always a fresh log interval's means.
    """

    def __init__(self, step: int, total: int, emit: Callable[[str], None]):
        self.start, self.step, self.total, self.emit = step, step, total, emit
        try:
            self.period = float(os.environ.get(PROGRESS_SECONDS_ENV) or 30)
        except ValueError:
            raise GensuiteError(f"${PROGRESS_SECONDS_ENV}={os.environ[PROGRESS_SECONDS_ENV]!r} is not a number of "
                                f"seconds; set it to e.g. 30, or unset it") from None
        self.began = self.printed_at = time.perf_counter()
        self.printed_step = step

    def advance(self, running_losses: Callable[[], dict[str, float]]) -> None:
        self.step += 1
        if self.step == self.start + 1:
            self.line(running_losses())

    def at_log_step(self, step: int, losses: dict[str, float]) -> None:
        self.step = step
        due = time.perf_counter() - self.printed_at >= self.period or step == self.total
        if due and step != self.printed_step:
            self.line(losses)

    def close(self, running_losses: dict[str, float]) -> None:
        if self.step != self.printed_step:  # stopped early (signal, divergence): where it got to
            self.line(running_losses)

    def line(self, losses: dict[str, float]) -> None:
        now = time.perf_counter()
        rate = (self.step - self.start) / max(now - self.began, 1e-9)
        eta = _duration((self.total - self.step) / rate) if rate > 0 else "?"
        shown = "".join(f"  {tag}={value:.4g}" for tag, value in sorted(losses.items()))
        self.emit(f"step {self.step}/{self.total}  {rate:.3g} steps/s  ETA {eta}{shown}")
        self.printed_at, self.printed_step = now, self.step


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RunLogger:
    def __init__(self, run_dir: Path, job: JobConfig, enabled: bool, origin: str = ""):
        self.run_dir, self.job, self.enabled = Path(run_dir), job, enabled
        self.origin = origin or socket.gethostname()  # e.g. "node2 rank 1/2": who wrote a log line
        self.writer = None
        self.bar = None
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.samples = 0
        self.clock = time.perf_counter()
        self.lines: PlainProgress | None = None  # the bar's form when stderr is a file

    @property
    def tb_dir(self) -> Path:
        return self.run_dir / "tb"

    @property
    def samples_dir(self) -> Path:
        return self.run_dir / "samples"

    def info(self, message: str) -> None:
        """A log line from rank 0."""
        if self.enabled:
            self.say(message)

    def say(self, message: str) -> None:
        """A log line from this rank, whichever it is."""
        print(f"[gensuite {self.origin}] {message}", file=sys.stderr, flush=True)

    def start(self, trainer, resumed: bool) -> None:
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        wait_for_later_event_file_name(self.tb_dir)
        # purge_step: after a resume TensorBoard drops events the crashed run logged past the checkpoint.
        with self._events():
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=trainer.step + 1 if resumed else None)
        with self._events():
            self.writer.add_text("config", "    " + dump_yaml(self.job).replace("\n", "\n    "), trainer.step)
            self.writer.add_text("run/git_commit", git_commit(), trainer.step)  # the code that trains from here
        if self.job.log.progress_bar and sys.stderr.isatty():
            self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", dynamic_ncols=True,
                            desc=self.job.name, file=sys.stderr)
        elif self.job.log.progress_bar:  # a SLURM log, CI, `2> file`: no carriage-return redraws
            self.lines = PlainProgress(trainer.step, trainer.total_steps, self.info)
        self.clock = time.perf_counter()

    def count_samples(self, n: int) -> None:
        self.samples += n

    def add_terms(self, player: str, terms: dict[str, float | torch.Tensor]) -> None:
        """Floats, or tensors summed where they are (float64) and read at the next log step: a value
        that is only logged costs no device-to-host copy per step."""
        for key, value in terms.items():
            tag = f"{player}/{key}"
            if isinstance(value, torch.Tensor):
                value = value.detach().double()
            self.sums[tag] = self.sums.get(tag, 0.0) + value
            self.counts[tag] = self.counts.get(tag, 0) + 1

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.lines is not None:
            self.lines.advance(self._running_losses)

    def _running_losses(self) -> dict[str, float]:
        """Means of the loss terms since the last log step."""
        return {tag: float(self.sums[tag]) / self.counts[tag] for tag in self.sums if tag.endswith("/loss")}

    def scalars(self, step: int, lrs: dict[str, float], train_seconds: float | None = None) -> None:
        """Means of every loss term since the last call, learning rates, throughput and (given) the
        seconds spent in training steps so far."""
        if not self.enabled:
            self.sums.clear(), self.counts.clear()
            return
        now = time.perf_counter()
        values = {tag: float(self.sums[tag]) / self.counts[tag] for tag in self.sums}
        values.update({f"lr/{p}": lr for p, lr in lrs.items()})
        values["perf/samples_per_sec"] = self.samples / max(now - self.clock, 1e-9)
        if train_seconds is not None:
            values["perf/train_seconds"] = train_seconds
        with self._events():
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        self.last.update(values)
        self.sums.clear(), self.counts.clear()
        self.samples, self.clock = 0, now
        if self.bar is not None:
            shown = {t.split("/", 1)[0] + ":" + t.split("/", 1)[1]: f"{v:.4g}" for t, v in values.items()
                     if t.endswith("/loss")}
            self.bar.set_postfix(shown, refresh=False)
        if self.lines is not None:
            self.lines.at_log_step(step, {t: v for t, v in values.items() if t.endswith("/loss")})

    def eval_values(self, step: int, values: dict[str, Any], protocol: str | None = None) -> None:
        """Scalars as ``eval/<name>``; figures (confusion matrices) as images and PNGs."""
        if not self.enabled:
            return
        scalars = {k: v for k, v in values.items() if isinstance(v, float)}
        with self._events():
            if protocol:  # what the numbers mean, next to them
                self.writer.add_text("eval/protocol", protocol, step)
            for name, value in scalars.items():
                self.writer.add_scalar(f"eval/{name}", value, step)
                self.last[f"eval/{name}"] = value
        figures = {k: v for k, v in values.items() if k not in scalars}
        if figures:
            self.visuals(step, figures, family=None)
        self.info(f"step {step}: " + "  ".join(f"eval/{k}={v:.5g}" for k, v in scalars.items()))

    def validation_values(self, step: int, values: dict[str, float], protocol: str | None = None) -> None:
        """``{"<player>/<term>": value}`` on held-out data as ``val/<player>/<term>``, the pair of the
        training curve ``<player>/<term>``."""
        if not self.enabled:
            return
        with self._events():
            if protocol:
                self.writer.add_text("val/protocol", protocol, step)
            for name, value in values.items():
                self.writer.add_scalar(f"val/{name}", value, step)
                self.last[f"val/{name}"] = value
        shown = "  ".join(f"val/{k}={v:.5g}" for k, v in values.items() if k.endswith("/loss"))
        self.info(f"step {step}: {shown}")

    def visuals(self, step: int, visuals: dict[str, Any], family) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchvision.utils import make_grid, save_image

        self.samples_dir.mkdir(parents=True, exist_ok=True)
        for name, value in visuals.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2:  # points: show a scatter
                value = scatter(value)
            png = self.samples_dir / f"{name}-{step:08d}.png"
            if isinstance(value, torch.Tensor):
                grid = make_grid(value.float().clamp(0, 1).cpu(), nrow=family.grid_nrow(len(value)), padding=2)
                with self._events():
                    self.writer.add_image(f"samples/{name}", grid, step)
                if self.job.log.save_png:
                    with writing(png, self.run_dir):
                        save_image(grid, png)
            else:
                try:
                    if self.job.log.save_png:
                        with writing(png, self.run_dir):
                            value.savefig(png, dpi=100)
                    with self._events():
                        self.writer.add_figure(f"figures/{name}", value, step, close=True)
                finally:
                    plt.close(value)

    def finish(self, step: int) -> dict[str, float]:
        if not self.enabled:
            return {}
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"final/{tag}": v for tag, v in self.last.items()}
        with self._events():
            # Written into the run's own event file (SummaryWriter.add_hparams would start a new one).
            for summary in hparams(hparams_of(self.job), metrics):
                self.writer.file_writer.add_summary(summary, step)
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.job.log.save_png:
            write_progress_gifs(self.samples_dir, self.run_dir)
        return metrics

    @contextlib.contextmanager
    def _events(self):
        """A full disk while TensorBoard writes (in its own thread: the error surfaces at the writer's
        next call) becomes one line naming the event file. The file is kept: it holds the earlier
        events, and TensorBoard reads a file up to an incomplete last record."""
        try:
            yield
        except OSError:
            with writing(self._event_file(), self.run_dir, remove_partial=False):
                raise

    def _event_file(self) -> Path:
        event_writer = getattr(getattr(self.writer, "file_writer", None), "event_writer", None)
        path = getattr(event_writer, "_file_name", None)
        if path is None:  # failed while the writer was being made: the file this process opened
            mine = sorted(self.tb_dir.glob(f"events.out.tfevents.*.{os.getpid()}.*"))
            path = mine[-1] if mine else self.tb_dir
        return Path(path)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.lines is not None:
            self.lines.close(self._running_losses())
            self.lines = None
        if self.writer is not None:
            try:
                with self._events():
                    self.writer.close()
            finally:
                self.writer = None


def write_progress_gifs(folder: Path, run_dir: Path | None = None) -> None:
    """``<name>.gif`` from the ``<name>-<step>.png`` grids: how samples evolved during training."""
    series: dict[str, list[tuple[int, bytes]]] = {}
    for png in sorted(folder.glob("*-[0-9]*.png")):
        name, step = png.stem.rsplit("-", 1)
        series.setdefault(name, []).append((int(step), png.read_bytes()))
    for name, frames in series.items():
        if len(frames) >= 2:
            with writing(folder / f"{name}.gif", run_dir):
                write_gif(frames, folder / f"{name}.gif")


MAX_GIF_FRAMES = 120


def write_gif(frames: list[tuple[int, bytes]], path: Path, ms_per_frame: int = 500) -> None:
    """An animated GIF, each frame with its step written above it (at most MAX_GIF_FRAMES, evenly spaced)."""
    from PIL import Image, ImageDraw, ImageFont

    if len(frames) > MAX_GIF_FRAMES:
        keep = {round(i * (len(frames) - 1) / (MAX_GIF_FRAMES - 1)) for i in range(MAX_GIF_FRAMES)}
        frames = [f for i, f in enumerate(frames) if i in keep]
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in frames]
    try:  # FreeType builds of Pillow scale the default font
        font = ImageFont.load_default(size=max(10, max(im.height for im in images) // 28))
    except (TypeError, ImportError):
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), f"step {step}", font=font) for step, _ in frames]
    band = max(b[3] for b in boxes) + 4
    width = max([im.width for im in images] + [b[2] + 4 for b in boxes])
    height = max(im.height for im in images) + band
    labelled = []
    for (step, _), im in zip(frames, images):
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(im, (0, band))
        ImageDraw.Draw(canvas).text((2, 2), f"step {step}", fill="black", font=font)
        labelled.append(canvas)
    labelled[0].save(path, save_all=True, append_images=labelled[1:], duration=ms_per_frame, loop=0)


def scatter(points: torch.Tensor):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    xy = points.detach().float().cpu().numpy()
    ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig
