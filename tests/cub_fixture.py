"""A tiny CUB-200-2011 in StackGAN's exact ``Data/birds`` layout, pickles written as Python 2 wrote them."""

import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# key (class folder/image name, as in filenames.pickle), image (width, height), bounding box (x, y, w, h),
# 1-based class id, split. Boxes include float coordinates and crops clipped at every border.
IMAGES = (
    ("001.Black_footed_Albatross/Black_Footed_Albatross_0046_18", (40, 30), (10, 5, 12, 8), 1, "train"),
    ("017.Cardinal/Cardinal_0001_17057", (25, 50), (2.5, 30.7, 20.2, 18.9), 17, "train"),
    ("002.Laysan_Albatross/Laysan_Albatross_0002_1027", (60, 60), (20, 20, 20, 20), 2, "train"),
    ("017.Cardinal/Cardinal_0014_17389", (33, 21), (0, 0, 33, 21), 17, "test"),
    ("001.Black_footed_Albatross/Black_Footed_Albatross_0009_34", (48, 36), (30.9, 1.2, 15.5, 10.0), 1, "test"),
)
# In images.txt but in neither split, as some CUB images are not used by StackGAN's splits.
UNUSED = ("002.Laysan_Albatross/Laysan_Albatross_0003_1033", (20, 20), (1, 1, 5, 5), 2)
NO_CAPTIONS = "017.Cardinal/Cardinal_0014_17389"  # its text_c10 file is left out


class Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING): numpy's raw array data then needs
    ``encoding="latin1"`` to load, exactly like StackGAN's pickles."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(path: Path, obj) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth, distinct picture per image (JPEG keeps it close), so a wrong crop shows."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(2, 6, 3)
    rgb = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), 128 + 100 * np.sin(xx / a + yy / b + c)], -1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def captions_for(key: str) -> list[str]:
    bird = key.split("/")[0].split(".")[1].replace("_", " ").lower()
    return [f"caption {i} of this {bird}: the bird has a short beak" for i in range(10)]


def write_cub_fixture(root: Path, captions: bool = True) -> dict:
    """Writes the dataset under ``root`` (StackGAN's Data/birds); returns what each split must hold."""
    root = Path(root)
    cub = root / "CUB_200_2011"
    rows = [(key, size, box, cls) for key, size, box, cls, _ in IMAGES] + [UNUSED]
    lines, boxes = [], []
    for image_id, (key, size, box, _) in enumerate(rows, 1):
        path = cub / "images" / f"{key}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture(size, image_id).save(path, quality=95)
        lines.append(f"{image_id} {key}.jpg")
        boxes.append(f"{image_id} " + " ".join(str(float(v)) for v in box))
    (cub / "images.txt").write_text("\n".join(lines) + "\n")
    (cub / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    expected = {}
    rng = np.random.default_rng(7)
    for split in ("train", "test"):
        entries = [(key, cls) for key, _, _, cls, s in IMAGES if s == split]
        embeddings = rng.standard_normal((len(entries), 10, 1024)).astype(np.float32)
        (root / split).mkdir(parents=True)
        # StackGAN stores the training embeddings as one array; a list of arrays loads the same way.
        py2_pickle(root / split / "char-CNN-RNN-embeddings.pickle",
                   embeddings if split == "train" else list(embeddings))
        py2_pickle(root / split / "filenames.pickle", [key.encode() for key, _ in entries])
        py2_pickle(root / split / "class_info.pickle", [cls for _, cls in entries])
        expected[split] = {"keys": [k for k, _ in entries], "classes": [c for _, c in entries],
                           "embeddings": embeddings}
    if captions:
        for key, *_ in rows:
            if key == NO_CAPTIONS:
                continue
            path = root / "text_c10" / f"{key}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(captions_for(key)) + "\n\n")  # a trailing blank line, as in some files
    expected["boxes"] = {key: box for key, _, box, _, _ in IMAGES}
    return expected
