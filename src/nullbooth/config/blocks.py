"""The settings blocks and the validation every block shares (no bool for a number, 64-bit bounds, no NUL)."""
from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

NullspaceMode = Literal["absolute", "relative", "energy", "rank", "percentile"]
MethodName = Literal["nullbooth", "dreambooth", "attn2_finetune", "lora", "oft", "perfusion"]
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
    if list in leaves:  # subjects: a list of blocks is set as a whole, not key by key
        return "a list"
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
    checkpoint_every: int | None = Field(None, ge=1, description="write a resumable checkpoint every N prompt batches "
                                         "(instead of by time; default: by time, see checkpoint_minutes)")
    checkpoint_minutes: float = Field(10.0, gt=0.0, description="write a resumable checkpoint after the first batch, "
                                      "then whenever this many minutes passed since the last one, and at the end")
    accumulator_memory_gb: float | None = Field(None, gt=0.0, description="memory the collection's per-timestep "
                                                "float64 sums may take on the model's device; default: 70% of its free "
                                                "memory (CUDA) or of the available RAM (CPU)")
    accumulator_device: Literal["auto", "device", "host"] = Field(
        "auto", description="where per-timestep sums live: on the model's device, in host RAM (products still formed on "
        "the device), or auto: the device when they fit accumulator_memory_gb, else the host")
    accumulation_precision: Literal["auto", "float64", "float32"] = Field(
        "auto", description="precision of the feature products XᵀX (their sums are float64 either way): float32 is "
        "fast on GPUs with slow float64 (consumer cards); auto: float64 on CPUs and on GPUs with fast float64 "
        "(P100/V100/A100/H100/B200), else float32")
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
    scope: Literal["attn2", "unet"] = Field(
        "attn2", description="what NullBooth trains: attn2 (the cross-attention weights, the seed's) | unet (every Linear "
        "and Conv2d weight of the UNet, each in the null space of its own prior inputs and under leakage_budget; "
        "biases and norms frozen; trains full weights (the projected update) and writes the whole unet/ folder)")
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
    gate_scope: Literal["all_tokens", "concept_token"] = Field(
        "all_tokens", description="tokens eq. 3 edits: 'all_tokens' (the paper: any token whose s(e) opens the gate) "
        "or 'concept_token' (only the concept's own positions; for text encoders whose C is singular where the new "
        "token points, which then open the gate on every later token); stored in the concept file")
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



class SubjectBlock(_Block):
    """One subject of a several-subject run (``subjects:``): its images, its prompts, its own concept token."""

    instance_data_dir: str
    instance_prompt: str
    class_prompt: str | None = None
    class_data_dir: str | None = Field(None, description="default: <output_dir>/class_images/<subject number>")
    concept_token: str | None = Field(None, description="method perfusion: this subject's token (default: "
                                      "perfusion.concept_token for a single subject)")
    superclass: str | None = Field(None, description="method perfusion: the word this subject's keys are locked to")
    mask_dir: str | None = Field(None, description="method perfusion: this subject's masks (as perfusion.mask_dir)")
