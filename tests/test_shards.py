"""Shard builder: original formats (IDX, CIFAR pickles, scikit-learn) round-trip pixel for pixel."""

import gzip
import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gensuite.data.pipeline import read_shards, read_split, split_shards
from gensuite.data.shards import build, data_spec, read_manifest, sha256, shard_paths
from gensuite.errors import GensuiteError

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """IDX: magic (0, 0, type 0x08 = ubyte, ndim), big-endian uint32 dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def mnist_fixture(folder: Path, gz: bool, n_train=20, n_test=7):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays["train" if prefix == "train" else "test"] = (images, labels)
    return arrays


def read_tars(paths):
    """Samples of tar shards in order, read with the standard library and numpy (independent of the
    builder and the pipeline): a PNG set's member groups as stored, a raw set's records expanded into
    one {"pixels": (H, W, C) uint8, "cls": label in ASCII} per sample."""
    groups = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    samples = []
    for key in sorted(groups):
        group = groups[key]
        if "x.npy" not in group:
            samples.append(group)
            continue
        pixels, labels = (np.load(io.BytesIO(group[k])) for k in ("x.npy", "cls.npy"))
        assert pixels.dtype == np.uint8 and labels.dtype == np.int64 and len(pixels) == len(labels)
        samples += [{"pixels": p.transpose(1, 2, 0), "cls": str(label).encode()} for p, label in zip(pixels, labels)]
    return samples


def png_pixels(sample: dict) -> np.ndarray:
    """A sample's stored pixels, (H, W) for one channel, (H, W, C) else: decoded PNG or raw."""
    if "pixels" in sample:
        return sample["pixels"][:, :, 0] if sample["pixels"].shape[2] == 1 else sample["pixels"]
    return np.asarray(Image.open(io.BytesIO(sample["png"])))


@pytest.mark.parametrize("gz, encoding", [(False, None), (True, None), (False, "png")])
def test_mnist_idx_round_trip_pixel_for_pixel(tmp_path, gz, encoding):
    src = tmp_path / "src"
    src.mkdir()
    arrays = mnist_fixture(src, gz)
    manifest = build("mnist", str(src), str(tmp_path / "out"), shard_size=8, progress=False, encoding=encoding)
    assert manifest["shape"] == [1, 28, 28] and manifest["num_classes"] == 10
    assert manifest["encoding"] == (encoding or "raw")  # the default for images of at most 64 px
    assert manifest["splits"]["train"]["samples"] == 20 and manifest["splits"]["test"]["samples"] == 7
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [8, 8, 4]
    for split, (images, labels) in arrays.items():
        samples = read_tars(shard_paths(tmp_path / "out" / "mnist", split))
        assert len(samples) == len(images)
        for sample, image, label in zip(samples, images, labels):
            assert np.array_equal(png_pixels(sample), image)
            assert int(sample["cls"]) == label
    # The training pipeline decodes the same pixels.
    batch = read_split(tmp_path / "out" / "mnist", "test", 7)
    assert np.array_equal((batch["x"][:, 0] * 255).round().byte().numpy(), arrays["test"][0])
    assert batch["y"].tolist() == arrays["test"][1].tolist()


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_cifar10_pickles_round_trip_with_channel_planes(tmp_path, encoding):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    rng = np.random.default_rng(1)
    expected = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        images[0, :, :, 0], images[0, :, :, 1], images[0, :, :, 2] = 10, 20, 30  # a distinct value per plane
        labels = rng.integers(0, 10, 4).tolist()
        data = images.transpose(0, 3, 1, 2).reshape(4, 3072)  # R plane, then G, then B
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(4)]}
        (src / name).write_bytes(pickle.dumps(batch))
        expected["test" if name == "test_batch" else "train"].append((images, labels))
    (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}))
    manifest = build("cifar10", str(tmp_path), str(tmp_path / "out"), progress=False, encoding=encoding)
    assert manifest["shape"] == [3, 32, 32] and manifest["class_names"][9] == "truck"
    for split, parts in expected.items():
        images = np.concatenate([p[0] for p in parts])
        labels = sum((p[1] for p in parts), [])
        samples = read_tars(shard_paths(tmp_path / "out" / "cifar10", split))
        assert len(samples) == len(images) == manifest["splits"][split]["samples"]
        for sample, image, label in zip(samples, images, labels):
            assert np.array_equal(png_pixels(sample), image)
            assert int(sample["cls"]) == label
        assert png_pixels(samples[0])[0, 0].tolist() == [10, 20, 30]


def test_digits_are_scikit_learns_and_the_manifest_is_complete(tmp_path):
    from sklearn.datasets import load_digits

    manifest = build("digits", None, str(tmp_path), size=8, progress=False)
    folder = tmp_path / "digits"
    assert manifest["splits"]["train"]["samples"] == 1500 and manifest["splits"]["test"]["samples"] == 297
    assert manifest["shape"] == [1, 8, 8] and manifest["class_names"] == list("0123456789")
    for split in ("train", "test"):
        for shard in manifest["splits"][split]["shards"]:
            assert sha256(folder / shard["file"]) == shard["sha256"]
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    samples = read_tars(shard_paths(folder, "train"))
    train_order = [i for i in order if i not in set(order[-297:].tolist())]
    for sample, i in zip(samples[:50], train_order[:50]):
        assert int(sample["cls"]) == digits.target[i]
        assert np.array_equal(png_pixels(sample), np.round(digits.images[i] * 255 / 16).astype(np.uint8))
    spec = data_spec(read_manifest(folder))
    assert spec.shape == (1, 8, 8) and spec.samples == {"train": 1500, "test": 297}


def test_moons_points_are_make_moons_exactly(tmp_path):
    from sklearn.datasets import make_moons

    build("moons", None, str(tmp_path), n=300, noise=0.1, seed=4, progress=False)
    samples = read_tars(shard_paths(tmp_path / "moons", "train"))
    points, labels = make_moons(n_samples=300, noise=0.1, random_state=4)
    got = np.stack([np.load(io.BytesIO(s["npy"])) for s in samples])
    assert got.dtype == np.float32 and np.array_equal(got, points.astype(np.float32))
    assert [int(s["cls"]) for s in samples] == labels.tolist()


def test_rerun_verifies_and_skips_and_a_corrupt_shard_is_rebuilt(tmp_path, capsys):
    build("digits", None, str(tmp_path), size=8, progress=False)
    folder = tmp_path / "digits"
    first = folder / "train-000000.tar"
    stamp, digest = first.stat().st_mtime_ns, sha256(first)
    build("digits", None, str(tmp_path), size=8, progress=False)
    assert "up to date" in capsys.readouterr().err
    assert first.stat().st_mtime_ns == stamp
    data = bytearray(first.read_bytes())
    data[2000] ^= 0xFF
    first.write_bytes(bytes(data))
    build("digits", None, str(tmp_path), size=8, progress=False)
    assert "rebuilding" in capsys.readouterr().err and sha256(first) == digest


def test_shards_are_byte_reproducible(tmp_path):
    a = build("digits", None, str(tmp_path / "a"), size=8, progress=False)
    b = build("digits", None, str(tmp_path / "b"), size=8, progress=False)
    assert a["splits"] == b["splits"]


def test_missing_and_malformed_sources_name_the_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    mnist_fixture(src, gz=False)
    (src / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(GensuiteError, match=r"t10k-labels-idx1-ubyte\(\.gz\): not found"):
        build("mnist", str(src), str(tmp_path / "out"), progress=False)
    mnist_fixture(src, gz=False)
    (src / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x09" + b"\x00" * 64)  # wrong magic
    with pytest.raises(GensuiteError, match=r"train-images-idx3-ubyte: not an IDX image file"):
        build("mnist", str(src), str(tmp_path / "out"), progress=False)
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    with pytest.raises(GensuiteError, match=r"data_batch_1: not found"):
        build("cifar10", str(cifar), str(tmp_path / "out"), progress=False)
    (cifar / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(GensuiteError, match=r"data_batch_1: not a CIFAR-10 python batch"):
        build("cifar10", str(cifar), str(tmp_path / "out"), progress=False)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    for args in (["mnist", "--src", str(tmp_path)], ["imagenet"], ["mnist"], ["moons", "--validation", "-0.1"]):
        result = subprocess.run([sys.executable, str(ROOT / "shards" / "build.py"), *args, "--no-progress",
                                 "--out", str(tmp_path)], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ")
        if "--validation" in args:
            assert result.stderr.startswith("error: --validation: must be a fraction in [0, 1)")
    assert not (tmp_path / "moons").exists()


def test_validation_split_takes_exactly_the_expected_training_samples(tmp_path):
    plain = build("digits", None, str(tmp_path / "plain"), size=8, progress=False)
    held = build("digits", None, str(tmp_path / "held"), size=8, validation=0.15, progress=False)
    n = plain["splits"]["train"]["samples"]
    # Training sample i goes to validation iff floor((i+1) f) > floor(i f), f = 0.15 = 3/20 exactly.
    chosen = [i for i in range(n) if (i + 1) * 3 // 20 > i * 3 // 20]
    kept = [i for i in range(n) if i not in set(chosen)]
    assert len(chosen) == n * 3 // 20 == 225 and chosen[0] == 6 and chosen[-1] == n - 1
    assert max(b - a for a, b in zip(chosen, chosen[1:])) == 7  # evenly spread: gaps of 6 or 7
    assert list(held["splits"]) == ["train", "validation", "test"]
    assert {k: v["samples"] for k, v in held["splits"].items()} == {"train": n - 225, "validation": 225, "test": 297}
    assert held["params"] == {"size": 8, "validation": 0.15, "shard_size": 500}
    assert held["splits"]["test"] == plain["splits"]["test"]  # byte-identical test shards
    original = read_split(tmp_path / "plain" / "digits", "train", n)
    train = read_split(tmp_path / "held" / "digits", "train", n)
    validation = read_split(tmp_path / "held" / "digits", "validation", n)
    assert torch.equal(validation["x"], original["x"][chosen]) and torch.equal(validation["y"], original["y"][chosen])
    assert torch.equal(train["x"], original["x"][kept]) and torch.equal(train["y"], original["y"][kept])
    validation_keys = [s["__key__"] for s in read_shards(split_shards(held, tmp_path / "held" / "digits", "validation"))]
    assert validation_keys == [f"{i:08d}" for i in range(225)]


def test_changing_the_validation_fraction_rebuilds(tmp_path, capsys):
    folder = tmp_path / "moons"
    build("moons", None, str(tmp_path), n=200, validation=0.1, progress=False)
    build("moons", None, str(tmp_path), n=200, validation=0.1, progress=False)
    assert "up to date" in capsys.readouterr().err
    manifest = build("moons", None, str(tmp_path), n=200, validation=0.25, progress=False)
    assert "rebuilding: build options" in capsys.readouterr().err
    assert manifest["splits"]["validation"]["samples"] == 50 and manifest["splits"]["train"]["samples"] == 150
    manifest = build("moons", None, str(tmp_path), n=200, progress=False)
    assert "rebuilding" in capsys.readouterr().err and "validation" not in manifest["splits"]
    assert not list(folder.glob("validation-*.tar"))  # stale validation shards are gone
    # A manifest written before the option existed means validation 0: still up to date.
    old = json.loads((folder / "manifest.json").read_text())
    del old["params"]["validation"]
    (folder / "manifest.json").write_text(json.dumps(old))
    build("moons", None, str(tmp_path), n=200, progress=False)
    assert "up to date" in capsys.readouterr().err
    with pytest.raises(GensuiteError, match=r"^--validation: must be a fraction in \[0, 1\), got 1.0$"):
        build("moons", None, str(tmp_path), n=200, validation=1.0, progress=False)


def test_manifest_json_is_written_last_and_names_the_build_command(tmp_path):
    with pytest.raises(GensuiteError, match=r"python shards/build.py mnist --src DIR"):
        read_manifest(tmp_path / "mnist")
    build("moons", None, str(tmp_path), n=100, progress=False)
    manifest = json.loads((tmp_path / "moons" / "manifest.json").read_text())
    assert manifest["params"] == {"n": 100, "noise": 0.05, "seed": 0, "validation": 0.0, "shard_size": 4000}
    assert manifest["builder_version"] >= 1 and manifest["kind"] == "points"
