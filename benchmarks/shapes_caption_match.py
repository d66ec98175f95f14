#!/usr/bin/env python
"""How often a StackGAN run on the captioned shapes draws what the caption says.

    python benchmarks/shapes_caption_match.py runs/stackgan_stage2_shapes [--n 500] [--seed 0]

Draws ``n`` samples for random held-out test captions (the run's stored conditions) and reads the
background colour, shape colour and position off the pixels (gensuite/families/stackgan/caption_match.py).
Prints the match rates of this stage (and of the frozen Stage I inside a Stage-II run), next to the
same images scored against shuffled captions (chance level, measured in the same run).
``--n 10 --seed 0`` scores exactly the 10 captions of the run's ``captioned`` figure, and up to 20
samples are also listed one by one: what the caption says and what the pixels show.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gensuite.families.stackgan.caption_match import caption_facts, caption_match, image_facts  # noqa: E402
from gensuite.sampling import load_run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = load_run(args.run)
    family = run.family
    fixed = family.fixed_inputs(args.n, torch.Generator().manual_seed(args.seed))
    captions = [family.caption_text(i) for i in fixed["caption"]]
    shuffled = captions[1:] + captions[:1]
    with torch.no_grad(), family.seeded(fixed):
        image, _, _, low = family.generate(run.networks, fixed["z"], fixed["embedding"], ema=True)
    stages = [("Stage I (frozen G1)", low)] if low is not None else []
    stages.append((f"Stage {'II' if low is not None else 'I'} ({args.run})", image))
    print(f"{args.n} samples, step {run.step}; fraction matching the caption (chance: shuffled captions)")
    print(f"{'':34s} {'background':>12s} {'shape colour':>14s} {'position':>10s} {'all three':>11s}")
    for name, images in stages:
        images = (images.float() + 1) / 2
        match, chance = caption_match(images, captions), caption_match(images, shuffled)
        print(f"{name:34s} " + " ".join(f"{match[k]:>{w}.3f}" for k, w in
                                         (("background", 12), ("shape", 14), ("position", 10), ("all", 11))))
        print(f"{'  shuffled captions':34s} " + " ".join(f"{chance[k]:>{w}.3f}" for k, w in
                                                         (("background", 12), ("shape", 14), ("position", 10),
                                                          ("all", 11))))
    if args.n <= 20:
        final = (image.float() + 1) / 2
        print(f"\n{'#':>2s}  {'caption says (background / shape / position)':46s} {'last stage shows':34s} ok")
        for i, (caption, sample) in enumerate(zip(captions, final)):
            said, shown = caption_facts(caption), image_facts(sample)
            ok = "".join("+" if said[k] == shown[k] else "-" for k in ("background", "shape", "position"))
            print(f"{i:>2d}  {' / '.join(said.values()):46s} {' / '.join(shown.values()):34s} {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
