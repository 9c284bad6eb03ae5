"""Perfusion concept files at generation: find them, check them against their training run, attach them.

``nullbooth generate`` and ``nullbooth evaluate`` load every concept file of a training output together
(several subjects, or ``perfusion.concepts``: multi-concept generation, Appendix B of Tewel et al. 2023) with
the covariance ``C`` the concepts were trained with, rebuilt from the source ``perfusion_config.json`` records.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from nullbooth.config import PerfusionBlock
from nullbooth.errors import NullBoothError
from nullbooth.filenames import CONCEPT_FILE, PERFUSION_CONFIG
from nullbooth.io import read_json
from nullbooth.methods.perfusion.covariance import resolve_covariance
from nullbooth.methods.perfusion.editor import PerfusionEditor, read_concepts
from nullbooth.methods.perfusion.files import CONCEPT_FORMAT

__all__ = [
    "PERFUSION_CONFIG_FORMAT", "find_concept_files", "is_concept_file", "load_perfusion_personalization",
    "perfusion_generation",
]

PERFUSION_CONFIG_FORMAT = "nullbooth-perfusion"


def is_concept_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`nullbooth.methods.perfusion.files.save_concept`."""
    from safetensors import safe_open

    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == CONCEPT_FORMAT
    except Exception:  # a corrupt or foreign file is simply not a concept file here
        return False


def find_concept_files(path: str | Path) -> list[Path]:
    """The concept files at ``path``: the file itself, or every concept file directly in the folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path] if is_concept_file(path) else []
    if path.is_dir():
        return [p for p in sorted(path.glob("*.safetensors")) if is_concept_file(p)]
    return []


def _training_record(concept: Path) -> dict[str, Any] | None:
    """The ``perfusion_config.json`` of the training run that wrote ``concept``, when it sits beside it
    (a several-subject run lists all its files under ``concept_files``)."""
    config = concept.parent / PERFUSION_CONFIG
    if not config.is_file():
        return None
    data = read_json(config, "a Perfusion training config")
    written = data.get("concept_files") or [data.get("concept_file")]
    if data.get("format") != PERFUSION_CONFIG_FORMAT or concept.name not in written:
        return None
    return data


def perfusion_generation(pipe, concept_paths: Sequence[str | Path], beta: float | None = None,
                         tau: float | None = None, *, covariance_file: str | Path | None = None,
                         covariance_prompts: str | Path | None = None,
                         eigenvalue_floor: float | Literal["auto", "training"] | None = "training",
                         use_cholesky: bool = False) -> PerfusionEditor:
    """Attach one or more trained concepts to ``pipe`` for sampling; returns the editor (``detach()`` undoes it).

    Several files → multi-concept generation (Appendix B; ``use_cholesky`` for the exact projection).
    ``beta``/``tau`` override the inference gate of every concept for every later ``pipe(...)`` call
    (lower β / higher τ: more of the concept, less prompt alignment); ``None`` keeps the files' values.
    Use ``with editor.context(beta=…, tau=…):`` for a scoped override instead.

    ``C⁻¹`` must be the one the concepts were trained with: ``C`` from an explicit ``covariance_file`` /
    ``covariance_prompts``, else the source recorded in the ``perfusion_config.json`` beside the first
    concept file, else :func:`~nullbooth.methods.perfusion.covariance.default_covariance` -- checked against the recorded
    SHA-256 (a warning when it differs); ``eigenvalue_floor="training"`` reuses the run's floor ("auto"
    without a record).
    """
    paths = [Path(p) for p in concept_paths]
    if not paths:
        raise NullBoothError("expected at least one Perfusion concept file, got none")
    for p in paths:
        if not is_concept_file(p):
            raise NullBoothError(f"perfusion concept: {p} is not a Perfusion concept file (a safetensors file "
                                 f"written by `nullbooth train` with method: perfusion, e.g. {CONCEPT_FILE})")
    if tau is not None and tau <= 0:
        raise NullBoothError(f"expected a gate temperature tau > 0, got {tau}")
    read_concepts(pipe, paths)  # a concept for the other family (SD / SDXL) is refused before C is computed
    runs = [r for r in (_training_record(p) for p in paths) if r is not None]
    known = [r["covariance"] for r in runs if r.get("covariance")]
    if len({r.get("sha256") for r in known}) > 1:
        warnings.warn("the concept files were trained with different covariances C; using the first one's "
                      "(the others' outputs will differ from training)", stacklevel=2)
    block = PerfusionBlock(covariance_file=str(covariance_file) if covariance_file else None,
                           covariance_prompts=str(covariance_prompts) if covariance_prompts else None)
    record = known[0] if known else None
    if block.covariance_file is None and block.covariance_prompts is None and record is not None:
        if record.get("kind") in ("file", "prompts"):
            if not Path(record["path"]).exists():
                raise NullBoothError(
                    f"the concept was trained with the covariance from {record['path']}, which no longer exists; "
                    "pass the same file as perfusion.covariance_file (or covariance_prompts)")
            block = PerfusionBlock(**{f"covariance_{record['kind']}": record["path"]})
    C, source = resolve_covariance(pipe, block)
    if record is not None and record.get("sha256") not in (None, source["sha256"]):
        warnings.warn(f"the covariance C ({source['kind']}) differs from the one the concept was trained with "
                      f"({record.get('kind')}); the concept will not behave as in training -- pass the training "
                      "covariance as perfusion.covariance_file", stacklevel=2)
    if eigenvalue_floor == "training":
        eigenvalue_floor = runs[0].get("eigenvalue_floor", "auto") if runs else "auto"
    editor = PerfusionEditor.load(pipe, *paths, C=C, use_cholesky=use_cholesky, eigenvalue_floor=eigenvalue_floor)
    editor.ctx.beta, editor.ctx.tau = beta, tau  # read by every Rank1EditModule's gate (eq. 3)
    return editor


def load_perfusion_personalization(pipe, path: str | Path,
                                   block: PerfusionBlock | None = None) -> PerfusionEditor | None:
    """``nullbooth generate``: the concept files at ``path`` plus ``block.concepts``, attached; ``None`` if none."""
    block = block or PerfusionBlock()
    files = find_concept_files(path)
    for extra in block.concepts:
        if not Path(extra).is_file():
            raise NullBoothError(f"perfusion.concepts: expected a concept file at {extra}, found nothing")
        files.append(Path(extra))
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    if not unique:
        return None
    # the training run's floor unless this config sets one (C⁻¹ must be the training's)
    floor = block.eigenvalue_floor if "eigenvalue_floor" in block.model_fields_set else "training"
    return perfusion_generation(pipe, list(unique.values()), block.eval_beta, block.eval_tau,
                                covariance_file=block.covariance_file, covariance_prompts=block.covariance_prompts,
                                eigenvalue_floor=floor, use_cholesky=block.use_cholesky)
