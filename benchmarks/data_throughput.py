"""Samples/s of the shard pipeline, PNG and raw shards, vs an in-memory tensor dataset, 32x32 images,
0, 1 and 2 workers; and what the integrity checks cost.

Shards: a CIFAR-sized synthetic RGB set written twice from the same images with the builder's two
encodings (``png``: one PNG per sample; ``raw``: uint8 records of ``RECORD_SIZE`` samples, the
default for sets of at most 64 px), and the embedded digits. The in-memory baseline is a
``TensorDataset`` of the same decoded images behind a ``DataLoader`` with the same batch size and
workers. Each row is the best of ``--throughput-rounds`` rounds in which PNG, raw and in-memory take
turns, so load from other processes hits all alike; it prints samples/s and the ratios raw/PNG,
PNG/in-memory and raw/in-memory. With 0 workers the main process decodes, so that row is the
per-core rate; it also gives samples per CPU-second of the process (``time.process_time``), which
other processes on a shared machine do not lower. Never asserted by tests.

Integrity, measured in the same run: steady-state samples/s of the stream as training reads it
(every tar's sample count and every sample's fields and shape checked) against the stream without
those checks (webdataset's reader and a plain decode, as before they existed), alternated over
``--rounds`` rounds, best of each; and the start-up verification of a set against its manifest
(``open_shard_set``) the first time (every shard hashed) and when cached (one stat per shard), for
the synthetic set and the digits. The files are in the page cache: a cold disk adds its read time
to the first verification only.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--batches 200] [--batch 128] [--rounds 5]
        [--throughput-rounds 3]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gensuite.data.pipeline import ShardInfo, ShardStream, collate, make_loader  # noqa: E402
from gensuite.data.shards import (RECORD_SIZE, VERIFIED_CACHE, build, encode_record, open_shard_set,  # noqa: E402
                                  sha256)


class UncheckedStream(ShardStream):
    """The stream without the read-time checks: webdataset's reader, and the decode of an RGB sample
    as it was before them (no field, shape or sample-count checks)."""

    def read(self, shards):
        return wds.tarfile_to_samples()(iter([{"url": s.path} for s in shards]))

    def decode(self, chunk):
        return collate([self.plain_decode(s) for s in chunk])

    @staticmethod
    def plain_decode(sample: dict) -> dict:
        out = {"y": int(sample["cls"])} if "cls" in sample else {}
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        out["x"] = torch.from_numpy(image.transpose(2, 0, 1).copy())
        for key in sample:  # extra fields: none in this set
            name, _, ext = key.rpartition(".")
        return out


def write_manifest(folder: Path, shards: list[ShardInfo], encoding: str) -> None:
    """A manifest for the synthetic set, so ``open_shard_set`` can verify it."""
    entries = [{"file": Path(s.path).name, "samples": s.samples, "sha256": sha256(Path(s.path))} for s in shards]
    manifest = {"dataset": folder.name, "kind": "image", "encoding": encoding, "shape": [3, 32, 32], "num_classes": 10,
                "class_names": [str(i) for i in range(10)],
                "splits": {"train": {"samples": sum(s.samples for s in shards), "shards": entries}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def verification_seconds(folder: Path, repeats: int = 3) -> tuple[float, float]:
    """(first, cached) wall time of ``open_shard_set``, best of ``repeats``; files aged past the 2 s
    in which verify declines to cache a just-written file, as for a set built earlier."""
    old = time.time_ns() - 60 * 10**9
    for path in folder.glob("*.tar"):
        os.utime(path, ns=(old, old))
    first, cached = [], []
    for _ in range(repeats):
        (folder / VERIFIED_CACHE).unlink(missing_ok=True)
        t0 = time.perf_counter()
        open_shard_set(folder)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        open_shard_set(folder)
        cached.append(time.perf_counter() - t0)
    return min(first), min(cached)


def rgb_images(samples: int) -> list[np.ndarray]:
    """Smooth random (32, 32, 3) images: PNG sizes close to natural 32x32 photos, unlike pure noise."""
    rng = np.random.default_rng(0)
    return [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC))
            for _ in range(samples)]


def write_rgb_shards(folder: Path, images: list[np.ndarray], per_shard: int, encoding: str = "png") -> list[ShardInfo]:
    """The images as shards of ``per_shard`` samples (label: index mod 10), as the builder writes them."""
    shards = []
    for start in range(0, len(images), per_shard):
        n = min(per_shard, len(images) - start)
        path = folder / f"train-{len(shards):06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            if encoding == "raw":
                for first in range(start, start + n, RECORD_SIZE):
                    rows = range(first, min(first + RECORD_SIZE, start + n))
                    sink.write(encode_record(first, [images[i] for i in rows], [i % 10 for i in rows],
                                             [{}] * len(rows), {}))
            else:
                for i in range(start, start + n):
                    buf = io.BytesIO()
                    Image.fromarray(images[i]).save(buf, format="PNG")
                    sink.write({"__key__": f"{i:08d}", "png": buf.getvalue(), "cls": str(i % 10).encode()})
        shards.append(ShardInfo(str(path), n))
    return shards


def rate(loader, batches: int, batch: int, cpu: bool = False):
    """Samples/s (wall clock); with ``cpu``, (samples/s, samples per CPU-second of this process)."""
    it = iter(loader)
    next(it)  # start-up (worker spawn) is not throughput
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall = batches * batch / (time.perf_counter() - t0)
    return (wall, batches * batch / (time.process_time() - c0)) if cpu else wall


def endless(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of checked and unchecked streams")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="alternations of PNG, raw and in-memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, raw_folder = Path(tmp) / "rgb32", Path(tmp) / "rgb32-raw"
        folder.mkdir()
        raw_folder.mkdir()
        pixels = rgb_images(args.samples)
        shards = write_rgb_shards(folder, pixels, 2500)
        raw_shards = write_rgb_shards(raw_folder, pixels, 2500, encoding="raw")
        per_epoch = args.samples // args.batch
        images = next(iter(make_loader(ShardStream(shards, "image", 3, args.samples, 1, shuffle_buffer=1), 0)))
        raw_images = next(iter(make_loader(ShardStream(raw_shards, "image", 3, args.samples, 1, shuffle_buffer=1), 0)))
        assert torch.equal(images["x"], raw_images["x"]) and torch.equal(images["y"], raw_images["y"])
        memory = TensorDataset(images["x"], images["y"])
        print(f"32x32x3 shards, PNG and raw (records of {RECORD_SIZE}), {args.samples} samples, batch {args.batch}, "
              f"{args.batches} batches, best of {args.throughput_rounds} alternated rounds (samples/s)")
        print("| workers | PNG shards | raw shards | in-memory | raw / PNG | PNG / in-memory | raw / in-memory |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        cpu_rates = {}
        for workers in (0, 1, 2):
            best = {"png": 0.0, "raw": 0.0, "memory": 0.0}
            for _ in range(args.throughput_rounds):
                for name, source in (("png", shards), ("raw", raw_shards), ("memory", None)):
                    if source is None:
                        loader = endless(DataLoader(memory, batch_size=args.batch, shuffle=True, num_workers=workers,
                                                    drop_last=True, persistent_workers=workers > 0))
                    else:
                        loader = make_loader(ShardStream(source, "image", 3, args.batch, per_epoch, shuffle_buffer=1000,
                                                         shape=(3, 32, 32)), workers)
                    wall, cpu = rate(loader, args.batches, args.batch, cpu=True)
                    best[name] = max(best[name], wall)
                    if workers == 0:
                        cpu_rates[name] = max(cpu_rates.get(name, 0.0), cpu)
                    del loader
            png, raw, mem = best["png"], best["raw"], best["memory"]
            print(f"| {workers} | {png:.0f} | {raw:.0f} | {mem:.0f} | {raw / png:.2f}x | {png / mem:.2f}x | "
                  f"{raw / mem:.2f}x |")
        png, raw, mem = cpu_rates["png"], cpu_rates["raw"], cpu_rates["memory"]
        print(f"workers=0, samples per CPU-second of the process: PNG {png:.0f}   raw {raw:.0f}   in-memory {mem:.0f}   "
              f"raw / PNG {raw / png:.2f}x   raw / in-memory {raw / mem:.2f}x")

        print(f"\nintegrity checks at read time (best of {args.rounds} alternated rounds)")
        checked_stream = ShardStream(shards, "image", 3, args.batch, per_epoch, shape=(3, 32, 32))
        unchecked_stream = UncheckedStream(shards, "image", 3, args.batch, per_epoch)
        chunk = list(itertools.islice(checked_stream.read(shards[:1]), args.batch))
        per_sample = {"checked": [], "unchecked": []}  # (read, decode) seconds per sample
        for _ in range(4 * args.rounds):  # the checks' own cost, in this process: no worker or I/O noise
            for name, stream in (("checked", checked_stream), ("unchecked", unchecked_stream)):
                read = min(timeit.repeat(lambda: sum(1 for _ in stream.read(shards[:1])), number=1, repeat=2))
                decode = min(timeit.repeat(lambda: stream.decode(chunk), number=1, repeat=3))
                per_sample[name].append((read / shards[0].samples, decode / args.batch))
        (read_c, decode_c), (read_u, decode_u) = (
            [min(t[i] for t in per_sample[name]) for i in (0, 1)] for name in ("checked", "unchecked"))
        ratio = (read_c + decode_c) / (read_u + decode_u)
        print(f"per sample, in one process (best of {4 * args.rounds}): read {1e6 * read_c:.2f} us checked vs "
              f"{1e6 * read_u:.2f} us unchecked, decode {1e6 * decode_c:.2f} us vs {1e6 * decode_u:.2f} us; "
              f"time ratio {ratio:.4f} (cost {100 * (ratio - 1):+.2f}%)")
        steady = {}
        for workers in (0, 1):
            rates = {"checked": [], "unchecked": []}
            for _ in range(args.rounds):
                for name, cls in (("checked", ShardStream), ("unchecked", UncheckedStream)):
                    stream = cls(shards, "image", 3, args.batch, per_epoch, shuffle_buffer=1000, shape=(3, 32, 32))
                    rates[name].append(rate(make_loader(stream, workers), args.batches, args.batch))
            checked, unchecked = max(rates["checked"]), max(rates["unchecked"])
            steady[workers] = checked
            print(f"workers={workers}: checked {checked:9.0f} samples/s   unchecked {unchecked:9.0f} samples/s   "
                  f"ratio {checked / unchecked:.3f} (cost {100 * (1 - checked / unchecked):+.1f}%)")

        write_manifest(folder, shards, "png")
        write_manifest(raw_folder, raw_shards, "raw")
        digits = Path(tmp) / "digits-root"
        build("digits", None, str(digits), progress=False)
        print("\nstart-up verification against manifest.json (open_shard_set), best of 3")
        for name, path in [(f"{f.name} ({args.samples} samples, "
                            f"{sum(p.stat().st_size for p in f.glob('*.tar')) / 2**20:.1f} MiB)", f)
                           for f in (folder, raw_folder)] + [("digits (1797 samples, 32 px, raw)", digits / "digits")]:
            first, cached = verification_seconds(path)
            print(f"{name}: first {first:.4f} s (hashes every shard)   cached {cached:.5f} s   "
                  f"ratio {first / cached:.0f}x   first = {first * steady[0]:.0f} samples of loading at "
                  f"{steady[0]:.0f} samples/s (PNG, workers=0)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
