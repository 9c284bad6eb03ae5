"""The broad image distribution the general-purpose VAE learns to encode: anything a subject could look like.

An image is a background (a world background, any solid sRGB colour or any texture) with one to three objects,
each any shape of :data:`~nullbooth.world.textures.ALL_SHAPES` at any position, size and rotation, filled with any
texture kind in any two colours at any period and angle, or drawn as an outline only. Nothing here is tied to the
world's palette or to a subject, so a codec trained on it carries colours and patterns the world never shows —
which is what lets a personalisation method learn a subject at all.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from nullbooth.world.scenes import BACKGROUNDS
from nullbooth.world.textures import (
    ALL_SHAPES,
    PATTERN_KINDS,
    RGB,
    Texture,
    paste_texture,
    render_texture,
    shape_mask,
)

PERIOD_RANGE = (0.1, 0.35)  # fraction of the side; finer than any subject's so that subjects are interpolation
RADIUS_RANGE = (0.07, 0.32)  # fraction of the side
OUTLINE_PROB = 0.15


def _rgb(rng: np.random.Generator) -> RGB:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def random_texture(rng: np.random.Generator, side: int) -> Texture:
    """Any kind, two uniform sRGB colours, period ∈ :data:`PERIOD_RANGE` · side, angle ∈ [0°, 180°)."""
    return Texture(str(rng.choice(PATTERN_KINDS)), _rgb(rng), _rgb(rng), float(rng.uniform(*PERIOD_RANGE)) * side,
                   float(rng.uniform(0.0, 180.0)), seed=int(rng.integers(2**31)))


def broad_scene(rng: np.random.Generator, resolution: int = 64,
                supersample: int = 2) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """One image of the broad distribution, uint8 ``[resolution, resolution, 3]``, anti-aliased by supersampling,
    and the centre ``(x, y)`` of each of its objects in pixels of that image (what a crop can be centred on)."""
    side = resolution * supersample
    u = rng.random()
    if u < 0.5:
        canvas = Image.new("RGB", (side, side), BACKGROUNDS[str(rng.choice(list(BACKGROUNDS)))])
    elif u < 0.75:
        canvas = Image.new("RGB", (side, side), _rgb(rng))
    else:
        canvas = Image.fromarray(render_texture(random_texture(rng, side), side))
    centres = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
        cx, cy = rng.uniform(0.12, 0.88, size=2) * side
        r = float(rng.uniform(*RADIUS_RANGE)) * side
        width = int(rng.integers(1, 4)) * supersample if rng.random() < OUTLINE_PROB else 0
        mask = shape_mask(str(rng.choice(ALL_SHAPES)), side, float(cx), float(cy), r, float(rng.uniform(0, 360)), width)
        paste_texture(canvas, random_texture(rng, side), mask, center=(float(cx), float(cy)), radius=r)
        centres.append((float(cx) / supersample, float(cy) / supersample))
    return np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BOX)), centres


def broad_image(rng: np.random.Generator, resolution: int = 64, supersample: int = 2) -> np.ndarray:
    """One image of the broad distribution (:func:`broad_scene` without its object centres)."""
    return broad_scene(rng, resolution, supersample)[0]


def broad_images(n: int, seed: int, start: int = 0, resolution: int = 64) -> np.ndarray:
    """Images ``start … start + n − 1`` of family ``seed`` (each a pure function of ``(seed, index)``), ``[n, H, W, 3]``."""
    return np.stack([broad_image(np.random.default_rng([int(seed), int(i)]), resolution)
                     for i in range(start, start + n)])
