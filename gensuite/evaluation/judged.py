"""Metrics judged by a classifier the suite trained on the same data (usable without Inception weights).

``clf_fid``: the Fréchet distance between real and generated samples in the classifier's
penultimate feature space, computed by torchmetrics' FID with the classifier as feature extractor.
It is not comparable with Inception FID and is always logged under its own name.
``clf_prc``: improved precision and recall (Kynkäänniemi et al. 2019) in the same feature space:
precision is the share of generated samples inside the real samples' k-NN manifold (fidelity),
recall the share of real samples inside the generated samples' manifold (coverage, so mode dropping
shows), computed by torch-fidelity's k-NN code. Opt-in: it draws its own ``eval.n_samples``.
``cond_acc``: for class-conditional generators, how often a sample drawn for class k is classified
as k, with the confusion matrix of generated samples.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gensuite.data.pipeline import iterate_split
from gensuite.errors import ConfigError, GensuiteError
from gensuite.evaluation import EvalContext, Metric, generated_samples, register_metric
from gensuite.evaluation.classification import confusion_figure
from gensuite.registry import Classifies

_JUDGES: dict[tuple[str, str], object] = {}
PRC_NEIGHBOURHOOD = 3  # k of the k-NN manifolds, the paper's default
PRC_BATCH = 1024  # rows of each distance block: memory stays batch x samples, not samples x samples


def judge(ctx: EvalContext):
    """The classifier run named by ``eval.classifier`` (loaded once per process), checked against the data."""
    from gensuite import checkpoint as ckpt
    from gensuite.sampling import load_run

    path = ckpt.resolve_checkpoint(ctx.cfg.classifier)
    key = (str(path), str(ctx.device))
    if key not in _JUDGES:
        run = load_run(path, device=str(ctx.device))
        if not isinstance(run.family, Classifies):
            raise ConfigError("eval.classifier", f"{path} is a {run.job.family} run; name a classifier job's run")
        if tuple(run.family.data.shape) != tuple(ctx.family.data.shape) or \
                run.family.data.num_classes != ctx.family.data.num_classes:
            raise ConfigError("eval.classifier", f"{path} classifies {run.family.data.dataset} "
                                                 f"{tuple(run.family.data.shape)}; this job generates "
                                                 f"{ctx.family.data.dataset} {tuple(ctx.family.data.shape)}")
        _JUDGES[key] = run
    return _JUDGES[key]


class _PenultimateFeatures(nn.Module):
    """The judge's penultimate features as a module (the form torchmetrics' FID takes a custom model) that
    knows their width."""

    def __init__(self, run, example: torch.Tensor):
        super().__init__()
        self.run = run
        with torch.no_grad():
            self.num_features = int(run.family.features(run.networks, example).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run.family.features(self.run.networks, x)


def generated(ctx: EvalContext, with_start: bool = False):
    """(samples, labels or None) of this rank's share of ``eval.n_samples`` (``generated_samples``);
    ``with_start``: (index of the first sample, samples, labels)."""
    for start, samples, fixed in generated_samples(ctx):
        yield (start, samples, fixed.get("y")) if with_start else (samples, fixed.get("y"))


@torch.no_grad()
def clf_fid(ctx: EvalContext) -> dict:
    from torchmetrics.image.fid import FrechetInceptionDistance

    run = judge(ctx)
    example = torch.zeros(2, *ctx.family.data.shape, device=ctx.device)
    fid = FrechetInceptionDistance(feature=_PenultimateFeatures(run, example), normalize=True,
                                   input_img_size=tuple(ctx.family.data.shape)).to(ctx.device)
    for _, batch in iterate_split(ctx.shard_dir, ctx.cfg.split, ctx.cfg.batch_size, ctx.rank, ctx.world_size,
                                  ctx.cfg.max_samples):
        fid.update(batch["x"].to(ctx.device), real=True)
    for samples, _ in generated(ctx):
        fid.update(samples.float(), real=False)
    return {"clf_fid": float(fid.compute())}  # torchmetrics gathers the sums of every rank


def features_on_every_rank(ctx: EvalContext, extractor: _PenultimateFeatures, batches) -> torch.Tensor:
    """Features of the (global indices, images) batches of every rank, row i for sample i, on every rank.
    Each rank writes its rows into zeros and the tables are summed: x + 0 is exact, and every sample is
    computed in the same batch on any number of ranks, so the table is the single-process one bit for bit."""
    mine = [(indices, extractor(images.float().to(ctx.device)).float().cpu()) for indices, images in batches]
    total = int(ctx.sum_across_ranks(torch.tensor([float(sum(len(i) for i, _ in mine))], dtype=torch.float64)))
    table = torch.zeros(total, extractor.num_features)
    for indices, rows in mine:
        table[indices] = rows
    return ctx.sum_across_ranks(table)


def precision_recall(generated_features: torch.Tensor, real_features: torch.Tensor) -> tuple[float, float]:
    """(precision, recall) with k-NN manifolds of k = PRC_NEIGHBOURHOOD, by torch-fidelity."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    # torch-fidelity takes the generated features first and prints unless verbose=False; its k-NN radius is
    # the (k+1)-th smallest distance, the point itself counting, so each set needs more than k samples.
    # float64: a sample on a ball's edge is not decided by float32 rounding of the distances.
    prc = prc_features_to_metric(generated_features.double(), real_features.double(),
                                 prc_neighborhood=PRC_NEIGHBOURHOOD, prc_batch_size=PRC_BATCH, save_cpu_ram=True,
                                 verbose=False)
    return prc["precision"], prc["recall"]


@torch.no_grad()
def clf_prc(ctx: EvalContext) -> dict:
    extractor = _PenultimateFeatures(judge(ctx), torch.zeros(2, *ctx.family.data.shape, device=ctx.device))
    real = features_on_every_rank(ctx, extractor, (
        (indices, batch["x"]) for indices, batch in iterate_split(
            ctx.shard_dir, ctx.cfg.split, ctx.cfg.batch_size, ctx.rank, ctx.world_size, ctx.cfg.max_samples)))
    fake = features_on_every_rank(ctx, extractor, (
        (torch.arange(start, start + len(samples)), samples) for start, samples, _ in generated(ctx, with_start=True)))
    precision, recall = precision_recall(fake, real)
    return {"clf_precision": precision, "clf_recall": recall}


@torch.no_grad()
def cond_acc(ctx: EvalContext) -> dict:
    run = judge(ctx)
    classes = ctx.family.data.num_classes
    matrix = torch.zeros(classes, classes, dtype=torch.float64)
    for samples, labels in generated(ctx):
        predicted = run.family.predict(run.networks, samples.float()).argmax(1)
        matrix += torch.bincount((labels * classes + predicted).cpu(), minlength=classes**2).view(
            classes, classes).double()
    matrix = ctx.sum_across_ranks(matrix.flatten()).view(classes, classes)
    accuracy = (matrix.diagonal().sum() / matrix.sum()).item()
    title = f"generated samples: asked class (rows) vs classified; accuracy {accuracy:.4f}"
    return {"cond_acc": accuracy,
            "confusion_generated": confusion_figure(matrix, ctx.family.data.class_names, title)}


def _needs_classifier(cfg) -> str | None:
    if cfg.classifier:
        return None
    return ("eval.classifier: the run directory of a classifier trained on the same data "
            "(e.g. train jobs/classifier_digits.yaml first)")


def _classifier_exists(cfg) -> None:
    from gensuite import checkpoint as ckpt

    try:
        ckpt.resolve_checkpoint(cfg.classifier)
    except GensuiteError as e:
        raise ConfigError("eval.classifier", f"{e}; train the classifier first (e.g. gensuite train "
                                             f"jobs/classifier_digits.yaml --run-dir {cfg.classifier}), or leave "
                                             f"clf_fid, clf_prc and cond_acc out of eval.metrics") from None


def _prc_inputs(cfg) -> None:
    """The classifier exists and both sample sets can have k-NN radii (before training, not at its end)."""
    _classifier_exists(cfg)
    for field, count in (("eval.n_samples", cfg.n_samples), ("eval.max_samples", cfg.max_samples)):
        if count is not None and count <= PRC_NEIGHBOURHOOD:
            raise ConfigError(field, f"{count} is too few for clf_prc: its k-NN radii (k = {PRC_NEIGHBOURHOOD}) "
                                     f"need at least {PRC_NEIGHBOURHOOD + 1} samples")


def _describe(name: str):
    def describe(ctx: EvalContext) -> str:
        return (f"{name}: {ctx.cfg.n_samples} generated samples (seed {ctx.cfg.seed}) judged by the classifier "
                f"{Path(ctx.cfg.classifier)}" + (f" against the {ctx.cfg.split} split" if name == "clf_fid" else "")
                + "; classifier-feature FID, not comparable with Inception FID" * (name == "clf_fid"))
    return describe


def _describe_prc(ctx: EvalContext) -> str:
    from gensuite.evaluation.inception import _split_samples

    count = _split_samples(ctx.shard_dir, ctx.cfg.split)
    real = min(count, ctx.cfg.max_samples or count)
    return (f"clf_prc: improved precision and recall (Kynkäänniemi et al. 2019; k-NN manifolds, "
            f"k = {PRC_NEIGHBOURHOOD}, by torch-fidelity) of {ctx.cfg.n_samples} generated samples "
            f"(seed {ctx.cfg.seed}) against {real} samples of the {ctx.cfg.split} split, in the penultimate "
            f"features of the classifier {Path(ctx.cfg.classifier)}; clf_precision: share of generated samples "
            f"inside the real manifold, clf_recall: share of real samples inside the generated manifold")


def _generates_images(family) -> bool:
    return family.data.kind == "image" and bool(family.fixed_inputs(2, torch.Generator().manual_seed(0)))


register_metric(Metric("clf_fid", {"clf_fid": False}, applies=_generates_images, needs=_needs_classifier,
                       check_inputs=_classifier_exists, compute=clf_fid, describe=_describe("clf_fid")))
# opt-in: alone (without clf_fid) it draws eval.n_samples samples, for a diffusion model the costly part of an evaluation
register_metric(Metric("clf_prc", {"clf_precision": True, "clf_recall": True}, applies=_generates_images,
                       needs=_needs_classifier, check_inputs=_prc_inputs, compute=clf_prc, describe=_describe_prc,
                       default=False))
register_metric(Metric("cond_acc", {"cond_acc": True}, applies=lambda f: _generates_images(f) and f.conditional,
                       needs=_needs_classifier, check_inputs=_classifier_exists, compute=cond_acc,
                       describe=_describe("cond_acc")))
