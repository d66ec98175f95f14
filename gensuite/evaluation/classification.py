"""A classifier's loss, accuracy and confusion matrix on ``eval.split`` and on the shard set's other splits.

``eval.split`` (default test) gives ``accuracy``, ``nll`` and ``confusion_<split>``; each other split
among train/validation/test that the manifest has gives ``<split>_accuracy``, ``<split>_nll`` and
``confusion_<split>`` (a validation split comes from ``shards/build.py DATASET --validation F``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gensuite.data.pipeline import iterate_split
from gensuite.data.shards import build_command, read_manifest
from gensuite.errors import ConfigError, GensuiteError
from gensuite.evaluation import EvalContext, Metric, register_metric
from gensuite.registry import Classifies

SPLITS = ("train", "validation", "test")
VALUES = {"accuracy": True, "nll": False, "train_accuracy": True, "train_nll": False,
          "validation_accuracy": True, "validation_nll": False}


def evaluated_splits(ctx: EvalContext) -> list[str]:
    """``eval.split`` first, then the other splits among train/validation/test that the shard set has."""
    present = read_manifest(ctx.shard_dir)["splits"]
    if ctx.cfg.split not in present:
        raise ConfigError("eval.split", f"{Path(ctx.shard_dir) / 'manifest.json'} has no split {ctx.cfg.split!r}; "
                                        f"it has {', '.join(present)}")
    return [ctx.cfg.split] + [s for s in SPLITS if s != ctx.cfg.split and s in present]


def value_names(ctx: EvalContext, split: str) -> tuple[str, str]:
    return ("accuracy", "nll") if split == ctx.cfg.split else (f"{split}_accuracy", f"{split}_nll")


def confusion_figure(matrix: torch.Tensor, class_names, title: str):
    """Counts coloured by row-normalised rate (true class per row), with the numbers written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.long().numpy()
    rates = counts / counts.sum(1, keepdims=True).clip(min=1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def split_sums(ctx: EvalContext, split: str) -> torch.Tensor:
    """This rank's [summed cross-entropy, samples, confusion counts (true x predicted, flattened)]."""
    classes = ctx.family.data.num_classes
    totals = torch.zeros(2, dtype=torch.float64)  # summed cross-entropy, samples
    matrix = torch.zeros(classes, classes, dtype=torch.float64)
    for _, batch in iterate_split(ctx.shard_dir, split, ctx.cfg.batch_size, ctx.rank, ctx.world_size,
                                  ctx.cfg.max_samples):
        x, y = batch["x"].to(ctx.device), batch["y"].to(ctx.device)
        logits = ctx.family.predict(ctx.nets, x).double()
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").cpu(),
                               torch.tensor(float(len(y)), dtype=torch.float64)])
        matrix += torch.bincount((y * classes + logits.argmax(1)).cpu(), minlength=classes**2).view(
            classes, classes).double()
    return torch.cat([totals, matrix.flatten()])


@torch.no_grad()
def compute(ctx: EvalContext) -> dict:
    splits = evaluated_splits(ctx)
    best = ctx.cfg.best
    if best in VALUES and best not in {v for s in splits for v in value_names(ctx, s)}:
        # e.g. eval.best: validation_accuracy on a shard set built without --validation
        needed = best.rsplit("_", 1)[0]
        hint = (f"; rebuild it with: {build_command(Path(ctx.shard_dir).name)} --validation FRACTION"
                if needed == "validation" and needed not in splits else "")
        raise ConfigError("eval.best", f"{best!r} needs a {needed!r} split other than eval.split ({ctx.cfg.split}); "
                                       f"{Path(ctx.shard_dir) / 'manifest.json'} has {', '.join(splits)}{hint}")
    classes = ctx.family.data.num_classes
    # One reduction for every split: each rank's sums, in the same split order on every rank.
    summed = ctx.sum_across_ranks(torch.cat([split_sums(ctx, s) for s in splits])).view(len(splits), -1)
    out: dict = {}
    for split, row in zip(splits, summed):
        totals, matrix = row[:2], row[2:].view(classes, classes)
        accuracy = (matrix.diagonal().sum() / totals[1]).item()
        names = value_names(ctx, split)
        title = f"{split}: accuracy {accuracy:.4f} ({int(totals[1])} samples)"
        out[names[0]], out[names[1]] = accuracy, (totals[0] / totals[1]).item()
        out[f"confusion_{split}"] = confusion_figure(matrix, ctx.family.data.class_names, title)
    return out


def describe(ctx: EvalContext) -> str:
    try:
        others = evaluated_splits(ctx)[1:]
    except GensuiteError:
        others = []
    first = f"first {ctx.cfg.max_samples}" if ctx.cfg.max_samples else "all"
    also = (f"; also {', '.join(others)} as <split>_accuracy, <split>_nll, confusion_<split>" if others else "")
    return (f"classification: accuracy, mean cross-entropy (nats) and confusion matrix of the "
            f"{ctx.cfg.split} split{also} ({first} samples of each), EMA weights when kept")


register_metric(Metric("classification", VALUES,
                       applies=lambda family: isinstance(family, Classifies), compute=compute, describe=describe))
