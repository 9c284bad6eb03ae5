"""A small, fully deterministic text-to-image world: one flat shape per image, with captions.

Everything is derived from a seed: the attributes of sample ``i`` of a dataset come from
``np.random.default_rng([seed, i])``, so any sample can be rebuilt alone, in any order, on any worker.
Each sample carries its ground truth (:class:`Attributes`), which the judge is trained on and which
the tests check against the pixels.

The world is small enough for a Stable-Diffusion-architecture model to learn on two CPU cores and
rich enough to forget things in: shape × colour × position × size × background, worded in varied
templates. Some shape × colour pairs (:data:`HELD_OUT_PAIRS`) never occur in the ``"train"`` split,
so a model trained on it can be tested on compositions it never saw captioned together.

Personalisation subjects live in :mod:`nullbooth.world.subjects`; shapes and textures are drawn by
:mod:`nullbooth.world.textures`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Literal, Sequence

import numpy as np
from PIL import Image

from nullbooth.errors import NullBoothError
from nullbooth.world.textures import WORLD_SHAPES, Texture, paste_texture, shape_mask

Split = Literal["train", "heldout", "all"]

SHAPES: tuple[str, ...] = WORLD_SHAPES
# sRGB values chosen far apart so a blurry generation is still unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 210, 30),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
}
# Extra colours used only for pattern stripes/dots and the subject: never the main colour of a world shape.
ACCENT_COLOURS: dict[str, tuple[int, int, int]] = {
    "teal": (0, 160, 160),
    "pink": (250, 110, 185),
    "brown": (130, 80, 40),
    "white": (250, 250, 250),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
POSITIONS: dict[str, tuple[float, float]] = {
    # (x, y) of the shape's centre as a fraction of the image side; y grows downwards.
    "left": (0.31, 0.5),
    "right": (0.69, 0.5),
    "top": (0.5, 0.31),
    "bottom": (0.5, 0.69),
    "center": (0.5, 0.5),
}
# Circumradius as a fraction of the image side. A small shape spans ~22 pixels, ~5 latent pixels at VAE factor 4:
# at 0.135 (17 pixels) no 1-hour CPU model drew recognisable shapes (measured: shape at chance, colour 84 %).
SIZES: dict[str, float] = {"small": 0.17, "large": 0.25}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")

# One held-out colour per shape, all different: every shape and every colour still appears in training.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "green"),
    ("square", "purple"),
    ("triangle", "orange"),
    ("star", "blue"),
    ("cross", "red"),
)

ATTRIBUTE_NAMES: tuple[str, ...] = ("shape", "colour", "position", "size", "background", "pattern")

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side", "to the left"),
    "right": ("on the right", "at the right", "on the right side", "to the right"),
    "top": ("at the top", "on the top", "near the top"),
    "bottom": ("at the bottom", "on the bottom", "near the bottom"),
    "center": ("in the center", "in the middle", "at the center"),
}
_POSITION_SHORT = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center"}
_BACKGROUND_WORDS = (", {} background", " on a {} background", " against a {} background")
_PREFIXES = ("", "", "", "a picture of ", "a drawing of ", "an image of ")


@dataclass(frozen=True)
class Attributes:
    """Ground truth of one image: the categorical attributes plus the exact geometry that was drawn.

    ``cx, cy, radius`` are in pixels of the rendered image; ``mentioned`` lists the attributes the
    caption states (the others were drawn at random and the caption is silent about them).
    """

    shape: str
    colour: str
    position: str
    size: str
    background: str
    pattern: str = "solid"
    pattern_colour: str | None = None
    cx: float = 0.0
    cy: float = 0.0
    radius: float = 0.0
    rotation: float = 0.0
    mentioned: tuple[str, ...] = ("shape", "colour")

    def as_dict(self) -> dict:
        return asdict(self)

    def labels(self) -> dict[str, int]:
        """Integer class index of every categorical attribute (the judge's targets)."""
        return {name: ATTRIBUTE_VALUES[name].index(getattr(self, name)) for name in ATTRIBUTE_NAMES}


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    attributes: Attributes


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world. The defaults are the world the shipped ``tiny-sd`` model was trained on."""

    resolution: int = 64
    held_out: tuple[tuple[str, str], ...] = HELD_OUT_PAIRS
    # Probability that a non-subject image is striped/dotted (0 for the base world: the subject's texture is new).
    pattern_prob: float = 0.0
    # Probability that the caption leaves each optional attribute out.
    omit_size: float = 0.4
    omit_position: float = 0.15
    omit_background: float = 0.5
    # Small continuous variation around each attribute combination. Larger jitter (±0.04 side, ±10°, ±8 % radius)
    # spread every combination over many layouts, and no 1-hour CPU model learned to draw the shapes (at chance).
    jitter: float = 0.015  # max centre offset, fraction of the side
    rotation_jitter: float = 4.0  # degrees
    size_jitter: float = 0.04  # radius × U(1 − s, 1 + s)
    supersample: int = 4

    def __post_init__(self) -> None:
        if self.resolution < 16:
            raise NullBoothError(f"world resolution must be ≥ 16 pixels, got {self.resolution}")
        for shape, colour in self.held_out:
            if shape not in SHAPES or colour not in COLOURS:
                raise NullBoothError(
                    f"held-out pair ({shape!r}, {colour!r}) is not a known shape × colour; "
                    f"shapes: {', '.join(SHAPES)}; colours: {', '.join(COLOURS)}"
                )


ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
    "background": tuple(BACKGROUNDS),
    "pattern": PATTERNS,
}


# ---------------------------------------------------------------------------------------------- drawing

# World pattern words → texture kinds of :mod:`nullbooth.world.textures`.
_TEXTURE_KIND = {"solid": "solid", "striped": "stripes", "dotted": "dots"}


def _rgb(name: str) -> tuple[int, int, int]:
    if name in COLOURS:
        return COLOURS[name]
    if name in ACCENT_COLOURS:
        return ACCENT_COLOURS[name]
    raise NullBoothError(f"unknown colour {name!r}; known: {', '.join([*COLOURS, *ACCENT_COLOURS])}")


# ------------------------------------------------------------------------------------------------ world


class World:
    """Deterministic generator of captioned images.

    >>> w = World()
    >>> s = w.sample(seed=0, index=3)      # the same Sample on every call and machine
    >>> s.caption, s.attributes.shape, s.image.size
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        held = set(self.config.held_out)
        self._pairs = {
            "train": [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in held],
            "heldout": [p for p in self.config.held_out],
            "all": [(s, c) for s in SHAPES for c in COLOURS],
        }

    # -- attributes -------------------------------------------------------------------------------------

    def pairs(self, split: Split) -> list[tuple[str, str]]:
        """The shape × colour pairs a split draws from."""
        if split not in self._pairs:
            raise NullBoothError(f"unknown split {split!r}; expected one of train, heldout, all")
        if not self._pairs[split]:
            raise NullBoothError(f"split {split!r} has no shape × colour pairs (held_out is empty?)")
        return self._pairs[split]

    def sample_attributes(self, rng: np.random.Generator, split: Split = "train", **fixed: str) -> Attributes:
        """Draw one attribute set; ``fixed`` pins categorical attributes (e.g. ``shape="star"``).

        Pins must agree with the split: a held-out pair can be pinned under ``"heldout"`` or ``"all"`` only.
        """
        cfg = self.config
        unknown = set(fixed) - set(ATTRIBUTE_NAMES) - {"pattern_colour"}
        if unknown:
            raise NullBoothError(f"cannot pin {sorted(unknown)}; attributes are {', '.join(ATTRIBUTE_NAMES)}")
        for name, value in fixed.items():
            if name in ATTRIBUTE_VALUES and value not in ATTRIBUTE_VALUES[name]:
                raise NullBoothError(
                    f"{name}={value!r} is not a world value; expected one of {', '.join(ATTRIBUTE_VALUES[name])}"
                )
        candidates = [p for p in self.pairs(split) if fixed.get("shape", p[0]) == p[0]
                      and fixed.get("colour", p[1]) == p[1]]
        if not candidates:
            raise NullBoothError(f"split {split!r} holds no pair matching {fixed}; use split='all' or 'heldout'")
        shape, colour = candidates[int(rng.integers(len(candidates)))]
        position = fixed.get("position") or str(rng.choice(list(POSITIONS)))
        size = fixed.get("size") or str(rng.choice(list(SIZES)))
        background = fixed.get("background") or str(rng.choice(list(BACKGROUNDS)))
        if "pattern" in fixed:
            pattern = fixed["pattern"]
        else:
            pattern = "solid" if rng.random() >= cfg.pattern_prob else str(rng.choice(PATTERNS[1:]))
        pattern_colour = fixed.get("pattern_colour")
        if pattern != "solid" and pattern_colour is None:
            # Accents are never palette colours, so the shape's colour stays unambiguous for the judge.
            accents = [c for c in ACCENT_COLOURS if c != background]
            pattern_colour = str(rng.choice(accents))
        res = cfg.resolution
        fx, fy = POSITIONS[position]
        jx, jy = rng.uniform(-cfg.jitter, cfg.jitter, size=2)
        radius = SIZES[size] * res * float(rng.uniform(1 - cfg.size_jitter, 1 + cfg.size_jitter))
        rotation = float(rng.uniform(-cfg.rotation_jitter, cfg.rotation_jitter))
        mentioned = ["shape", "colour"]
        # Draw the omission coins in a fixed order so the caption is a function of the rng alone.
        for name, p in (("size", cfg.omit_size), ("position", cfg.omit_position), ("background", cfg.omit_background)):
            if rng.random() >= p:
                mentioned.append(name)
        if pattern != "solid":
            mentioned.append("pattern")
        return Attributes(
            shape=shape, colour=colour, position=position, size=size, background=background,
            pattern=pattern, pattern_colour=pattern_colour if pattern != "solid" else None,
            cx=float((fx + jx) * res), cy=float((fy + jy) * res), radius=radius, rotation=rotation, mentioned=tuple(mentioned),
        )

    # -- pixels -----------------------------------------------------------------------------------------

    def render(self, attrs: Attributes, *, pattern_period: float | None = None, pattern_angle: float = 45.0,
               resolution: int | None = None) -> Image.Image:
        """Draw ``attrs`` as an RGB image, anti-aliased by supersampling then box-filtering."""
        res = resolution or self.config.resolution
        scale = res / self.config.resolution
        ss = self.config.supersample
        side = res * ss
        k = scale * ss
        canvas = Image.new("RGB", (side, side), BACKGROUNDS[attrs.background])
        period = (pattern_period if pattern_period is not None else 0.09 * self.config.resolution) * k
        accent = _rgb(attrs.pattern_colour) if attrs.pattern_colour else _rgb(attrs.colour)
        texture = Texture(_TEXTURE_KIND[attrs.pattern], _rgb(attrs.colour), accent, period, pattern_angle)
        mask = shape_mask(attrs.shape, side, attrs.cx * k, attrs.cy * k, attrs.radius * k, attrs.rotation)
        paste_texture(canvas, texture, mask)
        return canvas.resize((res, res), Image.Resampling.BOX)

    # -- words ------------------------------------------------------------------------------------------

    def caption(self, attrs: Attributes, rng: np.random.Generator) -> str:
        """A templated caption stating exactly the attributes in ``attrs.mentioned``, in varied wording."""
        m = set(attrs.mentioned)
        adjectives = []
        if "size" in m:
            adjectives.append(str(rng.choice(_SIZE_WORDS[attrs.size])))
        adjectives.append(attrs.colour)
        if "pattern" in m:
            adjectives.append(f"{attrs.pattern_colour} {attrs.pattern}")
        noun = " ".join([*adjectives, attrs.shape])
        article = "an" if noun[0] in "aeiou" else "a"
        style = int(rng.integers(4))
        pos = str(rng.choice(_POSITION_WORDS[attrs.position])) if "position" in m else ""
        bg = str(rng.choice(_BACKGROUND_WORDS)).format(attrs.background) if "background" in m else ""
        prefix = str(rng.choice(_PREFIXES))
        if style == 3 and pos:
            # Telegraphic: "red circle, left, white background"
            bg_short = f", {attrs.background} background" if bg else ""
            return f"{noun}, {_POSITION_SHORT[attrs.position]}{bg_short}"
        if style == 2 and pos:
            # Position first: "on the left, a red circle on a white background"
            return f"{pos}, {prefix}{article} {noun}{bg}"
        # "a picture of a small red circle at the top, white background"
        return f"{prefix}{article} {noun}" + (f" {pos}" if pos else "") + bg

    def random_caption(self, attrs: Attributes, rng: np.random.Generator) -> str:
        """A fresh caption for an already drawn image: re-draws which attributes are stated and the wording.

        Training uses this to see every image under many captions (the image stays ground truth for all).
        """
        cfg = self.config
        mentioned = ["shape", "colour"]
        for name, p in (("size", cfg.omit_size), ("position", cfg.omit_position), ("background", cfg.omit_background)):
            if rng.random() >= p:
                mentioned.append(name)
        if attrs.pattern != "solid":
            mentioned.append("pattern")
        return self.caption(replace(attrs, mentioned=tuple(mentioned)), rng)

    # -- samples ----------------------------------------------------------------------------------------

    def sample(self, seed: int, index: int = 0, split: Split = "train", **fixed: str) -> Sample:
        """Sample ``index`` of the dataset ``seed``: a pure function of its arguments."""
        rng = np.random.default_rng([int(seed), int(index)])
        attrs = self.sample_attributes(rng, split, **fixed)
        text = self.caption(attrs, rng)
        return Sample(self.render(attrs), text, attrs)

    def samples(self, n: int, seed: int, split: Split = "train", start: int = 0, **fixed: str) -> Iterator[Sample]:
        for i in range(start, start + n):
            yield self.sample(seed, i, split, **fixed)

    def arrays(self, n: int, seed: int, split: Split = "train", start: int = 0
               ) -> tuple[np.ndarray, list[str], list[Attributes]]:
        """``n`` samples as a uint8 array ``[n, H, W, 3]`` plus captions and attributes."""
        res = self.config.resolution
        images = np.empty((n, res, res, 3), np.uint8)
        captions, attrs = [], []
        for k, s in enumerate(self.samples(n, seed, split, start)):
            images[k] = np.asarray(s.image)
            captions.append(s.caption)
            attrs.append(s.attributes)
        return images, captions, attrs

    def prompt(self, seed: int, index: int = 0, split: Split = "train", **fixed: str) -> tuple[str, Attributes]:
        """A caption and its attributes without rendering (for prompt lists and evaluation)."""
        rng = np.random.default_rng([int(seed), int(index)])
        attrs = self.sample_attributes(rng, split, **fixed)
        return self.caption(attrs, rng), attrs


# ----------------------------------------------------------------------------------------------- parsing

_WORD_TO_ATTR: dict[str, tuple[str, str]] = {}
for _shape in SHAPES:
    _WORD_TO_ATTR[_shape] = ("shape", _shape)
for _colour in COLOURS:
    _WORD_TO_ATTR[_colour] = ("colour", _colour)
for _size, _words in _SIZE_WORDS.items():
    for _w in _words:
        _WORD_TO_ATTR[_w] = ("size", _size)
for _pos in POSITIONS:
    _WORD_TO_ATTR[_pos] = ("position", _pos)
_WORD_TO_ATTR["middle"] = ("position", "center")
_WORD_TO_ATTR["centre"] = ("position", "center")
for _pattern in PATTERNS[1:]:
    _WORD_TO_ATTR[_pattern] = ("pattern", _pattern)


def parse_prompt(text: str) -> dict[str, str]:
    """The world attributes a prompt states: ``{"shape": "circle", "colour": "red", "position": "left", ...}``.

    A colour word directly before ``background`` is the background; the first colour word elsewhere is the
    shape's colour. Attributes the prompt does not mention are absent from the result.
    """
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, str] = {}
    for k, word in enumerate(words):
        nxt = words[k + 1] if k + 1 < len(words) else ""
        if nxt == "background" and word in BACKGROUNDS:
            found.setdefault("background", word)
            continue
        if word in _WORD_TO_ATTR:
            name, value = _WORD_TO_ATTR[word]
            if name == "colour" and k + 1 < len(words) and words[k + 1] in PATTERNS[1:]:
                continue  # "pink striped": a pattern colour, not the shape's colour
            found.setdefault(name, value)
    return found


# ---------------------------------------------------------------------------------------- prompt lists


def prior_prompts(n: int, seed: int = 0, split: Split = "train", world: World | None = None) -> list[str]:
    """``n`` captions from the world's caption distribution (the base model's "prior knowledge")."""
    w = world or World()
    return [w.prompt(seed, i, split)[0] for i in range(n)]


def heldout_prompts(n: int, seed: int = 0, world: World | None = None) -> list[tuple[str, Attributes]]:
    """``n`` prompts over the held-out shape × colour pairs, cycling through the pairs evenly.

    Shape and colour are always stated; the quality gate checks exactly those two.
    """
    w = world or World()
    pairs = w.pairs("heldout")
    out = []
    for i in range(n):
        shape, colour = pairs[i % len(pairs)]
        out.append(w.prompt(seed, i, "all", shape=shape, colour=colour))
    return out


def position_phrase(position: str) -> str:
    """The plain wording of a position (``"on the left"``)."""
    return _POSITION_WORDS[position][0]


def with_config(world: World, **changes) -> World:
    """A world like ``world`` with some config fields changed."""
    return World(replace(world.config, **changes))


def to_tensor_batch(images: Sequence[Image.Image], resolution: int | None = None) -> np.ndarray:
    """PIL images → float32 ``[n, 3, H, W]`` in [-1, 1] (the VAE's input range); resized if ``resolution``."""
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if resolution is not None and im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
        arrs.append(np.asarray(im, dtype=np.float32))
    x = np.stack(arrs) / 127.5 - 1.0  # [n, H, W, 3]
    return x.transpose(0, 3, 1, 2).copy()
