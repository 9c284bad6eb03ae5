"""Typed configuration: one YAML file, validated as a whole before any model is loaded.

Top-level keys follow diffusers ``train_dreambooth.py`` flag names; the ``nullbooth:`` block
carries the seed's keys verbatim plus documented additions; ``generate:`` holds the sampling
settings of ``nullbooth generate``. Unknown keys are errors (a typo must not silently fall back to
a default). Every problem in a file is reported at once, each with its dotted field name; the
problems only ``train`` cares about (a missing instance folder, say) come from
:func:`training_problems`, also all at once.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nullbooth.errors import NullBoothError
from nullbooth.text import read_user_text

NullspaceMode = Literal["absolute", "relative", "energy", "rank", "percentile"]
MethodName = Literal["nullbooth", "dreambooth", "lora", "perfusion"]
FEATURES = ("q", "k", "v", "out")
INT_LIMIT = 2**63  # torch tensors, generators and step counters are signed 64-bit
# Training derives generator seeds as ``seed * 1_000_003 + epoch`` (dataset) and ``seed * 1000 + rank`` (setup),
# which torch's manual_seed takes in [-2**63, 2**64) only. Negative seeds stay allowed: a collection samples
# prompt i with ``seed + i``, and extending a run with an offset prompt list can need a negative base.
SEED_LIMIT = 2**32
MAX_RESOLUTION = 4096
MAX_STEPS = 1000  # diffusers schedulers train on 1000 timesteps and refuse more inference steps than that


def _leaves(annotation: Any) -> set:
    """The types a field annotation is built from: ``int | None`` → {int, NoneType}, ``list[int]`` → {list, int}."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*map(_leaves, typing.get_args(annotation)))
    if origin is list:
        return {list, *_leaves(typing.get_args(annotation)[0])}
    return {origin or annotation}


def _describe(annotation: Any) -> str:
    """How a field reads to a user: ``seed`` is "a number", ``nullbooth`` is "a block"."""
    leaves = _leaves(annotation) - {type(None)}
    if any(isinstance(t, type) and issubclass(t, BaseModel) for t in leaves):
        return "a block"
    for kind, words in ((list, "a list"), (bool, "true/false"), (int, "a number"), (float, "a number"), (str, "text")):
        if kind in leaves:
            return words
    return "a single value"


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1, so a YAML `yes`/`on` would silently become a step count or a seed.
        leaves = _leaves(cls.model_fields[info.field_name].annotation)
        values = v if isinstance(v, list) else [v]
        if bool not in leaves and leaves & {int, float} and any(isinstance(x, bool) for x in values):
            raise ValueError(f"expected a number, got {v!r} (YAML reads true/false/yes/no/on/off as true/false); "
                             "write a number")
        return v

    @field_validator("*")
    @classmethod
    def _representable(cls, v: Any) -> Any:
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, int) and not -INT_LIMIT <= x < INT_LIMIT:
                got = x if len(str(abs(x))) <= 30 else f"a number with {len(str(abs(x)))} digits"
                raise ValueError(f"expected a whole number of magnitude below 2**63, got {got}")
            if isinstance(x, str) and "\x00" in x:
                raise ValueError(f"expected text without NUL characters, got {x[:60]!r}")
        return v


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
    stats_run: str | None = Field(None, description="train from this run directory instead of finding/collecting one "
                                  "under cov_matrices_output_dir")
    storage: Literal["float32", "float16", "eigh"] = Field(
        "float32", description="per-timestep matrices: float32 .npy (seed layout) | float16 .npy | eigh: top eigenpairs "
        "by energy + the exact null-space basis (safetensors); summed float64 statistics are never compressed")
    storage_energy: float = Field(0.9999, gt=0.0, le=1.0, description="storage 'eigh': fraction of Σλ the kept eigenpairs hold")
    leakage_budget: float | None = Field(
        None, gt=0.0, description="ε: after every optimizer step each protected weight keeps ‖ΔW X₀‖_F / ‖W X₀‖_F ≤ ε on the "
        "collected prior statistics (exact projection onto that ellipsoid); None: the threshold alone")
    leakage_penalty: float = Field(0.0, ge=0.0, description="γ: soft form, adds γ · Σ_W leakage(W)² to the loss "
                                   "(no guarantee; combine with leakage_budget for one)")

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


class GenerateBlock(_Block):
    """``nullbooth generate``: the base model, alone or with a trained result, prompts × seeds → images and grids."""

    adapter: str | None = Field(None, description="a training output_dir (ours or a diffusers LoRA folder); default: "
                                "output_dir when it holds a result, else the base model alone")
    prompts: list[str] = Field(default_factory=list)
    prompts_file: str | None = Field(None, description="one prompt per line (added after `prompts`)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])
    num_inference_steps: int = Field(25, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(7.5, ge=0.0, description="≤ 1 turns classifier-free guidance off")
    out_dir: str | None = Field(None, description="default: <adapter>/samples")
    compare_base: bool = Field(False, description="also sample the base model and write both side by side")
    batch_size: int = Field(8, ge=1, description="images per pipeline call, prompts × seeds flattened (an image "
                            "depends only on its prompt and seed, up to float round-off)")
    num_images_per_prompt: int | None = Field(None, ge=1, le=10_000, description="K images per prompt with seeds "
                                              "seed, seed+1, …, seed+K-1 (instead of seeds)")
    scheduler: str | None = Field(None, description="a diffusers scheduler class name, e.g. "
                                  "DPMSolverMultistepScheduler; default: the model's own")

    @field_validator("seeds")
    @classmethod
    def _some_seed(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("expected at least one seed")
        bad = [s for s in v if not 0 <= s < INT_LIMIT]
        if bad:
            raise ValueError(f"expected generator seeds in [0, 2**63) (torch.Generator.manual_seed), got {bad[:3]}")
        return v


class PerfusionBlock(_Block):
    """``method: perfusion`` (Tewel et al. 2023, key-locked rank-1 editing) and its concept files at generation.

    Only read when ``method: perfusion`` (training) or when concept files are generated from.
    """

    concept_token: str | None = Field(None, description="the new token the concept binds to, e.g. '<my-teddy>'; must "
                                      "not exist in the vocabulary and must occur in instance_prompt")
    superclass: str | None = Field(None, description="the word the keys are locked to, e.g. 'teddy' "
                                   "('teddy bear' works)")
    value_lr: float | None = Field(None, gt=0.0, description="lr of o*_V; default: learning_rate, else 0.03 (paper)")
    embedding_lr: float | None = Field(None, gt=0.0, description="lr of the concept token embedding; default: "
                                       "value_lr / 5 (0.006 with the paper's 0.03)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decay of o*_V and the embedding (adam_weight_decay is "
                                "not used: it would pull o*_V towards 0, not towards its superclass start)")
    train_beta: float = Field(0.75, description="gate bias β while training (eq. 3)")
    train_tau: float = Field(0.1, gt=0.0, description="gate temperature τ while training")
    eval_beta: float | None = Field(None, description="gate β at inference; train: stored in the concept file (default "
                                    "0.70); generate: overrides the files' value")
    eval_tau: float | None = Field(None, gt=0.0, description="gate τ at inference (default 0.15); like eval_beta")
    input_decay: float = Field(0.99, ge=0.0, lt=1.0, description="EMA decay of the concept input i*")
    frac_gradient_concept_embed: float = Field(0.1, gt=0.0, le=1.0, description="gradient scale from the edited rows "
                                               "into the text encoder")
    mask_dir: str | None = Field(None, description="one mask per instance image (same file stem, same size); the loss "
                                 "is weighted by it (loss_fn_weighted_by_mask)")
    normalized_mask_min_value: float = Field(0.0, ge=0.0, le=1.0, description="loss weight floor outside the mask")
    covariance_file: str | None = Field(None, description="the text-encoding second moment C [d, d] (.npy, or "
                                        ".safetensors with key 'C'); default: shipped for SD 1.x, else computed")
    covariance_prompts: str | None = Field(None, description="prompt file C is computed from (cached); default: a "
                                           "built-in generic list")
    eigenvalue_floor: float | Literal["auto"] | None = Field(
        "auto", description="regularise a singular C: eigenvalues ≥ floor·λ_max; 'auto': only when singular (with a "
        "warning); null: refuse a singular C")
    concepts: list[str] = Field(default_factory=list, description="generate: more concept files to load (several: "
                                "multi-concept generation)")
    use_cholesky: bool = Field(False, description="generate with several concepts: the exact C⁻¹-orthogonal "
                               "projection (Appendix B) instead of the sum approximation")

    @field_validator("eigenvalue_floor")
    @classmethod
    def _floor(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"expected 'auto', null or a fraction of λ_max in (0, 1), got {v}")
        return v


class Config(_Block):
    """The whole file. ``collect`` reads the model and ``nullbooth:`` keys; ``train`` and ``generate`` the rest."""

    # -- model and run
    pretrained_model_name_or_path: str = "tiny-sd"
    revision: str | None = None
    seed: int = Field(0, description="prompt i of a collection is sampled with seed + i; training derives its own")
    resolution: int | None = Field(None, ge=8, description="image size; default: the model's native size")
    output_dir: str = "./outputs"
    overwrite: bool = Field(False, description="train into an output_dir that already holds a finished result, "
                            "deleting its result and checkpoints first")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # -- what is trained
    method: MethodName = Field("nullbooth", description="nullbooth | dreambooth (unconstrained baseline) | lora | perfusion")
    nullbooth_update: Literal["adapter", "projected"] = Field(
        "adapter", description="adapter: ΔW = M Uᵀ (exact); projected: full weights, W ← W_old + (W_new − W_old) P")
    lora_rank: int = Field(4, ge=1)
    lora_format: Literal["diffusers", "kohya"] = Field(
        "diffusers", description="kohya: also write pytorch_lora_weights_kohya.safetensors (A1111 / ComfyUI key names)")
    # -- data (diffusers train_dreambooth.py names)
    instance_data_dir: str | None = None
    instance_prompt: str | None = None
    class_data_dir: str | None = Field(None, description="default: <output_dir>/class_images")
    class_prompt: str | None = None
    with_prior_preservation: bool = False
    prior_loss_weight: float = Field(1.0, ge=0.0)
    num_class_images: int = Field(100, ge=1)
    class_generation_steps: int = Field(50, ge=1, le=MAX_STEPS, description="sampling steps when class images are generated")
    sample_batch_size: int = Field(4, ge=1, description="batch size when generating class images")
    # -- optimisation
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float | None = Field(None, gt=0.0, description="default: the method's (dreambooth/nullbooth 5e-6, lora 1e-4)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_weight_decay: float = Field(1e-2, ge=0.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_train_steps: int = Field(400, ge=1)
    gradient_checkpointing: bool = False
    # -- checkpoints, validation, report
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(None, ge=1)
    resume_from_checkpoint: str | None = Field(None, description="a checkpoint folder or 'latest'")
    validation_prompt: str | None = None
    num_validation_images: int = Field(2, ge=1)
    validation_steps: int = Field(100, ge=1)
    heldout_prompts: str | None = Field(None, description="prompt file: the report measures the leakage on their features")
    heldout_steps: int = Field(2, ge=1, le=MAX_STEPS, description="sampling steps recorded for the held-out features")
    # -- blocks
    nullbooth: NullBoothBlock = NullBoothBlock()
    # method: perfusion (nullbooth.methods.perfusion.method); generate reads its gate and concept keys.
    perfusion: PerfusionBlock = PerfusionBlock()
    generate: GenerateBlock = GenerateBlock()

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not -SEED_LIMIT < v < SEED_LIMIT:
            raise ValueError(f"expected a seed in (-2**32, 2**32), got {v}; training derives generator seeds from it "
                             "(seed × 1000003 + epoch) that must stay within torch's 64-bit range")
        return v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {v}")
        if v is not None and v > MAX_RESOLUTION:
            raise ValueError(f"expected an image size of at most {MAX_RESOLUTION} (SD 1.x: 512, SD 2.x: 768, SDXL: "
                             f"1024), got {v}; one {v}×{v} image needs tens of GB — pick the model's native size")
        return v


def _words(text: str) -> set[str]:
    return {w for w in "".join(c.lower() if c.isalnum() or c in "<>_" else " " for c in text).split()}


def training_problems(cfg: Config) -> list[str]:
    """Every reason ``cfg`` cannot be trained from, as ``field: what is wrong; how to fix`` lines."""
    problems = []
    if not cfg.instance_data_dir:
        problems.append("instance_data_dir: expected a folder of subject images, got nothing; set instance_data_dir")
    if not cfg.instance_prompt or not cfg.instance_prompt.strip():
        problems.append("instance_prompt: expected a prompt with an identifier token (e.g. 'a photo of sks dog'), got nothing")
    if cfg.with_prior_preservation and not cfg.class_prompt:
        problems.append("class_prompt: with_prior_preservation needs a class prompt (e.g. 'a photo of dog'); set it "
                        "or turn with_prior_preservation off")
    if cfg.instance_prompt and cfg.class_prompt:
        # The identifier (a rare token such as "sks") is what the subject binds to: it must be in the
        # instance prompt and not in the class prompt, or prior preservation trains the class itself.
        extra = _words(cfg.instance_prompt) - _words(cfg.class_prompt)
        if not extra:
            problems.append(
                f"instance_prompt: {cfg.instance_prompt!r} has no identifier token that class_prompt "
                f"{cfg.class_prompt!r} lacks; add a rare token, e.g. {('sks ' + cfg.class_prompt)!r}"
            )
    if cfg.method == "nullbooth":
        nb = cfg.nullbooth
        if not nb.enable:
            problems.append("nullbooth.enable: method 'nullbooth' needs enable: true; for an unconstrained run set "
                            "method: dreambooth")
        if nb.stats_run is None and nb.original_knowledge_prompts is None:
            problems.append("nullbooth.original_knowledge_prompts: method 'nullbooth' needs a statistics run; give the "
                            "prior prompts file (the run is collected or reused) or nullbooth.stats_run")
    if cfg.lora_format == "kohya" and cfg.method == "perfusion":
        problems.append("lora_format: 'kohya' exports a LoRA, and Perfusion's gated rank-1 edits are not one; "
                        "use lora_format: diffusers with method perfusion")
    if cfg.lr_warmup_steps > cfg.max_train_steps:
        problems.append(f"lr_warmup_steps: {cfg.lr_warmup_steps} exceeds max_train_steps {cfg.max_train_steps}")
    return problems


def check_training(cfg: Config, source: str = "config") -> None:
    """Raise one ``NullBoothError`` listing every :func:`training_problems` entry."""
    problems = training_problems(cfg)
    if problems:
        raise NullBoothError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))


def _known_keys(loc: tuple) -> list[str]:
    """The field names valid next to the unknown key at ``loc`` (for a "did you mean" hint)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(map(_name, e["loc"])) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "finite_number":
            msg = "expected a finite number, not NaN or infinity; write a number"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _known_keys(e["loc"]), n=1)
            msg = "unknown key" + (f"; did you mean {'.'.join([*map(_name, e['loc'][:-1]), close[0]])}?" if close else "")
        got = e.get("input")
        said = "got " in msg  # our own validators already name the value
        got_txt = "" if isinstance(got, dict) or got is None or said else f" (got {_short(got)})"
        lines.append(f"{where}: {msg}{got_txt}".replace("\n", " "))
    return f"{source}: {len(lines)} problem(s): " + "; ".join(lines)


def _name(part: Any) -> str:
    """A key as the one-line message shows it: quoted when empty, long or holding control characters."""
    text = str(part)
    return text if text and text.isprintable() and len(text) <= 60 else _short(part, 60)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def config_from_dict(data: dict[str, Any], source: str = "config", cls: type[Config] = Config) -> Config:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise NullBoothError(_format_errors(err, source)) from None


def _dotted_parts(dotted: str) -> list[str]:
    parts = [part.strip() for part in str(dotted).split(".")]
    if not all(parts) or not all(part.isprintable() for part in parts):
        got = "an empty name" + (" between dots" if any(parts) else "") if not all(parts) else "control characters"
        raise NullBoothError(f"config override {dotted!r}: expected a dotted key like nullbooth.num_denoising_steps, "
                             f"got {got}; write KEY=VALUE")
    return parts


def _merge(node: dict[str, Any], leaf: str, value: Any) -> None:
    """``node[leaf] = value``, except that a mapping merges into a mapping (other keys of the block stay)."""
    old = node.get(leaf)
    if isinstance(old, dict) and isinstance(value, dict):
        for key, sub in value.items():
            _merge(old, key, sub)
    else:
        node[leaf] = value


def set_dotted(data: dict[str, Any], overrides: Mapping[str, Any], cls: type[BaseModel] = Config) -> dict[str, Any]:
    """Apply ``{"nullbooth.num_denoising_steps": 25, …}`` to the nested mapping ``data`` in place (and return it).

    A key that walks into a value (``seed.x``) or a value given for a whole block (``nullbooth=3``) is an error
    naming both; a mapping given for a block merges into it. Unknown keys are left for validation to report.
    """
    for dotted, value in overrides.items():
        *parents, leaf = parts = _dotted_parts(dotted)
        node, model = data, cls
        for depth, key in enumerate(parents):
            field = model.model_fields.get(key) if model else None
            child = node.get(key, {})
            kind = _describe(field.annotation) if field else None
            what = kind if kind not in (None, "a block") else None if isinstance(child, dict) else _describe(type(child))
            if what:
                where = ".".join(parts[: depth + 1])
                raise NullBoothError(f"config override {dotted}: {where} is {what}, not a block; set {where}=VALUE, "
                                     "or a key inside a block, e.g. nullbooth.num_denoising_steps=25")
            node, model = node.setdefault(key, child), field.annotation if field else None
        field = model.model_fields.get(leaf) if model else None
        if field and _describe(field.annotation) == "a block" and not isinstance(value, dict):
            raise NullBoothError(f"config override {dotted}={_short(value)}: {dotted} is a block of settings, not a "
                                 f"value; set one of its keys, e.g. {dotted}.{next(iter(field.annotation.model_fields))}"
                                 "=VALUE")
        _merge(node, leaf, value)
    return data


MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what would silently change a config or blow up on load.

    Duplicate keys (YAML keeps the last one) are errors naming both lines. Aliases (``*name``) are refused
    outright — not bounded — since a config has no use for them and a few of them nest into an exponential
    "billion laughs" tree; nesting deeper than ``MAX_YAML_DEPTH`` is refused before it reaches recursion limits.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"an alias (*{event.anchor}) — aliases are not allowed in "
                                              "a config; write the value out", event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels",
                                              event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable: SafeConstructor reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {_short(key)} is given twice (lines {first.start_mark.line + 1} and "
                        f"{key_node.start_mark.line + 1}); YAML would silently keep the last — delete one",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.reader.ReaderError):
        return f"character {chr(err.character)!r} at character offset {err.position} is not allowed in YAML; remove it"
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def parse_yaml(text: str, source: str) -> Any:
    """``text`` as YAML through :class:`StrictLoader`; any problem is one ``NullBoothError`` naming ``source``."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as err:
        raise NullBoothError(f"{source} is not valid YAML — {_yaml_problem(err)}") from None
    except (ValueError, OverflowError) as err:  # a tagged scalar SafeConstructor cannot build (!!timestamp 2001-13-45)
        raise NullBoothError(f"{source} is not valid YAML — a value cannot be read ({err}); fix or quote it") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (UTF-8, at most 1 MiB); every problem is one ``NullBoothError``."""
    p = Path(path)
    text = read_user_text(p, "--config", "a YAML config file", MAX_CONFIG_BYTES)
    loaded = parse_yaml(text, str(p))
    if loaded is not None and not isinstance(loaded, dict):
        raise NullBoothError(f"expected a mapping (KEY: VALUE lines) at the top of {p}, got {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None, cls: type[Config] = Config) -> Config:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``nullbooth.num_denoising_steps``)."""
    data = read_config_file(path) if path is not None else {}
    set_dotted(data, overrides or {}, cls)
    return config_from_dict(data, str(path or "flags"), cls)
