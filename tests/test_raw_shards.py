"""Raw shards (uint8 records of many samples, no PNG): the same tensors as PNG shards, in the same order,
with the same integrity checks, one-line errors and per-rank batch counts."""

import io
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from gensuite.data.pipeline import (SKIPPED, ShardInfo, ShardStream, iterate_split, make_loader,
                                    read_split, split_shards)
from gensuite.data.shards import (RECORD_SIZE, build, encode_record, manifest_encoding, open_shard_set,
                                  read_manifest)
from gensuite.errors import GensuiteError
from launchers import free_port
from test_shard_integrity import error_line, rewrite_shard, set_manifest

ROOT = Path(__file__).resolve().parents[1]


def same(a: dict, b: dict) -> bool:
    """Equal keys, and every tensor bitwise equal (same dtype and shape); other values equal."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype if isinstance(a[k], torch.Tensor) else a[k] == b[k]
        for k in a)


def stream_batches(folder: Path, n: int, workers: int = 0, **kw) -> list[dict]:
    manifest = read_manifest(folder)
    args = dict(batch_size=32, batches_per_epoch=20, seed=11, shuffle_buffer=200, shape=tuple(manifest["shape"]))
    args.update(kw)
    stream = ShardStream(split_shards(manifest, folder, "train"), manifest["kind"], manifest["shape"][0], **args)
    return list(itertools.islice(iter(make_loader(stream, workers)), n))


@pytest.fixture
def raw_copy(shard_root, tmp_path) -> Path:
    """A private copy of the (raw, 16 px) digits set to damage, its files aged as if built earlier."""
    copy = tmp_path / "shards"
    shutil.copytree(shard_root / "digits", copy / "digits", ignore=shutil.ignore_patterns(".stats"))
    old = time.time_ns() - 60 * 10**9
    for path in copy.glob("*/*"):
        os.utime(path, ns=(old, old))
    return copy


def hint(root) -> str:
    return f"rebuild with: python shards/build.py digits --out {root}"


# -- the same tensors as PNG ------------------------------------------------------------------------------------


def test_the_manifest_records_the_encoding(shard_root, png_shard_root):
    raw, png = read_manifest(shard_root / "digits"), read_manifest(png_shard_root / "digits")
    assert (raw["encoding"], raw["record_size"], png["encoding"]) == ("raw", RECORD_SIZE, "png")
    assert "record_size" not in png
    assert read_manifest(shard_root / "moons")["encoding"] == "npy"
    # Same samples, same shards: only the encoding differs.
    assert {k: [s["samples"] for s in v["shards"]] for k, v in raw["splits"].items()} == \
        {k: [s["samples"] for s in v["shards"]] for k, v in png["splits"].items()}
    assert raw["params"] == png["params"]
    # Records of RECORD_SIZE samples, each keyed by its first sample; a shard's last record is shorter.
    with open(shard_root / "digits" / "train-000000.tar", "rb") as f:
        names = [m["fname"] for m in wds.tariterators.tar_file_iterator(f)]
    shard_samples = raw["splits"]["train"]["shards"][0]["samples"]
    assert names == [f"{first:08d}.{field}" for first in range(0, shard_samples, RECORD_SIZE)
                     for field in ("cls.npy", "x.npy")]


def test_raw_and_png_sets_of_the_same_data_give_bitwise_identical_tensors(shard_root, png_shard_root):
    raw, png = shard_root / "digits", png_shard_root / "digits"
    for split in ("train", "test"):  # stored order
        a, b = read_split(raw, split, 10_000), read_split(png, split, 10_000)
        assert same(a, b) and a["x"].shape == (1500 if split == "train" else 297, 1, 16, 16)
        assert a["x"].dtype == torch.float32 and a["y"].dtype == torch.int64
    for (ia, a), (ib, b) in zip(iterate_split(raw, "test", 64, rank=1, world_size=2),
                                iterate_split(png, "test", 64, rank=1, world_size=2)):
        assert torch.equal(ia, ib) and same(a, b)
    # The training stream, shuffled with a fixed seed, over two epochs: same batches in the same order,
    # whatever the worker count.
    a = stream_batches(raw, 50)
    assert all(same(x, y) for x, y in zip(a, stream_batches(png, 50)))
    assert all(same(x, y) for x, y in zip(a, stream_batches(raw, 50, workers=2)))
    assert all(same(x, y) for x, y in zip(a[7:], stream_batches(raw, 5, start_batch=7)))  # exact resume
    assert not same(a[0], stream_batches(raw, 1, seed=12)[0])


def test_extra_fields_of_raw_records_match_png_sets(tmp_path):
    """Captioned data: embeddings (npy), captions (json) stacked per record; at 38 px the default is raw."""
    options = dict(n=40, n_test=8, size=38, text_dim=16, progress=False, shard_size=24)
    raw = build("shapes", None, str(tmp_path / "raw"), **options)
    png = build("shapes", None, str(tmp_path / "png"), encoding="png", **options)
    assert (raw["encoding"], png["encoding"]) == ("raw", "png") and raw["fields"] == png["fields"]
    for split in ("train", "test"):
        a, b = (read_split(tmp_path / root / "shapes", split, 100) for root in ("raw", "png"))
        assert same(a, b) and a["embeddings"].shape == (40 if split == "train" else 8, 10, 16)
        assert isinstance(a["captions"][0], list) and isinstance(a["captions"][0][0], str)
    only_x = read_split(tmp_path / "raw" / "shapes", "test", 8, fields=set())
    assert set(only_x) == {"x", "y"}
    a, b = (stream_batches(tmp_path / root / "shapes", 6, batch_size=8, shuffle_buffer=16) for root in ("raw", "png"))
    assert all(same(x, y) for x, y in zip(a, b))


def test_a_manifest_without_the_encoding_field_reads_as_png(png_shard_root, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(png_shard_root / "digits", old / "digits", ignore=shutil.ignore_patterns(".stats"))
    set_manifest(old / "digits", lambda m: m.pop("encoding"))
    manifest = open_shard_set(old / "digits")
    assert "encoding" not in manifest and manifest_encoding(manifest) == "png"
    assert same(read_split(old / "digits", "test", 64), read_split(png_shard_root / "digits", "test", 64))
    assert all(same(x, y) for x, y in zip(stream_batches(old / "digits", 4), stream_batches(png_shard_root / "digits", 4)))
    # Asking for png keeps the old set; the new default (raw at 16 px) rebuilds it.
    build("digits", None, str(old), size=16, encoding="png", progress=False)
    assert "up to date" in capsys.readouterr().err
    assert build("digits", None, str(old), size=16, progress=False)["encoding"] == "raw"
    assert "rebuilding: encoding changed (png -> raw)" in capsys.readouterr().err
    with pytest.raises(GensuiteError, match=r"^--encoding: moons holds points, always stored as npy"):
        build("moons", None, str(old), n=100, encoding="raw", progress=False)


def test_the_builder_flag_picks_the_encoding(tmp_path):
    cmd = [sys.executable, str(ROOT / "shards" / "build.py"), "digits", "--size", "8", "--no-progress",
           "--out", str(tmp_path)]
    result = subprocess.run(cmd + ["--encoding", "png"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "4 png shards" in result.stderr, result.stderr
    assert read_manifest(tmp_path / "digits")["encoding"] == "png"
    with pytest.raises(GensuiteError, match=r"^--encoding: unknown encoding 'jpeg'; choose one of raw, png$"):
        build("digits", None, str(tmp_path), size=8, encoding="jpeg", progress=False)


# -- integrity ---------------------------------------------------------------------------------------------------


def test_a_corrupt_raw_shard_is_refused_with_the_one_line_error(raw_copy):
    folder = raw_copy / "digits"
    shard = folder / "train-000001.tar"
    open_shard_set(folder)  # verified and cached
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a pixel inside a record: same size, only the sha256 can tell
    shard.write_bytes(bytes(data))
    expected = f"{shard} does not match its sha256 in manifest.json (changed or damaged); {hint(raw_copy)}"
    with pytest.raises(GensuiteError) as err:
        open_shard_set(folder)
    assert str(err.value) == expected
    result = subprocess.run([sys.executable, "shards/build.py", "digits", "--out", str(raw_copy), "--verify-only"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert error_line(result) == f"error: {expected}"


def test_damaged_records_with_matching_checksums_are_named_when_read(raw_copy):
    folder = raw_copy / "digits"
    shard = folder / "test-000000.tar"

    def wrong_shape(key, fields):
        buf = io.BytesIO()
        np.save(buf, np.zeros((RECORD_SIZE, 1, 20, 20), np.uint8))
        return {**fields, "x.npy": buf.getvalue()} if key == "00000128" else fields

    rewrite_shard(shard, wrong_shape)
    with pytest.raises(GensuiteError) as err:
        read_split(folder, "test", 297)
    assert str(err.value) == (f"{shard}: sample 00000128 does not decode (x.npy has shape 1x20x20, the manifest says "
                              f"1x16x16); {hint(raw_copy)}")
    assert read_split(folder, "test", 128)["x"].shape == (128, 1, 16, 16)  # the first record is fine

    rewrite_shard(shard, lambda key, fields: {**fields, "cls.npy": b"garbage"} if key == "00000000" else fields)
    with pytest.raises(GensuiteError) as err:
        read_split(folder, "test", 8)
    assert str(err.value) == (f"{shard}: record 00000000 does not decode (cls.npy: not an npy array); "
                              f"{hint(raw_copy)}")

    shard = folder / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:100_000])  # two whole records (33 kB each), then the middle of one
    with pytest.raises(GensuiteError, match=rf"^{re.escape(str(shard))}: truncated or damaged tar, unreadable after "
                                            rf"{2 * RECORD_SIZE} samples \(ReadError: [^)]+\); {re.escape(hint(raw_copy))}$"):
        list(iterate_split(folder, "train", 64))


def test_skip_mode_leaves_out_a_bad_record_deterministically(raw_copy):
    folder = raw_copy / "digits"
    rewrite_shard(folder / "train-000000.tar",
                  lambda key, fields: {**fields, "x.npy": b"not npy"} if key == "00000128" else fields)
    a = stream_batches(folder, 30, batch_size=16, shuffle_buffer=64, on_bad_sample="skip")
    assert all(len(b["x"]) + int(b[SKIPPED]) == 16 for b in a)
    assert 0 < sum(int(b[SKIPPED]) for b in a) <= RECORD_SIZE
    b = stream_batches(folder, 30, workers=2, batch_size=16, shuffle_buffer=64, on_bad_sample="skip")
    assert all(same(x, y) for x, y in zip(a, b))
    with pytest.raises(GensuiteError, match=r"sample 00000\d{3} does not decode \(x\.npy: not an npy array\); "
                                            r"rebuild with: .+ or set data\.on_bad_sample: skip$"):
        stream_batches(folder, 30, batch_size=16, shuffle_buffer=64)


# -- ranks -------------------------------------------------------------------------------------------------------

SIZES = (5, 11, 23)  # deliberately uneven, in records of 4 (a shard's last one shorter)


def write_uneven_raw_shards(folder) -> list[ShardInfo]:
    """Images of 1x1x2 pixels holding their index (low byte, high byte), as raw records of 4."""
    shards, index = [], 0
    for i, size in enumerate(SIZES):
        path = os.path.join(folder, f"train-{i:06d}.tar")
        with wds.TarWriter(path, mtime=0) as sink:
            for first in range(index, index + size, 4):
                rows = range(first, min(first + 4, index + size))
                pixels = [np.array([[[j % 256], [j // 256]]], np.uint8) for j in rows]
                sink.write(encode_record(first, pixels, [j % 3 for j in rows], [{}] * len(rows), {}))
        index += size
        shards.append(ShardInfo(path, size))
    return shards


def raw_stream(shards, **kw) -> ShardStream:
    args = dict(kind="image", channels=1, batch_size=4, batches_per_epoch=6, seed=7, shuffle_buffer=8, shape=(1, 1, 2))
    args.update(kw)
    return ShardStream(shards, **args)


def ids(batch) -> list[int]:
    pixels = (batch["x"] * 255).round().long()
    return (pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 0, 1]).tolist()


def test_ranks_get_equal_batch_counts_and_disjoint_shards_from_raw_records(tmp_path):
    shards = write_uneven_raw_shards(tmp_path)
    per_rank = [list(itertools.islice(iter(raw_stream(shards, rank=r, world_size=2)), 6 * 3)) for r in (0, 1)]
    assert [len(batches) for batches in per_rank] == [18, 18]  # three epochs each, however uneven the shards
    assert all(len(ids(b)) == 4 for batches in per_rank for b in batches)
    for batches in per_rank:
        assert all(b["y"].tolist() == [i % 3 for i in ids(b)] for b in batches)
    # Epoch 0: split by node, so the ranks read disjoint shards and see disjoint samples.
    seen = [set(itertools.chain(*(ids(b) for b in batches[:6]))) for batches in per_rank]
    assert not seen[0] & seen[1]
    with_workers = list(itertools.islice(iter(make_loader(raw_stream(shards, rank=1, world_size=2), 2)), 18))
    assert [ids(b) for b in with_workers] == [ids(b) for b in per_rank[1]]


def _rank_main(rank, world, port, shard_paths, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shards = [ShardInfo(p, n) for p, n in shard_paths]
    count = 0
    for _ in itertools.islice(iter(make_loader(raw_stream(shards, rank=rank, world_size=world), workers=1)), 6 * 3):
        t = torch.ones(1)
        dist.all_reduce(t)  # a collective per batch, as DDP does: a rank that ran short would hang here
        count += 1
    torch.save({"count": count}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_on_uneven_raw_shards_run_equal_batches(tmp_path):
    shards = write_uneven_raw_shards(tmp_path)
    mp.start_processes(_rank_main, args=(2, free_port(), [(s.path, s.samples) for s in shards], str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    assert [torch.load(tmp_path / f"rank{r}.pt")["count"] for r in range(2)] == [18, 18]
