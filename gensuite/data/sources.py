"""Readers of the original dataset formats, and each dataset's static facts.

Every reader yields ``(split, sample, label)`` in a fixed order: ``sample`` is a uint8 (H, W, C)
array for images or a float32 (D,) array for points. Captioned datasets (``captioned.py``) yield
``(split, sample, label, extras)``: ``extras`` maps field names to more per-sample data (text embeddings,
captions, high-resolution images) stored beside the sample. Nothing is downloaded, ever.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from gensuite.errors import GensuiteError
from gensuite.data.captioned import (CUB_CLASSES, SHAPES_CLASSES, describe_cub, describe_shapes, read_cub,
                                     read_shapes)

if TYPE_CHECKING:
    import torch  # mixture_modes imports it when called: the builder does not need it

Record = tuple[str, np.ndarray, int]

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str  # "image" or "points"
    shape: tuple[int, ...]  # native (C, H, W) or (D,)
    class_names: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)  # build options and their defaults
    shard_size: int = 10000
    needs_src: bool = False
    src_hint: str = ""
    # Manifest entries that depend on the source or the options, e.g. class names read from the source's
    # folders or the text encoder: (src, reader params) -> {"class_names": ..., "text_encoder": ...}.
    describe: Callable[[str | None, dict[str, Any]], dict[str, Any]] | None = None

    def shape_for(self, params: dict[str, Any]) -> tuple[int, ...]:
        size = params.get("size") or params.get("lowres")
        if self.kind == "image" and size:
            return (self.shape[0], size, size)
        return self.shape


def resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C) with an antialiased bicubic filter (PIL)."""
    if not size or image.shape[0] == size:
        return image
    from PIL import Image

    mode = "L" if image.shape[2] == 1 else "RGB"
    pil = Image.fromarray(image[:, :, 0] if mode == "L" else image, mode)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    return out.reshape(size, size, image.shape[2])


# -- embedded datasets (scikit-learn) -----------------------------------------------------------


def read_digits(src: str | None, size: int = 32) -> Iterator[Record]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    test = set(order[-297:].tolist())
    for split in ("train", "test"):
        for i in order:
            if (i in test) != (split == "test"):
                continue
            # sklearn's digits are 8x8 with 17 grey levels (0..16).
            image = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)[:, :, None]
            yield split, resize(image, size), int(digits.target[i])


def read_moons(src: str | None, n: int = 10000, noise: float = 0.05, seed: int = 0) -> Iterator[Record]:
    from sklearn.datasets import make_moons

    for split, count, state in (("train", n, seed), ("test", max(1, n // 5), seed + 1)):
        points, labels = make_moons(n_samples=count, noise=noise, random_state=state)
        for p, y in zip(points.astype(np.float32), labels):
            yield split, p, int(y)


# -- Gaussian mixtures for mode-collapse experiments ------------------------------------------
# ring: 8 modes evenly spaced on a circle of radius 2, std 0.02 (Metz et al., "Unrolled GANs", 2017);
# grid: 25 modes on {-4, -2, 0, 2, 4}^2, std 0.05 (Lin et al., "PacGAN", 2018). Every mode equally likely.

MIXTURE_RADIUS = 2.0  # ring
MIXTURE_GRID = (-4.0, -2.0, 0.0, 2.0, 4.0)  # grid: each coordinate


def _mode_centres(dataset: str) -> np.ndarray:
    """(K, 2) float64 centres; mode k is class k."""
    if dataset == "ring":
        angles = 2 * np.pi * np.arange(8) / 8  # mode 0 at (2, 0), counter-clockwise
        return MIXTURE_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if dataset == "grid":
        return np.array([(x, y) for x in MIXTURE_GRID for y in MIXTURE_GRID], dtype=np.float64)  # row-major in x
    raise GensuiteError(f"{dataset!r} is not a Gaussian-mixture dataset; choose ring or grid")


def mixture_modes(dataset: str, std: float | None = None) -> tuple[torch.Tensor, float]:
    """Geometry of a Gaussian-mixture dataset (``ring`` or ``grid``): ``(centres, std)`` with centres a
    float64 torch tensor (K, 2) whose row k is the mean of mode k (= class k), and ``std`` the per-axis
    standard deviation of every mode: the given one, or the dataset's default build option when None.
    A shard set's own std is its manifest's ``params["std"]`` (what ``shards/build.py --std`` set)."""
    import torch

    centres = _mode_centres(dataset)
    std = float(DATASETS[dataset].params["std"] if std is None else std)
    if not (np.isfinite(std) and std > 0):
        raise GensuiteError(f"--std: must be a positive number, got {std!r}")
    return torch.from_numpy(centres), std


def read_mixture(dataset: str, n: int, std: float, seed: int) -> Iterator[Record]:
    """n training points and max(1, n // 5) test points: mode k ~ uniform{0..K-1}, x ~ N(centre_k, std^2 I);
    each split from its own stream of seed (seed, split)."""
    centres, std = mixture_modes(dataset, std)
    centres = centres.numpy()
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise GensuiteError(f"--n: must be a positive number of points, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise GensuiteError(f"--seed: must be a non-negative integer, got {seed!r}")
    for index, (split, count) in enumerate((("train", n), ("test", max(1, n // 5)))):
        rng = np.random.default_rng((seed, index))
        labels = rng.integers(0, len(centres), size=count)
        points = (centres[labels] + std * rng.standard_normal((count, 2))).astype(np.float32)
        for p, y in zip(points, labels):
            yield split, p, int(y)


def read_ring(src: str | None, n: int = 20000, std: float = 0.02, seed: int = 0) -> Iterator[Record]:
    return read_mixture("ring", n, std, seed)


def read_grid(src: str | None, n: int = 20000, std: float = 0.05, seed: int = 0) -> Iterator[Record]:
    return read_mixture("grid", n, std, seed)


# -- MNIST / Fashion-MNIST (IDX) --------------------------------------------------------------


def _idx_file(src: Path, stem: str) -> Path:
    for candidate in (src / stem, src / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise GensuiteError(f"{src / stem}(.gz): not found; put the dataset's four IDX files in {src}")


def read_idx(path: Path, kind: str) -> np.ndarray:
    """One IDX file through torchvision's reader (it checks the magic number and dimensions)."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    reader = read_image_file if kind == "images" else read_label_file
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f, tempfile.NamedTemporaryFile(suffix=".idx") as tmp:
                shutil.copyfileobj(f, tmp)
                tmp.flush()
                return reader(tmp.name).numpy()
        return reader(str(path)).numpy()
    except (AssertionError, KeyError, RuntimeError, ValueError, OSError, EOFError) as e:
        raise GensuiteError(f"{path}: not an IDX {kind[:-1]} file ({type(e).__name__}: "
                            f"{str(e) or 'bad magic number or dimensions'})") from None


def read_mnist_like(src: str | None, size: int | None = None) -> Iterator[Record]:
    if not src:
        raise GensuiteError("--src: give the folder holding the IDX files (train-images-idx3-ubyte[.gz], ...)")
    root = Path(src)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = _idx_file(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
        if len(images) != len(labels):
            raise GensuiteError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
        for image, label in zip(images, labels):
            yield split, resize(image[:, :, None], size), int(label)


# -- CIFAR-10 (python pickles) ----------------------------------------------------------------


def _cifar_root(src: str | None) -> Path:
    if not src:
        raise GensuiteError("--src: give the cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta)")
    root = Path(src)
    nested = root / "cifar-10-batches-py"
    return nested if nested.is_dir() else root


def read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    if not path.is_file():
        raise GensuiteError(f"{path}: not found; expected the CIFAR-10 python batches in {path.parent}")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = [int(v) for v in batch[b"labels"]]
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise GensuiteError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise GensuiteError(f"{path}: expected b'data' of shape (N, 3072) and N labels, got {data.shape} "
                            f"and {len(labels)}")
    # Rows hold the red, green and blue 32x32 planes one after another.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar10(src: str | None, size: int | None = None) -> Iterator[Record]:
    root = _cifar_root(src)
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        for name in names:
            images, labels = read_cifar_batch(root / name)
            for image, label in zip(images, labels):
                yield split, resize(np.ascontiguousarray(image), size), label


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", "image", (1, 8, 8), tuple("0123456789"), {"size": 32}, shard_size=500),
    "moons": DatasetInfo("moons", "points", (2,), ("upper", "lower"), {"n": 10000, "noise": 0.05, "seed": 0},
                         shard_size=4000),
    "ring": DatasetInfo("ring", "points", (2,), tuple(str(k) for k in range(8)),
                        {"n": 20000, "std": 0.02, "seed": 0}, shard_size=10000),
    "grid": DatasetInfo("grid", "points", (2,), tuple(str(k) for k in range(25)),
                        {"n": 20000, "std": 0.05, "seed": 0}, shard_size=10000),
    "mnist": DatasetInfo("mnist", "image", (1, 28, 28), tuple("0123456789"), {"size": None}, needs_src=True,
                         src_hint="the four IDX files"),
    "fashion_mnist": DatasetInfo("fashion_mnist", "image", (1, 28, 28), FASHION_CLASSES, {"size": None},
                                 needs_src=True, src_hint="the four IDX files"),
    "cifar10": DatasetInfo("cifar10", "image", (3, 32, 32), CIFAR10_CLASSES, {"size": None}, needs_src=True,
                           src_hint="the cifar-10-batches-py folder"),
    "cub": DatasetInfo("cub", "image", (3, 76, 76), CUB_CLASSES,
                       {"lowres": 76, "hires": 304, "text_encoder": "char_cnn_rnn", "text_model": None,
                        "text_dim": 256}, shard_size=1000, needs_src=True,
                       src_hint="StackGAN's Data/birds folder", describe=describe_cub),
    "shapes": DatasetInfo("shapes", "image", (3, 76, 76), SHAPES_CLASSES,
                          {"size": 76, "n": 6000, "n_test": 1000, "seed": 0, "text_encoder": "hashing",
                           "text_model": None, "text_dim": 256}, shard_size=2000, describe=describe_shapes),
}

READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "digits": read_digits,
    "moons": read_moons,
    "ring": read_ring,
    "grid": read_grid,
    "mnist": read_mnist_like,
    "fashion_mnist": read_mnist_like,
    "cifar10": read_cifar10,
    "cub": read_cub,
    "shapes": read_shapes,
}
