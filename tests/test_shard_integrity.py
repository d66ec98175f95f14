"""Damaged shard sets: refused before a run reads them, or named by shard and sample when read; one-line errors."""

import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gensuite.data import shards as shards_module
from gensuite.data.pipeline import SKIPPED, ShardStream, iterate_split, make_loader, read_split, split_shards
from gensuite.data.shards import VERIFIED_CACHE, open_shard_set, read_manifest, sha256
from gensuite.errors import GensuiteError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(shard_root, png_shard_root, tmp_path) -> Path:
    """A private copy of the digits (PNG-encoded: these tests damage PNG members; raw records are
    damaged in test_raw_shards.py) and moons sets, its files aged a minute as if built earlier."""
    copy = tmp_path / "shards"
    for name, source in (("digits", png_shard_root), ("moons", shard_root)):
        shutil.copytree(source / name, copy / name, ignore=shutil.ignore_patterns(".stats"))
    old = time.time_ns() - 60 * 10**9
    for path in copy.glob("*/*"):
        os.utime(path, ns=(old, old))
    return copy


def job_file(tmp_path, root, dataset="digits", **data) -> Path:
    path = tmp_path / "job.yaml"  # JSON is YAML
    path.write_text(json.dumps({
        "family": "vae", "flavor": "debug",
        "data": {"dataset": dataset, "root": str(root), "shuffle_buffer": 64, **data},
        "train": {"steps": 2, "batch_size": 16, "log_every": 1, "checkpoint_every": 100},
        "eval": {"metrics": []}, "log": {"progress_bar": False, "grid_size": 4}}))
    return path


def cli(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gensuite", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def train(tmp_path, root, **data):
    return cli("train", job_file(tmp_path, root, **data), "--run-dir", tmp_path / "run")


def error_line(result, before_training=True) -> str:
    """The run's one error line: exit code 2, no traceback; nothing else on stderr when the error comes
    before training starts (else only the run's own ``[gensuite ...]`` log lines)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    if not before_training:
        lines = [line for line in lines if not line.startswith("[gensuite ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def hint(root, dataset="digits") -> str:
    return f"rebuild with: python shards/build.py {dataset} --out {root}"


def set_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def record_sha256(folder: Path, name: str) -> None:
    """The manifest takes the file's current sha256, so only reading it can find the damage."""
    def change(manifest):
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if shard["file"] == name:
                    shard["sha256"] = sha256(folder / name)
    set_manifest(folder, change)


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard sample by sample through ``change(key, fields) -> fields``; record its sha256."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    with wds.TarWriter(str(path), mtime=0) as sink:
        for key in sorted(samples):
            sink.write({"__key__": key, **change(key, samples[key])})
    record_sha256(path.parent, path.name)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def even_keys_damaged(key, fields):
    return {**fields, "png": b"not a png"} if int(key) % 2 == 0 else fields


# -- refused before a run reads the shards --------------------------------------------------------------------


def test_a_flipped_byte_is_refused_by_name_with_the_rebuild_command(root, tmp_path):
    shard = root / "digits" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF  # same size: only the sha256 can tell
    shard.write_bytes(bytes(data))
    assert error_line(train(tmp_path, root)) == (
        f"error: {shard} does not match its sha256 in manifest.json (changed or damaged); {hint(root)}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_truncated_shard_is_refused_at_start(root, tmp_path):
    shard = root / "digits" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:20_000])
    assert error_line(train(tmp_path, root)) == (
        f"error: {shard} does not match its sha256 in manifest.json (changed or damaged); {hint(root)}")


def test_a_missing_shard_is_refused(root, tmp_path):
    shard = root / "digits" / "train-000002.tar"
    shard.unlink()
    assert error_line(train(tmp_path, root)) == (
        f"error: {shard} is missing (listed in manifest.json); {hint(root)}")


@pytest.mark.parametrize("field, path", [
    ("class_names", "class_names"),
    ("shard sha256", "splits.train.shards[1].sha256"),
])
def test_a_manifest_without_a_field_is_refused(root, tmp_path, field, path):
    def drop(manifest):
        if field == "class_names":
            del manifest["class_names"]
        else:
            del manifest["splits"]["train"]["shards"][1]["sha256"]
    set_manifest(root / "digits", drop)
    assert error_line(train(tmp_path, root)) == (
        f"error: {root / 'digits' / 'manifest.json'}: no field {path!r}; {hint(root)}")


def test_a_manifest_that_is_not_json_is_refused(root, tmp_path):
    (root / "digits" / "manifest.json").write_text("{not json")
    assert error_line(train(tmp_path, root)) == (
        f"error: {root / 'digits' / 'manifest.json'}: unreadable manifest (Expecting property name enclosed in "
        f"double quotes: line 1 column 2 (char 1)); {hint(root)}")


def test_validate_data_and_verify_only_refuse_a_damaged_set_like_train(root, tmp_path):
    shard = root / "digits" / "test-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    expected = f"error: {shard} does not match its sha256 in manifest.json (changed or damaged); {hint(root)}"
    assert error_line(cli("validate", "--data", job_file(tmp_path, root))) == expected
    build = subprocess.run([sys.executable, "shards/build.py", "digits", "--out", str(root), "--verify-only"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert error_line(build) == expected
    good = subprocess.run([sys.executable, "shards/build.py", "moons", "--out", str(root), "--verify-only"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert good.returncode == 0 and good.stderr.strip() == "moons: all 2 shards verified"


def test_the_default_root_gives_the_plain_rebuild_command(root, tmp_path):
    (root / "digits" / "train-000000.tar").unlink()
    job = job_file(tmp_path, "shards")  # relative: the default root, seen from tmp_path
    result = cli("validate", "--data", job, cwd=tmp_path)
    assert error_line(result) == ("error: shards/digits/train-000000.tar is missing (listed in manifest.json); "
                                  "rebuild with: python shards/build.py digits")


# -- the verification cache ----------------------------------------------------------------------------------


def test_verification_is_cached_and_a_changed_file_is_noticed(root, tmp_path, monkeypatch):
    folder = root / "digits"
    hashed = []
    real = shards_module.sha256
    monkeypatch.setattr(shards_module, "sha256", lambda path: hashed.append(Path(path).name) or real(path))
    open_shard_set(folder)
    assert sorted(hashed) == sorted(p.name for p in folder.glob("*.tar"))
    cache = json.loads((folder / VERIFIED_CACHE).read_text())["shards"]
    assert set(cache) == set(hashed) and all({"size", "mtime_ns", "sha256"} <= set(e) for e in cache.values())
    hashed.clear()
    assert open_shard_set(folder) == read_manifest(folder) and hashed == []  # a cached start hashes nothing

    shard = folder / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0x01  # same size; the write gives it a new mtime
    shard.write_bytes(bytes(data))
    with pytest.raises(GensuiteError, match=re.escape(f"{shard} does not match its sha256")):
        open_shard_set(folder)
    assert hashed == ["train-000000.tar"]  # only the changed file was hashed again
    assert error_line(cli("validate", "--data", job_file(tmp_path, root))).startswith(f"error: {shard} does not")


def test_a_shard_folder_that_cannot_be_written_is_verified_every_time_silently(root, capsys):
    folder = root / "digits"
    (folder / ".stats").write_text("")  # a file where the cache folder would go: the cache cannot be written
    open_shard_set(folder)
    open_shard_set(folder)
    assert capsys.readouterr() == ("", "")
    assert not list(folder.glob(".*.tmp")) and (folder / ".stats").read_text() == ""


# -- samples that do not decode -----------------------------------------------------------------------------


def test_an_undecodable_png_names_the_shard_and_sample_from_a_worker(root, tmp_path):
    for shard in (root / "digits").glob("train-*.tar"):
        rewrite_shard(shard, even_keys_damaged)
    line = error_line(train(tmp_path, root, workers=1), before_training=False)
    assert re.fullmatch(rf"error: {re.escape(str(root / 'digits'))}/train-00000\d\.tar: sample \d{{7}}[02468] does "
                        rf"not decode \(png: UnidentifiedImageError: cannot identify image file\); "
                        rf"{re.escape(hint(root))} or set data\.on_bad_sample: skip", line), line


def test_skip_mode_trains_and_logs_the_skipped_count(root, tmp_path):
    for shard in (root / "digits").glob("train-*.tar"):
        rewrite_shard(shard, even_keys_damaged)
    result = train(tmp_path, root, on_bad_sample="skip")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [int(n) for n in re.findall(r"step \d: skipped (\d+) samples so far that do not decode "
                                         r"\(data\.on_bad_sample: skip\)", result.stderr)]
    assert counts and counts == sorted(counts) and counts[0] > 0


def test_skip_mode_is_deterministic_whatever_the_workers_and_resumes_exactly(root):
    folder = root / "digits"
    for shard in folder.glob("train-*.tar"):
        rewrite_shard(shard, even_keys_damaged)
    shards = split_shards(read_manifest(folder), folder, "train")

    def batches(workers=0, start=0, n=6):
        stream = ShardStream(shards, "image", 1, batch_size=8, batches_per_epoch=20, seed=5, shuffle_buffer=32,
                             start_batch=start, shape=(1, 16, 16), on_bad_sample="skip")
        return list(itertools.islice(iter(make_loader(stream, workers)), n))

    def same(a, b):
        return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                        for x, y in zip(a, b))

    first = batches()
    assert all(len(b["x"]) + int(b[SKIPPED]) == 8 for b in first)
    assert 0 < sum(int(b[SKIPPED]) for b in first) < 6 * 8
    assert same(first, batches()) and same(first, batches(workers=2))
    assert same(first[3:], batches(start=3, n=3))  # a resumed stream continues exactly


@pytest.mark.parametrize("damage, reason", [
    (lambda f: {**f, "png": b"\x89PNG\r\n\x1a\n" + f["png"][8:40]}, r"png: \w+Error: .+"),
    (lambda f: {**f, "png": png(np.zeros((20, 20), np.uint8))}, r"png has shape 1x20x20, the manifest says 1x16x16"),
    (lambda f: {k: v for k, v in f.items() if k != "png"}, r"no png field"),
    (lambda f: {k: v for k, v in f.items() if k != "cls"}, r"no cls field"),
    (lambda f: {**f, "cls": b"seven"}, r"cls: ValueError: invalid literal for int\(\) with base 10: b'seven'"),
], ids=["truncated png", "wrong shape", "no png", "no cls", "bad label"])
def test_every_kind_of_bad_sample_is_named(root, damage, reason):
    folder = root / "digits"
    rewrite_shard(folder / "test-000000.tar", lambda key, f: damage(f) if key == "00000003" else f)
    with pytest.raises(GensuiteError) as err:
        read_split(folder, "test", 8)
    message = str(err.value)
    assert "\n" not in message
    assert re.fullmatch(rf"{re.escape(str(folder / 'test-000000.tar'))}: sample 00000003 does not decode "
                        rf"\({reason}\); {re.escape(hint(root))}", message), message


def test_bad_points_are_named(root):
    folder = root / "moons"

    def damage(key, fields):
        buf = io.BytesIO()
        np.save(buf, np.zeros(3, np.float32))  # a point of 3 coordinates in a 2-d set
        return {**fields, "npy": buf.getvalue()} if key == "00000001" else fields

    rewrite_shard(folder / "test-000000.tar", damage)
    with pytest.raises(GensuiteError, match=r"test-000000\.tar: sample 00000001 does not decode \(npy has shape 3, "
                                            r"the manifest says 2\); rebuild with: python shards/build\.py moons"):
        next(iterate_split(folder, "test", 4))


def test_a_truncated_tar_with_a_matching_manifest_names_the_shard_when_read(root, tmp_path):
    folder = root / "digits"
    for shard in folder.glob("train-*.tar"):
        shard.write_bytes(shard.read_bytes()[:15_000])  # a few samples, then the middle of a member
        record_sha256(folder, shard.name)
    line = error_line(train(tmp_path, root), before_training=False)
    assert re.fullmatch(rf"error: {re.escape(str(folder))}/train-00000\d\.tar: truncated or damaged tar, unreadable after "
                        rf"\d+ samples \(ReadError: [^)]+\); {re.escape(hint(root))}", line), line


def test_a_shard_with_fewer_samples_than_its_manifest_says_is_named(root):
    folder = root / "digits"
    set_manifest(folder, lambda m: m["splits"]["test"]["shards"][0].update(samples=300))
    with pytest.raises(GensuiteError, match=re.escape(f"{folder / 'test-000000.tar'}: holds 297 samples, "
                                                      f"manifest.json says 300; {hint(root)}")):
        list(iterate_split(folder, "test", 64))
