"""The whole subject space: textures, shapes, random subjects and the broad image distribution.

Checked against independent computations: stripe and check phases recomputed from the formula, gradient
monotonicity, noise attached to the object, shape areas against the circle's, and the random subjects' stated
constraints (colour distance to every background, pattern contrast, period range) over many draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from nullbooth.errors import NullBoothError
from nullbooth.world.broad import broad_image, broad_images, broad_scene
from nullbooth.world.scenes import BACKGROUNDS
from nullbooth.world.subjects import (
    HELDOUT_SEED,
    MIN_BACKGROUND_DISTANCE,
    MIN_PATTERN_CONTRAST,
    PERIOD_RANGE,
    SUBJECT,
    SUITE_SEED,
    Subject,
    class_prompts,
    random_subject,
    render_subject,
    subject_instances,
    subject_prompts,
    subject_suite,
)
from nullbooth.world.textures import (
    ALL_SHAPES,
    NEW_SHAPES,
    PATTERN_KINDS,
    WORLD_SHAPES,
    Texture,
    render_texture,
    shape_mask,
)

RED, BLUE = (200, 20, 20), (20, 20, 200)


def _is(img: np.ndarray, rgb) -> np.ndarray:
    return np.all(img == np.asarray(rgb, np.uint8), axis=-1)


def test_stripes_and_checks_follow_their_formula():
    side, period = 48, 8.0
    stripes = render_texture(Texture("stripes", RED, BLUE, period, 0.0), side)
    x = np.arange(side)
    expected = (np.floor(x / (period / 2)) % 2) == 1  # accent on odd half-periods along u = x at 0°
    assert np.array_equal(_is(stripes, BLUE), np.broadcast_to(expected, (side, side)))
    checks = render_texture(Texture("checks", RED, BLUE, period, 0.0), side)
    yy, xx = np.mgrid[0:side, 0:side]
    expected = ((np.floor(xx / 4) + np.floor(yy / 4)) % 2) == 1
    assert np.array_equal(_is(checks, BLUE), expected)
    turned = render_texture(Texture("stripes", RED, BLUE, period, 90.0), side)
    assert np.array_equal(_is(turned, BLUE), _is(stripes, BLUE).T)  # 90°: stripes along the other axis


def test_gradient_ramps_along_its_angle_and_noise_moves_with_the_object():
    side = 64
    g = render_texture(Texture("gradient", (0, 0, 0), (255, 255, 255), angle=0.0), side, center=(32, 32), radius=16)
    row = g[10, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[15] == 0 and row[49] == 255  # black at cx − r, white at cx + r
    t = Texture("noise", RED, BLUE, 12.0, seed=3)
    a = render_texture(t, side, center=(20, 20))
    b = render_texture(t, side, center=(30, 26))
    assert np.array_equal(a[5:40, 5:40], b[11:46, 15:50])  # the same blobs, shifted with the centre
    assert 0.1 < _is(a, BLUE).mean() < 0.9


def test_a_part_of_the_canvas_renders_exactly_as_that_part_of_the_whole():
    """``box`` renders only the part under a shape (the VAE's data are drawn every step): the same uint8 pixels as
    that part of the full canvas, for every kind, any colours, period, angle and centre."""
    rng = np.random.default_rng(0)
    side = 96
    for k in range(60):
        kind = PATTERN_KINDS[k % len(PATTERN_KINDS)]
        colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2)]
        t = Texture(kind, *colours, float(rng.uniform(5, 30)), float(rng.uniform(0, 180)), seed=k)
        centre, radius = tuple(float(v) for v in rng.uniform(10, 86, 2)), float(rng.uniform(5, 40))
        left, upper = (int(v) for v in rng.integers(0, side - 1, 2))
        right, lower = int(rng.integers(left + 1, side + 1)), int(rng.integers(upper + 1, side + 1))
        whole = render_texture(t, side, centre, radius)
        part = render_texture(t, side, centre, radius, box=(left, upper, right, lower))
        assert part.dtype == np.uint8 and np.array_equal(part, whole[upper:lower, left:right]), (kind, k)
    with_box = broad_scene(np.random.default_rng(3))[0]
    assert with_box.shape == (64, 64, 3) and np.array_equal(with_box, broad_scene(np.random.default_rng(3))[0])


def test_every_shape_draws_a_comparable_area():
    side, r = 256, 60.0
    circle = np.asarray(shape_mask("circle", side, 128, 128, r)).astype(bool).sum()
    for shape in ALL_SHAPES:
        area = np.asarray(shape_mask(shape, side, 128, 128, r, rotation=17.0)).astype(bool).sum()
        assert 0.25 * circle < area < 1.3 * circle, shape
        outline = np.asarray(shape_mask(shape, side, 128, 128, r, outline_width=4)).astype(bool).sum()
        assert 0 < outline < area, shape
    with pytest.raises(NullBoothError, match="unknown shape 'blob'"):
        shape_mask("blob", side, 128, 128, r)


def test_random_subjects_keep_their_stated_constraints():
    for i in range(200):
        s = random_subject(HELDOUT_SEED, i)
        assert s == random_subject(HELDOUT_SEED, i)  # a pure function of (seed, index)
        for bg in BACKGROUNDS.values():
            assert math.dist(s.colour, bg) >= MIN_BACKGROUND_DISTANCE
        if s.pattern == "solid":
            assert s.pattern_colour is None
        else:
            assert math.dist(s.colour, s.pattern_colour) >= MIN_PATTERN_CONTRAST
        assert PERIOD_RANGE[0] <= s.pattern_period <= PERIOD_RANGE[1] and 0 <= s.pattern_angle <= 180
    drawn = [random_subject(HELDOUT_SEED, i) for i in range(200)]
    assert {s.shape for s in drawn} == set(ALL_SHAPES) and {s.pattern for s in drawn} == set(PATTERN_KINDS)


def test_suite_spans_the_space_and_is_disjoint_from_the_heldout_family():
    suite = subject_suite()
    assert suite[0] == SUBJECT and len(suite) == 9
    randoms = suite[1:]
    assert {s.pattern for s in randoms} == set(PATTERN_KINDS)
    assert any(s.shape in WORLD_SHAPES for s in randoms) and any(s.shape in NEW_SHAPES for s in randoms)
    assert len({s.colour for s in suite}) == 9
    heldout = {random_subject(HELDOUT_SEED, i).colour for i in range(100)}
    assert not heldout & {s.colour for s in suite}
    assert [s.name for s in subject_suite(3, SUITE_SEED, with_star=False)] == [s.name for s in randoms[:3]]


def test_subject_views_show_the_same_object_in_its_colours():
    for s in subject_suite():
        views = subject_instances(5, s)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views, subject_instances(5, s)))
        for k, im in enumerate(views):
            a = np.asarray(im).reshape(-1, 3).astype(float)
            bg = BACKGROUNDS[s.views[k][2]]
            near_colour = np.linalg.norm(a - np.asarray(s.colour), axis=1) < 20
            assert near_colour.sum() >= 8, (s.name, k)  # the main colour is visible in every view
            assert np.linalg.norm(a - np.asarray(bg), axis=1).__lt__(3).mean() > 0.5  # background dominates
    assert render_subject(SUBJECT, 0, resolution=32).size == (32, 32)
    with pytest.raises(NullBoothError, match="not drawable"):
        Subject(shape="blob")


def test_prompts_name_the_subject_and_its_class():
    s = subject_suite()[2]
    assert all(p.startswith(f"a sks {s.shape}") for p in subject_prompts(s))
    cls = class_prompts(s.shape, 20, seed=0)
    assert len(cls) == 20 and all(s.shape in p for p in cls)
    assert not any(w in p for p in cls for w in WORLD_SHAPES if w != s.shape)


def test_broad_images_are_deterministic_and_colourful():
    a = broad_images(24, seed=5)
    assert a.shape == (24, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a[3], broad_images(1, seed=5, start=3)[0])
    colours = {tuple(c) for c in a.reshape(-1, 3)[::7]}
    assert len(colours) > 500  # far beyond the world's 6 + 4 + 3 colours
    Image.fromarray(a[0])  # a valid image


def test_broad_scene_centres_locate_its_objects():
    """Each centre lies in the frame and a window around it shows an object: on a flat background some pixel there
    differs from the background (a ring's centre is a hole and an outline's inside is background, hence a window)."""
    flat = 0
    for i in range(40):
        image, centres = broad_scene(np.random.default_rng([5, i]))
        assert np.array_equal(image, broad_image(np.random.default_rng([5, i])))
        assert 1 <= len(centres) <= 3
        corner = image[0, 0]
        if not (image.reshape(-1, 3)[::97] == corner).all(axis=1).mean() > 0.6:
            continue  # a textured background: no single background colour to compare with
        flat += 1
        for cx, cy in centres:
            assert 0 <= cx < 64 and 0 <= cy < 64
            x, y = round(cx), round(cy)
            window = image[max(y - 12, 0):y + 12, max(x - 12, 0):x + 12].astype(int)
            assert np.abs(window - corner.astype(int)).sum(-1).max() > 30, (i, cx, cy)
    assert flat >= 20
