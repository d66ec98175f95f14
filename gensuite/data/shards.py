"""Shard sets: ``OUT/DATASET/{train,validation,test}-NNNNNN.tar`` plus ``manifest.json``.

Samples: ``__key__`` (index in split), ``png`` (images) or ``npy`` (float32 points), ``cls``
(the label in ASCII). Tar members get a fixed mtime so rebuilding gives byte-identical shards and
the manifest's sha256 values are reproducible. ``validation`` (a fraction f, any dataset) moves
training sample i (in reader order) to a ``validation`` split iff floor((i+1)f) > floor(i f): exactly
floor(n f) samples, evenly spread over the training order.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import io
import json
import math
import os
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


def validation_fraction(value) -> Fraction:
    """``--validation`` as an exact fraction (0.1 -> 1/10, so floor(n f) is exact), checked to be in [0, 1)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if not 0 <= f < 1:
        raise GensuiteError(f"--validation: must be a fraction in [0, 1), got {value!r}")
    return Fraction(repr(f))


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
    with tqdm(desc=f"{dataset} shards", unit="sample", disable=not progress, file=sys.stderr) as bar:
        train_index = 0
        for split, sample, label in itertools.chain([first], records):
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
            writers[split].write({"__key__": f"{counts[split]:08d}", key: payload, "cls": str(label).encode()})
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
    manifest = {
        "dataset": dataset,
        "builder_version": BUILDER_VERSION,
        "kind": info.kind,
        "shape": list(shape),
        "num_classes": len(info.class_names),
        "class_names": list(info.class_names),
        "params": params,
        "splits": splits,
    }
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
    return DataSpec(dataset=dataset, kind=info.kind, shape=info.shape_for({**info.params, **params}),
                    num_classes=len(info.class_names), class_names=info.class_names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shards/build.py", description="Build WebDataset shards of a dataset.")
    parser.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--src", help="folder with the original files (mnist, fashion_mnist, cifar10)")
    parser.add_argument("--out", default="shards", help="shard root (default: shards)")
    parser.add_argument("--shard-size", type=int, help="samples per shard")
    parser.add_argument("--size", type=int, help="resize images to SIZE x SIZE (digits default: 32)")
    parser.add_argument("--n", type=int, help="moons: training points")
    parser.add_argument("--noise", type=float, help="moons: noise")
    parser.add_argument("--seed", type=int, help="moons: seed")
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
