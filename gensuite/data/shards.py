"""Shard sets: ``OUT/DATASET/{train,validation,test}-NNNNNN.tar`` plus ``manifest.json``.

Samples: ``__key__`` (index in split), ``png`` (images) or ``npy`` (float32 points), ``cls``
(the label in ASCII), plus any extra fields a reader yields: ``<name>.png`` (uint8 (H, W, C) images),
``<name>.npy`` (other arrays, float32 or float16) or ``<name>.json`` (captions and other plain data); the
manifest's ``fields`` lists them with their kind and shape. Tar members get a fixed mtime so rebuilding gives byte-identical shards and
the manifest's sha256 values are reproducible. ``validation`` (a fraction f, any dataset) moves
training sample i (in reader order) to a ``validation`` split iff floor((i+1)f) > floor(i f): exactly
floor(n f) samples, evenly spread over the training order.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import io
import json
import math
import os
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from gensuite.errors import GensuiteError
from gensuite.data.sources import DATASETS, READERS, DatasetInfo

BUILDER_VERSION = 1
TAR_MTIME = 0.0
GENERIC_PARAMS = {"validation": 0.0}  # build options of every dataset, with their defaults


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise GensuiteError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def build_command(name: str) -> str:
    info = dataset_info(name) if name in DATASETS else None
    return f"python shards/build.py {name}" + (" --src DIR" if info is None or info.needs_src else "")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encode(sample: np.ndarray, kind: str) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if kind == "points":
        np.save(buf, sample.astype(np.float32))
        return "npy", buf.getvalue()
    from PIL import Image

    image = Image.fromarray(sample[:, :, 0], "L") if sample.shape[2] == 1 else Image.fromarray(sample, "RGB")
    image.save(buf, format="PNG")
    return "png", buf.getvalue()


def encode_extra(name: str, value) -> tuple[str, bytes, dict]:
    """One extra field as (tar key, payload, manifest entry {"kind", "shape"}); shape (C, H, W) for png."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ("x", "y"):
        raise ValueError(f"extra field name {name!r}: use lower-case letters, digits and _ (not x or y)")
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
        _, payload = encode(value, "image")
        return f"{name}.png", payload, {"kind": "png", "shape": [value.shape[2], value.shape[0], value.shape[1]]}
    if isinstance(value, np.ndarray):
        array = value if value.dtype == np.float16 else value.astype(np.float32)
        buf = io.BytesIO()
        np.save(buf, array)
        return f"{name}.npy", buf.getvalue(), {"kind": "npy", "shape": list(array.shape)}
    if isinstance(value, (str, list, dict)):
        return f"{name}.json", json.dumps(value, ensure_ascii=False).encode("utf-8"), {"kind": "json", "shape": []}
    raise TypeError(f"extra field {name!r}: cannot store a {type(value).__name__}")


def validation_fraction(value) -> Fraction:
    """``--validation`` as an exact fraction (0.1 -> 1/10, so floor(n f) is exact), checked to be in [0, 1)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if not 0 <= f < 1:
        raise GensuiteError(f"--validation: must be a fraction in [0, 1), got {value!r}")
    return Fraction(repr(f))


@contextlib.contextmanager
def discarding_partial_shards(writers: dict, folder: Path):
    """A reader failing mid-build (say a missing image) leaves no open or half-written shard behind."""
    try:
        yield
    except BaseException:
        for writer in writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        writers.clear()
        for tmp in folder.glob(".*.tar.tmp"):
            tmp.unlink(missing_ok=True)
        raise


def verify(folder: Path, manifest: dict) -> str | None:
    """None when every shard in the manifest is present with its checksum; else the first problem."""
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = folder / shard["file"]
            if not path.is_file():
                return f"{path} is missing"
            if sha256(path) != shard["sha256"]:
                return f"{path} does not match its sha256"
    return None


def build(dataset: str, src: str | None = None, out: str = "shards", shard_size: int | None = None,
          progress: bool = True, **params) -> dict:
    """Write (or verify) the shard set of ``dataset`` under ``out``; returns its manifest."""
    import webdataset as wds
    from tqdm import tqdm

    info = dataset_info(dataset)
    options = {**info.params, **GENERIC_PARAMS}
    unknown = set(params) - set(options)
    if unknown:
        raise GensuiteError(f"{dataset}: unknown build option {sorted(unknown)[0]!r}; it takes "
                            f"{', '.join(options)}")
    params = {**options, **{k: v for k, v in params.items() if v is not None}}
    validation = validation_fraction(params["validation"])
    params["validation"] = float(validation)
    params["shard_size"] = shard_size or info.shard_size
    folder = Path(out) / dataset
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        # Manifests from before the generic options were built with their defaults.
        if old.get("builder_version") == BUILDER_VERSION and {**GENERIC_PARAMS, **old.get("params", {})} == params:
            problem = verify(folder, old)
            if problem is None:
                shards = sum(len(s["shards"]) for s in old["splits"].values())
                print(f"{dataset}: {shards} shards verified, up to date ({folder})", file=sys.stderr)
                return old
            print(f"{dataset}: rebuilding: {problem}", file=sys.stderr)
        else:
            print(f"{dataset}: rebuilding: build options or builder version changed", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    read = READERS[dataset]
    reader_params = {k: v for k, v in params.items() if k in info.params}
    splits: dict[str, dict[str, Any]] = {}
    writers: dict[str, Any] = {}
    counts: dict[str, int] = {}
    shape = info.shape_for(params)
    fields: dict[str, dict] = {}

    def open_shard(split: str):
        index = len(splits[split]["shards"])
        name = f"{split}-{index:06d}.tar"
        splits[split]["shards"].append({"file": name, "samples": 0})
        writers[split] = wds.TarWriter(str(folder / f".{name}.tmp"), mtime=TAR_MTIME)

    def close_shard(split: str):
        writers.pop(split).close()
        entry = splits[split]["shards"][-1]
        tmp, final = folder / f".{entry['file']}.tmp", folder / entry["file"]
        os.replace(tmp, final)
        entry["sha256"] = sha256(final)

    records = read(src, **reader_params)
    first = next(records)  # bad source files fail here, before a progress bar is drawn
    with tqdm(desc=f"{dataset} shards", unit="sample", disable=not progress, file=sys.stderr) as bar, \
            discarding_partial_shards(writers, folder):
        train_index = 0
        for split, sample, label, *rest in itertools.chain([first], records):
            if split == "train":
                i, train_index = train_index, train_index + 1
                if math.floor((i + 1) * validation) > math.floor(i * validation):
                    split = "validation"
            if split not in splits:
                splits[split] = {"samples": 0, "shards": []}
                counts[split] = 0
            if split not in writers:
                open_shard(split)
            key, payload = encode(sample, info.kind)
            entry = {"__key__": f"{counts[split]:08d}", key: payload, "cls": str(label).encode()}
            for name, value in (rest[0] if rest else {}).items():
                extra_key, extra_payload, field = encode_extra(name, value)
                entry[extra_key] = extra_payload
                fields.setdefault(name, field)
            writers[split].write(entry)
            counts[split] += 1
            splits[split]["samples"] += 1
            splits[split]["shards"][-1]["samples"] += 1
            if splits[split]["shards"][-1]["samples"] == params["shard_size"]:
                close_shard(split)
            bar.update(1)
        for split in list(writers):
            close_shard(split)
    # Stale shards of an earlier, larger build would otherwise linger beside the new ones.
    current = {s["file"] for split in splits.values() for s in split["shards"]}
    for stale in folder.glob("*.tar"):
        if stale.name not in current:
            stale.unlink()
    described = info.describe(src, reader_params) if info.describe else {}
    class_names = described.get("class_names", info.class_names)
    manifest = {
        "dataset": dataset,
        "builder_version": BUILDER_VERSION,
        "kind": info.kind,
        "shape": list(shape),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "params": params,
        "splits": splits,
    }
    if fields:
        manifest["fields"] = fields
    if described.get("text_encoder"):
        manifest["text_encoder"] = described["text_encoder"]
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)  # written last: its presence means the set is complete
    total = sum(s["samples"] for s in splits.values())
    print(f"{dataset}: wrote {total} samples in {len(current)} shards to {folder}", file=sys.stderr)
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        name = Path(shard_dir).name
        raise GensuiteError(f"{path}: shard set not found; build it with: {build_command(name)}"
                            + (f" --out {Path(shard_dir).parent}" if str(Path(shard_dir).parent) != "shards" else ""))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GensuiteError(f"{path}: unreadable manifest ({e}); rebuild with: {build_command(Path(shard_dir).name)}") \
            from None


def shard_paths(shard_dir: str | Path, split: str) -> list[str]:
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise GensuiteError(f"{Path(shard_dir) / 'manifest.json'}: no split {split!r}; it has "
                            f"{', '.join(manifest['splits'])}")
    return [str(Path(shard_dir) / s["file"]) for s in manifest["splits"][split]["shards"]]


def data_spec(manifest: dict):
    from gensuite.registry import DataSpec

    return DataSpec(dataset=manifest["dataset"], kind=manifest["kind"], shape=tuple(manifest["shape"]),
                    num_classes=manifest["num_classes"], class_names=tuple(manifest["class_names"]),
                    samples={k: v["samples"] for k, v in manifest["splits"].items()},
                    fields=manifest.get("fields", {}), text_encoder=manifest.get("text_encoder", {}))


def static_data_spec(dataset: str, **params):
    """A dataset's shape and classes without its shards (for `gensuite summary` before building)."""
    from gensuite.registry import DataSpec

    info = dataset_info(dataset)
    options = {**info.params, **params}
    fields, text_encoder = ({}, {})
    if "text_encoder" in options:  # captioned data: embeddings, captions (and CUB's hires images)
        from gensuite.data.captioned import static_text_fields

        fields, text_encoder = static_text_fields(options)
    return DataSpec(dataset=dataset, kind=info.kind, shape=info.shape_for(options),
                    num_classes=len(info.class_names), class_names=info.class_names, fields=fields,
                    text_encoder=text_encoder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shards/build.py", description="Build WebDataset shards of a dataset.")
    parser.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--src", help="folder with the original files (mnist, fashion_mnist, cifar10, cub: "
                                      "StackGAN's Data/birds)")
    parser.add_argument("--out", default="shards", help="shard root (default: shards)")
    parser.add_argument("--shard-size", type=int, help="samples per shard")
    parser.add_argument("--size", type=int, help="resize images to SIZE x SIZE (digits default: 32, shapes: 76)")
    parser.add_argument("--n", type=int, help="moons: training points; shapes: training images (default 6000)")
    parser.add_argument("--n-test", type=int, help="shapes: test images (default 1000)")
    parser.add_argument("--noise", type=float, help="moons: noise")
    parser.add_argument("--seed", type=int, help="moons, shapes: seed")
    parser.add_argument("--lowres", type=int, help="cub: side of the stored crop (default 76)")
    parser.add_argument("--hires", type=int, help="cub: side of the high-resolution crop field (default 304; "
                                                  "0: not stored)")
    parser.add_argument("--text-encoder", choices=("hashing", "sentence"),
                        help="cub, shapes: embed the captions with this encoder (default: shapes hashing, cub the "
                             "precomputed char-CNN-RNN embeddings)")
    parser.add_argument("--text-model", metavar="PATH",
                        help="--text-encoder sentence: a downloaded sentence-transformers model directory")
    parser.add_argument("--text-dim", type=int, help="--text-encoder hashing: embedding size (default 256)")
    parser.add_argument("--validation", metavar="FRACTION",
                        help="move this fraction of the training samples, evenly spread, to a validation split "
                             "(default 0)")
    parser.add_argument("--verify-only", action="store_true", help="check checksums; build nothing")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        info = dataset_info(args.dataset)
        options = {k: getattr(args, k) for k in {**info.params, **GENERIC_PARAMS}
                   if getattr(args, k, None) is not None}
        if args.verify_only:
            folder = Path(args.out) / args.dataset
            problem = verify(folder, read_manifest(folder))
            if problem:
                raise GensuiteError(f"{problem}; rebuild with: {build_command(args.dataset)}")
            print(f"{args.dataset}: all shards verified", file=sys.stderr)
            return 0
        build(args.dataset, args.src, args.out, args.shard_size, progress=not args.no_progress, **options)
    except GensuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
