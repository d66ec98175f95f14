"""Captioned image datasets for text-to-image families (StackGAN): CUB birds and the ``shapes`` demo.

Readers yield ``(split, image, label, extras)``: ``extras`` holds ``embeddings`` (10, D) float32 (one
per caption), ``captions`` (a list of strings) and, for CUB, ``hires`` (the same crop at 304 px for
Stage-II). Images are stored at 76 px: the StackGAN convention of random 64-px crops of 76-px images.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gensuite.errors import GensuiteError
from gensuite.text import TextEncoder, make_encoder

CaptionedRecord = tuple[str, np.ndarray, int, dict[str, Any]]
CHUNK = 128  # samples whose captions are embedded in one call (sentence models are much faster batched)


@lru_cache(maxsize=4)
def cached_encoder(name: str, model: str | None, dim: int) -> TextEncoder:
    """Cached: the reader and the manifest's description share one loaded model."""
    return make_encoder(name, model, dim)


def describe_text_encoder(params: dict) -> dict:
    if params["text_encoder"] == "char_cnn_rnn":
        return {"name": "char_cnn_rnn", "dim": CHAR_CNN_RNN_DIM}
    return cached_encoder(params["text_encoder"], params["text_model"], params["text_dim"]).describe()


def static_text_fields(params: dict) -> tuple[dict, dict]:
    """The extra fields and text encoder a build with these options will record, without building
    (for `gensuite summary` before the shards exist)."""
    name = params["text_encoder"]
    if name == "sentence":
        raise GensuiteError("--text-encoder sentence: the embedding size comes from the model; build the shards "
                            "first (python shards/build.py ... --text-encoder sentence --text-model DIR)")
    dim = CHAR_CNN_RNN_DIM if name == "char_cnn_rnn" else int(params["text_dim"])
    fields = {"embeddings": {"kind": "npy", "shape": [10, dim]}, "captions": {"kind": "json", "shape": []}}
    if params.get("hires"):
        fields["hires"] = {"kind": "png", "shape": [3, params["hires"], params["hires"]]}
    return fields, {"name": name, "dim": dim}


# -- CUB-200-2011 in StackGAN's layout ---------------------------------------------------------

CUB_CLASS_COUNT = 200
CHAR_CNN_RNN_DIM = 1024
# Placeholders for `gensuite summary` before a build; the manifest takes the names from the class folders.
CUB_CLASSES = tuple(f"class_{i:03d}" for i in range(1, CUB_CLASS_COUNT + 1))
CUB_CONTENTS = ("CUB_200_2011/ (images.txt, bounding_boxes.txt, images/), train/ and test/ "
                "(char-CNN-RNN-embeddings.pickle, filenames.pickle, class_info.pickle), optionally text_c10/")
CUB_LAYOUT = f"--src must be StackGAN's Data/birds folder with {CUB_CONTENTS}"


def crop_box(bbox, width: int, height: int) -> tuple[int, int, int, int]:
    """StackGAN's crop (x1, y1, x2, y2) around a CUB bounding box (x, y, w, h): a square of side
    1.5 max(w, h) on the box centre, clipped to the image. Integer truncation exactly as the original."""
    x, y, w, h = bbox
    r = int(max(w, h) * 0.75)
    cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
    return max(0, cx - r), max(0, cy - r), min(width, cx + r), min(height, cy + r)


def _cub_file(path: Path) -> Path:
    if not path.is_file():
        raise GensuiteError(f"{path}: not found; {CUB_LAYOUT}")
    return path


def _cub_root(src: str | None) -> Path:
    if not src:
        raise GensuiteError(f"--src: give StackGAN's Data/birds folder with {CUB_CONTENTS}")
    return Path(src)


def _read_table(path: Path, columns: int) -> dict[int, list[str]]:
    """``<id> <col> ...`` lines (images.txt, bounding_boxes.txt) -> {id: [cols]}."""
    table = {}
    for number, line in enumerate(_cub_file(path).read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != columns + 1 or not parts[0].isdigit():
            raise GensuiteError(f"{path}:{number}: expected '<id>' and {columns} value(s), got {line.strip()!r}")
        table[int(parts[0])] = parts[1:]
    return table


def _load_py2_pickle(path: Path):
    try:
        with open(_cub_file(path), "rb") as f:
            return pickle.load(f, encoding="latin1")  # StackGAN's pickles come from Python 2
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise GensuiteError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); {CUB_LAYOUT}") from None


def _as_text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def cub_class_names(root: Path) -> tuple[str, ...]:
    """Names from the class folders of images.txt ("001.Black_footed_Albatross" -> "Black_footed_Albatross");
    a class without images keeps its placeholder."""
    names = list(CUB_CLASSES)
    for (relpath,) in _read_table(root / "CUB_200_2011" / "images.txt", 1).values():
        folder = relpath.split("/", 1)[0]
        number, _, name = folder.partition(".")
        if number.isdigit() and 1 <= int(number) <= CUB_CLASS_COUNT and name:
            names[int(number) - 1] = name
    return tuple(names)


def cub_boxes(root: Path) -> dict[str, tuple[float, float, float, float]]:
    """Bounding box of every image, keyed like filenames.pickle (the relative path without .jpg)."""
    cub = root / "CUB_200_2011"
    paths = _read_table(cub / "images.txt", 1)
    boxes = _read_table(cub / "bounding_boxes.txt", 4)
    out = {}
    for image_id, (relpath,) in paths.items():
        if image_id not in boxes:
            raise GensuiteError(f"{cub / 'bounding_boxes.txt'}: no box for image {image_id} ({relpath}) of images.txt")
        try:
            out[relpath.rsplit(".", 1)[0]] = tuple(float(v) for v in boxes[image_id])
        except ValueError:
            raise GensuiteError(f"{cub / 'bounding_boxes.txt'}: image {image_id}: box {boxes[image_id]} is not "
                                "four numbers") from None
    return out


def cub_captions(root: Path, key: str) -> list[str]:
    path = root / "text_c10" / f"{key}.txt"
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def cub_split(root: Path, split: str) -> tuple[list[str], np.ndarray, list[int]]:
    """(keys, char-CNN-RNN embeddings (N, 10, 1024) float32, 1-based class ids) of StackGAN's split folder."""
    folder = root / split
    paths = {name: folder / f"{name}.pickle" for name in ("char-CNN-RNN-embeddings", "filenames", "class_info")}
    for path in paths.values():
        _cub_file(path)  # all three checked before the big embedding file is read
    keys = [_as_text(k) for k in _load_py2_pickle(paths["filenames"])]
    classes = [int(c) for c in _load_py2_pickle(paths["class_info"])]
    embeddings = np.asarray(_load_py2_pickle(paths["char-CNN-RNN-embeddings"]), dtype=np.float32)
    if embeddings.ndim != 3 or embeddings.shape[-1] != CHAR_CNN_RNN_DIM or len(embeddings) != len(keys):
        raise GensuiteError(f"{paths['char-CNN-RNN-embeddings']}: expected ({len(keys)}, 10, {CHAR_CNN_RNN_DIM}) "
                            f"embeddings (one row per entry of filenames.pickle), got {embeddings.shape}")
    if len(classes) != len(keys):
        raise GensuiteError(f"{paths['class_info']}: {len(classes)} class ids for {len(keys)} entries of "
                            "filenames.pickle")
    for key, cls in zip(keys, classes):
        folder_number = key.split("/", 1)[0].partition(".")[0]
        if not 1 <= cls <= CUB_CLASS_COUNT or (folder_number.isdigit() and int(folder_number) != cls):
            raise GensuiteError(f"{paths['class_info']}: class {cls} for {key!r} does not match its folder "
                                f"(CUB ids are 1..{CUB_CLASS_COUNT})")
    return keys, embeddings, classes


def cub_crop(path: Path, bbox, sizes: list[int]) -> list[np.ndarray]:
    """The StackGAN crop of one image, resized (bilinear, as the original) to each size: (s, s, 3) uint8."""
    from PIL import Image

    try:
        with Image.open(_cub_file(path)) as image:
            image = image.convert("RGB")
    except OSError as e:
        raise GensuiteError(f"{path}: unreadable image ({e})") from None
    crop = image.crop(crop_box(bbox, *image.size))
    return [np.asarray(crop.resize((s, s), Image.Resampling.BILINEAR)) for s in sizes]


def read_cub(src: str | None, lowres: int = 76, hires: int = 304, text_encoder: str = "char_cnn_rnn",
             text_model: str | None = None, text_dim: int = 256) -> Iterator[CaptionedRecord]:
    """StackGAN's CUB birds: train then test, in the order of each split's filenames.pickle."""
    if int(lowres) < 8 or int(hires) < 0:
        raise GensuiteError(f"--lowres/--hires: need lowres >= 8 and hires >= 0 (0: no hires field), got "
                            f"{lowres}/{hires}")
    root = _cub_root(src)
    boxes = cub_boxes(root)
    encoder = None if text_encoder == "char_cnn_rnn" else cached_encoder(text_encoder, text_model, text_dim)
    sizes = [int(lowres)] + ([int(hires)] if hires else [])
    for split in ("train", "test"):
        keys, embeddings, classes = cub_split(root, split)
        for start in range(0, len(keys), CHUNK):
            chunk = []
            for i in range(start, min(start + CHUNK, len(keys))):
                key = keys[i]
                if key not in boxes:
                    raise GensuiteError(f"{root / split / 'filenames.pickle'}: {key!r} is not in "
                                        f"{root / 'CUB_200_2011' / 'images.txt'}")
                images = cub_crop(root / "CUB_200_2011" / "images" / f"{key}.jpg", boxes[key], sizes)
                extras: dict[str, Any] = {"hires": images[1]} if hires else {}
                extras.update(embeddings=embeddings[i], captions=cub_captions(root, key))
                if encoder is not None and len(extras["captions"]) != 10:
                    raise GensuiteError(f"{root / 'text_c10' / (key + '.txt')}: --text-encoder {text_encoder} "
                                        f"re-embeds 10 captions per image, found {len(extras['captions'])}; put "
                                        f"StackGAN's text_c10 folder in {root}")
                chunk.append((split, images[0], classes[i] - 1, extras))
            if encoder is not None:
                _embed_captions(chunk, encoder)
            yield from chunk


def _embed_captions(chunk: list[CaptionedRecord], encoder: TextEncoder) -> None:
    """Replace the precomputed embeddings with the captions embedded by ``encoder`` (10 per image)."""
    vectors = encoder.embed([c for r in chunk for c in r[3]["captions"]])
    for i, record in enumerate(chunk):
        record[3]["embeddings"] = vectors[i * 10:(i + 1) * 10]


def describe_cub(src: str | None, params: dict) -> dict:
    return {"class_names": cub_class_names(_cub_root(src)), "text_encoder": describe_text_encoder(params)}


# -- shapes: coloured shapes with exact captions (CPU demo) ---------------------------------------

SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross")
SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (45, 90, 225), "yellow": (245, 215, 40),
                 "purple": (150, 60, 190), "orange": (250, 140, 30)}
BACKGROUND_COLOURS = {"white": (245, 245, 245), "black": (25, 25, 25), "gray": (128, 128, 128),
                      "blue": SHAPE_COLOURS["blue"], "yellow": SHAPE_COLOURS["yellow"]}
SHAPES_CLASSES = tuple(f"{colour} {kind}" for kind in SHAPE_KINDS for colour in SHAPE_COLOURS)
SIZES = {"small": 0.12, "big": 0.24}  # circumradius as a fraction of the safe region's side
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
# Centre of the shape as fractions (x, y) of the safe region.
NEAR, FAR = 0.27, 0.73
POSITIONS = {"center": (0.5, 0.5), "top": (0.5, NEAR), "bottom": (0.5, FAR), "left": (NEAR, 0.5),
             "right": (FAR, 0.5), "top left": (NEAR, NEAR), "top right": (FAR, NEAR), "bottom left": (NEAR, FAR),
             "bottom right": (FAR, FAR)}
WHERE = {
    "center": ("in the center", "in the middle", "at the center of the image"),
    "top": ("at the top", "near the top", "in the upper middle"),
    "bottom": ("at the bottom", "near the bottom", "in the lower middle"),
    "left": ("on the left", "near the left edge", "on the left side"),
    "right": ("on the right", "near the right edge", "on the right side"),
    "top left": ("in the top left corner", "in the upper left", "near the top left"),
    "top right": ("in the top right corner", "in the upper right", "near the top right"),
    "bottom left": ("in the bottom left corner", "in the lower left", "near the bottom left"),
    "bottom right": ("in the bottom right corner", "in the lower right", "near the bottom right"),
}
# Every phrasing names kind, colour, size, position and background ("<bg> background" or "background is <bg>").
TEMPLATES = (
    "a {size} {colour} {kind} {where} on a {bg} background",
    "there is a {size} {colour} {kind} {where} on a {bg} background",
    "a {bg} background with a {size} {colour} {kind} {where}",
    "{where}, a {size} {colour} {kind} on a {bg} background",
    "this picture shows a {size} {colour} {kind} {where} over a {bg} background",
    "the {kind} is {colour} and {size}, it sits {where} and the background is {bg}",
    "{size} {colour} {kind} {where}, {bg} background",
    "a {size} {kind} in {colour} {where} against a {bg} background",
    "on a plain {bg} background there is a {size} {colour} {kind} {where}",
    "one {colour} {kind}, {size}, {where}; the background is {bg}",
)
JITTER = 0.015  # of the safe region: centres move by up to this much
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    kind: str
    colour: str
    size: str
    position: str
    background: str
    x: float  # centre, as a fraction of the safe region
    y: float
    radius: float  # circumradius, as a fraction of the safe region
    angle: float  # degrees

    @property
    def label(self) -> int:
        return SHAPES_CLASSES.index(f"{self.colour} {self.kind}")


def safe_region(image_size: int) -> tuple[float, float]:
    """(offset, side) of the square every random crop of side round(image_size * 64/76) keeps: a shape
    inside it is never cut by the 76 -> 64 crop (at 76 px: pixels 12..63, side 52)."""
    crop = round(image_size * 64 / 76)
    return float(image_size - crop), float(2 * crop - image_size)


def random_scene(rng: np.random.Generator) -> Scene:
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    colour = list(SHAPE_COLOURS)[rng.integers(len(SHAPE_COLOURS))]
    backgrounds = [b for b in BACKGROUND_COLOURS if b != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    fx, fy = POSITIONS[position]
    dx, dy = rng.uniform(-JITTER, JITTER, 2)
    radius = SIZES[size] * rng.uniform(0.9, 1.05)  # big at most 0.252 <= NEAR - JITTER: stays inside
    angle = 0.0 if kind == "circle" else float(rng.uniform(-15, 15))
    return Scene(kind, colour, size, position, background, fx + float(dx), fy + float(dy), float(radius), angle)


def shape_outline(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon of a shape of circumradius ``r`` (everything lies within ``r`` of the centre)."""
    if kind == "square":
        polar = [(r, 45 + 90 * k) for k in range(4)]
    elif kind == "triangle":
        polar = [(r, -90 + 120 * k) for k in range(3)]
    elif kind == "star":
        polar = [(r if k % 2 == 0 else 0.45 * r, -90 + 36 * k) for k in range(10)]
    elif kind == "cross":
        arm, half = 0.95 * r, 0.3 * r  # corner (arm, half) is 0.996 r from the centre
        quarter = [(arm, -half), (arm, half), (half, half)]
        points = []
        for k in range(4):
            c, s = math.cos(math.pi / 2 * k), math.sin(math.pi / 2 * k)
            points += [(px * c - py * s, px * s + py * c) for px, py in quarter]
        polar = [(math.hypot(px, py), math.degrees(math.atan2(py, px))) for px, py in points]
    else:
        raise ValueError(f"no polygon for {kind!r}")
    return [(cx + d * math.cos(math.radians(a + angle)), cy + d * math.sin(math.radians(a + angle)))
            for d, a in polar]


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
    """(image_size, image_size, 3) uint8, antialiased: drawn at 4x, then box-filtered down."""
    from PIL import Image, ImageDraw

    scale = SUPERSAMPLE
    offset, side = safe_region(image_size)
    canvas = Image.new("RGB", (image_size * scale, image_size * scale), BACKGROUND_COLOURS[scene.background])
    draw = ImageDraw.Draw(canvas)
    cx, cy = (offset + scene.x * side) * scale, (offset + scene.y * side) * scale
    r = scene.radius * side * scale
    fill = SHAPE_COLOURS[scene.colour]
    if scene.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(shape_outline(scene.kind, cx, cy, r, scene.angle), fill=fill)
    return np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX))


def scene_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Ten captions, one per phrasing in a random order, each naming every attribute of the scene."""
    captions = []
    for t in rng.permutation(len(TEMPLATES)):
        where = WHERE[scene.position][rng.integers(len(WHERE[scene.position]))]
        size = SIZE_WORDS[scene.size][rng.integers(len(SIZE_WORDS[scene.size]))]
        captions.append(TEMPLATES[t].format(size=size, colour=scene.colour, kind=scene.kind, where=where,
                                            bg=scene.background))
    return captions


def read_shapes(src: str | None, size: int = 76, n: int = 6000, n_test: int = 1000, seed: int = 0,
                text_encoder: str = "hashing", text_model: str | None = None,
                text_dim: int = 256) -> Iterator[CaptionedRecord]:
    """Coloured shapes on plain backgrounds with ten exact captions each; a pure function of the options."""
    if int(size) < 16 or int(n) < 1 or int(n_test) < 1:
        raise GensuiteError(f"--size/--n/--n-test: need size >= 16 and at least one sample per split, got "
                            f"{size}/{n}/{n_test}")
    if text_encoder == "char_cnn_rnn":
        raise GensuiteError("--text-encoder: char_cnn_rnn embeddings exist only for cub; use hashing or sentence")
    encoder = cached_encoder(text_encoder, text_model, text_dim)
    for split_index, (split, count) in enumerate((("train", int(n)), ("test", int(n_test)))):
        rng = np.random.default_rng([int(seed), split_index])
        for start in range(0, count, CHUNK):
            scenes = [random_scene(rng) for _ in range(min(CHUNK, count - start))]
            captions = [scene_captions(scene, rng) for scene in scenes]
            vectors = encoder.embed([c for group in captions for c in group]).reshape(len(scenes), 10, -1)
            for scene, group, embedding in zip(scenes, captions, vectors):
                yield split, render_scene(scene, int(size)), scene.label, {"embeddings": embedding,
                                                                           "captions": group}


def describe_shapes(src: str | None, params: dict) -> dict:
    return {"text_encoder": describe_text_encoder(params)}
