"""Subject fidelity with the open-palette judge: is the generated object *this* subject, and is it where asked?

A sample matches the subject when its judged shape, main colour, pattern kind and (unless the subject is solid)
pattern colour all match the subject's reference (``subject_match``); colours match within
:data:`COLOUR_TOLERANCE` (sRGB Euclidean, 0–255). For kinds whose two colours are interchangeable
(:data:`~nullbooth.world.judge.SYMMETRIC_KINDS`: stripes, checks, noise, gradient) the pair is compared unordered.

The reference is the ground truth when a :class:`~nullbooth.world.subjects.Subject` is known (benchmarks), else the
judge's consensus over the instance images (``nullbooth evaluate``: users give images only): majority shape and
kind, per-channel median colours (pairs aligned to the first instance first).

``identity_similarity`` is the soft version (:func:`nullbooth.eval.metrics.identity_similarity`): it moves with
partial progress (right shape, colour drifting in) where the all-or-nothing match does not.
``context_*``: for prompts that state a position or a background (``"a sks star on the left"``), the share of their
samples drawn there — and ``context_subject_match``, drawn there *and* matching the subject.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from nullbooth.errors import NullBoothError
from nullbooth.eval.metrics import identity_similarity
from nullbooth.world.judge import SYMMETRIC_KINDS, Judge, Reading, colour_pair_errors
from nullbooth.world.scenes import parse_prompt
from nullbooth.world.subjects import Subject

# sRGB distance (0–255) within which two colours count as the same. Measured on the shipped judge (judge.json
# "heldout"): median errors on held-out subjects 6.2 / 7.9 (main / pattern, clean), 7.7 / 10.6 degraded; the 95th
# percentiles (≈ 110–120) are wrong-region readings no tolerance rescues,
# while two independent uniform random colours fall within 40 of each other with probability 1.3 % (and
# within 40 of one fixed colour at most (4/3·π·40³)/256³ = 1.6 %): see tests/test_fidelity.py.
COLOUR_TOLERANCE = 40.0
CONTEXT_ATTRIBUTES = ("position", "background")


@dataclass(frozen=True)
class SubjectReference:
    """What a matching sample shows: ``shape``, ``pattern`` kind, sRGB ``colour`` and ``pattern_colour`` (None
    when solid); ``source`` says where it came from (``"subject"`` or ``"instances"``)."""

    shape: str
    pattern: str
    colour: tuple[float, float, float]
    pattern_colour: tuple[float, float, float] | None
    source: str

    def as_dict(self) -> dict[str, Any]:
        hex_ = lambda c: None if c is None else "#" + "".join(f"{int(round(v)):02x}" for v in c)  # noqa: E731
        return {"shape": self.shape, "pattern": self.pattern, "colour": hex_(self.colour),
                "pattern_colour": hex_(self.pattern_colour), "source": self.source}


def reference_from_subject(subject: Subject) -> SubjectReference:
    """The ground truth of a known subject."""
    pattern = None if subject.pattern == "solid" else tuple(float(v) for v in subject.pattern_colour)
    return SubjectReference(subject.shape, subject.pattern, tuple(float(v) for v in subject.colour), pattern,
                            "subject")


def reference_from_instances(judge: Judge, images: Sequence[Image.Image]) -> SubjectReference:
    """The judge's consensus over instance images: majority shape and kind, per-channel median colours."""
    if len(images) == 0:
        raise NullBoothError("subject fidelity needs at least one instance image to read the subject from, got none")
    r = judge.read(list(images))
    shape = Counter(r.labels["shape"]).most_common(1)[0][0]
    kind = Counter(r.labels["pattern_kind"]).most_common(1)[0][0]
    colour, pattern = r.colour.copy(), r.pattern_colour.copy()
    if kind in SYMMETRIC_KINDS:  # the judge's order of an unordered pair may flip between views: align to view 0
        _, _, swap = colour_pair_errors(colour, pattern, colour[0], pattern[0], True)
        colour[swap], pattern[swap] = r.pattern_colour[swap], r.colour[swap]
    median = lambda a: tuple(float(v) for v in np.median(a, axis=0))  # noqa: E731
    return SubjectReference(shape, kind, median(colour), None if kind == "solid" else median(pattern), "instances")


def _context(reading: Reading, prompts: Sequence[str], subject_ok: np.ndarray) -> dict[str, float | None]:
    """Shares of samples drawn where their prompt asks (position, background, both) — None when no prompt asks."""
    stated = [{k: v for k, v in parse_prompt(p).items() if k in CONTEXT_ATTRIBUTES} for p in prompts]
    out: dict[str, float | None] = {}
    for name in CONTEXT_ATTRIBUTES:
        hits = [reading.labels[name][i] == s[name] for i, s in enumerate(stated) if name in s]
        out[f"context_{name}"] = float(np.mean(hits)) if hits else None
    asked = [i for i, s in enumerate(stated) if s]
    placed = np.array([all(reading.labels[k][i] == v for k, v in stated[i].items()) for i in asked], bool)
    out["context_match"] = float(placed.mean()) if asked else None
    out["context_subject_match"] = float((placed & subject_ok[asked]).mean()) if asked else None
    out["context_samples"] = len(asked)
    return out


def subject_fidelity_scores(judge: Judge, images: Sequence[Image.Image], prompts: Sequence[str],
                            reference: SubjectReference, tolerance: float = COLOUR_TOLERANCE) -> dict[str, Any]:
    """Subject match, per-attribute match rates, identity similarity and subject-in-context of ``images``
    (image ``i`` drawn for ``prompts[i]``) against ``reference``; colours within ``tolerance`` (sRGB, 0–255)."""
    if len(images) != len(prompts):
        raise NullBoothError(f"subject fidelity: expected one prompt per image, got {len(images)} images and "
                             f"{len(prompts)} prompts")
    r = judge.read(list(images))
    solid = reference.pattern == "solid"
    ref_pattern = reference.colour if solid else reference.pattern_colour
    colour_err, pattern_err, _ = colour_pair_errors(r.colour, r.pattern_colour, reference.colour, ref_pattern,
                                                    reference.pattern in SYMMETRIC_KINDS)
    shape_ok = np.array([s == reference.shape for s in r.labels["shape"]])
    kind_ok = np.array([k == reference.pattern for k in r.labels["pattern_kind"]])
    colour_ok = colour_err <= tolerance
    pattern_colour_ok = np.ones(len(r), bool) if solid else pattern_err <= tolerance
    subject_ok = shape_ok & kind_ok & colour_ok & pattern_colour_ok
    p_shape = r.proba["shape"][:, judge.config.attributes["shape"].index(reference.shape)]
    p_kind = r.proba["pattern_kind"][:, judge.config.attributes["pattern_kind"].index(reference.pattern)]
    out: dict[str, Any] = {
        "subject_match": float(subject_ok.mean()),
        "identity_similarity": identity_similarity(p_shape, p_kind, colour_err, None if solid else pattern_err,
                                                   tolerance),
        "shape_match": float(shape_ok.mean()),
        "colour_match": float(colour_ok.mean()),
        "pattern_match": float(kind_ok.mean()),
        "pattern_colour_match": None if solid else float(pattern_colour_ok.mean()),
        "colour_error_median": float(np.median(colour_err)),
    }
    out.update(_context(r, prompts, subject_ok))
    return out
