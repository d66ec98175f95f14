"""Captioned datasets for text-to-image: StackGAN's CUB layout, the shapes demo, text encoders, extra fields."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cub_fixture import IMAGES, NO_CAPTIONS, captions_for, write_cub_fixture
from gensuite.data import pipeline
from gensuite.data.captioned import BACKGROUND_COLOURS, SHAPE_COLOURS, crop_box, safe_region
from gensuite.data.pipeline import ShardStream, iterate_split, read_split, split_shards
from gensuite.data.shards import build, read_manifest, sha256
from gensuite.errors import GensuiteError
from gensuite.text import HashingEncoder, SentenceEncoder, encoder_for

ROOT = Path(__file__).resolve().parents[1]
# (x1, y1, x2, y2) of each fixture image, worked out by hand from StackGAN's formula:
# R = int(0.75 max(w, h)), cx = int((2x + w) / 2), cy = int((2y + h) / 2), clipped to the image.
HAND_CROPS = {
    IMAGES[0][0]: (7, 0, 25, 18),  # R 9, centre (16, 9): clipped at the top
    IMAGES[1][0]: (0, 25, 25, 50),  # R int(15.15) = 15, centre (int(12.6), int(40.15)) = (12, 40): left, right, bottom
    IMAGES[2][0]: (15, 15, 45, 45),  # R 15, centre (30, 30): not clipped
    IMAGES[3][0]: (0, 0, 33, 21),  # R int(24.75) = 24, centre (16, 10): the whole image
    IMAGES[4][0]: (27, 0, 48, 17),  # R int(11.625) = 11, centre (int(38.65), int(6.2)) = (38, 6): top, right
}


def test_crop_box_is_stackgans_arithmetic():
    for key, size, box, _, _ in IMAGES:
        assert crop_box(box, *size) == HAND_CROPS[key], key
    assert crop_box((1.4, 1.4, 3.9, 3.9), 100, 100) == (1, 1, 5, 5)  # truncates: R int(2.925) = 2, centre 3
    assert crop_box((100, 50, 40, 60), 300, 200) == (75, 35, 165, 125)  # R 45, centre (120, 80)
    assert crop_box((280, 170, 40, 60), 300, 200) == (255, 155, 300, 200)  # clipped at right and bottom


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub")
    expected = write_cub_fixture(root / "birds")
    manifest = build("cub", str(root / "birds"), str(root / "out"), shard_size=2, progress=False)
    return root, expected, manifest


def expected_crop(src: Path, key: str, size: int) -> np.ndarray:
    with Image.open(src / "CUB_200_2011" / "images" / f"{key}.jpg") as image:
        crop = image.convert("RGB").crop(HAND_CROPS[key])
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1).astype(np.int16)


def test_cub_shards_hold_the_stackgan_crops_embeddings_and_captions(cub):
    root, expected, manifest = cub
    assert manifest["shape"] == [3, 76, 76] and manifest["num_classes"] == 200
    assert manifest["fields"] == {"hires": {"kind": "png", "shape": [3, 304, 304]},
                                  "embeddings": {"kind": "npy", "shape": [10, 1024]},
                                  "captions": {"kind": "json", "shape": []}}
    assert manifest["text_encoder"] == {"name": "char_cnn_rnn", "dim": 1024}
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 3, "test": 2}
    names = manifest["class_names"]
    assert (names[0], names[1], names[16]) == ("Black_footed_Albatross", "Laysan_Albatross", "Cardinal")
    for split, want in ((s, expected[s]) for s in ("train", "test")):
        batch = read_split(root / "out" / "cub", split, 10)
        assert batch["y"].tolist() == [c - 1 for c in want["classes"]]
        assert batch["embeddings"].dtype == torch.float32
        assert torch.equal(batch["embeddings"], torch.from_numpy(want["embeddings"]))
        assert batch["x"].shape == (len(want["keys"]), 3, 76, 76) and batch["hires"].shape[1:] == (3, 304, 304)
        for i, key in enumerate(want["keys"]):
            for field, size in (("x", 76), ("hires", 304)):
                got = (batch[field][i] * 255).round().to(torch.int16).numpy()
                assert np.abs(got - expected_crop(root / "birds", key, size)).max() <= 1, (key, field)
            assert batch["captions"][i] == ([] if key == NO_CAPTIONS else captions_for(key))


def test_cub_missing_files_are_one_line_errors_naming_the_file(tmp_path):
    src = tmp_path / "birds"
    write_cub_fixture(src)
    (src / "test" / "class_info.pickle").unlink()
    with pytest.raises(GensuiteError) as err:
        build("cub", str(src), str(tmp_path / "out"), progress=False)
    message = str(err.value)
    assert message.startswith(f"{src / 'test' / 'class_info.pickle'}: not found; --src must be StackGAN's")
    assert "\n" not in message and "CUB_200_2011/" in message
    image = src / "CUB_200_2011" / "images" / f"{IMAGES[2][0]}.jpg"
    image.unlink()
    result = subprocess.run([sys.executable, str(ROOT / "shards" / "build.py"), "cub", "--src", str(src), "--out",
                             str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {image}: not found; " + message.split("; ", 1)[1]]
    assert not (tmp_path / "out" / "cub" / "manifest.json").exists()
    assert not list((tmp_path / "out" / "cub").glob(".*.tmp"))  # the half-written shard is gone


def test_cub_can_drop_hires_and_re_embed_the_captions(tmp_path):
    src = tmp_path / "birds"
    write_cub_fixture(src)
    with pytest.raises(GensuiteError, match=re.escape(f"{src / 'text_c10' / NO_CAPTIONS}.txt: --text-encoder "
                                                      "hashing re-embeds 10 captions per image, found 0")):
        build("cub", str(src), str(tmp_path / "out"), hires=0, text_encoder="hashing", progress=False)
    (src / "text_c10" / f"{NO_CAPTIONS}.txt").write_text("\n".join(captions_for(NO_CAPTIONS)))
    manifest = build("cub", str(src), str(tmp_path / "out"), hires=0, text_encoder="hashing", text_dim=64,
                     progress=False)
    assert set(manifest["fields"]) == {"embeddings", "captions"} and manifest["fields"]["embeddings"]["shape"] == [10, 64]
    assert manifest["text_encoder"] == {"name": "hashing", "dim": 64}
    batch = read_split(tmp_path / "out" / "cub", "test", 10)
    want = HashingEncoder(64).embed([c for key in (IMAGES[3][0], IMAGES[4][0]) for c in captions_for(key)])
    assert "hires" not in batch and torch.equal(batch["embeddings"], torch.from_numpy(want).reshape(2, 10, 64))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    manifest = build("shapes", None, str(root), n=96, n_test=16, progress=False)
    return root / "shapes", manifest


def test_shapes_are_byte_reproducible_and_seeded(shapes, tmp_path):
    folder, manifest = shapes
    again = build("shapes", None, str(tmp_path / "a"), n=96, n_test=16, progress=False)
    assert again["splits"] == manifest["splits"]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert sha256(tmp_path / "a" / "shapes" / shard["file"]) == sha256(folder / shard["file"])
    other = build("shapes", None, str(tmp_path / "b"), n=96, n_test=16, seed=1, progress=False)
    assert other["splits"]["train"]["shards"][0]["sha256"] != manifest["splits"]["train"]["shards"][0]["sha256"]


def nearest_colour(rgb, palette: dict) -> str:
    return min(palette, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(rgb, palette[name])))


def test_shapes_captions_name_the_drawn_colours_size_and_position(shapes):
    folder, manifest = shapes
    assert manifest["num_classes"] == 30 and manifest["shape"] == [3, 76, 76]
    assert manifest["fields"]["embeddings"] == {"kind": "npy", "shape": [10, 256]}
    assert manifest["text_encoder"] == {"name": "hashing", "dim": 256}
    colours = {**SHAPE_COLOURS, **BACKGROUND_COLOURS}
    offset, side = safe_region(76)
    assert (offset, side) == (12, 52)
    sizes = {"small": [], "big": []}
    for split in ("train", "test"):
        batch = read_split(folder, split, 1000)
        for image, label, captions in zip((batch["x"] * 255).round().byte().numpy(), batch["y"], batch["captions"]):
            pixels = image.transpose(1, 2, 0).astype(int)
            background = nearest_colour(pixels[0, 0], BACKGROUND_COLOURS)
            mask = np.abs(pixels - BACKGROUND_COLOURS[background]).sum(-1) > 24
            ys, xs = np.nonzero(mask)
            # Inside the part of the image that every 64-px crop of the 76-px image keeps.
            assert ys.min() >= 12 and xs.min() >= 12 and ys.max() < 64 and xs.max() < 64
            cy, cx = int(round(ys.mean())), int(round(xs.mean()))
            shape = nearest_colour(pixels[cy, cx], SHAPE_COLOURS)
            assert shape != background
            assert manifest["class_names"][label].split()[0] == shape
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert len(captions) == 10 and len(set(captions)) >= 8
            for caption in captions:
                named = [w for w in re.findall(r"[a-z]+", caption) if w in colours]
                assert sorted(named) == sorted([shape, background]), caption
                assert re.search(rf"\b{background} background\b|background is {background}\b", caption), caption
                assert manifest["class_names"][label].split()[1] in caption
                vertical = "top" if cy < 30 else "bottom" if cy > 46 else None
                horizontal = "left" if cx < 30 else "right" if cx > 46 else None
                assert (re.search(r"top|upper", caption) is not None) == (vertical == "top"), caption
                assert (re.search(r"bottom|lower", caption) is not None) == (vertical == "bottom"), caption
                assert ("left" in caption) == (horizontal == "left") and ("right" in caption) == (horizontal == "right")
                if vertical is None and horizontal is None:
                    assert re.search(r"center|middle", caption), caption
            size = "small" if re.search(r"\b(small|little)\b", captions[0]) else "big"
            assert all(re.search(r"\b(small|little)\b" if size == "small" else r"\b(big|large)\b", c) for c in captions)
            sizes[size].append(extent)
    # Extents at most 14 px for small shapes, at least 17 px for big ones (a big triangle is the least wide).
    assert max(sizes["small"]) < 16 <= min(sizes["big"]), (max(sizes["small"]), min(sizes["big"]))


HASH_SCRIPT = ("import sys; sys.path.insert(0, {root!r}); from gensuite.text import HashingEncoder; "
               "sys.stdout.write(HashingEncoder(64).embed(['a red circle on a blue background']).tobytes().hex())")


def test_hashing_encoder_is_stable_across_processes_and_sees_word_order():
    encoder = HashingEncoder(64)
    here = encoder.embed(["a red circle on a blue background"])
    assert here.shape == (1, 64) and here.dtype == np.float32 and abs(np.linalg.norm(here) - 1) < 1e-6
    for seed in ("1", "2"):  # Python's own str hash differs between these processes
        out = subprocess.run([sys.executable, "-c", HASH_SCRIPT.format(root=str(ROOT))], capture_output=True,
                             text=True, env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}, check=True).stdout
        assert out == here.tobytes().hex()
    a, b, same = HashingEncoder(256).embed(["red circle on blue background", "blue circle on red background",
                                            "Red circle, on blue background!"])
    assert float(a @ b) < 0.9 and np.array_equal(a, same)
    assert not HashingEncoder(256).embed([""]).any()  # no words: all zeros, not NaN


def test_text_encoder_errors_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    with pytest.raises(GensuiteError, match=r"^--text-model: .*`pip install gensuite\[text\]` \(sentence-trans"
                                            r"formers\) and point --text-model at a downloaded model directory "
                                            r"such as all-MiniLM-L6-v2$"):
        SentenceEncoder("/models/all-MiniLM-L6-v2")
    with pytest.raises(GensuiteError, match=r"^--text-model: .*pip install gensuite\[text\]"):
        encoder_for({"name": "sentence", "dim": 384, "model": "/models/all-MiniLM-L6-v2"})
    with pytest.raises(GensuiteError, match=r"char-CNN-RNN embeddings of StackGAN's authors; gensuite cannot embed "
                                            r"new text with them; rebuild the shards with `--text-encoder sentence"):
        encoder_for({"name": "char_cnn_rnn", "dim": 1024})
    encoder = encoder_for({"name": "hashing", "dim": 32})
    assert isinstance(encoder, HashingEncoder) and encoder.describe() == {"name": "hashing", "dim": 32}
    with pytest.raises(GensuiteError, match=r"^--text-model: .*pip install gensuite\[text\]"):
        build("shapes", None, str(tmp_path), n=4, n_test=1, text_encoder="sentence", text_model="x",
              progress=False)
    assert not (tmp_path / "shapes" / "manifest.json").exists()


def test_pipeline_returns_captions_as_lists_and_decodes_only_the_requested_fields(cub, shapes, monkeypatch):
    folder, _ = shapes
    batch = read_split(folder, "train", 12)
    assert batch["embeddings"].shape == (12, 10, 256) and batch["embeddings"].dtype == torch.float32
    assert isinstance(batch["captions"], list) and len(batch["captions"]) == 12
    assert all(isinstance(c, str) for group in batch["captions"] for c in group)
    assert batch["x"].dtype == torch.float32 and 0 <= batch["x"].min() and batch["x"].max() <= 1
    assert set(read_split(folder, "train", 4, fields={"embeddings"})) == {"x", "y", "embeddings"}
    assert set(read_split(folder, "train", 4, fields=set())) == {"x", "y"}
    _, batch = next(iterate_split(folder, "test", 8, fields={"captions"}))
    assert set(batch) == {"x", "y", "captions"} and len(batch["captions"]) == 8
    manifest = read_manifest(folder)
    stream = ShardStream(split_shards(manifest, folder, "train"), "image", 3, batch_size=5, batches_per_epoch=2,
                         fields={"embeddings"})
    assert set(next(iter(stream))) == {"x", "y", "embeddings"}

    opened = []  # image sizes decoded: the 304-px crops must not be, when not asked for
    real_open = pipeline.Image.open

    def recording_open(fp, *args, **kwargs):
        image = real_open(fp, *args, **kwargs)
        opened.append(image.size[0])
        return image

    monkeypatch.setattr(pipeline.Image, "open", recording_open)
    root, _, _ = cub
    batch = read_split(root / "out" / "cub", "train", 3, fields={"embeddings", "captions"})
    assert opened == [76, 76, 76] and "hires" not in batch and batch["embeddings"].shape == (3, 10, 1024)
    batch = read_split(root / "out" / "cub", "train", 3)
    assert sorted(opened[3:]) == [76, 76, 76, 304, 304, 304] and batch["hires"].dtype == torch.float32
