"""Captioned objects of the whole space (nullbooth.world.objects): pure, worded by the nearest palette name,
never a held-out world pair, and spread over every shape, pattern kind and palette region."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np

from nullbooth.world.objects import OBJECT_SEED, PALETTE, PATTERN_WORDS, colour_name, object_arrays, random_object
from nullbooth.world.scenes import BACKGROUNDS, COLOURS, World
from nullbooth.world.textures import ALL_SHAPES, PATTERN_KINDS

REPO = Path(__file__).resolve().parents[1]


def test_palette_keeps_the_world_names_and_names_every_colour_nearest():
    for name, rgb in COLOURS.items():
        assert PALETTE[name] == rgb and colour_name(rgb) == name
    rng = np.random.default_rng(0)
    for rgb in rng.integers(0, 256, size=(200, 3)):
        name = colour_name(tuple(int(v) for v in rgb))
        d = {n: np.linalg.norm(np.subtract(rgb, c, dtype=np.float64)) for n, c in PALETTE.items()}
        assert d[name] == min(d.values())
    # A palette that tiles the cube: no sRGB colour is further than this from its name (sampled, 0–255 units).
    worst = max(min(np.linalg.norm(np.subtract(rgb, c, dtype=np.float64)) for c in PALETTE.values())
                for rgb in rng.integers(0, 256, size=(2000, 3)))
    assert worst < 110, worst


def test_objects_are_pure_functions_of_seed_and_index():
    w = World()
    a_img, a = random_object(w, OBJECT_SEED, 7)
    b_img, b = random_object(w, OBJECT_SEED, 7)
    assert a == b and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    imgs, attrs = object_arrays(w, 3, start=6)
    assert attrs[1] == a and np.array_equal(imgs[1], np.asarray(a_img))
    assert random_object(w, OBJECT_SEED + 1, 7)[1] != a


def test_objects_cover_the_space_and_never_a_held_out_pair():
    w = World()
    _, attrs = object_arrays(w, 400)
    held = set(w.config.held_out)
    assert not [a for a in attrs if (a.shape, a.colour) in held]
    assert {a.shape for a in attrs} == set(ALL_SHAPES)
    assert {a.pattern for a in attrs} == {PATTERN_WORDS[k] for k in PATTERN_KINDS}
    assert len({a.colour for a in attrs}) >= len(PALETTE) - 3  # white/gray/black are never main colours
    # Main colours are spread, not one name: the commonest holds under a fifth.
    assert Counter(a.colour for a in attrs).most_common(1)[0][1] < 0.2 * len(attrs)


def test_object_pixels_are_what_the_caption_names():
    w = World()
    for i in range(30):
        img, a = random_object(w, OBJECT_SEED, i)
        pixels = np.asarray(img).reshape(-1, 3)
        inside = pixels[np.abs(pixels.astype(int) - BACKGROUNDS[a.background]).sum(axis=1) > 30]
        values, counts = np.unique(inside, axis=0, return_counts=True)
        px = values[np.argmax(counts)]  # the object's commonest colour (edges are blended with the background)
        caption = w.random_caption(a, np.random.default_rng(i))
        assert a.shape in caption and a.colour in caption
        if a.pattern == "solid":
            # A solid object's commonest pixel is its main colour, which the caption names by its nearest name.
            assert colour_name(tuple(int(v) for v in px)) == a.colour


def test_training_latents_mix_world_images_and_objects():
    spec = importlib.util.spec_from_file_location("train_world_model", REPO / "scripts" / "train_world_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from nullbooth.models import WORLD_ARCH, build_tiny_pipeline

    pipe = build_tiny_pipeline(WORLD_ARCH)
    w = World()
    means, stds, attrs = mod.training_latents(pipe.vae, w, 5, 3, seed=0)
    assert means.shape[0] == stds.shape[0] == len(attrs) == 8
    assert attrs[:5] == list(w.arrays(5, 0, "train")[2])
    assert attrs[5:] == object_arrays(w, 3, seed=OBJECT_SEED)[1]
