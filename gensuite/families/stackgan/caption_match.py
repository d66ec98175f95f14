"""Does an image of the captioned-shapes data show what its caption says? Read off the pixels.

The shapes images are flat: one background colour, one shape colour. The background is the median
of the border pixels; the shape is every pixel far from it; its colour is their median and its
position their centroid. Each is matched to the nearest named colour / the caption's position, so
generated samples can be scored without a trained judge (real test images score ~1.0: the test
checks it). Position is judged on the 64/76 centre view the generators learn, in thirds.

Registered as the ``caption_match`` metric for StackGAN runs on the shapes data: ``eval.n_samples``
samples for random held-out captions, each scored against its own caption (``caption_*``) and against
the next sample's caption (``caption_chance_*``, the level a generator that ignores the text reaches).
"""

from __future__ import annotations

import re

import torch

from gensuite.data.captioned import BACKGROUND_COLOURS, SHAPE_COLOURS
from gensuite.evaluation import EvalContext, Metric, generated_samples, register_metric

FAR_FROM_BACKGROUND = 0.25  # RGB distance in [0, 1] units above which a pixel belongs to the shape


def caption_facts(caption: str) -> dict[str, str]:
    """Background colour, shape colour, and position ("top left", "center", ...) named by a caption."""
    text = caption.lower()
    named = "|".join(BACKGROUND_COLOURS)
    background = re.search(rf"\b({named}) background|background is ({named})\b", text)
    bg = next(g for g in background.groups() if g)
    colours = [w for w in re.findall(r"\w+", text) if w in SHAPE_COLOURS and w != bg]
    shape = colours[0] if colours else bg  # a shape never has the background's colour
    row = "top" if re.search(r"\b(top|upper)\b", text) else "bottom" if re.search(r"\b(bottom|lower)\b", text) else ""
    col = "left" if "left" in text else "right" if "right" in text else ""
    return {"background": bg, "shape": shape, "position": f"{row} {col}".strip() or "center"}


def _nearest(rgb: torch.Tensor, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    colours = torch.tensor([palette[n] for n in names], dtype=torch.float32) / 255
    return names[int((colours - rgb).norm(dim=1).argmin())]


def image_facts(image: torch.Tensor) -> dict[str, str]:
    """What an image (3, H, W) in [0, 1] shows, read as ``caption_facts`` reads a caption."""
    image = image.float().clamp(0, 1)
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    bg_rgb = border.median(dim=1).values
    facts = {"background": _nearest(bg_rgb, BACKGROUND_COLOURS)}
    far = (image - bg_rgb[:, None, None]).norm(dim=0) > FAR_FROM_BACKGROUND
    if far.sum() < 2:
        return {**facts, "shape": "", "position": ""}
    facts["shape"] = _nearest(image[:, far].median(dim=1).values, SHAPE_COLOURS)
    h, w = far.shape
    ys, xs = far.nonzero(as_tuple=True)
    y, x = ys.float().mean() / h, xs.float().mean() / w
    row = "top" if y < 0.4 else "bottom" if y > 0.6 else ""
    col = "left" if x < 0.4 else "right" if x > 0.6 else ""
    facts["position"] = f"{row} {col}".strip() or "center"
    return facts


FACTS = ("background", "shape", "position", "all")


def caption_hits(images: torch.Tensor, captions: list[str]) -> dict[str, int]:
    """How many images match their caption's background colour, shape colour, position, and all three."""
    hits = dict.fromkeys(FACTS, 0)
    for image, caption in zip(images, captions):
        said, shown = caption_facts(caption), image_facts(image)
        same = [said[k] == shown[k] for k in FACTS[:3]]
        for key, ok in zip(FACTS, same):
            hits[key] += ok
        hits["all"] += all(same)
    return hits


def caption_match(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Fraction of images whose background colour, shape colour, position, and all three, match."""
    return {k: v / max(1, len(captions)) for k, v in caption_hits(images, captions).items()}


# -- the registered metric ---------------------------------------------------------------------------
def _applies(family) -> bool:
    from gensuite.families.stackgan import StackGAN

    return isinstance(family, StackGAN) and family.data.dataset == "shapes"


@torch.no_grad()
def compute(ctx: EvalContext) -> dict[str, float]:
    """Hits per fact against the sample's own caption and against the next sample's (chance), summed
    over ranks; every rank scores its own chunks of the sample stream."""
    counts = torch.zeros(2 * len(FACTS) + 1, dtype=torch.float64)
    for _, samples, fixed in generated_samples(ctx):
        captions = [ctx.family.caption_text(i) for i in fixed["caption"]]
        own, other = caption_hits(samples.cpu(), captions), caption_hits(samples.cpu(), captions[1:] + captions[:1])
        counts += torch.tensor([own[k] for k in FACTS] + [other[k] for k in FACTS] + [len(captions)],
                               dtype=torch.float64)
    counts = ctx.sum_across_ranks(counts.to(ctx.device)).cpu()
    n = max(1.0, float(counts[-1]))
    out = {f"caption_{k}": float(counts[i]) / n for i, k in enumerate(FACTS)}
    out.update({f"caption_chance_{k}": float(counts[len(FACTS) + i]) / n for i, k in enumerate(FACTS)})
    return out


def _describe(ctx: EvalContext) -> str:
    return (f"caption_match: {ctx.cfg.n_samples} samples (seed {ctx.cfg.seed}) for random held-out captions; "
            f"background colour, shape colour and position read off the pixels and compared with the caption "
            f"(caption_chance_*: against another sample's caption)")


VALUES = {f"caption_{k}": True for k in FACTS} | {f"caption_chance_{k}": True for k in FACTS}
register_metric(Metric("caption_match", VALUES, applies=_applies, compute=compute, describe=_describe))
