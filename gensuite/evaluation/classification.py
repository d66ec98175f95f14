"""A classifier's loss, accuracy and confusion matrix on a held-out split."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gensuite.data.pipeline import iterate_split
from gensuite.evaluation import EvalContext, Metric, register_metric


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


@torch.no_grad()
def compute(ctx: EvalContext) -> dict:
    classes = ctx.family.data.num_classes
    totals = torch.zeros(2, dtype=torch.float64)  # summed cross-entropy, samples
    matrix = torch.zeros(classes, classes, dtype=torch.float64)
    for _, batch in iterate_split(ctx.shard_dir, ctx.cfg.split, ctx.cfg.batch_size, ctx.rank, ctx.world_size,
                                  ctx.cfg.max_samples):
        x, y = batch["x"].to(ctx.device), batch["y"].to(ctx.device)
        logits = ctx.family.predict(ctx.nets, x).double()
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").cpu(),
                               torch.tensor(float(len(y)), dtype=torch.float64)])
        matrix += torch.bincount((y * classes + logits.argmax(1)).cpu(), minlength=classes**2).view(
            classes, classes).double()
    summed = ctx.sum_across_ranks(torch.cat([totals, matrix.flatten()]))
    totals, matrix = summed[:2], summed[2:].view(classes, classes)
    accuracy = (matrix.diagonal().sum() / totals[1]).item()
    title = f"{ctx.cfg.split}: accuracy {accuracy:.4f} ({int(totals[1])} samples)"
    return {"accuracy": accuracy, "nll": (totals[0] / totals[1]).item(),
            f"confusion_{ctx.cfg.split}": confusion_figure(matrix, ctx.family.data.class_names, title)}


def describe(ctx: EvalContext) -> str:
    return (f"classification: accuracy, mean cross-entropy (nats) and confusion matrix of the "
            f"{ctx.cfg.split} split ({'first ' + str(ctx.cfg.max_samples) if ctx.cfg.max_samples else 'all'} "
            f"samples), EMA weights when kept")


register_metric(Metric("classification", {"accuracy": True, "nll": False},
                       applies=lambda family: hasattr(family, "predict"), compute=compute, describe=describe))
