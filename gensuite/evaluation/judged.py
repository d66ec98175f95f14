"""Metrics judged by a classifier the suite trained on the same data (usable without Inception weights).

``clf_fid``: the Fréchet distance between real and generated samples in the classifier's
penultimate feature space, computed by torchmetrics' FID with the classifier as feature extractor.
It is not comparable with Inception FID and is always logged under its own name.
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
    """The judge's feature extractor in the form torchmetrics' FID takes a custom model."""

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
                                             f"clf_fid and cond_acc out of eval.metrics") from None


def _describe(name: str):
    def describe(ctx: EvalContext) -> str:
        return (f"{name}: {ctx.cfg.n_samples} generated samples (seed {ctx.cfg.seed}) judged by the classifier "
                f"{Path(ctx.cfg.classifier)}" + (f" against the {ctx.cfg.split} split" if name == "clf_fid" else "")
                + "; classifier-feature FID, not comparable with Inception FID" * (name == "clf_fid"))
    return describe


def _generates_images(family) -> bool:
    return family.data.kind == "image" and bool(family.fixed_inputs(2, torch.Generator().manual_seed(0)))


register_metric(Metric("clf_fid", {"clf_fid": False}, applies=_generates_images, needs=_needs_classifier,
                       check_inputs=_classifier_exists, compute=clf_fid, describe=_describe("clf_fid")))
register_metric(Metric("cond_acc", {"cond_acc": True}, applies=lambda f: _generates_images(f) and f.conditional,
                       needs=_needs_classifier, check_inputs=_classifier_exists, compute=cond_acc,
                       describe=_describe("cond_acc")))
