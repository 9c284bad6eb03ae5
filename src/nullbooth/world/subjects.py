"""Personalisation subjects: one particular object — a shape in an exact colour and pattern — shown in a few views.

:data:`SUBJECT` is the project's long-standing example, a star with diagonal teal and pink stripes.
:func:`random_subject` draws a subject from the whole space (any of :data:`~nullbooth.world.textures.ALL_SHAPES`,
any sRGB main colour that stands out on every background, any pattern kind with any period, angle and pattern
colour) as a pure function of ``(seed, index)``; :func:`subject_suite` is the benchmark's public suite and
:data:`HELDOUT_SEED` the seed of the family nothing is ever tuned on (the VAE gate and the hidden evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from nullbooth.errors import NullBoothError
from nullbooth.world.scenes import (
    BACKGROUNDS,
    POSITIONS,
    SIZES,
    World,
    heldout_prompts,
    position_phrase,
    prior_prompts,
)
from nullbooth.world.textures import (
    ALL_SHAPES,
    ORIENTED_KINDS,
    PATTERN_KINDS,
    PERIODIC_KINDS,
    RGB,
    WORLD_SHAPES,
    Texture,
    paste_texture,
    shape_mask,
)

SUITE_SEED = 20_251_123
HELDOUT_SEED = 77_000_001
# Views of the instance images, (position, size, background, rotation°): varied context, the same object.
VIEWS: tuple[tuple[str, str, str, float], ...] = (
    ("center", "large", "white", 0.0),
    ("left", "large", "gray", -8.0),
    ("right", "small", "white", 6.0),
    ("top", "large", "black", 3.0),
    ("bottom", "small", "gray", -4.0),
)
# A main colour must stay this far (sRGB Euclidean, 0–255) from every background so that no view hides the shape,
# and a pattern colour this far from the main colour so that the pattern is visible at all.
MIN_BACKGROUND_DISTANCE = 70.0
MIN_PATTERN_CONTRAST = 110.0
PERIOD_RANGE = (0.14, 0.26)  # pattern period as a fraction of the image side: ≥ 9 pixels at 64, 2 latent pixels


@dataclass(frozen=True)
class Subject:
    """One object: ``shape`` filled with ``colour`` and, unless ``pattern`` is solid, ``pattern`` in
    ``pattern_colour`` with ``pattern_period`` (fraction of the image side) and ``pattern_angle`` (degrees, fixed
    to the image, not to the shape's rotation). Prompts call it ``"{identifier} {class_name}"``."""

    shape: str = "star"
    colour: RGB = (0, 160, 160)
    pattern: str = "stripes"
    pattern_colour: RGB | None = (250, 110, 185)
    pattern_period: float = 0.16
    pattern_angle: float = 45.0
    name: str = "striped-star"
    identifier: str = "sks"
    views: tuple[tuple[str, str, str, float], ...] = field(default=VIEWS)

    def __post_init__(self) -> None:
        if self.shape not in ALL_SHAPES:
            raise NullBoothError(f"subject shape {self.shape!r} is not drawable; expected one of {', '.join(ALL_SHAPES)}")
        Texture(self.pattern, self.colour, self.pattern_colour or self.colour, self.pattern_period * 64)

    @property
    def class_name(self) -> str:
        return self.shape

    @property
    def concept_token(self) -> str:
        """The identifier as a token of its own (``"<sks>"``): what Perfusion adds to the vocabulary."""
        return f"<{self.identifier}>"

    @property
    def description(self) -> str:
        fill = _hex(self.colour)
        if self.pattern == "solid":
            return f"a solid {fill} {self.shape}"
        details = [f"period {self.pattern_period:.2f}"] if self.pattern in PERIODIC_KINDS else []
        details += [f"{self.pattern_angle:.0f}°"] if self.pattern in ORIENTED_KINDS else []
        return f"a {fill} {self.shape} with {_hex(self.pattern_colour)} {self.pattern} ({', '.join(details)})"

    def texture(self, side: int) -> Texture:
        """The fill at ``side`` pixels (the noise field is seeded by the subject's name: same blobs in every view)."""
        return Texture(self.pattern, self.colour, self.pattern_colour or self.colour, self.pattern_period * side,
                       self.pattern_angle, seed=sum(map(ord, self.name)))

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": self.shape, "colour": list(self.colour), "pattern": self.pattern,
                "pattern_colour": list(self.pattern_colour) if self.pattern_colour else None,
                "pattern_period": self.pattern_period, "pattern_angle": self.pattern_angle,
                "description": self.description}


def _hex(rgb: RGB | None) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb) if rgb else "none"


SUBJECT = Subject()


def _distance(a: RGB, b: RGB) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def distinct_colour(rng: np.random.Generator, away_from: list[RGB], margin: float) -> RGB:
    """A uniform sRGB colour at least ``margin`` from each of ``away_from`` (rejection sampling)."""
    while True:
        c = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if all(_distance(c, o) >= margin for o in away_from):
            return c  # type: ignore[return-value]


def random_subject(seed: int, index: int, shape: str | None = None, pattern: str | None = None) -> Subject:
    """Subject ``index`` of family ``seed``: a pure function of its arguments. ``shape``/``pattern`` pin those."""
    rng = np.random.default_rng([int(seed), int(index)])
    shape = shape or str(rng.choice(ALL_SHAPES))
    pattern = pattern or str(rng.choice(PATTERN_KINDS))
    colour = distinct_colour(rng, list(BACKGROUNDS.values()), MIN_BACKGROUND_DISTANCE)
    accent = distinct_colour(rng, [colour], MIN_PATTERN_CONTRAST) if pattern != "solid" else None
    period = float(rng.uniform(*PERIOD_RANGE))
    angle = float(rng.uniform(0.0, 180.0))
    return Subject(shape=shape, colour=colour, pattern=pattern, pattern_colour=accent, pattern_period=round(period, 3),
                   pattern_angle=round(angle, 1), name=f"s{seed}-{index}")


def subject_suite(n: int = 8, seed: int = SUITE_SEED, with_star: bool = True) -> list[Subject]:
    """``n`` random subjects (plus :data:`SUBJECT` first): pattern kinds cycle and world/new shapes alternate so
    that every kind and both shape families appear; colours, periods and angles are free draws."""
    if n < 0:
        raise NullBoothError(f"a subject suite needs n ≥ 0 random subjects, got {n}")
    new_shapes = [s for s in ALL_SHAPES if s not in WORLD_SHAPES]
    out = [SUBJECT] if with_star else []
    for i in range(n):
        rng = np.random.default_rng([int(seed), int(i), 1])
        family = WORLD_SHAPES if i % 2 == 0 else new_shapes
        out.append(random_subject(seed, i, shape=str(rng.choice(family)),
                                  pattern=PATTERN_KINDS[(i + 1) % len(PATTERN_KINDS)]))
    return out


# --------------------------------------------------------------------------------------------------- pixels


def draw_subject(subject: Subject, side: int, cx: float, cy: float, r: float, background: str,
                 rotation: float) -> Image.Image:
    """``subject`` centred at ``(cx, cy)`` with circumradius ``r`` on a ``side × side`` canvas (all in pixels)."""
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[background])
    paste_texture(canvas, subject.texture(side), shape_mask(subject.shape, side, cx, cy, r, rotation), (cx, cy), r)
    return canvas


def render_subject(subject: Subject, view: int, resolution: int = 64, supersample: int = 4) -> Image.Image:
    """View ``view`` of ``subject`` (cycling through ``subject.views``), anti-aliased by supersampling."""
    position, size, background, rotation = subject.views[view % len(subject.views)]
    side = resolution * supersample
    fx, fy = POSITIONS[position]
    canvas = draw_subject(subject, side, fx * side, fy * side, SIZES[size] * side, background, rotation)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def subject_instances(n: int = 5, subject: Subject = SUBJECT, resolution: int = 64) -> list[Image.Image]:
    """``n`` instance images of the subject (varied position/size/background), as DreamBooth's few shots."""
    if n < 1:
        raise NullBoothError(f"need at least 1 subject instance image, asked for {n}")
    return [render_subject(subject, i, resolution) for i in range(n)]


# ---------------------------------------------------------------------------------------------------- words


def instance_prompt(subject: Subject = SUBJECT) -> str:
    return f"a {subject.identifier} {subject.class_name}"


def with_concept_token(prompt: str, subject: Subject = SUBJECT) -> str:
    """``prompt`` with the subject's identifier written as its :attr:`Subject.concept_token`."""
    return prompt.replace(f"{subject.identifier} ", f"{subject.concept_token} ")


def subject_prompts(subject: Subject = SUBJECT) -> list[str]:
    """Prompts that place the subject (``"a sks star on the left"``) — for fidelity and in-context evaluation."""
    ident = f"{subject.identifier} {subject.class_name}"
    return [f"a {ident}", *(f"a {ident} {position_phrase(p)}" for p in POSITIONS),
            *(f"a {ident}, {bg} background" for bg in BACKGROUNDS)]


def class_prompts(class_name: str = "star", n: int = 100, seed: int = 0, world: World | None = None) -> list[str]:
    """Prompts naming the subject's class in world wording (for prior preservation and drift checks).

    A world shape is pinned in the world's own captions; a shape the world never shows replaces the shape word
    of world captions, so both read alike.
    """
    w = world or World()
    out = [f"a {class_name}"]
    for i in range(max(n - 1, 0)):
        if class_name in WORLD_SHAPES:
            out.append(w.prompt(seed, i, "train", shape=class_name)[0])
        else:
            text, attrs = w.prompt(seed, i, "train")
            out.append(text.replace(attrs.shape, class_name))
    return out[:n]


def write_prompt_lists(folder: str | Path, n_prior: int = 1000, n_eval: int = 100, seed: int = 0,
                       subject: Subject = SUBJECT) -> list[Path]:
    """Write the world's prompt lists as text files (one prompt a line) into ``folder``.

    ``prior_prompts.txt`` (collection of prior knowledge), ``eval_prompts.txt`` (disjoint seeds, for
    preservation metrics), ``heldout_prompts.txt`` (held-out compositions), ``class_prompts.txt``
    (the subject's class, for prior preservation) and ``subject_prompts.txt`` (with the identifier).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lists = {
        "prior_prompts.txt": prior_prompts(n_prior, seed),
        "eval_prompts.txt": prior_prompts(n_eval, seed + 1_000_003),
        "heldout_prompts.txt": [p for p, _ in heldout_prompts(n_eval, seed)],
        "class_prompts.txt": class_prompts(subject.class_name, n_eval, seed),
        "subject_prompts.txt": subject_prompts(subject),
    }
    written = []
    for name, prompts in lists.items():
        path = folder / name
        path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        written.append(path)
    return written
