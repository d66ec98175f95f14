"""WebDataset shards -> an endless, deterministic stream of per-rank micro-batches.

Guarantees the training loop relies on:
- every rank yields the same number of batches per epoch, however uneven the shards (uneven
  streams hang DDP): a rank cycles through its own shards until its epoch quota is met;
- the stream is a pure function of (seed, epoch, rank, start position), independent of the number
  of DataLoader workers, so a resumed run sees exactly the batches a straight run would.

Splitting: shards are split by node (rank) after a per-epoch shuffle; within a rank, DataLoader
workers split the rank's sequence batch by batch (worker w decodes batches w, w+W, ...). Splitting
shards by worker instead would make the order depend on the worker count and break exact resume.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from PIL import Image

from gensuite.data.shards import read_manifest


@dataclass(frozen=True)
class ShardInfo:
    path: str
    samples: int


def split_shards(manifest: dict, shard_dir: str | Path, split: str) -> list[ShardInfo]:
    entries = manifest["splits"][split]["shards"]
    return [ShardInfo(str(Path(shard_dir) / e["file"]), int(e["samples"])) for e in entries]


def _rng(*parts) -> random.Random:
    return random.Random("-".join(map(str, parts)))  # str seeds hash with sha512: stable everywhere


def decode_sample(sample: dict, kind: str, channels: int, fields: set[str] | None = None) -> dict:
    """"x" and "y", plus the extra fields named in ``fields`` (None: all): <name>.npy -> tensor,
    <name>.png -> uint8 (3, H, W) tensor, <name>.json -> Python object. Skipped fields are never decoded,
    so a consumer pays nothing for large extras it does not use (e.g. high-resolution images)."""
    out = {"y": int(sample["cls"])} if "cls" in sample else {}
    if kind == "image":
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L" if channels == 1 else "RGB"))
        out["x"] = torch.from_numpy(image.reshape(image.shape[0], image.shape[1], channels).transpose(2, 0, 1).copy())
    else:
        out["x"] = torch.from_numpy(np.load(io.BytesIO(sample["npy"])))
    for key, value in sample.items():
        name, _, ext = key.rpartition(".")
        if not name or (fields is not None and name not in fields):
            continue
        if ext == "npy":
            out[name] = torch.from_numpy(np.load(io.BytesIO(value)))
        elif ext == "png":
            image = np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
            out[name] = torch.from_numpy(image.transpose(2, 0, 1).copy())
        elif ext == "json":
            out[name] = json.loads(value.decode("utf-8"))
    return out


def collate(samples: list[dict]) -> dict:
    """Tensors are stacked (uint8 images -> float in [0, 1]), numbers become a tensor, anything else
    (captions and other JSON fields) stays a Python list."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
            if batch[key].dtype == torch.uint8 and (key == "x" or batch[key].ndim == 4):
                batch[key] = batch[key].float().div_(255.0)
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class ShardStream(IterableDataset):
    """Micro-batches for one rank, from position ``start_batch`` on, forever."""

    def __init__(self, shards: list[ShardInfo], kind: str, channels: int, batch_size: int,
                 batches_per_epoch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, start_batch: int = 0, fields: set[str] | None = None):
        super().__init__()
        self.shards, self.kind, self.channels = shards, kind, channels
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.start_batch = shuffle_buffer, start_batch
        self.fields = None if fields is None else set(fields)  # extra fields to decode; None: all

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
                samples = wds.tarfile_to_samples()(iter([{"url": s.path} for s in order]))
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
                    yield collate([decode_sample(s, self.kind, self.channels, self.fields) for s in chunk])
                index += 1
            epoch, offset = epoch + 1, 0


def make_loader(stream: ShardStream, workers: int) -> DataLoader:
    # Own generator: creating the iterator must not draw from the global torch RNG (exact resume).
    return DataLoader(stream, batch_size=None, num_workers=workers, generator=torch.Generator(),
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def read_split(shard_dir: str | Path, split: str, limit: int, fields: set[str] | None = None) -> dict:
    """The first ``limit`` samples of a split in stored order, as one batch (reference images);
    ``fields``: the extra fields to decode (None: all)."""
    manifest = read_manifest(shard_dir)
    shape = manifest["shape"]
    shards = [{"url": s.path} for s in split_shards(manifest, shard_dir, split)]
    raw = itertools.islice(wds.tarfile_to_samples()(iter(shards)), limit)
    return collate([decode_sample(s, manifest["kind"], shape[0], fields) for s in raw])


def iterate_split(shard_dir: str | Path, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                  limit: int | None = None, fields: set[str] | None = None):
    """(indices, batch) over this rank's share of a split's first ``limit`` samples, in stored order.

    Batch j holds samples j*batch_size .. (j+1)*batch_size - 1 whatever the rank count, and goes to
    rank j mod world_size. Every sample is then computed in the same batch on one rank as on many,
    so per-sample float32 results are bitwise those of a single process (a network's float32 output
    can depend on the batch it is computed in), and only the float64 sums across ranks differ in order.
    ``fields``: the extra fields to decode (None: all)."""
    manifest = read_manifest(shard_dir)
    shards = [{"url": s.path} for s in split_shards(manifest, shard_dir, split)]
    raw = itertools.islice(wds.tarfile_to_samples()(iter(shards)), limit)
    for j in itertools.count():
        chunk = list(itertools.islice(raw, batch_size))
        if not chunk:
            return
        if j % world_size == rank:  # the other ranks' batches are never decoded here
            start = j * batch_size
            yield (torch.arange(start, start + len(chunk)),
                   collate([decode_sample(s, manifest["kind"], manifest["shape"][0], fields) for s in chunk]))
