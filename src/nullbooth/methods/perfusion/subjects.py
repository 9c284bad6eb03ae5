"""Which concepts a Perfusion run trains -- one per subject -- and every reason the config cannot train them.

A single subject comes from the top-level keys (``instance_prompt``, ``perfusion.concept_token``, …) and
keeps those field names in its errors; several subjects (``subjects:``) each bring their own concept token,
superclass and masks, and their errors name the subject (``subjects.1.concept_token: …``). Each subject's
training examples carry its own instance prompt, so each prompt may hold only its own concept token: the
concepts are trained side by side in one editor, each with its own ``o*_V``, embedding, ``i*`` and key lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nullbooth.config import Config
from nullbooth.filenames import CONCEPT_FILE, SUBJECT_CONCEPT_FILE

__all__ = ["ConceptSpec", "concept_file_names", "concept_specs", "perfusion_problems"]

@dataclass(frozen=True)
class ConceptSpec:
    """One subject's concept: its token, superclass and masks, its data, and the config fields that set them."""

    token: str | None
    superclass: str | None
    mask_dir: str | None
    instance_data_dir: str | None
    instance_prompt: str | None
    class_prompt: str | None
    where: str  # "" for the top-level keys, "subjects.<i>." for a subjects entry

    def field(self, name: str) -> str:
        """The config field a problem names: ``perfusion.concept_token`` alone, ``subjects.1.concept_token`` in a list."""
        if self.where:
            return f"{self.where}{name}"
        return f"perfusion.{name}" if name in ("concept_token", "superclass", "mask_dir") else name


def concept_specs(cfg: Config) -> list[ConceptSpec]:
    """The run's concepts in subject order. A ``subjects`` entry without its own superclass takes
    ``perfusion.superclass``; a lone entry may also take ``perfusion.concept_token`` / ``mask_dir``."""
    p = cfg.perfusion
    if not cfg.subjects:
        return [ConceptSpec(p.concept_token, p.superclass, p.mask_dir, cfg.instance_data_dir, cfg.instance_prompt,
                            cfg.class_prompt, "")]
    lone = len(cfg.subjects) == 1
    return [ConceptSpec(s.concept_token or (p.concept_token if lone else None), s.superclass or p.superclass,
                        s.mask_dir or (p.mask_dir if lone else None), s.instance_data_dir, s.instance_prompt,
                        s.class_prompt, f"subjects.{i}.")
            for i, s in enumerate(cfg.subjects)]


def concept_file_names(n: int) -> list[str]:
    """The concept files of a run with ``n`` subjects: ``perfusion_concept.safetensors`` for one, else one each."""
    return [CONCEPT_FILE] if n == 1 else [SUBJECT_CONCEPT_FILE.format(i) for i in range(n)]


def _spec_problems(s: ConceptSpec, prior: bool) -> list[str]:
    token, problems = s.token, []
    if not token:
        problems.append(f"{s.field('concept_token')}: expected the new token the subject binds to (e.g. "
                        "'<my-teddy>'), got nothing")
    if not s.superclass or not s.superclass.strip():
        problems.append(f"{s.field('superclass')}: expected the subject's class word the keys are locked to "
                        "(e.g. 'teddy'), got nothing")
    if token and s.instance_prompt and token not in s.instance_prompt:
        problems.append(f"{s.field('instance_prompt')}: {s.instance_prompt!r} does not contain "
                        f"{s.field('concept_token')} {token!r}; write it where the subject goes, e.g. "
                        f"'a photo of {token}'")
    if token and prior and s.class_prompt and token in s.class_prompt:
        problems.append(f"{s.field('class_prompt')}: {s.class_prompt!r} contains the concept token {token!r}; the "
                        "class prompt must describe the plain class (e.g. 'a photo of a teddy')")
    if s.mask_dir is not None and not Path(s.mask_dir).exists():
        problems.append(f"{s.field('mask_dir')}: {s.mask_dir} does not exist")
    elif s.mask_dir is not None and not Path(s.mask_dir).is_dir():
        problems.append(f"{s.field('mask_dir')}: expected a folder of masks, {s.mask_dir} is a file")
    return problems


def _between_subjects(cfg: Config, specs: list[ConceptSpec]) -> list[str]:
    """Several subjects: one token each, named only in its own prompt; no shared top-level token or masks."""
    problems = []
    for key, what in (("concept_token", "token"), ("mask_dir", "masks")):
        if getattr(cfg.perfusion, key) is not None:
            problems.append(f"perfusion.{key}: with several subjects each subject gives its own {what} "
                            f"(subjects.<i>.{key}); move it into the subjects entries")
    for j, s in enumerate(specs):
        for i, other in enumerate(specs[:j]):
            if s.token and s.token == other.token:
                problems.append(f"{s.field('concept_token')}: {s.token!r} is also subjects.{i}'s token; each subject "
                                "needs its own concept token")
        for i, other in enumerate(specs):
            if i != j and other.token and other.token != s.token and s.instance_prompt and \
                    other.token in s.instance_prompt:
                problems.append(f"{s.field('instance_prompt')}: {s.instance_prompt!r} contains subjects.{i}'s concept "
                                f"token {other.token!r}; each subject's prompt names only its own concept")
    return problems


def perfusion_problems(cfg: Config) -> list[str]:
    """Every reason ``cfg`` cannot train Perfusion, as ``field: what is wrong; how to fix`` lines."""
    p = cfg.perfusion
    specs = concept_specs(cfg)
    problems = [line for s in specs for line in _spec_problems(s, cfg.with_prior_preservation)]
    if len(specs) > 1:
        problems += _between_subjects(cfg, specs)
    masked = [s.field("mask_dir") for s in specs if s.mask_dir is not None]
    if masked and (not cfg.center_crop or cfg.random_flip):
        # a mask is cut like its image's centre crop; a drawn crop or mirror image would not match it
        problems.append(f"{masked[0]}: masks follow the centre crop of their image, so they need center_crop: true "
                        "and random_flip: false; set those or remove the masks")
    for field in ("covariance_file", "covariance_prompts"):
        value = getattr(p, field)
        if value is not None and not Path(value).exists():
            problems.append(f"perfusion.{field}: {value} does not exist")
    if p.covariance_file is not None and p.covariance_prompts is not None:
        problems.append("perfusion.covariance_prompts: give covariance_file or covariance_prompts, not both")
    return problems
