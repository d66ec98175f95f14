"""A job plus its ``sweep`` section -> the list of runs it stands for, each with its own directory.

``variants`` (named partial jobs, e.g. one per family of a leaderboard) are merged into the job first;
each is then combined with every grid point and explicit set. A variant whose ``train.resume`` is
``variant:NAME`` evaluates the finished run of variant NAME (same override set) instead of training its
own, e.g. a diffusion model's second sampler: it runs after that task (locally, and on SLURM through a
job dependency)."""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gensuite.config import JobConfig, job_from_dict, set_key
from gensuite.errors import ConfigError


@dataclass
class SweepTask:
    name: str  # "" for a job without a sweep
    overrides: dict[str, Any]
    job: JobConfig
    run_dir: Path
    after: str | None = None  # the task whose finished run this one resumes (``train.resume: variant:NAME``)


def override_sets(job: JobConfig) -> list[dict[str, Any]]:
    """Every grid point combined with every explicit set (either may be absent)."""
    grid = job.sweep.grid
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    sets = job.sweep.sets or [{}]
    return [{**point, **extra} for point in points for extra in sets]


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_format(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def task_name(overrides: dict[str, Any]) -> str:
    """``loss=hinge,lr=0.0002``: the last part of each key unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in overrides]
    keys = [short if last.count(short) == 1 else full.replace(".", "_") for short, full in zip(last, overrides)]
    return ",".join(f"{k}={_format(v)}" for k, v in zip(keys, overrides.values()))


def merge_variant(base: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the partial job ``variant`` merged in, mapping by mapping. A variant that names a
    family or flavor replaces the model section (the base's settings belong to another model), so its
    model starts from that flavor's defaults plus the variant's own ``model``."""
    out = copy.deepcopy(base)
    if "family" in variant or "flavor" in variant:
        out["model"] = {}

    def merge(into: dict, part: dict) -> None:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(out, variant)
    return out


def expand(job: JobConfig, run_root: Path) -> list[SweepTask]:
    """One validated job per variant and override set; run directories under ``run_root`` named after
    the variant and the overrides."""
    sets = override_sets(job)
    base = job.to_dict()
    base["sweep"] = {}
    variants = job.sweep.variants or {"": {}}
    tasks = []
    for variant, partial in variants.items():
        tasks += _expand_variant(job, merge_variant(base, partial), variant, sets, run_root)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError("sweep", f"two runs would share the directory {dup!r}; make the override sets distinct")
    return [t for t in tasks if t.after is None] + [t for t in tasks if t.after is not None]


RESUME_VARIANT = "variant:"


def _resumed_variant(job: JobConfig, base: dict[str, Any], variant: str) -> str | None:
    """The variant named by ``train.resume: variant:NAME``, checked; None for any other resume."""
    resume = str(base.get("train", {}).get("resume", ""))
    if not resume.startswith(RESUME_VARIANT):
        return None
    where = f"sweep.variants.{variant}.train.resume" if variant else "train.resume"
    other = resume[len(RESUME_VARIANT):]
    if other not in job.sweep.variants or other == variant:
        choices = ", ".join(v for v in job.sweep.variants if v != variant) or "(none)"
        raise ConfigError(where, f"{resume!r} names no other variant of this sweep; choose one of {choices}")
    if str(job.sweep.variants[other].get("train", {}).get("resume", "")).startswith(RESUME_VARIANT):
        raise ConfigError(where, f"variant {other!r} itself resumes a variant; name the one that trains")
    return other


def _expand_variant(job: JobConfig, base: dict[str, Any], variant: str, sets: list[dict[str, Any]],
                    run_root: Path) -> list[SweepTask]:
    tasks = []
    resumed = _resumed_variant(job, base, variant)
    for i, overrides in enumerate(sets):
        raw = copy.deepcopy(base)
        where = "sweep.grid" if overrides.keys() <= job.sweep.grid.keys() else f"sweep.sets[{i}]"
        for key, value in overrides.items():
            if key.split(".")[0] in ("sweep", "launch", "name"):
                raise ConfigError(f"{where}.{key}", "a sweep varies training settings, not launch, sweep or name")
            set_key(raw, key, value)
        suffix = task_name(overrides) if len(sets) > 1 else ""
        after = ",".join(filter(None, [resumed, suffix])) if resumed else None
        if after:
            raw["train"]["resume"] = str(run_root / after)
        if variant:
            where = f"sweep.variants.{variant}" + (f" with {where}" if overrides else "")
        try:
            task_job = job_from_dict(raw)
        except ConfigError as e:  # name where the bad value came from
            raise ConfigError(where, str(e)) from None
        name = ",".join(filter(None, [variant, suffix]))
        tasks.append(SweepTask(name, overrides, task_job, run_root / name if name else run_root, after))
    return tasks
