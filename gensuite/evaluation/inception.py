"""Inception metrics (FID, IS, KID, precision/recall) through torch-fidelity, split across ranks.

Protocol: ``eval.n_samples`` generated samples (default 10,000; use 50,000 to compare with papers)
against the ``eval.split`` split (first ``eval.max_samples``, else all). Every image is quantised
to uint8 exactly as a saved PNG is, grey is replicated to RGB, and torch-fidelity's InceptionV3
resizes to 299x299 with its TensorFlow-1-compatible bilinear interpolation (the reference FID
implementation's behaviour). Features: the 2048-d pool layer (FID, KID, precision/recall) and the
unbiased logits (IS, 10 splits). The metric math is torch-fidelity's; this module only feeds it.

Weights never download here: ``eval.inception_weights``, else ``$GENSUITE_INCEPTION_WEIGHTS``, else
torch hub's cache, which is where torch-fidelity itself would have saved them.
Real-split features are cached beside the shards (``<shards>/.stats/``) under a key derived from
the manifest's checksum, the split, the sample cap and the weights file, so every run and rank
after the first reads them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from gensuite.errors import ConfigError, GensuiteError
from gensuite.evaluation import EvalContext, Metric, register_metric

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's converted TF weights
WEIGHTS_ENV = "GENSUITE_INCEPTION_WEIGHTS"
CACHE_VERSION = 1
LAYERS = ("2048", "logits_unbiased")
KID_SUBSETS, KID_SUBSET_SIZE, ISC_SPLITS, PRC_NEIGHBORHOOD, RNG_SEED = 100, 1000, 10, 3, 2020


def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def weights_path(configured: str | None) -> Path:
    """The weights file to load, or a one-line error saying where to put it."""
    if configured:
        path, origin = Path(configured).expanduser(), "eval.inception_weights"
    elif os.environ.get(WEIGHTS_ENV):
        path, origin = Path(os.environ[WEIGHTS_ENV]).expanduser(), f"${WEIGHTS_ENV}"
    else:
        path, origin = hub_weights_path(), "torch hub cache"
    if not path.is_file():
        raise ConfigError("eval.inception_weights",
                          f"Inception weights not found at {path} ({origin}); copy torch-fidelity's {WEIGHTS_FILE} "
                          f"there, or point eval.inception_weights or ${WEIGHTS_ENV} at it")
    check_weights(path)
    return path


def _needs_weights(cfg) -> str | None:
    try:
        weights_path(cfg.inception_weights)
    except ConfigError as e:
        return str(e).split(": ", 1)[1]
    except GensuiteError as e:  # the file is there but is not the weights
        return f"usable Inception weights: {e}"
    return None


# -- reading a weights file -------------------------------------------------------------------------

def _not_weights(path: Path, why: str) -> GensuiteError:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return GensuiteError(f"{path}: not torch-fidelity InceptionV3 weights ({why}); replace it with torch-fidelity's "
                         f"{WEIGHTS_FILE} ({URL_INCEPTION_V3}), or point eval.inception_weights or ${WEIGHTS_ENV} "
                         f"at a good copy")


def _unloaded_inception() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 in its random initialisation (weights are loaded by the caller)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # the file torch-fidelity reads: nothing to load
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Unloaded("inception-v3-compat", list(LAYERS), feature_extractor_weights_path=str(empty))


_SHAPES: dict[str, tuple[int, ...]] = {}
OPTIONAL = "num_batches_tracked"  # BatchNorm counters: torch-fidelity's file has none, PyTorch fills them in


def expected_shapes() -> dict[str, tuple[int, ...]]:
    if not _SHAPES:
        _SHAPES.update({k: tuple(v.shape) for k, v in _unloaded_inception().state_dict().items()})
    return _SHAPES


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, checked against InceptionV3's names and shapes; a one-line error
    naming the file otherwise. Loaded with ``weights_only`` (torch-fidelity itself unpickles anything)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad file; say which kind
        raise _not_weights(path, _unreadable_reason(path, e)) from None
    if not isinstance(state, dict):
        raise _not_weights(path, f"it holds a {type(state).__name__}, not a dict of tensors")
    expected = expected_shapes()
    needed = [k for k in expected if not k.endswith(OPTIONAL)]
    missing = [k for k in needed if k not in state]
    extra = [k for k in state if k not in expected]
    if len(missing) == len(needed):
        held = ", ".join(repr(k) for k in list(state)[:3]) + (", ..." if len(state) > 3 else "")
        raise _not_weights(path, f"none of InceptionV3's {len(needed)} tensors; it holds {held or 'nothing'}")
    if missing:
        raise _not_weights(path, f"{len(missing)} of InceptionV3's {len(needed)} tensors missing, e.g. {missing[0]!r}")
    if extra:
        raise _not_weights(path, f"{extra[0]!r}, which InceptionV3 does not have"
                                 + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise _not_weights(path, f"{key!r} is not a tensor ({type(value).__name__})")
        if tuple(value.shape) != expected[key]:
            raise _not_weights(path, f"{key!r} has shape {tuple(value.shape)}, InceptionV3's is {expected[key]}")
    return state


def _unreadable_reason(path: Path, error: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "an empty file"
    torch_file = head == b"PK\x03\x04" or head.startswith(b"\x80\x02\x8a\x0a")  # zip, or the legacy format's magic
    if not torch_file:
        return "not a PyTorch file"
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
        return "it holds Python objects besides tensors"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "a truncated PyTorch file"
    return "a truncated or damaged PyTorch file"


_CHECKED: set[tuple[str, int, int]] = set()


def check_weights(path: Path) -> None:
    """``read_weights`` once per file version (the metric is resolved, described and run several times)."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CHECKED:
        read_weights(path)
        _CHECKED.add(key)


_EXTRACTORS: dict[tuple[str, float, str], torch.nn.Module] = {}
_DIGESTS: dict[tuple[str, float], str] = {}


def file_digest(path: Path) -> str:
    key = (str(path), path.stat().st_mtime)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def extractor(path: Path, device: torch.device) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with the given weights (loaded once per process and device)."""
    key = (str(path), path.stat().st_mtime, str(device))
    if key not in _EXTRACTORS:
        net = _unloaded_inception()
        torch.nn.Module.load_state_dict(net, read_weights(path))  # strict: names and shapes were checked
        _EXTRACTORS[key] = net.to(device)
    return _EXTRACTORS[key]


def write_random_weights(path: str | Path, seed: int = 0) -> Path:
    """A randomly initialised weights file in torch-fidelity's format (tests and benchmarks only).

    Convolutions get He-normal init so activations keep their scale through the 94 layers: with
    PyTorch's default init the pool features are ~1e-8 and every distance and score degenerates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = _unloaded_inception()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=2048 ** -0.5)  # logits of unit scale: IS away from 1
    torch.save(net.state_dict(), path)
    return path


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8 RGB, rounded as torchvision's save_image rounds."""
    images = images.float().clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def features_in_order(net: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int,
                      device: torch.device, sum_across_ranks: Callable[[torch.Tensor], torch.Tensor],
                      batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Features of ``total`` images, row i for image i, from (global indices, [0,1] images) batches
    that are split across ranks. Each rank writes its rows into zeros and the ranks' tables are
    summed: x + 0 is exact, so the result is the single-process table bit for bit."""
    tables = {layer: torch.zeros(total, 2048 if layer == "2048" else 1008) for layer in LAYERS}
    for indices, images in batches:
        for start in range(0, len(images), batch_size):
            part = to_uint8_rgb(images[start:start + batch_size].to(device))
            for layer, values in zip(LAYERS, net(part)):
                tables[layer][indices[start:start + batch_size]] = values.float().cpu()
    return {layer: sum_across_ranks(table) for layer, table in tables.items()}


def real_features(ctx: EvalContext, weights: Path) -> torch.Tensor:
    """Pool features of the evaluation split."""
    return shard_features(ctx.shard_dir, ctx.cfg.split, ctx.cfg.max_samples, weights, ctx.device, ctx.cfg.batch_size,
                          ctx.rank, ctx.world_size, ctx.sum_across_ranks)


def shard_features(shard_dir: Path, split: str, limit: int | None, weights: Path, device: torch.device,
                   batch_size: int = 256, rank: int = 0, world_size: int = 1,
                   sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """Pool features of a shard split's first ``limit`` samples, from the cache beside the shards when present."""
    from gensuite import checkpoint as ckpt
    from gensuite.data.pipeline import iterate_split

    count = _split_samples(shard_dir, split)
    total = min(count, limit or count)
    path = stats_cache_path(shard_dir, split, total, weights)
    if path.is_file():
        return torch.load(path, weights_only=True)["2048"]
    batches = ((i, b["x"]) for i, b in iterate_split(shard_dir, split, batch_size, rank, world_size, total))
    table = features_in_order(extractor(weights, device), batches, total, device, sum_across_ranks)["2048"]
    if rank == 0:
        try:
            path.parent.mkdir(exist_ok=True)
            ckpt._atomic_save({"2048": table, "split": split, "samples": total, "weights": str(weights)}, path)
        except OSError as e:  # a read-only dataset folder: still correct, only slower next time
            print(f"[gensuite] warning: cannot cache real Inception features at {path}: {e}", file=sys.stderr)
    return table


def _split_samples(shard_dir: Path, split: str) -> int:
    from gensuite.data.shards import read_manifest

    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise GensuiteError(f"{Path(shard_dir) / 'manifest.json'}: no split {split!r}; it has "
                            f"{', '.join(manifest['splits'])}")
    return manifest["splits"][split]["samples"]


def stats_cache_path(shard_dir: Path, split: str, samples: int, weights: Path) -> Path:
    manifest_digest = hashlib.sha256((Path(shard_dir) / "manifest.json").read_bytes()).hexdigest()
    key = hashlib.sha256(f"{CACHE_VERSION}|{manifest_digest}|{split}|{samples}|{file_digest(weights)}".encode())
    return Path(shard_dir) / ".stats" / f"inception-{split}-{samples}-{key.hexdigest()[:16]}.pt"


def scores(generated: dict[str, torch.Tensor], real: torch.Tensor | None) -> dict[str, float]:
    """torch-fidelity's metrics from feature tables; IS needs the generated set's logits."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = {}
    if "logits_unbiased" in generated:
        isc = isc_features_to_metric(generated["logits_unbiased"], splits=ISC_SPLITS, rng_seed=RNG_SEED)
        out = {"is": isc["inception_score_mean"], "is_std": isc["inception_score_std"]}
    if real is None:
        return out
    fake = generated["2048"]
    fid = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), verbose=False)
    subset = min(KID_SUBSET_SIZE, len(fake), len(real))
    kid = kid_features_to_metric(fake, real, kid_subsets=KID_SUBSETS, kid_subset_size=subset, kid_degree=3,
                                 kid_gamma=None, kid_coef0=1, rng_seed=RNG_SEED, verbose=False)
    out.update(fid=fid["frechet_inception_distance"], kid=kid["kernel_inception_distance_mean"],
               kid_std=kid["kernel_inception_distance_std"])
    if min(len(fake), len(real)) > PRC_NEIGHBORHOOD:  # k-NN radii need more than k points in each set
        prc = prc_features_to_metric(fake, real, prc_neighborhood=PRC_NEIGHBORHOOD, prc_batch_size=10000,
                                     save_cpu_ram=False, verbose=False)
        out.update(precision=prc["precision"], recall=prc["recall"])
    return out


def generated_batches(ctx: EvalContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from gensuite.evaluation.judged import generated

    for start, samples, _ in generated(ctx, with_start=True):
        yield torch.arange(start, start + len(samples)), samples


def compute(ctx: EvalContext) -> dict:
    weights = weights_path(ctx.cfg.inception_weights)
    real = real_features(ctx, weights)
    fake = features_in_order(extractor(weights, ctx.device), generated_batches(ctx), ctx.cfg.n_samples, ctx.device,
                             ctx.sum_across_ranks)
    return scores(fake, real)


def describe(ctx: EvalContext) -> str:
    split = ctx.cfg.split + (f" (first {ctx.cfg.max_samples})" if ctx.cfg.max_samples else "")
    return (f"inception: FID, KID (100 subsets of <= {KID_SUBSET_SIZE}), IS ({ISC_SPLITS} splits), precision/recall "
            f"(k={PRC_NEIGHBORHOOD}) by torch-fidelity {_fidelity_version()}; {ctx.cfg.n_samples} generated samples "
            f"(seed {ctx.cfg.seed}) vs the {split} split; uint8 RGB, TF1-bilinear resize to 299x299; weights "
            f"{weights_path(ctx.cfg.inception_weights).name} sha256 {file_digest(weights_path(ctx.cfg.inception_weights))[:12]}")


def _fidelity_version() -> str:
    import torch_fidelity

    return torch_fidelity.__version__


def _generates_images(family) -> bool:
    from gensuite.evaluation.judged import _generates_images as images

    return images(family)


register_metric(Metric("inception", {"fid": False, "is": True, "kid": False, "precision": True, "recall": True},
                       applies=_generates_images, needs=_needs_weights, compute=compute, describe=describe))


# -- `gensuite fid A B`: any two image sources -----------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GensuiteError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    return files


def source_kind(source: str, split: str) -> str:
    """``shards``, ``folder`` or ``run``: what an image source is, or a one-line error when it cannot
    be used (no such path, no images, no such split, no checkpoint). Reads no images and no weights."""
    from gensuite import checkpoint as ckpt

    path = Path(source)
    if (path / "manifest.json").is_file():
        _split_samples(path, split)
        return "shards"
    if path.is_dir() and not ((path / "checkpoints").is_dir() or (path / "config.yaml").is_file()):
        image_files(path)
        return "folder"
    if path.exists():
        ckpt.resolve_checkpoint(path)
        return "run"
    raise GensuiteError(f"{source}: no such folder, shard set or run directory")


def folder_batches(folder: Path, batch_size: int = 64):
    """(indices, [0,1] images) of every image file in a folder, sorted by name; batches never mix sizes."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    files = image_files(folder)
    indices, images = [], []
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                tensor = pil_to_tensor(image.convert("RGB")).float() / 255
        except OSError as e:
            raise GensuiteError(f"{path}: not a readable image ({e})") from None
        if images and (tensor.shape != images[0].shape or len(images) == batch_size):
            yield torch.tensor(indices), torch.stack(images)
            indices, images = [], []
        indices.append(i)
        images.append(tensor)
    yield torch.tensor(indices), torch.stack(images)


def source_features(source: str, weights: Path, device: torch.device, n: int, split: str, seed: int | None,
                    batch_size: int) -> tuple[dict[str, torch.Tensor], str]:
    """Feature tables of an image folder, a shard set (its ``split``) or a run (``n`` samples), and what it was."""
    path, kind = Path(source), source_kind(source, split)
    if kind == "shards":
        table = shard_features(path, split, n, weights, device, batch_size)
        return {"2048": table}, f"{len(table)} images of the {split} split of shard set {path}"
    if kind == "folder":
        total = len(image_files(path))
        tables = features_in_order(extractor(weights, device), folder_batches(path), total, device, lambda t: t)
        return tables, f"{total} images in folder {path}"
    # a run
    from gensuite.config import EvalConfig
    from gensuite.evaluation import EvalContext
    from gensuite.sampling import load_run

    run = load_run(path, device=str(device))
    if run.family.data.kind != "image":
        raise GensuiteError(f"{path}: a {run.job.family} run on {run.family.data.dataset} does not make images")
    # the run's own eval seed and chunking unless told otherwise: the samples its logged values used
    seed = run.job.eval.seed if seed is None else seed
    ctx = EvalContext(run.family, run.networks, Path(run.job.data.root) / run.job.data.dataset,
                      EvalConfig(n_samples=n, seed=seed, batch_size=run.job.eval.batch_size), device)
    tables = features_in_order(extractor(weights, device), generated_batches(ctx), n, device, lambda t: t)
    return tables, f"{n} samples (seed {seed}) of run {run.checkpoint} at step {run.step}"


def compare(a: str, b: str, weights: str | None = None, n: int = 10_000, split: str = "test", seed: int | None = None,
            batch_size: int = 256, device: str = "cpu") -> tuple[dict[str, float], list[str]]:
    """Inception metrics of A (the images judged) against B (the reference), and descriptions of both."""
    for source in (a, b):  # a wrong path is named before the weights are looked for
        source_kind(source, split)
    path = weights_path(weights)
    first, about_a = source_features(a, path, torch.device(device), n, split, seed, batch_size)
    second, about_b = source_features(b, path, torch.device(device), n, split, seed, batch_size)
    return scores(first, second["2048"]), [about_a, about_b]
