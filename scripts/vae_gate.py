#!/usr/bin/env python
"""The general VAE's gate, on a saved diffusers folder: does it carry subjects it never saw?

The family is :data:`nullbooth.world.subjects.HELDOUT_SEED` — random subjects over the whole space (any shape,
main colour, pattern kind, period, angle and pattern colour), never trained or tuned on —, its first 160 subjects
in all five instance views. Each image goes through ``decode(mode(encode(x)))`` and the reconstruction is

- **judged** (the open-palette judge): ``kept`` — the reconstruction shows what the judge sees in the original
  (same shape, same pattern kind, main and pattern colour within the fidelity tolerance: the codec, not the judge,
  is measured); and, beside it, both images against the subject's ground truth (:mod:`nullbooth.eval.fidelity`),
  whose ceiling is the judge's own accuracy;
- **measured**: PSNR per image (peak 2 on the [-1, 1] range, i.e. 255 on 0–255), mean, median and 5th percentile.

Each ``kept`` rate comes with a 95 % interval that resamples whole subjects (``kept_ci95``): 40 subjects read a
rate to about ±4 points, 160 to about ±2–3. Gate: every ``kept`` rate (shape, colour, pattern) ≥ 95 % and mean PSNR
≥ 28 dB. Writes ``vae_gate.json`` and ``vae_grid.png`` (rows of originals over their reconstructions) into the
model folder.

    python scripts/vae_gate.py src/nullbooth/data/models/tiny-sd
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

GATE_KEEP = 0.95
GATE_PSNR_DB = 28.0


@torch.no_grad()
def reconstruct(vae, images: list[Image.Image], chunk: int = 100) -> list[Image.Image]:
    """``decode(mode(encode(x)))`` of every image, as 8-bit images."""
    out = []
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images[start:start + chunk]]) / 127.5 - 1)
        x = x.permute(0, 3, 1, 2).contiguous().to(vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        arr = ((y.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        out.extend(Image.fromarray(a) for a in arr)
    return out


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def kept_flags(judge, originals: list[Image.Image], recons: list[Image.Image]) -> dict[str, np.ndarray]:
    """Per image, does the judge read the reconstruction as it reads the original: shape, pattern kind, main colour
    and pattern colour (float 0/1; the pattern colour NaN where the original reads solid)."""
    from nullbooth.eval.fidelity import COLOUR_TOLERANCE
    from nullbooth.world.judge import SYMMETRIC_KINDS, colour_pair_errors

    a, b = judge.read(originals), judge.read(recons)
    kinds = a.labels["pattern_kind"]
    symmetric = np.array([k in SYMMETRIC_KINDS for k in kinds])
    main, pattern, _ = colour_pair_errors(b.colour, b.pattern_colour, a.colour, a.pattern_colour, symmetric)
    solid = np.array([k == "solid" for k in kinds])
    return {"shape": np.equal(a.labels["shape"], b.labels["shape"]).astype(float),
            "colour": (main <= COLOUR_TOLERANCE).astype(float),
            "pattern": np.equal(kinds, b.labels["pattern_kind"]).astype(float),
            "pattern_colour": np.where(solid, np.nan, (pattern <= COLOUR_TOLERANCE).astype(float))}


def subject_interval(flags: np.ndarray, n_views: int, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of a kept rate, resampling whole subjects: a subject's views share its
    colours and pattern, so they are not independent trials and a per-view binomial interval would be too narrow."""
    per_subject = flags.reshape(-1, n_views)  # [subjects, views]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_subject), size=(draws, len(per_subject)))
    with np.errstate(invalid="ignore"):
        rates = np.array([np.nanmean(per_subject[p]) for p in picks])
    lo, hi = np.nanpercentile(rates, [2.5, 97.5])
    return float(lo), float(hi)


def vae_gate(vae, judge, n_subjects: int = 160, seed: int | None = None) -> tuple[dict, Image.Image]:
    """The gate's numbers and a grid (originals over reconstructions, first 10 subjects' first two views)."""
    from nullbooth.eval.fidelity import reference_from_subject, subject_fidelity_scores
    from nullbooth.world.subjects import HELDOUT_SEED, random_subject, subject_instances

    seed = HELDOUT_SEED if seed is None else seed
    subjects = [random_subject(seed, i) for i in range(n_subjects)]
    originals = [subject_instances(5, s) for s in subjects]
    recons = [reconstruct(vae, views) for views in originals]
    keys = ("shape_match", "colour_match", "pattern_match", "pattern_colour_match", "subject_match")
    scores = {"reconstructed": {k: [] for k in keys}, "original": {k: [] for k in keys}}
    for s, orig, rec in zip(subjects, originals, recons):
        ref = reference_from_subject(s)
        for name, images in (("reconstructed", rec), ("original", orig)):
            f = subject_fidelity_scores(judge, images, [""] * len(images), ref)
            for k in keys:
                if f[k] is not None:
                    scores[name][k].extend([f[k]] * len(images))  # per-image weights: solid subjects have no pattern colour
    values = np.array([psnr(a, b) for o, r in zip(originals, recons) for a, b in zip(o, r)])
    flags = kept_flags(judge, [im for o in originals for im in o], [im for r in recons for im in r])
    result = {
        "family_seed": seed, "subjects": n_subjects, "images": int(len(values)),
        "psnr_db": {"mean": float(values.mean()), "median": float(np.median(values)),
                    "p05": float(np.percentile(values, 5)), "min": float(values.min())},
        # Pattern colour is None when every original reads solid (nothing to keep).
        "kept": {k: float(np.nanmean(v)) if np.isfinite(v).any() else None for k, v in flags.items()},
        "kept_ci95": {k: list(subject_interval(v, len(originals[0]))) if np.isfinite(v).any() else None
                      for k, v in flags.items()},
        "against_truth": {name: {k: float(np.mean(v)) if v else None for k, v in d.items()}
                          for name, d in scores.items()},
        "gate": {"keep": GATE_KEEP, "psnr_db": GATE_PSNR_DB},
    }
    k = result["kept"]
    result["passed"] = bool(min(k["shape"], k["colour"], k["pattern"]) >= GATE_KEEP
                            and result["psnr_db"]["mean"] >= GATE_PSNR_DB)
    cells = [(o[v], r[v]) for o, r in zip(originals[:10], recons[:10]) for v in (0, 1)]
    w = originals[0][0].width
    grid = Image.new("RGB", (len(cells) * w, 2 * w), (255, 255, 255))
    for k, (o, r) in enumerate(cells):
        grid.paste(o, (k * w, 0))
        grid.paste(r, (k * w, w))
    return result, grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a diffusers folder with vae/")
    p.add_argument("--subjects", type=int, default=160)
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL

    from nullbooth.world.judge import load_judge

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", dtype=torch.float32).eval()
    result, grid = vae_gate(vae, load_judge(), args.subjects)
    (args.model / "vae_gate.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    grid.save(args.model / "vae_grid.png")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
