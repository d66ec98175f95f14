"""Rank-0 run output: progress bar, TensorBoard scalars/images/text/hparams and PNG sample grids."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gensuite.config import JobConfig, dump_yaml, to_dict


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def hparams_of(job: JobConfig) -> dict[str, Any]:
    """Scalar job settings for TensorBoard's HParams view (lists become strings)."""
    flat = flatten({k: v for k, v in to_dict(job).items() if k not in ("launch", "sweep", "eval")})
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


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
        self.writer = SummaryWriter(str(self.tb_dir), purge_step=trainer.step + 1 if resumed else None)
        self.writer.add_text("config", "    " + dump_yaml(self.job).replace("\n", "\n    "), trainer.step)
        if self.job.log.progress_bar:
            self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", dynamic_ncols=True,
                            desc=self.job.name, file=sys.stderr)
        self.clock = time.perf_counter()

    def count_samples(self, n: int) -> None:
        self.samples += n

    def add_terms(self, player: str, terms: dict[str, torch.Tensor]) -> None:
        for key, value in terms.items():
            tag = f"{player}/{key}"
            self.sums[tag] = self.sums.get(tag, 0.0) + float(value)
            self.counts[tag] = self.counts.get(tag, 0) + 1

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def scalars(self, step: int, lrs: dict[str, float]) -> None:
        """Means of every loss term since the last call, learning rates and throughput."""
        if not self.enabled:
            self.sums.clear(), self.counts.clear()
            return
        now = time.perf_counter()
        values = {tag: self.sums[tag] / self.counts[tag] for tag in self.sums}
        values.update({f"lr/{p}": lr for p, lr in lrs.items()})
        values["perf/samples_per_sec"] = self.samples / max(now - self.clock, 1e-9)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.last.update(values)
        self.sums.clear(), self.counts.clear()
        self.samples, self.clock = 0, now
        if self.bar is not None:
            shown = {t.split("/", 1)[0] + ":" + t.split("/", 1)[1]: f"{v:.4g}" for t, v in values.items()
                     if t.endswith("/loss")}
            self.bar.set_postfix(shown, refresh=False)

    def eval_values(self, step: int, values: dict[str, Any], protocol: str | None = None) -> None:
        """Scalars as ``eval/<name>``; figures (confusion matrices) as images and PNGs."""
        if not self.enabled:
            return
        if protocol:  # what the numbers mean, next to them
            self.writer.add_text("eval/protocol", protocol, step)
        scalars = {k: v for k, v in values.items() if isinstance(v, float)}
        for name, value in scalars.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
            self.last[f"eval/{name}"] = value
        figures = {k: v for k, v in values.items() if k not in scalars}
        if figures:
            self.visuals(step, figures, family=None)
        self.info(f"step {step}: " + "  ".join(f"eval/{k}={v:.5g}" for k, v in scalars.items()))

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
                self.writer.add_image(f"samples/{name}", grid, step)
                if self.job.log.save_png:
                    save_image(grid, png)
            else:
                if self.job.log.save_png:
                    value.savefig(png, dpi=100)
                self.writer.add_figure(f"figures/{name}", value, step, close=True)
                plt.close(value)

    def finish(self, step: int) -> dict[str, float]:
        if not self.enabled:
            return {}
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"final/{tag}": v for tag, v in self.last.items()}
        # Written into the run's own event file (SummaryWriter.add_hparams would start a new one).
        for summary in hparams(hparams_of(self.job), metrics):
            self.writer.file_writer.add_summary(summary, step)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        if self.job.log.save_png:
            write_progress_gifs(self.samples_dir)
        return metrics

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_progress_gifs(folder: Path) -> None:
    """``<name>.gif`` from the ``<name>-<step>.png`` grids: how samples evolved during training."""
    from PIL import Image

    series: dict[str, list[Path]] = {}
    for png in sorted(folder.glob("*-[0-9]*.png")):
        series.setdefault(png.stem.rsplit("-", 1)[0], []).append(png)
    for name, frames in series.items():
        if len(frames) < 2:
            continue
        images = [Image.open(f).convert("RGB") for f in frames]
        images[0].save(folder / f"{name}.gif", save_all=True, append_images=images[1:], duration=400, loop=0)


def scatter(points: torch.Tensor):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    xy = points.detach().float().cpu().numpy()
    ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig
