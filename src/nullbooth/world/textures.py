"""Textures and shape masks over the whole space: any RGB colour, stripes/dots/checks at any period and angle,
gradients and smooth noise, on the world's five shapes and on shapes the world never shows.

Both the world (:mod:`nullbooth.world.scenes`), the random subjects (:mod:`nullbooth.world.subjects`) and the
broad image distribution the general VAE learns from (:mod:`nullbooth.world.broad`) draw with these functions, so
a texture looks the same wherever it appears. Coordinates are pixels of the canvas being drawn on; ``u`` runs
along the texture's angle, ``v`` across it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from nullbooth.errors import NullBoothError

RGB = tuple[int, int, int]

# "solid" has neither period nor angle; "gradient" has an angle but no period (it ramps once across the shape);
# "noise" has a period (the blob size) but no angle.
PATTERN_KINDS: tuple[str, ...] = ("solid", "stripes", "dots", "checks", "gradient", "noise")
PERIODIC_KINDS: tuple[str, ...] = ("stripes", "dots", "checks", "noise")
ORIENTED_KINDS: dict[str, float] = {"stripes": 180.0, "dots": 90.0, "checks": 90.0, "gradient": 360.0}
"""Kind → the angle period (degrees) under which the texture repeats; kinds without an angle are absent."""

WORLD_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
NEW_SHAPES: tuple[str, ...] = ("hexagon", "heart", "ring", "crescent", "arrow", "diamond")
ALL_SHAPES: tuple[str, ...] = WORLD_SHAPES + NEW_SHAPES


@dataclass(frozen=True)
class Texture:
    """A fill: ``kind`` in :data:`PATTERN_KINDS`, ``base`` and ``accent`` sRGB, ``period`` in pixels of the
    canvas, ``angle`` in degrees, ``seed`` for the noise field."""

    kind: str = "solid"
    base: RGB = (128, 128, 128)
    accent: RGB = (128, 128, 128)
    period: float = 8.0
    angle: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PATTERN_KINDS:
            raise NullBoothError(f"unknown pattern {self.kind!r}; expected one of {', '.join(PATTERN_KINDS)}")
        if self.kind in PERIODIC_KINDS and not self.period > 0:
            raise NullBoothError(f"a {self.kind} texture needs a period > 0 pixels, got {self.period}")


def _mix(base: RGB, accent: RGB, t: np.ndarray) -> np.ndarray:
    """``(1 − t) base + t accent`` per pixel, uint8 ``[h, w, 3]``."""
    b, a = np.asarray(base, np.float64), np.asarray(accent, np.float64)
    return np.clip(np.rint(b + (a - b) * t[..., None]), 0, 255).astype(np.uint8)


def _pick(base: RGB, accent: RGB, mask: np.ndarray) -> np.ndarray:
    """``accent`` where ``mask``, else ``base``, uint8 ``[h, w, 3]``: :func:`_mix` of a 0/1 ``t``, exactly, at a
    fraction of its cost (the VAE's data are rendered on every training step)."""
    return np.asarray((base, accent), np.uint8)[mask.astype(np.intp)]


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``yy, xx`` (float64, ``[side, side]``), cached per side: read-only, shared by every call."""
    if side not in _GRIDS:
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
        yy.flags.writeable = xx.flags.writeable = False
        _GRIDS[side] = (yy, xx)
    return _GRIDS[side]


def _noise_field(side: int, period: float, seed: int, center: tuple[float, float]) -> np.ndarray:
    """Smooth value noise in [0, 1] attached to ``center`` (the same blobs wherever the object is drawn): a random
    lattice with spacing ``period`` upsampled bicubically, cut out around ``center``."""
    cells = max(2, int(math.ceil(2 * side / period)) + 2)
    grid = np.random.default_rng([int(seed), 7]).random((cells, cells)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((int(cells * period), int(cells * period)), Image.Resampling.BICUBIC)
    x0, y0 = side - int(round(center[0])), side - int(round(center[1]))
    return np.asarray(up, np.float64)[y0:y0 + side, x0:x0 + side]


def render_texture(texture: Texture, side: int, center: tuple[float, float] | None = None,
                   radius: float | None = None, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The texture over a ``side × side`` canvas, uint8 ``[side, side, 3]``, or only over its part ``box``
    (``(left, upper, right, lower)``, PIL's convention, e.g. a shape mask's ``getbbox()``): the same pixels as that
    part of the whole canvas, ``[lower − upper, right − left, 3]``.

    Stripes, dots and checks are phase-locked to the canvas origin (the world's renders depend on it); noise is
    attached to ``center``; a gradient ramps from ``base`` to ``accent`` across ``center ± radius`` along ``angle``.
    Without ``center``/``radius`` the canvas centre and half-side stand in.
    """
    t = texture
    left, upper, right, lower = box or (0, 0, side, side)
    part = (slice(upper, lower), slice(left, right))
    if t.kind == "solid":
        out = np.empty((lower - upper, right - left, 3), np.uint8)
        out[:] = t.base
        return out
    if t.kind == "noise":
        field = _noise_field(side, t.period, t.seed, center or (side / 2, side / 2))[part]
        return _pick(t.base, t.accent, field > 0.5)
    yy, xx = (g[part] for g in _grid(side))
    a = math.radians(t.angle)
    u = xx * math.cos(a) + yy * math.sin(a)
    if t.kind == "gradient":
        cx, cy = center if center is not None else (side / 2, side / 2)
        r = radius if radius is not None else side / 2
        u0 = cx * math.cos(a) + cy * math.sin(a)
        return _mix(t.base, t.accent, np.clip((u - u0 + r) / (2 * r), 0.0, 1.0))
    if t.kind == "stripes":
        return _pick(t.base, t.accent, (np.floor(u / (t.period / 2)) % 2) == 1)
    v = -xx * math.sin(a) + yy * math.cos(a)
    if t.kind == "dots":
        du, dv = (u % t.period) - t.period / 2, (v % t.period) - t.period / 2
        return _pick(t.base, t.accent, du**2 + dv**2 <= (t.period * 0.28) ** 2)
    return _pick(t.base, t.accent, ((np.floor(u / (t.period / 2)) + np.floor(v / (t.period / 2))) % 2) == 1)  # checks


def paste_texture(canvas: Image.Image, texture: Texture, mask: Image.Image,
                  center: tuple[float, float] | None = None, radius: float | None = None) -> None:
    """Paint ``texture`` onto the square ``canvas`` where the mode-"L" ``mask`` (same size) is set; ``center`` and
    ``radius`` as in :func:`render_texture`. The texture is rendered only over the mask's bounding box: most of the
    canvas never shows it, and the VAE's training images are drawn on every step."""
    box = mask.getbbox()
    if box is not None:
        fill = render_texture(texture, canvas.width, center=center, radius=radius, box=box)
        canvas.paste(Image.fromarray(fill), box[:2], mask.crop(box))


# ------------------------------------------------------------------------------------------------ shapes


def _ring(cx: float, cy: float, rotation: float, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _regular(n: int, r: float, phase: float) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def shape_outline(shape: str, r: float) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` with circumradius ``r`` around the origin, unrotated; None for the round shapes
    (circle, ring, crescent), which :func:`draw_shape` draws with ellipses. Areas are roughly equalised."""
    if shape == "square":
        h = r * 0.82
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return _regular(3, r * 1.15, -math.pi / 2)
    if shape == "star":
        rr = r * 1.15
        return [((rr if k % 2 == 0 else rr * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (rr if k % 2 == 0 else rr * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, w = r * 0.95, r * 0.34
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a),
                (-w, w), (-a, w), (-a, -w), (-w, -w)]
    if shape == "hexagon":
        return _regular(6, r * 0.95, 0.0)
    if shape == "diamond":
        return [(0.0, -r * 1.1), (r * 0.7, 0.0), (0.0, r * 1.1), (-r * 0.7, 0.0)]
    if shape == "arrow":
        w, h = r * 0.3, r * 1.05
        return [(-h, -w), (0.1 * r, -w), (0.1 * r, -r * 0.75), (h, 0.0), (0.1 * r, r * 0.75), (0.1 * r, w), (-h, w)]
    if shape == "heart":
        # The classic parametric heart (x = 16 sin³θ, y = 13 cos θ − 5 cos 2θ − 2 cos 3θ − cos 4θ), scaled to r.
        k = r / 15.0
        return [(k * 16 * math.sin(th) ** 3,
                 -k * (13 * math.cos(th) - 5 * math.cos(2 * th) - 2 * math.cos(3 * th) - math.cos(4 * th)) + 0.1 * r)
                for th in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    if shape in ("circle", "ring", "crescent"):
        return None
    raise NullBoothError(f"unknown shape {shape!r}; known shapes: {', '.join(ALL_SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rotation: float = 0.0,
               fill: int = 255, outline_width: int = 0) -> None:
    """Draw ``shape`` into a mode-"L" mask: filled with ``fill``, or only its outline when ``outline_width`` > 0."""
    poly = shape_outline(shape, r)
    if poly is not None:
        pts = _ring(cx, cy, rotation, poly)
        if outline_width:
            draw.line([*pts, pts[0]], fill=fill, width=outline_width, joint="curve")
        else:
            draw.polygon(pts, fill=fill)
        return
    if outline_width:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=outline_width)
        return
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    if shape == "ring":
        ri = r * 0.5
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "crescent":
        ox, oy = _ring(0.0, 0.0, rotation, [(r * 0.45, -r * 0.25)])[0]
        ri = r * 0.8
        draw.ellipse([cx + ox - ri, cy + oy - ri, cx + ox + ri, cy + oy + ri], fill=0)


def shape_mask(shape: str, side: int, cx: float, cy: float, r: float, rotation: float = 0.0,
               outline_width: int = 0) -> Image.Image:
    """A ``side × side`` mode-"L" mask of one shape (255 inside)."""
    mask = Image.new("L", (side, side), 0)
    draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, rotation, 255, outline_width)
    return mask
