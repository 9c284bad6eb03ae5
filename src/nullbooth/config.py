"""Typed configuration: one YAML file, validated as a whole before any model is loaded.

Top-level keys follow diffusers ``train_dreambooth.py`` flag names; the ``nullbooth:`` block
carries the seed's keys verbatim plus documented additions. Every problem in a file is reported
at once, each with its dotted field name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import NullBoothError

NullspaceMode = Literal["absolute", "relative", "energy", "rank", "percentile"]
FEATURES = ("q", "k", "v", "out")


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CollectFeatures(_Block):
    q_features: bool = True
    k_features: bool = True
    v_features: bool = True
    out_features: bool = True

    def selected(self) -> tuple[str, ...]:
        return tuple(f for f in FEATURES if getattr(self, f"{f}_features"))


def check_threshold(mode: str, value: float) -> str | None:
    """Why ``value`` is out of range for ``mode`` (``None`` when it is fine)."""
    if not math.isfinite(value):
        return f"expected a finite number, got {value}"
    ranges = {
        "absolute": (value >= 0, "an eigenvalue ≥ 0"),
        "relative": (0 <= value <= 1, "a fraction of λ_max in [0, 1]"),
        "energy": (0 <= value <= 1, "an energy fraction in [0, 1]"),
        "rank": (value >= 0 and float(value).is_integer(), "a whole number ≥ 0 (the preserved rank)"),
        "percentile": (0 <= value <= 100, "a percentile in [0, 100]"),
    }
    ok, expected = ranges[mode]
    return None if ok else f"nullspace_mode '{mode}' expects {expected}, got {value}"


class NullBoothBlock(_Block):
    """The seed's ``nullbooth:`` block (first nine keys verbatim) plus additions."""

    enable: bool = True
    original_knowledge_prompts: str | None = None
    cov_matrices_output_dir: str = "./cov_matrices"
    visual_attention_map: bool = False
    num_denoising_steps: int = Field(50, ge=1, le=1000)
    nullspace_threshold: float = 2e-2
    collect_features: CollectFeatures = CollectFeatures()
    cross_attention_layers: Literal["all"] | list[int] = "all"
    # Additions.
    guidance_scale: float = Field(7.5, gt=1.0, description="CFG scale of the collection trajectories (>1: both branches)")
    sampler: str = Field("uniform", description="'uniform' (seed: 980, 960, … 0 for 50 steps) or a diffusers scheduler class name")
    collection_batch_size: int = Field(8, ge=1)
    nullspace_mode: NullspaceMode = "absolute"
    checkpoint_every: int = Field(1, ge=1, description="write a resumable checkpoint every N prompt batches")
    save_generations: bool = Field(False, description="also decode and keep the collection's images (reusable as class images)")
    attention_map_prompts: int = Field(2, ge=0, description="how many prompts get attention-map pictures")
    keep_timestep_sums: bool = Field(False, description="also keep exact float64 per-timestep sums (large) for exact per-timestep merges")

    @field_validator("cross_attention_layers")
    @classmethod
    def _indices(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("expected 'all' or a non-empty list of layer indices, got []")
            bad = [i for i in v if i < 0]
            if bad:
                raise ValueError(f"layer indices must be ≥ 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "NullBoothBlock":
        problem = check_threshold(self.nullspace_mode, self.nullspace_threshold)
        if problem:
            raise ValueError(f"nullspace_threshold: {problem}")
        if not self.collect_features.selected():
            raise ValueError("collect_features: all four features are disabled; enable at least one of q/k/v/out_features")
        return self


class Config(_Block):
    """The whole file. Training and generation keys are read by ``train``/``generate`` and ignored by ``collect``."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    pretrained_model_name_or_path: str = "tiny-sd"
    revision: str | None = None
    seed: int = 0
    resolution: int | None = Field(None, ge=8, description="image size; default: the model's native size")
    output_dir: str = "./outputs"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    nullbooth: NullBoothBlock = NullBoothBlock()

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {v}")
        return v


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        got_txt = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        lines.append(f"{where}: {msg}{got_txt}")
    return f"{source}: {len(lines)} problem(s): " + "; ".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "config", cls: type[Config] = Config) -> Config:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise NullBoothError(_format_errors(err, source)) from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None, cls: type[Config] = Config) -> Config:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``nullbooth.num_denoising_steps``)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise NullBoothError(f"expected a YAML config file at {p}, found nothing; pass --config PATH")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise NullBoothError(f"{p} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise NullBoothError(f"expected a mapping at the top of {p}, got {type(loaded).__name__}")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config_from_dict(data, str(path or "flags"), cls)
