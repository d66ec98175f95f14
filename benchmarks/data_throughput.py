"""Samples/s of the shard pipeline vs an in-memory tensor dataset, 32x32 images, 1 and 2 workers.

Shards: a CIFAR-sized synthetic RGB set (PNG-encoded, like every image shard) and the embedded
digits. The in-memory baseline is a ``TensorDataset`` of the same decoded images behind a
``DataLoader`` with the same batch size and workers. Never asserted by tests.

    python benchmarks/data_throughput.py [--batches 200] [--batch 128]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gensuite.data.pipeline import ShardInfo, ShardStream, make_loader  # noqa: E402


def write_rgb_shards(folder: Path, samples: int, per_shard: int) -> list[ShardInfo]:
    rng = np.random.default_rng(0)
    shards = []
    for start in range(0, samples, per_shard):
        n = min(per_shard, samples - start)
        path = folder / f"train-{len(shards):06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i in range(n):
                # Smooth random images: PNG sizes close to natural 32x32 photos, unlike pure noise.
                img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                img = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC))
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                sink.write({"__key__": f"{start + i:08d}", "png": buf.getvalue(), "cls": str(i % 10).encode()})
        shards.append(ShardInfo(str(path), n))
    return shards


def rate(loader, batches: int, batch: int) -> float:
    it = iter(loader)
    next(it)  # start-up (worker spawn) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def endless(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=10000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_rgb_shards(Path(tmp), args.samples, 2500)
        per_epoch = args.samples // args.batch
        images = next(iter(make_loader(ShardStream(shards, "image", 3, args.samples, 1, shuffle_buffer=1), 0)))
        memory = TensorDataset(images["x"], images["y"])
        print(f"32x32x3 PNG shards, {args.samples} samples, batch {args.batch}, {args.batches} batches")
        for workers in (1, 2):
            stream = ShardStream(shards, "image", 3, args.batch, per_epoch, shuffle_buffer=1000)
            shard_rate = rate(make_loader(stream, workers), args.batches, args.batch)
            mem_loader = DataLoader(memory, batch_size=args.batch, shuffle=True, num_workers=workers,
                                    drop_last=True, persistent_workers=True)
            mem_rate = rate(endless(mem_loader), args.batches, args.batch)
            print(f"workers={workers}: shards {shard_rate:9.0f} samples/s   in-memory {mem_rate:9.0f} samples/s   "
                  f"ratio {shard_rate / mem_rate:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
