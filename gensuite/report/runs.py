"""Locating runs and reading them: run directories and sweep roots, the TensorBoard event files and
``config.yaml`` of a run (``RunLog``), the networks a job trains, and what the job settings and eval
tags say (the settings swept across runs, eval metrics grouped by split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gensuite.config import JobConfig, load_job, to_dict
from gensuite.errors import GensuiteError
from gensuite.logger import flatten

NAMESPACES = ("lr", "perf", "eval", "final", "val")  # scalar tags that are not a player's loss terms
VALIDATION = "val/"  # val/<player>/<term>: the training curve <player>/<term> on held-out data
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

    from gensuite.registry import complete_job, get_family

    job = complete_job(job, inputs_required=False)  # Stage II: G1 as the Stage-I run built it, when it exists
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
    def validation_tags(self) -> list[str]:
        """``val/<player>/<term>``: the loss terms on held-out data (``gensuite.evaluation.validation``)."""
        return [t for t in self.scalars if t.startswith(VALIDATION) and t.count("/") >= 2]

    @property
    def loss_panels(self) -> dict[str, list[str]]:
        """``{player: [<player>/<term>, ...]}``: one axes per term, showing its training curve and its
        validation curve (``val/<player>/<term>``) where either was logged."""
        out = {player: list(tags) for player, tags in self.players.items()}
        for tag in self.validation_tags:
            term = tag.removeprefix(VALIDATION)
            panels = out.setdefault(term.split("/", 1)[0], [])
            if term not in panels:
                panels.append(term)
        return out

    @property
    def eval_tags(self) -> list[str]:
        return [t for t in self.scalars if t.startswith("eval/")]

    @property
    def last_step(self) -> int:
        steps = [s[-1][0] for s in [*self.scalars.values(), *self.images.values()] if s]
        return max(steps, default=0)

    def final(self) -> dict[str, tuple[int, float]]:
        """The last ``(step, value)`` of every eval/ scalar, then of every loss term, then of its validation."""
        tags = self.eval_tags + [t for tags in self.players.values() for t in tags] + self.validation_tags
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


# -- what eval tags and job settings say ---------------------------------------------------------


def eval_groups(names: list[str], default_split: str) -> dict[str, dict[str, str]]:
    """``{stem: {split: name}}``: ``accuracy``, ``validation_accuracy``, ``train_accuracy`` share one axes."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        head, _, rest = name.partition("_")
        split, stem = (head, rest) if head in SPLITS and rest else (default_split, name)
        group = groups.setdefault(stem, {})
        group[split if split not in group else name] = name
    return groups


def swept_values(jobs: list[JobConfig]) -> dict[str, list[Any]]:
    """``{key: [value per run]}`` for every job setting that is not the same in all runs."""
    skip = {"name", "launch", "sweep"}
    if len({j.family for j in jobs}) > 1:  # other families' model settings do not line up: family/flavor say it
        skip.add("model")
    flat = [{k: v for k, v in flatten(to_dict(j)).items() if k.split(".")[0] not in skip} for j in jobs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1}
