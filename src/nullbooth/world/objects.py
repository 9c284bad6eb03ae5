"""Captioned objects over the whole space: what the base model knows beyond the world's six colours.

A real text-to-image model has seen colours and patterns of every kind under approximate words ("a teal
dotted heart"), so a new subject is a point near what it can already draw and a cross-attention edit can reach
it. The world (:mod:`nullbooth.world.scenes`) alone names six exact colours on five shapes; these objects give
the base model that wider, approximate knowledge: any shape of :data:`~nullbooth.world.textures.ALL_SHAPES`,
any sRGB main colour, any pattern kind, period, angle and pattern colour, placed like world shapes and captioned
with the nearest name of :data:`PALETTE` — so a word covers a region of colours, never one exact value.

Object ``i`` of family ``seed`` is a pure function of ``(seed, i)``. The world's held-out shape × colour pairs
never occur (their composition gate stays a test of composition), and :data:`OBJECT_SEED` is neither the
subject suite's nor the held-out family's seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from nullbooth.world.scenes import ACCENT_COLOURS, BACKGROUNDS, COLOURS, POSITIONS, SIZES, Attributes, World
from nullbooth.world.subjects import (
    MIN_BACKGROUND_DISTANCE,
    MIN_PATTERN_CONTRAST,
    PERIOD_RANGE,
    Subject,
    distinct_colour,
    draw_subject,
)
from nullbooth.world.textures import ALL_SHAPES, PATTERN_KINDS, RGB

OBJECT_SEED = 31_000_007
# The world's names keep their values; the rest tile the sRGB cube so that every colour has a name within reach.
PALETTE: dict[str, RGB] = {
    **COLOURS, **ACCENT_COLOURS,
    "black": (15, 15, 15), "gray": (128, 128, 128), "navy": (25, 35, 110), "cyan": (40, 210, 230),
    "lime": (165, 225, 45), "olive": (115, 120, 35), "maroon": (115, 20, 40), "magenta": (215, 45, 200),
    "beige": (230, 210, 165), "lavender": (180, 160, 235), "mint": (150, 235, 185), "sky": (120, 185, 245),
    "gold": (200, 165, 40), "coral": (245, 125, 100), "indigo": (75, 40, 140), "forest": (25, 85, 45),
}
# Pattern kind → the adjective captions use (the world says "striped" and "dotted" already).
PATTERN_WORDS: dict[str, str] = {"solid": "solid", "stripes": "striped", "dots": "dotted", "checks": "checked",
                                 "gradient": "fading", "noise": "mottled"}


_NAMES = list(PALETTE)
_VALUES = np.asarray([PALETTE[n] for n in _NAMES], np.float64)  # [names, 3]


def colour_name(rgb: RGB) -> str:
    """The :data:`PALETTE` name nearest to ``rgb`` (sRGB Euclidean distance)."""
    return _NAMES[int(np.argmin(np.linalg.norm(_VALUES - np.asarray(rgb, np.float64), axis=1)))]


def random_object(world: World, seed: int, index: int) -> tuple[Image.Image, Attributes]:
    """Object ``index`` of family ``seed``: its image (world resolution) and its worded attributes.

    The attributes carry palette names (``colour``, ``pattern_colour``) and the pattern adjective, so
    :meth:`World.random_caption` words them like any world sample.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    cfg = world.config
    held = set(cfg.held_out)
    shape = str(rng.choice(ALL_SHAPES))
    while True:
        colour = distinct_colour(rng, list(BACKGROUNDS.values()), MIN_BACKGROUND_DISTANCE)
        if (shape, colour_name(colour)) not in held:
            break
    kind = str(rng.choice(PATTERN_KINDS))
    accent = distinct_colour(rng, [colour], MIN_PATTERN_CONTRAST) if kind != "solid" else None
    subject = Subject(shape=shape, colour=colour, pattern=kind, pattern_colour=accent,
                      pattern_period=float(rng.uniform(*PERIOD_RANGE)), pattern_angle=float(rng.uniform(0.0, 180.0)),
                      name=f"o{seed}-{index}")
    position = str(rng.choice(list(POSITIONS)))
    size = str(rng.choice(list(SIZES)))
    background = str(rng.choice(list(BACKGROUNDS)))
    res, ss = cfg.resolution, cfg.supersample
    fx, fy = POSITIONS[position] + rng.uniform(-cfg.jitter, cfg.jitter, size=2)
    radius = SIZES[size] * float(rng.uniform(1 - cfg.size_jitter, 1 + cfg.size_jitter))
    rotation = float(rng.uniform(-cfg.rotation_jitter, cfg.rotation_jitter))
    side = res * ss
    image = draw_subject(subject, side, fx * side, fy * side, radius * side, background, rotation)
    attrs = Attributes(shape=shape, colour=colour_name(colour), position=position, size=size, background=background,
                       pattern=PATTERN_WORDS[kind], pattern_colour=colour_name(accent) if accent else None,
                       cx=float(fx * res), cy=float(fy * res), radius=radius * res, rotation=rotation)
    return image.resize((res, res), Image.Resampling.BOX), attrs


def object_arrays(world: World, n: int, seed: int = OBJECT_SEED, start: int = 0
                  ) -> tuple[np.ndarray, list[Attributes]]:
    """Objects ``start … start + n − 1``: uint8 images ``[n, H, W, 3]`` and their attributes."""
    pairs = [random_object(world, seed, i) for i in range(start, start + n)]
    return np.stack([np.asarray(im) for im, _ in pairs]), [a for _, a in pairs]
