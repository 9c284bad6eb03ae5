#!/usr/bin/env python
"""The base model's composition gate, on a saved diffusers folder: does it draw pairs it was never shown?

Five shape × colour pairs of the world (``World.pairs("heldout")``: green circle, purple square, …) are never
captioned in training. The gate draws ``n`` prompts of those pairs (cycling through them evenly) and ``n`` prompts
of seen pairs, prompt ``i`` from generator seed ``seed + i``, and the judge reads each image's shape and
colour (:func:`nullbooth.world.judge.shape_colour_flags`). Gate: held-out shape *and* colour right in ≥ 95 % of
the images.

Each rate comes with its 95 % Wilson score interval: 93 of 100 reads 86–97 %, so the default n is 500 (about ±2
points). Writes ``composition_gate.json`` (rates, intervals, the held-out rate per pair) and ``heldout_grid.png`` /
``train_grid.png`` (the first 50 images of each split) into the model folder.

    python scripts/composition_gate.py src/nullbooth/data/models/tiny-sd
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

GATE = 0.95
SEED = 12345  # the gate's prompt and noise seed; the training script passes SEED + its --seed


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a binomial rate ``k / n`` (Wilson 1927), which, unlike ``p ± z·se``,
    stays inside [0, 1] and keeps its coverage near rates of 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rates(flags: dict) -> dict:
    from nullbooth.world.judge import shape_colour_rates

    r = shape_colour_rates(flags)
    r["shape_and_colour_ci95"] = list(wilson_interval(int(flags["shape_and_colour"].sum()), r["n"]))
    return r


def composition_gate(pipe, judge, n: int = 500, steps: int = 25, guidance: float = 4.0, seed: int = SEED
                     ) -> tuple[dict, list[Image.Image], list[Image.Image]]:
    """The gate's numbers, then the held-out and the seen-pair images (in prompt order)."""
    from nullbooth.sampling import sample
    from nullbooth.world.judge import shape_colour_flags
    from nullbooth.world.scenes import heldout_prompts, prior_prompts

    heldout = heldout_prompts(n, seed=seed)
    splits = {"heldout": [p for p, _ in heldout], "train": prior_prompts(n, seed=seed + 7)}
    images = {name: sample(pipe, prompts, range(seed, seed + len(prompts)), steps=steps, guidance=guidance,
                           batch_size=50)
              for name, prompts in splits.items()}
    flags = {name: shape_colour_flags(judge, images[name], prompts) for name, prompts in splits.items()}
    result: dict = {name: _rates(f) for name, f in flags.items()}
    pairs: dict[str, list[int]] = {}
    for k, (_, attrs) in enumerate(heldout):
        pairs.setdefault(f"{attrs.colour} {attrs.shape}", []).append(k)
    result["heldout_per_pair"] = {pair: int(flags["heldout"]["shape_and_colour"][ks].sum()) / len(ks)
                                  for pair, ks in pairs.items()}
    result.update(steps=steps, guidance=guidance, seed=seed, gate=GATE,
                  passed=bool(result["heldout"]["shape_and_colour"] >= GATE))
    return result, images["heldout"], images["train"]


def save_grid(images: list[Image.Image], path: Path, cols: int = 10) -> None:
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    grid.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a diffusers folder")
    p.add_argument("--n", type=int, default=500, help="prompts per split")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    from nullbooth.models import load_pipeline
    from nullbooth.world.judge import load_judge

    torch.set_num_threads(1)
    pipe = load_pipeline(str(args.model))
    result, heldout, train = composition_gate(pipe, load_judge(), args.n, args.steps, args.guidance, args.seed)
    save_grid(heldout[:50], args.model / "heldout_grid.png")
    save_grid(train[:50], args.model / "train_grid.png")
    (args.model / "composition_gate.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
