"""Shard sets: ``OUT/DATASET/{train,validation,test}-NNNNNN.tar`` plus ``manifest.json``.

Two encodings of images, recorded in the manifest's ``encoding`` (a manifest without it is ``png``):

- ``png``: one tar member group per sample: ``__key__`` (index in split), ``png`` (the image), ``cls``
  (the label in ASCII), plus any extra fields a reader yields: ``<name>.png`` (uint8 (H, W, C) images),
  ``<name>.npy`` (other arrays, float32 or float16) or ``<name>.json`` (captions and other plain data).
- ``raw`` (the default for images of at most 64 px a side): records of ``RECORD_SIZE`` consecutive
  samples (fewer when a record would pass ``RECORD_BYTES``; the manifest's ``record_size``; a shard's
  last record may be shorter), one member group per record, keyed by the index of its first sample:
  ``x.npy`` (uint8 (K, C, H, W) pixels), ``cls.npy`` (int64 (K,) labels) and per extra field
  ``<name>.npy`` (its K rows stacked; images as uint8 (K, C, H, W)) or ``<name>.json`` (a list of K
  values). No PNG decode, and the tar reader's per-member cost is paid once per record instead of
  once per sample. Readers expand a record into its samples, so shuffling, splitting and batching
  are per sample, and a raw set yields bitwise the tensors of the PNG set built from the same data,
  in the same order.

Points are stored per sample as ``npy`` (float32) and ``cls`` (encoding ``npy``). The manifest's
``fields`` lists the extra fields with their kind (``png`` for uint8 images, however encoded) and
shape. Tar members get a fixed mtime so rebuilding gives byte-identical shards and the manifest's
sha256 values are reproducible; verification (``verify``) hashes every shard whatever its encoding.
``validation`` (a fraction f, any dataset) moves training sample i (in reader order) to a
``validation`` split iff floor((i+1)f) > floor(i f): exactly floor(n f) samples, evenly spread over
the training order.
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
import stat
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from gensuite.errors import GensuiteError
from gensuite.data.sources import DATASETS, READERS, DatasetInfo

BUILDER_VERSION = 1
TAR_MTIME = 0.0
GENERIC_PARAMS = {"validation": 0.0}  # build options of every dataset, with their defaults
ENCODINGS = ("raw", "png")  # how image sets store their samples (points: always "npy")
RAW_MAX_SIDE = 64  # image sets up to this many pixels a side default to raw, larger ones to png
RECORD_SIZE = 128  # raw encoding: samples per record (one tar member group) ...
RECORD_BYTES = 1 << 20  # ... or fewer, so that a record's arrays stay under 1 MiB (large images, extras)
RECORD_X, RECORD_Y = "x.npy", "cls.npy"  # a raw record's pixel and label members


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


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def default_encoding(kind: str, shape) -> str:
    """``raw`` for images of at most ``RAW_MAX_SIDE`` px a side, ``png`` above; points: ``npy``."""
    if kind != "image":
        return "npy"
    return "raw" if max(shape[1:]) <= RAW_MAX_SIDE else "png"


def manifest_encoding(manifest: dict) -> str:
    """The encoding a set was built with; sets built before the field existed are ``png`` (images)."""
    return manifest.get("encoding") or ("png" if manifest.get("kind") == "image" else "npy")


def check_extra_name(name: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ("x", "y", "cls"):
        raise ValueError(f"extra field name {name!r}: use lower-case letters, digits and _ (not x, y or cls)")


def record_size(sample: np.ndarray, extras: dict) -> int:
    """Samples per raw record for samples like this one: ``RECORD_SIZE``, or fewer for large samples."""
    nbytes = sample.nbytes + sum(v.nbytes for v in extras.values() if isinstance(v, np.ndarray))
    return max(1, min(RECORD_SIZE, RECORD_BYTES // max(1, nbytes)))


def encode_record(first: int, samples: list[np.ndarray], labels: list[int], extras: list[dict],
                  fields: dict) -> dict:
    """One raw record (see the module docstring) of consecutive samples, the first with index ``first``;
    ``fields`` collects the manifest entries of the extra fields."""
    entry = {"__key__": f"{first:08d}",
             RECORD_X: npy_bytes(np.ascontiguousarray(np.stack(samples).transpose(0, 3, 1, 2))),
             RECORD_Y: npy_bytes(np.asarray(labels, dtype=np.int64))}
    for name in extras[0]:
        check_extra_name(name)
        values = [e[name] for e in extras]
        first_value = values[0]
        if isinstance(first_value, np.ndarray) and first_value.dtype == np.uint8 and first_value.ndim == 3:
            entry[f"{name}.npy"] = npy_bytes(np.ascontiguousarray(np.stack(values).transpose(0, 3, 1, 2)))
            field = {"kind": "png", "shape": [first_value.shape[2], first_value.shape[0], first_value.shape[1]]}
        elif isinstance(first_value, np.ndarray):
            dtype = np.float16 if first_value.dtype == np.float16 else np.float32
            entry[f"{name}.npy"] = npy_bytes(np.stack([np.asarray(v, dtype=dtype) for v in values]))
            field = {"kind": "npy", "shape": list(first_value.shape)}
        elif isinstance(first_value, (str, list, dict)):
            entry[f"{name}.json"] = json.dumps(values, ensure_ascii=False).encode("utf-8")
            field = {"kind": "json", "shape": []}
        else:
            raise TypeError(f"extra field {name!r}: cannot store a {type(first_value).__name__}")
        fields.setdefault(name, field)
    return entry


def encode_extra(name: str, value) -> tuple[str, bytes, dict]:
    """One extra field as (tar key, payload, manifest entry {"kind", "shape"}); shape (C, H, W) for png."""
    check_extra_name(name)
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


REQUIRED_FIELDS = ("dataset", "kind", "shape", "num_classes", "class_names", "splits")
SPLIT_FIELDS = ("samples", "shards")
SHARD_FIELDS = ("file", "samples", "sha256")
VERIFIED_CACHE = Path(".stats") / "verified.json"  # in the shard folder: {file: {size, mtime_ns, sha256}}
SETTLE_NS = 2_000_000_000  # a file modified this recently is hashed but not cached (see verify)


def rebuild_command(shard_dir: str | Path) -> str:
    """The command that (re)builds the set in ``shard_dir``, with ``--out`` unless its root is ``shards``."""
    shard_dir = Path(shard_dir)
    return build_command(shard_dir.name) + (f" --out {shard_dir.parent}" if str(shard_dir.parent) != "shards" else "")


def manifest_problem(manifest, path: Path) -> str | None:
    """None when the manifest has every field a run reads; else the first one missing, by its path."""
    if not isinstance(manifest, dict):
        return f"{path}: not a shard manifest (expected a JSON object)"
    for key in REQUIRED_FIELDS:
        if key not in manifest:
            return f"{path}: no field {key!r}"
    if not isinstance(manifest["splits"], dict) or not manifest["splits"]:
        return f"{path}: field 'splits' lists no splits"
    for name, split in manifest["splits"].items():
        for key in SPLIT_FIELDS:
            if not isinstance(split, dict) or key not in split:
                return f"{path}: no field 'splits.{name}.{key}'"
        if not isinstance(split["shards"], list):
            return f"{path}: field 'splits.{name}.shards' is not a list"
        for i, shard in enumerate(split["shards"]):
            for key in SHARD_FIELDS:
                if not isinstance(shard, dict) or key not in shard:
                    return f"{path}: no field 'splits.{name}.shards[{i}].{key}'"
    return None


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
        return cache["shards"] if cache.get("version") == 1 and isinstance(cache.get("shards"), dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}  # absent, unreadable or damaged: every shard is hashed again


def _write_cache(path: Path, entries: dict) -> None:
    tmp = None
    try:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # ranks may verify at once
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)  # readable by whoever shares the shards, as the shards are
            json.dump({"version": 1, "shards": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only shard folder: verified, just not remembered
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def verify(folder: Path, manifest: dict, trust_cache: bool = True) -> str | None:
    """None when every shard in the manifest is present with its checksum; else the first problem.

    Verified hashes are remembered in ``<folder>/.stats/verified.json`` under each file's size and
    mtime_ns, so a later start hashes only new or changed files (``trust_cache=False`` hashes them
    all, and refreshes the cache). A file modified within the last 2 s is not remembered: a write in
    the same clock tick could change it and keep its size and mtime. A folder that cannot be written
    is verified in full each time, silently."""
    cache_path = Path(folder) / VERIFIED_CACHE
    cache = _read_cache(cache_path)
    entries = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = Path(folder) / shard["file"]
            try:
                st = path.stat()
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                return f"{path} is missing (listed in manifest.json)"
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": shard["sha256"]}
            if trust_cache and cache.get(shard["file"]) == entry:
                entries[shard["file"]] = entry
                continue
            if sha256(path) != shard["sha256"]:
                return f"{path} does not match its sha256 in manifest.json (changed or damaged)"
            now = path.stat()
            if (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and \
                    time.time_ns() - st.st_mtime_ns > SETTLE_NS:
                entries[shard["file"]] = entry
    if entries != cache:
        _write_cache(cache_path, entries)
    return None


def open_shard_set(shard_dir: str | Path, trust_cache: bool = True) -> dict:
    """The manifest of the shard set in ``shard_dir``, once it has every field a run reads and every
    shard matches its sha256 (see ``verify``); else a one-line error naming the file and the rebuild
    command. Runs call this before reading a shard."""
    manifest = read_manifest(shard_dir)
    problem = manifest_problem(manifest, Path(shard_dir) / "manifest.json") or \
        verify(Path(shard_dir), manifest, trust_cache)
    if problem:
        raise GensuiteError(f"{problem}; rebuild with: {rebuild_command(shard_dir)}")
    return manifest


def resolve_encoding(info: DatasetInfo, shape, encoding: str | None) -> str:
    """``--encoding`` checked against the dataset (None: the default for its kind and image size)."""
    if encoding is None:
        return default_encoding(info.kind, shape)
    if info.kind != "image":
        raise GensuiteError(f"--encoding: {info.name} holds points, always stored as npy; the option is for "
                            f"image sets")
    if encoding not in ENCODINGS:
        raise GensuiteError(f"--encoding: unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return encoding


def build(dataset: str, src: str | None = None, out: str = "shards", shard_size: int | None = None,
          progress: bool = True, encoding: str | None = None, **params) -> dict:
    """Write (or verify) the shard set of ``dataset`` under ``out``; returns its manifest. ``encoding``:
    ``raw`` or ``png`` for image sets (None: raw up to ``RAW_MAX_SIDE`` px a side, else png)."""
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
    shape = info.shape_for(params)
    encoding = resolve_encoding(info, shape, encoding)
    folder = Path(out) / dataset
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        try:
            old = read_manifest(folder)
            problem = manifest_problem(old, manifest_path)
        except GensuiteError as e:  # unreadable: rebuilt below
            old, problem = None, str(e).split("; rebuild with")[0]
        # Manifests from before the generic options were built with their defaults.
        if problem is None and (old.get("builder_version") != BUILDER_VERSION
                                or {**GENERIC_PARAMS, **old.get("params", {})} != params):
            problem = "build options or builder version changed"
        if problem is None and manifest_encoding(old) != encoding:
            problem = f"encoding changed ({manifest_encoding(old)} -> {encoding})"
        problem = problem or verify(folder, old, trust_cache=False)
        if problem is None:
            shards = sum(len(s["shards"]) for s in old["splits"].values())
            print(f"{dataset}: {shards} shards verified, up to date ({folder})", file=sys.stderr)
            return old
        print(f"{dataset}: rebuilding: {problem}", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    read = READERS[dataset]
    reader_params = {k: v for k, v in params.items() if k in info.params}
    splits: dict[str, dict[str, Any]] = {}
    writers: dict[str, Any] = {}
    counts: dict[str, int] = {}
    pending: dict[str, list] = {}  # raw encoding: split -> [first index, samples, labels, extras] not yet written
    samples_per_record = 0  # raw encoding: set from the first sample
    fields: dict[str, dict] = {}

    def flush_record(split: str):
        if split in pending:
            first, samples, labels, extras = pending.pop(split)
            writers[split].write(encode_record(first, samples, labels, extras, fields))

    def open_shard(split: str):
        index = len(splits[split]["shards"])
        name = f"{split}-{index:06d}.tar"
        splits[split]["shards"].append({"file": name, "samples": 0})
        writers[split] = wds.TarWriter(str(folder / f".{name}.tmp"), mtime=TAR_MTIME)

    def close_shard(split: str):
        flush_record(split)
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
            if encoding == "raw":
                samples_per_record = samples_per_record or record_size(sample, rest[0] if rest else {})
                record = pending.setdefault(split, [counts[split], [], [], []])
                for part, value in zip(record[1:], (sample, int(label), rest[0] if rest else {})):
                    part.append(value)
                if len(record[1]) == samples_per_record:
                    flush_record(split)
            else:
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
        "encoding": encoding,
        "shape": list(shape),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "params": params,
        "splits": splits,
    }
    if encoding == "raw":
        manifest["record_size"] = samples_per_record
    if fields:
        manifest["fields"] = fields
    if described.get("text_encoder"):
        manifest["text_encoder"] = described["text_encoder"]
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)  # written last: its presence means the set is complete
    total = sum(s["samples"] for s in splits.values())
    print(f"{dataset}: wrote {total} samples in {len(current)} {encoding} shards to {folder}", file=sys.stderr)
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise GensuiteError(f"{path}: shard set not found; build it with: {rebuild_command(shard_dir)}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise GensuiteError(f"{path}: unreadable manifest ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"rebuild with: {rebuild_command(shard_dir)}") from None


def shard_paths(shard_dir: str | Path, split: str) -> list[str]:
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise GensuiteError(f"{Path(shard_dir) / 'manifest.json'}: no split {split!r}; it has "
                            f"{', '.join(manifest['splits'])}")
    return [str(Path(shard_dir) / s["file"]) for s in manifest["splits"][split]["shards"]]


def data_spec(manifest: dict):
    from gensuite.registry import DataSpec

    return DataSpec.from_dict({**manifest, "samples": {k: v["samples"] for k, v in manifest["splits"].items()}})


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
    parser.add_argument("--n", type=int, help="moons, ring, grid: training points (default moons 10000, ring and grid "
                                              "20000; test n // 5); shapes: training images (default 6000)")
    parser.add_argument("--n-test", type=int, help="shapes: test images (default 1000)")
    parser.add_argument("--noise", type=float, help="moons: noise")
    parser.add_argument("--std", type=float, help="ring, grid: standard deviation of each Gaussian mode (default "
                                                  "ring 0.02, grid 0.05); recorded in the manifest's params")
    parser.add_argument("--seed", type=int, help="moons, ring, grid, shapes: seed")
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
    parser.add_argument("--encoding", choices=ENCODINGS,
                        help=f"image sets: raw (uint8 pixels in records of {RECORD_SIZE} samples, no decode) or png "
                             f"(default: raw up to {RAW_MAX_SIDE} px a side, png above, e.g. cub)")
    parser.add_argument("--verify-only", action="store_true", help="check checksums; build nothing")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        info = dataset_info(args.dataset)
        options = {k: getattr(args, k) for k in {**info.params, **GENERIC_PARAMS}
                   if getattr(args, k, None) is not None}
        if args.verify_only:
            manifest = open_shard_set(Path(args.out) / args.dataset, trust_cache=False)  # every file hashed
            shards = sum(len(s["shards"]) for s in manifest["splits"].values())
            print(f"{args.dataset}: all {shards} shards verified", file=sys.stderr)
            return 0
        build(args.dataset, args.src, args.out, args.shard_size, progress=not args.no_progress,
              encoding=args.encoding, **options)
    except GensuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
