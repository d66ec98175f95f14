"""The shard stream: equal batch counts per rank on uneven shards, determinism, exact resume."""

import io
import itertools
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from gensuite.data.pipeline import ShardInfo, ShardStream, make_loader
from launchers import free_port

SIZES = (5, 11, 23)  # deliberately uneven


def write_uneven_shards(folder) -> list[ShardInfo]:
    shards, index = [], 0
    for i, size in enumerate(SIZES):
        path = os.path.join(folder, f"train-{i:06d}.tar")
        with wds.TarWriter(path, mtime=0) as sink:
            for _ in range(size):
                buf = io.BytesIO()
                np.save(buf, np.array([index, index * 0.5], dtype=np.float32))
                sink.write({"__key__": f"{index:08d}", "npy": buf.getvalue(), "cls": str(index % 3).encode()})
                index += 1
        shards.append(ShardInfo(path, size))
    return shards


def stream(shards, **kw) -> ShardStream:
    args = dict(kind="points", channels=1, batch_size=4, batches_per_epoch=5, seed=7, shuffle_buffer=8)
    args.update(kw)
    return ShardStream(shards, **args)


def ids(batches) -> list[list[int]]:
    return [b["x"][:, 0].long().tolist() for b in batches]


def take(loader_or_stream, n):
    return list(itertools.islice(iter(loader_or_stream), n))


def test_stream_is_deterministic_and_labels_follow_samples(tmp_path):
    shards = write_uneven_shards(tmp_path)
    a, b = take(stream(shards), 12), take(stream(shards), 12)
    assert ids(a) == ids(b)
    assert all(len(x) == 4 for x in ids(a))
    for batch in a:
        assert torch.equal(batch["y"], batch["x"][:, 0].long() % 3)
        assert torch.allclose(batch["x"][:, 1], batch["x"][:, 0] * 0.5)
    assert ids(take(stream(shards, seed=8), 12)) != ids(a)


def test_epochs_reshuffle_and_cover_the_rank_shards(tmp_path):
    shards = write_uneven_shards(tmp_path)
    s = stream(shards, batches_per_epoch=10)  # 40 samples > 39: every sample seen in epoch 0
    first, second = ids(take(s, 20)[:10]), ids(take(s, 20)[10:])
    assert set(itertools.chain(*first)) == set(range(sum(SIZES)))
    assert first != second


def test_resume_position_and_worker_count_do_not_change_the_batches(tmp_path):
    shards = write_uneven_shards(tmp_path)
    straight = ids(take(stream(shards), 13))
    resumed = ids(take(stream(shards, start_batch=7), 6))
    assert resumed == straight[7:]
    with_workers = ids(take(make_loader(stream(shards, start_batch=3), workers=2), 10))
    assert with_workers == straight[3:]


def _rank_main(rank, world, port, shard_paths, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shards = [ShardInfo(p, n) for p, n in shard_paths]
    s = stream(shards, rank=rank, world_size=world, batches_per_epoch=6)
    seen, count = [], 0
    for batch in itertools.islice(iter(make_loader(s, workers=0)), 6 * 3):  # three epochs
        t = torch.ones(1)
        dist.all_reduce(t)  # a collective per batch, as DDP does: a rank that ran short would hang here
        assert t.item() == world
        seen.extend(batch["x"][:, 0].long().tolist())
        count += 1
    torch.save({"count": count, "seen": seen}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_on_three_uneven_shards_run_equal_batches(tmp_path):
    shards = write_uneven_shards(tmp_path)
    mp.start_processes(_rank_main, args=(2, free_port(), [(s.path, s.samples) for s in shards], str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["count"] == r1["count"] == 18
    # Epoch 0: ranks read disjoint shards (split by node), so they see disjoint samples.
    assert not set(r0["seen"][:24]) & set(r1["seen"][:24])
    assert len(r0["seen"]) == len(r1["seen"]) == 18 * 4


def test_extra_fields_are_decoded_into_the_batch(tmp_path):
    path = str(tmp_path / "train-000000.tar")
    with wds.TarWriter(path, mtime=0) as sink:
        for i in range(6):
            point, emb = io.BytesIO(), io.BytesIO()
            np.save(point, np.array([i, 0], dtype=np.float32))
            np.save(emb, np.full(5, i, dtype=np.float32))  # e.g. a text embedding
            sink.write({"__key__": f"{i:08d}", "npy": point.getvalue(), "emb.npy": emb.getvalue(), "cls": b"1"})
    batch = take(stream([ShardInfo(path, 6)], batch_size=3, batches_per_epoch=2), 1)[0]
    assert batch["emb"].shape == (3, 5)
    assert torch.equal(batch["emb"][:, 0], batch["x"][:, 0])
