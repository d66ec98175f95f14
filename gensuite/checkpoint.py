"""Atomic checkpoint files: ``<run>/checkpoints/step-00001000.pt``, the last K kept.

A checkpoint is a plain dict of tensors and plain data so that it loads with
``torch.load(weights_only=True)``: no pickled code ever runs on resume.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from gensuite.errors import DiskFull, GensuiteError

_NAME = re.compile(r"^step-(\d{8})\.pt$")
# Temporary files of atomic writes: .<final name>.tmp-<host>-<pid>
_TEMPORARY = re.compile(r"^\..+\.tmp-(?P<host>[^/]*)-(?P<pid>\d+)$")
UNREADABLE_SUFFIX = ".unreadable"  # a checkpoint that failed to load is renamed, never deleted


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
    # Serialised in memory first: torch.save reports a failed file write as a RuntimeError without
    # its errno, and a full disk must be told apart from a bug.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(final, buffer.getbuffer())


def temporary_path(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"


def atomic_write_bytes(final: Path, data: bytes | memoryview) -> None:
    """Write to a temporary file, fsync, then rename: readers see the old file or the whole new one.
    The temporary file is removed on any failure; a full disk raises ``DiskFull`` naming ``final``."""
    final = Path(final)
    tmp = temporary_path(final)
    try:
        with writing(final, remove_partial=False), open(tmp, "wb") as f:  # tmp goes below
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def atomic_write_text(final: Path, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text; a file that already holds exactly this text is left alone."""
    final = Path(final)
    data = text.encode("utf-8")
    with contextlib.suppress(OSError):
        if final.read_bytes() == data:
            return
    atomic_write_bytes(final, data)


def run_dir_of(path: Path) -> Path:
    """The run directory a file of it lives in (checkpoints/ and samples/ are one level down)."""
    path = Path(path)
    return path.parent.parent if path.parent.name in ("checkpoints", "samples", "tb") else path.parent


@contextlib.contextmanager
def writing(path: Path, run_dir: Path | None = None, remove_partial: bool = True) -> Iterator[None]:
    """A full disk (or quota) while writing ``path`` becomes one line naming the file and the last
    complete checkpoint; the partial file is removed unless it holds earlier data (event files)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if remove_partial:
            with contextlib.suppress(OSError):
                Path(path).unlink()
        last = latest_checkpoint(run_dir if run_dir is not None else run_dir_of(path))
        raise DiskFull(f"no space left on device writing {path}; last complete checkpoint: "
                       f"{last or 'none yet'}") from None


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files that dead writers left behind (a SIGKILL during an atomic write). A temporary
    of a live process on this host is left alone; one from another host belongs to an earlier
    attempt of this run (one run directory has one writer at a time)."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    host = socket.gethostname()
    for path in Path(folder).iterdir():
        m = _TEMPORARY.match(path.name)
        if m is None or (m["host"] == host and _alive(int(m["pid"]))):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


REQUIRED_KEYS = ("step", "config", "networks")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GensuiteError(f"{path}: checkpoint not found (train.resume takes auto, never or a checkpoint file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: say which, not a traceback
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise GensuiteError(f"{path}: not a readable gensuite checkpoint ({type(e).__name__}: {first})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise GensuiteError(f"{path}: not a gensuite checkpoint (no {missing[0]!r} entry)")
    return state


def load_latest_readable(run_dir: str | Path, warn=None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of a run that loads, with its state; None when the run has none.

    Unreadable newer ones (a damaged disk, a file copied halfway) are skipped with a warning naming
    each, through ``warn(message)`` (default: stderr). When every checkpoint is unreadable, the error
    names the newest."""
    warn = warn or (lambda message: print(f"[gensuite] warning: {message}", file=sys.stderr, flush=True))
    found = list_checkpoints(run_dir)
    first_error = None
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
        except GensuiteError as e:
            first_error = first_error or e
            warn(f"skipping {e}")
            continue
        return path, state
    if first_error is not None:
        raise GensuiteError(f"{first_error}; no older checkpoint of {run_dir} loads either (train.resume: never "
                            f"starts afresh, or use another --run-dir)")
    return None


def set_aside_unreadable(paths: list[Path]) -> list[Path]:
    """Rename unreadable checkpoints to <name>.unreadable: kept for inspection, never resumed from,
    never rotated away and never overwritten when the run reaches their step again."""
    moved = []
    for path in paths:
        target = path.with_name(path.name + UNREADABLE_SUFFIX)
        with contextlib.suppress(OSError):
            os.replace(path, target)
            moved.append(target)
    return moved


def check_fits(module: nn.Module, weights: dict[str, torch.Tensor], where: str, network: str) -> None:
    """Refuse weights that do not fit ``module`` with one line naming the first mismatching tensor."""
    own = module.state_dict()
    for key, value in weights.items():
        if key not in own:
            raise GensuiteError(f"{where}: network {network} has no tensor {key!r} (the checkpoint's model "
                                f"settings differ from the job's; use the same model section or another --run-dir)")
        if tuple(own[key].shape) != tuple(value.shape):
            raise GensuiteError(f"{where}: tensor {network}.{key} has shape {tuple(value.shape)} in the checkpoint "
                                f"but {tuple(own[key].shape)} in this job's network (the model settings differ; "
                                f"use the same model section or another --run-dir)")
    missing = [k for k in own if k not in weights]
    if missing:
        raise GensuiteError(f"{where}: the checkpoint has no tensor {network}.{missing[0]} that this job's network "
                            f"needs (the model settings differ; use the same model section or another --run-dir)")


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


def load_source(source: str | Path, warn=None) -> tuple[Path, dict[str, Any]]:
    """(path, state) of a checkpoint file, or of the newest readable checkpoint of a run directory."""
    path = Path(source)
    if path.is_dir() and latest_checkpoint(path) is not None:
        return load_latest_readable(path, warn)
    path = resolve_checkpoint(path)
    return path, load_checkpoint(path)


def ema_weights(state: dict[str, Any], name: str) -> dict[str, torch.Tensor] | None:
    """The EMA copy of network ``name`` as a plain state dict, if the run kept one."""
    if name not in state.get("ema", {}):
        return None
    return {k.removeprefix("module."): v for k, v in state["ema"][name].items() if k != "n_averaged"}
