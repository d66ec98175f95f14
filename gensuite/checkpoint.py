"""Atomic checkpoint files: ``<run>/checkpoints/step-00001000.pt``, the last K kept.

A checkpoint is a plain dict of tensors and plain data so that it loads with
``torch.load(weights_only=True)``: no pickled code ever runs on resume.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gensuite.errors import GensuiteError

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoints, oldest first (temporary files of an interrupted write are ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def sharded_dir(path: Path) -> Path:
    """Per-rank files (DeepSpeed's optimizer partitions) of checkpoint ``path``; they count only once
    ``path`` itself exists, so an interrupted write is never resumed from."""
    return path.parent / "sharded" / path.stem


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write to a temporary file, fsync, then rename: a crash never leaves a half-written checkpoint."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    _atomic_save(state, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        shutil.rmtree(sharded_dir(old), ignore_errors=True)
    return final


def save_named(run_dir: str | Path, name: str, state: dict[str, Any]) -> Path:
    """``checkpoints/<name>.pt`` (e.g. best), written atomically; never rotated, never resumed from."""
    checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir) / f"{name}.pt"
    _atomic_save(state, final)
    return final


def _atomic_save(state: dict[str, Any], final: Path) -> None:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GensuiteError(f"{path}: checkpoint not found (train.resume takes auto, never or a checkpoint file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: say which, not a traceback
        raise GensuiteError(f"{path}: not a readable gensuite checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    path = Path(source)
    if not path.exists():
        raise GensuiteError(f"{path}: no such run directory or checkpoint file")
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise GensuiteError(f"{path}: no checkpoints in this run directory (expected checkpoints/step-*.pt)")
        return found
    return path


def ema_weights(state: dict[str, Any], name: str) -> dict[str, torch.Tensor] | None:
    """The EMA copy of network ``name`` as a plain state dict, if the run kept one."""
    if name not in state.get("ema", {}):
        return None
    return {k.removeprefix("module."): v for k, v in state["ema"][name].items() if k != "n_averaged"}
