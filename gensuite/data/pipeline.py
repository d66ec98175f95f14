"""WebDataset shards -> an endless, deterministic stream of per-rank micro-batches.

Guarantees the training loop relies on:
- every rank yields the same number of batches per epoch, however uneven the shards (uneven
  streams hang DDP): a rank cycles through its own shards until its epoch quota is met;
- the stream is a pure function of (seed, epoch, rank, start position), independent of the number
  of DataLoader workers, so a resumed run sees exactly the batches a straight run would.

Splitting: shards are split by node (rank) after a per-epoch shuffle; within a rank, DataLoader
workers split the rank's sequence batch by batch (worker w decodes batches w, w+W, ...). Splitting
shards by worker instead would make the order depend on the worker count and break exact resume.

Encodings: a shard holds samples one per tar member group (png, npy) or raw records of many samples
(see ``gensuite.data.shards``); ``read_shards`` expands a record into one item per sample, so every
step after it (shuffle buffer, epoch quota, batches, worker split) is per sample and the same for
both, and a raw set yields bitwise the batches of the PNG set built from the same data.

Damage: a tar that cannot be read, or holds another number of samples than its manifest says, a raw
record whose labels do not parse, and a sample that does not decode (a field missing or unreadable,
an image of another shape than the manifest's) are one-line errors naming the shard and the sample.
With ``on_bad_sample="skip"`` a bad sample (every sample of a bad raw record) is left out of its
batch (which is then smaller) instead, and counted in the batch's ``SKIPPED`` entry: batch positions
stay where they were, so the stream is still a pure function of its arguments.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from PIL import Image

from gensuite.data.shards import RECORD_X, RECORD_Y, read_manifest, rebuild_command
from gensuite.errors import GensuiteError

SKIPPED = "_skipped"  # on_bad_sample="skip": samples left out of a batch, an int64 scalar tensor in each batch
RECORD = "__record__"  # a sample of a raw record: (Record, row)


@dataclass(frozen=True)
class ShardInfo:
    path: str
    samples: int


def split_shards(manifest: dict, shard_dir: str | Path, split: str) -> list[ShardInfo]:
    entries = manifest["splits"][split]["shards"]
    return [ShardInfo(str(Path(shard_dir) / e["file"]), int(e["samples"])) for e in entries]


def _rng(*parts) -> random.Random:
    return random.Random("-".join(map(str, parts)))  # str seeds hash with sha512: stable everywhere


def _reason(e: Exception) -> str:
    """An exception as a short single line (without the BytesIO reprs PIL and webdataset append)."""
    text = str(e.args[0]) if e.args else ""
    text = re.sub(r" ?(@ )?<_io\.\w+ (object at 0x[0-9a-f]+|name=[^>]*)>", "", text.splitlines()[0] if text else "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class BadSample(ValueError):
    """A sample field that does not decode; the message says which and why."""


class Record:
    """The member group of a raw record (``x.npy``, ``cls.npy``, extra fields), its fields parsed on
    first use and kept (a field that does not parse is kept as its ``BadSample``). ``size``: samples."""

    __slots__ = ("payloads", "parsed", "size")

    def __init__(self, payloads: dict):
        self.payloads, self.parsed, self.size = payloads, {}, None
        labels = self.field(RECORD_Y)
        if labels.ndim != 1 or labels.dtype != np.int64:
            raise BadSample(f"{RECORD_Y} holds {labels.dtype} of shape {_shape(labels.shape)}, not int64 labels")
        self.size = len(labels)

    def field(self, key: str):
        """The parsed member ``key`` (an array or list with one row per sample), or ``BadSample``."""
        value = self.parsed.get(key)
        if value is None:
            try:
                value = self._parse(key)
            except BadSample as e:
                value = e
            self.parsed[key] = value
        if isinstance(value, BadSample):
            raise value
        return value

    def _parse(self, key: str):
        if key not in self.payloads:
            raise BadSample(f"no {key} field")
        try:
            if key.endswith(".json"):
                value = json.loads(self.payloads[key].decode("utf-8"))
                if not isinstance(value, list):
                    raise ValueError("not a list")
            elif not self.payloads[key].startswith(b"\x93NUMPY"):
                raise BadSample(f"{key}: not an npy array")
            else:
                value = np.load(io.BytesIO(self.payloads[key]), allow_pickle=False)
                if not value.flags.writeable:  # torch wants writable memory; one copy per record
                    value = value.copy()
        except BadSample:
            raise
        except Exception as e:
            raise BadSample(f"{key}: {_reason(e)}") from None
        if self.size is not None and len(value) != self.size:
            raise BadSample(f"{key} holds {len(value)} rows for the record's {self.size} samples")
        return value


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def read_shards(shards: list[ShardInfo]) -> Iterator[dict]:
    """Undecoded samples of ``shards``, one after the other; a raw record is expanded into its samples
    (``{"__key__", "__url__", RECORD: (record, row)}``). A tar that cannot be read (truncated, damaged),
    a record whose labels do not parse, or a tar that holds another number of samples than its manifest
    entry, is a one-line error."""
    for shard in shards:
        count = 0
        try:
            for sample in wds.tarfile_to_samples()(iter([{"url": shard.path}])):
                if RECORD_X not in sample:
                    count += 1
                    yield sample
                    continue
                try:
                    record = Record(sample)
                except BadSample as e:
                    raise GensuiteError(f"{shard.path}: record {sample.get('__key__')} does not decode ({e}); "
                                        f"rebuild with: {rebuild_command(Path(shard.path).parent)}") from None
                first, url = int(sample["__key__"]), sample["__url__"]
                for row in range(record.size):
                    yield {"__key__": f"{first + row:08d}", "__url__": url, RECORD: (record, row)}
                count += record.size
        except GensuiteError:
            raise
        except Exception as e:  # anything the tar reader raises means the file is damaged
            raise GensuiteError(f"{shard.path}: truncated or damaged tar, unreadable after {count} samples ({_reason(e)}); "
                                f"rebuild with: {rebuild_command(Path(shard.path).parent)}") from None
        if count != shard.samples:
            raise GensuiteError(f"{shard.path}: holds {count} samples, manifest.json says {shard.samples}; "
                                f"rebuild with: {rebuild_command(Path(shard.path).parent)}")


def _decoded(sample: dict, key: str, decode):
    if key not in sample:
        raise BadSample(f"no {key} field")
    try:
        return decode(sample[key])
    except Exception as e:
        raise BadSample(f"{key}: {_reason(e)}") from None


def _npy(value: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(value)))


def decode_sample(sample: dict, kind: str, channels: int, fields: set[str] | None = None) -> dict:
    """"x" and "y", plus the extra fields named in ``fields`` (None: all): <name>.npy -> tensor,
    <name>.png -> uint8 (3, H, W) tensor, <name>.json -> Python object. Skipped fields are never decoded,
    so a consumer pays nothing for large extras it does not use (e.g. high-resolution images). A field
    that does not decode raises ``BadSample`` naming it. A raw record's sample decodes to the same."""
    if RECORD in sample:
        return _record_sample(*sample[RECORD], fields)
    out = {"y": _decoded(sample, "cls", int)} if "cls" in sample else {}
    if kind == "image":
        image = _decoded(sample, "png", lambda v: np.asarray(
            Image.open(io.BytesIO(v)).convert("L" if channels == 1 else "RGB")))
        out["x"] = torch.from_numpy(image.reshape(image.shape[0], image.shape[1], channels).transpose(2, 0, 1).copy())
    else:
        out["x"] = _decoded(sample, "npy", _npy)
    for key in sample:
        name, _, ext = key.rpartition(".")
        if not name or (fields is not None and name not in fields):
            continue
        if ext == "npy":
            out[name] = _decoded(sample, key, _npy)
        elif ext == "png":
            out[name] = _decoded(sample, key, lambda v: torch.from_numpy(
                np.asarray(Image.open(io.BytesIO(v)).convert("RGB")).transpose(2, 0, 1).copy()))
        elif ext == "json":
            out[name] = _decoded(sample, key, lambda v: json.loads(v.decode("utf-8")))
    return out


def _record_sample(record: Record, row: int, fields: set[str] | None) -> dict:
    out = {"y": int(record.field(RECORD_Y)[row]), "x": torch.from_numpy(record.field(RECORD_X)[row])}
    for key in record.payloads:
        name, _, ext = key.rpartition(".")
        if not name or name in ("x", "cls") or (fields is not None and name not in fields):
            continue
        if ext == "npy":
            out[name] = torch.from_numpy(record.field(key)[row])
        elif ext == "json":
            out[name] = record.field(key)[row]
    return out


def check_sample(sample: dict, kind: str, channels: int, shape: tuple[int, ...] | None = None,
                 fields: set[str] | None = None) -> dict:
    """``decode_sample`` for a set's samples: "cls" is required, and "x" must have the manifest's
    ``shape`` (None: any) and, for points, float32 (raw records' images: uint8); else ``BadSample``."""
    if "cls" not in sample and RECORD not in sample:
        raise BadSample("no cls field")
    out = decode_sample(sample, kind, channels, fields)
    x = out["x"]
    name = RECORD_X if RECORD in sample else "png" if kind == "image" else "npy"
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise BadSample(f"{name} has shape {_shape(x.shape)}, the manifest says {_shape(shape)}")
    want = torch.uint8 if kind == "image" else torch.float32
    if (kind != "image" or RECORD in sample) and x.dtype != want:
        dtypes = (str(t).removeprefix("torch.") for t in (x.dtype, want))
        raise BadSample(f"{name} holds {next(dtypes)}, not {next(dtypes)}")
    return out


def decode_batch(chunk: list[dict], kind: str, channels: int, shape: tuple[int, ...] | None = None,
                 fields: set[str] | None = None, on_bad_sample: str = "error", skip_hint: bool = False) -> dict:
    """The collated batch of the raw samples ``chunk``. A sample that does not decode is a one-line
    error naming its shard and key, or, with ``on_bad_sample="skip"``, left out of the batch and
    counted under ``SKIPPED`` (a batch with no good sample left is an error still). ``skip_hint``: the
    error says the job may set ``data.on_bad_sample: skip``."""
    if chunk and all(RECORD in sample for sample in chunk):
        try:
            batch = _record_batch(chunk, kind, shape, fields)
            if on_bad_sample == "skip":
                batch[SKIPPED] = torch.tensor(0)
            return batch
        except BadSample:
            pass  # some record is bad: the per-sample path below names the sample (or skips it)
    decoded, bad = [], []
    for sample in chunk:
        try:
            decoded.append(check_sample(sample, kind, channels, shape, fields))
        except BadSample as e:
            bad.append((sample, e))
            if on_bad_sample != "skip":
                break
    if bad and (on_bad_sample != "skip" or not decoded):
        sample, e = bad[0]
        url = sample.get("__url__", "?")
        what = f"sample {sample.get('__key__')} does not decode ({e})"
        hint = " or set data.on_bad_sample: skip" if skip_hint else ""
        if on_bad_sample == "skip":  # nothing left to skip to
            hint = ""
            what += (", and it is its batch's only sample" if len(chunk) == 1 else
                     f", nor does any other of the {len(chunk)} samples in its batch")
        raise GensuiteError(f"{url}: {what}; rebuild with: {rebuild_command(Path(url).parent)}{hint}")
    batch = collate(decoded)
    if on_bad_sample == "skip":
        batch[SKIPPED] = torch.tensor(len(bad))
    return batch


def _record_batch(chunk: list[dict], kind: str, shape: tuple[int, ...] | None, fields: set[str] | None) -> dict:
    """``collate`` of ``check_sample`` over samples of raw records, computed field by field over the
    whole batch (each record checked once); ``BadSample`` if any record is bad."""
    records = {}
    for sample in chunk:
        record = sample[RECORD][0]
        records[id(record)] = record
    want = np.uint8 if kind == "image" else np.float32
    for record in records.values():
        x = record.field(RECORD_X)
        if x.dtype != want or (shape is not None and x.shape[1:] != tuple(shape)):
            raise BadSample(RECORD_X)
    rows = [sample[RECORD] for sample in chunk]

    def column(key: str) -> list:
        return [record.field(key)[row] for record, row in rows]

    batch = {"y": torch.from_numpy(np.array(column(RECORD_Y))),
             "x": _batch_tensor("x", torch.from_numpy(np.stack(column(RECORD_X))))}
    for key in rows[0][0].payloads:
        name, _, ext = key.rpartition(".")
        if not name or name in ("x", "cls") or (fields is not None and name not in fields) or ext not in ("npy", "json"):
            continue
        values = column(key)
        batch[name] = _batch_tensor(name, torch.from_numpy(np.stack(values))) if ext == "npy" else values
    return batch


def _batch_tensor(key: str, stacked: torch.Tensor) -> torch.Tensor:
    """uint8 images (the samples, or any 4-d field) -> float in [0, 1]."""
    if stacked.dtype == torch.uint8 and (key == "x" or stacked.ndim == 4):
        return stacked.float().div_(255.0)
    return stacked


def collate(samples: list[dict]) -> dict:
    """Tensors are stacked (uint8 images -> float in [0, 1]), numbers become a tensor, anything else
    (captions and other JSON fields) stays a Python list."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = _batch_tensor(key, torch.stack(values))
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class ShardStream(IterableDataset):
    """Micro-batches for one rank, from position ``start_batch`` on, forever."""

    def __init__(self, shards: list[ShardInfo], kind: str, channels: int, batch_size: int,
                 batches_per_epoch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, start_batch: int = 0, fields: set[str] | None = None,
                 shape: tuple[int, ...] | None = None, on_bad_sample: str = "error"):
        super().__init__()
        self.shards, self.kind, self.channels = shards, kind, channels
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.start_batch = shuffle_buffer, start_batch
        self.fields = None if fields is None else set(fields)  # extra fields to decode; None: all
        self.shape = None if shape is None else tuple(shape)  # the manifest's sample shape (None: unchecked)
        self.on_bad_sample = on_bad_sample  # "error" or "skip" (see decode_batch)

    def read(self, shards: list[ShardInfo]) -> Iterator[dict]:
        """Raw samples of ``shards`` in order (a tar that cannot be read is an error naming it)."""
        return read_shards(shards)

    def decode(self, chunk: list[dict]) -> dict:
        """One micro-batch from its raw samples (see ``decode_batch``)."""
        return decode_batch(chunk, self.kind, self.channels, self.shape, self.fields, self.on_bad_sample,
                            skip_hint=True)

    def rank_shards(self, epoch: int) -> list[ShardInfo]:
        """This rank's shards for an epoch: a seeded shuffle shared by all ranks, then split by node."""
        order = list(self.shards)
        _rng(self.seed, "shards", epoch).shuffle(order)
        mine = order[self.rank::self.world_size]
        # Fewer shards than ranks: share one rather than leave a rank without data.
        return mine or [order[self.rank % len(order)]]

    def raw_epoch(self, epoch: int) -> Iterator[dict]:
        """Undecoded samples of one epoch for this rank: its shards in a shuffled order through a
        shuffle buffer, cycled (buffer flushed each cycle, so every sample comes before any repeat)."""
        shards = self.rank_shards(epoch)

        def cycles():
            for cycle in itertools.count():
                order = list(shards)
                _rng(self.seed, "cycle", epoch, self.rank, cycle).shuffle(order)
                samples = self.read(order)
                rng = _rng(self.seed, "buffer", epoch, self.rank, cycle)
                yield from wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

        return itertools.islice(cycles(), self.batches_per_epoch * self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        index = self.start_batch
        while True:
            raw = self.raw_epoch(epoch)
            # Skipping before decoding makes resuming mid-epoch cheap.
            raw = itertools.islice(raw, offset * self.batch_size, None)
            while True:
                chunk = list(itertools.islice(raw, self.batch_size))
                if not chunk:
                    break
                if (index - self.start_batch) % workers == worker:
                    yield self.decode(chunk)
                index += 1
            epoch, offset = epoch + 1, 0


def worker_error_message(e: Exception) -> str:
    """The one-line message of an error a DataLoader worker raised: torch raises it again in the main
    process with the worker's traceback text as its message, whose last line is the original."""
    lines = str(e).strip().splitlines()
    if len(lines) < 2:
        return str(e)
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    return lines[-1].removeprefix(prefix)


def make_loader(stream: ShardStream, workers: int) -> DataLoader:
    # Own generator: creating the iterator must not draw from the global torch RNG (exact resume).
    return DataLoader(stream, batch_size=None, num_workers=workers, generator=torch.Generator(),
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def read_split(shard_dir: str | Path, split: str, limit: int, fields: set[str] | None = None,
               on_bad_sample: str = "error") -> dict:
    """The first ``limit`` samples of a split in stored order, as one batch (reference images);
    ``fields``: the extra fields to decode (None: all); ``on_bad_sample``: as the training stream's
    (``skip`` leaves bad samples out, without counting them here)."""
    manifest = read_manifest(shard_dir)
    shape = tuple(manifest["shape"])
    raw = list(itertools.islice(read_shards(split_shards(manifest, shard_dir, split)), limit))
    batch = decode_batch(raw, manifest["kind"], shape[0], shape, fields, on_bad_sample)
    batch.pop(SKIPPED, None)
    return batch


def iterate_split(shard_dir: str | Path, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                  limit: int | None = None, fields: set[str] | None = None):
    """(indices, batch) over this rank's share of a split's first ``limit`` samples, in stored order.

    Batch j holds samples j*batch_size .. (j+1)*batch_size - 1 whatever the rank count, and goes to
    rank j mod world_size. Every sample is then computed in the same batch on one rank as on many,
    so per-sample float32 results are bitwise those of a single process (a network's float32 output
    can depend on the batch it is computed in), and only the float64 sums across ranks differ in order.
    ``fields``: the extra fields to decode (None: all)."""
    manifest = read_manifest(shard_dir)
    shape = tuple(manifest["shape"])
    raw = itertools.islice(read_shards(split_shards(manifest, shard_dir, split)), limit)
    for j in itertools.count():
        chunk = list(itertools.islice(raw, batch_size))
        if not chunk:
            return
        if j % world_size == rank:  # the other ranks' batches are never decoded here
            start = j * batch_size
            yield torch.arange(start, start + len(chunk)), decode_batch(chunk, manifest["kind"], shape[0], shape, fields)
