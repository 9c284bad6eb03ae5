"""The whole configuration (:class:`Config`) and what only ``train`` checks (:func:`training_problems`).

Top-level keys are spelled as the flags of diffusers' ``train_dreambooth.py`` / ``train_dreambooth_lora.py``
and mean what they mean there; where nullbooth differs (latents are encoded once, so crops and flips come from a
precomputed pool) the key's description says so. :data:`FLAG_GROUPS` orders them for ``--help``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from nullbooth.config.blocks import (
    MAX_RESOLUTION,
    MAX_STEPS,
    SEED_LIMIT,
    GenerateBlock,
    MethodName,
    NullBoothBlock,
    PerfusionBlock,
    SubjectBlock,
    _Block,
)
from nullbooth.errors import NullBoothError

Precision = Literal["fp32", "fp16", "bf16"]


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
    allow_tf32: bool = Field(False, description="TF32 matmuls and convolutions on Ampere+ GPUs while training "
                             "(faster, ~1e-3 relative error); no effect on the CPU")
    dataloader_num_workers: int = Field(0, ge=0, le=256, description="threads that decode and resize the image files "
                                        "(latents are encoded once, so there is no per-step loading)")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="log loss, lr, leakage per weight and validation images to tensorboard or wandb "
        "(offline); train_report.json is always written")
    logging_dir: str = Field("logs", description="tracker logs, relative to output_dir")
    # -- what is trained
    method: MethodName = Field("nullbooth", description="nullbooth | dreambooth (the whole UNet, unconstrained) | "
                               "attn2_finetune (nullbooth's weights, unconstrained) | lora | oft | perfusion")
    nullbooth_update: Literal["adapter", "projected"] = Field(
        "adapter", description="adapter: ΔW = M Uᵀ (exact); projected: full weights, W ← W_old + (W_new − W_old) P")
    train_text_encoder: bool = Field(False, description="also train the text encoder (dreambooth: all of it; lora: "
                                     "LoRA on its attention projections; nullbooth: a LoRA outside the guarantee, see README)")
    text_encoder_lr: float | None = Field(None, gt=0.0, description="lr of the text encoder; default: learning_rate")
    lora_rank: int = Field(4, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="method lora: dropout of the LoRA branch (peft)")
    use_dora: bool = Field(False, description="method lora: weight-decomposed LoRA (DoRA, peft's use_dora)")
    lora_targets: Literal["attention", "attn2"] = Field(
        "attention", description="method lora: attention = to_q/to_k/to_v/to_out.0 of every attention (attn1 and "
        "attn2, diffusers' train_dreambooth_lora.py); attn2 = the cross-attention weights nullbooth protects")
    oft_block_size: int = Field(32, ge=2, le=4096, description="method oft: peft's OFT block size (r = in_features / "
                                "block size blocks per layer; peft adjusts it where it does not divide a width)")
    lora_format: Literal["diffusers", "kohya"] = Field(
        "diffusers", description="kohya: also write pytorch_lora_weights_kohya.safetensors (A1111 / ComfyUI key names)")
    # -- data (diffusers train_dreambooth.py names)
    instance_data_dir: str | None = None
    instance_prompt: str | None = None
    class_data_dir: str | None = Field(None, description="default: <output_dir>/class_images")
    class_prompt: str | None = None
    subjects: list[SubjectBlock] = Field(default_factory=list, description="several subjects in one run, each "
                                         "{instance_data_dir, instance_prompt, class_prompt, …} (instead of the "
                                         "top-level keys)")
    with_prior_preservation: bool = False
    prior_loss_weight: float = Field(1.0, ge=0.0)
    num_class_images: int = Field(100, ge=1, description="per subject")
    class_generation_steps: int = Field(50, ge=1, le=MAX_STEPS, description="sampling steps when class images are generated")
    sample_batch_size: int = Field(4, ge=1, description="batch size when generating class images")
    prior_generation_precision: Precision | None = Field(None, description="autocast precision of class-image "
                                                         "generation; default: the model's own dtype")
    center_crop: bool = Field(True, description="false: a random square crop (diffusers' default; here drawn from "
                              "8 crops per image encoded once), true: the centre")
    random_flip: bool = Field(False, description="mirror each drawn image with probability ½ (both versions are "
                              "encoded once)")
    pre_compute_text_embeddings: bool = Field(False, description="prompts are always encoded once with a frozen "
                                              "text encoder; true also moves it off the accelerator while training")
    # -- optimisation
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float | None = Field(None, gt=0.0, description="default: the method's (dreambooth, attn2_finetune, "
                                          "nullbooth 5e-6; lora, oft 1e-4)")
    scale_lr: bool = Field(False, description="multiply the learning rates by train_batch_size × "
                           "gradient_accumulation_steps × processes")
    optimizer: Literal["adamw", "prodigy"] = Field("adamw", description="AdamW | prodigy (needs prodigyopt; use "
                                                   "learning_rate 1.0)")
    use_8bit_adam: bool = Field(False, description="bitsandbytes' 8-bit AdamW (needs bitsandbytes and a GPU)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_num_cycles: int = Field(1, ge=1, description="cosine_with_restarts: the number of hard restarts")
    lr_power: float = Field(1.0, gt=0.0, description="polynomial: the power of the decay")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_weight_decay: float = Field(1e-2, ge=0.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    prodigy_beta3: float | None = Field(None, ge=0.0, lt=1.0, description="prodigy: step-size EMA (default √beta2)")
    prodigy_decouple: bool = Field(True, description="prodigy: AdamW-style decoupled weight decay")
    prodigy_use_bias_correction: bool = Field(True, description="prodigy: Adam's bias correction")
    prodigy_safeguard_warmup: bool = Field(True, description="prodigy: keep the step-size estimate safe in warm-up")
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_train_steps: int = Field(400, ge=1, description="optimizer steps; when not set, num_train_epochs decides")
    num_train_epochs: int | None = Field(None, ge=1, description="passes over the instance images (or class images "
                                         "when more), used when max_train_steps is not set")
    snr_gamma: float | None = Field(None, gt=0.0, description="Min-SNR loss weighting γ (Hang et al. 2023; 5.0 "
                                    "recommended): min(SNR(t), γ)/SNR(t) (ε-prediction), /(SNR(t)+1) (v)")
    noise_offset: float = Field(0.0, ge=0.0, description="add noise_offset · N(0, 1) per image and channel to ε "
                                "(darker / brighter images; 0.1 is common)")
    gradient_checkpointing: bool = False
    # -- checkpoints, validation, report
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(None, ge=1)
    resume_from_checkpoint: str | None = Field(None, description="a checkpoint folder or 'latest'")
    validation_prompt: str | None = None
    num_validation_images: int = Field(2, ge=1)
    validation_steps: int = Field(100, ge=1)
    validation_epochs: int | None = Field(None, ge=1, description="validate every N epochs instead of validation_steps")
    heldout_prompts: str | None = Field(None, description="prompt file: the report measures the leakage on their features")
    heldout_steps: int = Field(2, ge=1, le=MAX_STEPS, description="sampling steps recorded for the held-out features")
    # -- blocks
    nullbooth: NullBoothBlock = NullBoothBlock()
    # method: perfusion (nullbooth.methods.perfusion.method); generate reads its gate and concept keys.
    perfusion: PerfusionBlock = PerfusionBlock()
    generate: GenerateBlock = GenerateBlock()

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_name(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v  # diffusers spells it AdamW

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

    def subject_list(self) -> list[SubjectBlock]:
        """The run's subjects: ``subjects``, or the one the top-level keys describe (empty when they are unset)."""
        if self.subjects:
            return list(self.subjects)
        if not self.instance_data_dir or not self.instance_prompt:
            return []
        return [SubjectBlock(instance_data_dir=self.instance_data_dir, instance_prompt=self.instance_prompt,
                             class_prompt=self.class_prompt, class_data_dir=self.class_data_dir,
                             concept_token=self.perfusion.concept_token, superclass=self.perfusion.superclass,
                             mask_dir=self.perfusion.mask_dir)]


# ``--help`` sections, in order; every top-level key is in exactly one (tests/test_config.py checks).
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "model and run": ("pretrained_model_name_or_path", "revision", "seed", "resolution", "output_dir", "overwrite",
                      "mixed_precision", "allow_tf32", "dataloader_num_workers"),
    "what is trained": ("method", "nullbooth_update", "train_text_encoder", "text_encoder_lr", "lora_rank",
                        "lora_dropout", "use_dora", "lora_targets", "oft_block_size", "lora_format"),
    "data": ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt", "subjects",
             "with_prior_preservation", "prior_loss_weight", "num_class_images", "class_generation_steps",
             "sample_batch_size", "prior_generation_precision", "center_crop", "random_flip",
             "pre_compute_text_embeddings"),
    "optimisation": ("train_batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr", "optimizer",
                     "use_8bit_adam", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "adam_beta1",
                     "adam_beta2", "adam_weight_decay", "adam_epsilon", "prodigy_beta3", "prodigy_decouple",
                     "prodigy_use_bias_correction", "prodigy_safeguard_warmup", "max_grad_norm", "max_train_steps",
                     "num_train_epochs", "snr_gamma", "noise_offset", "gradient_checkpointing"),
    "checkpoints, validation, logging": ("checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                                         "validation_prompt", "num_validation_images", "validation_steps",
                                         "validation_epochs", "heldout_prompts", "heldout_steps", "report_to",
                                         "logging_dir"),
    "nullbooth (null-space) settings": ("nullbooth",),
    "perfusion settings": ("perfusion",),
    "generate settings": ("generate",),
}


def _words(text: str) -> set[str]:
    return {w for w in "".join(c.lower() if c.isalnum() or c in "<>_" else " " for c in text).split()}


def _subject_problems(cfg: Config) -> list[str]:
    problems = []
    if cfg.subjects:
        top = [k for k in ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt")
               if getattr(cfg, k) is not None]
        if top:
            problems.append(f"subjects: give each subject's data inside subjects, not also at the top level "
                            f"({', '.join(top)}); move them into a subjects entry")
    else:
        if not cfg.instance_data_dir:
            problems.append("instance_data_dir: expected a folder of subject images, got nothing; set "
                            "instance_data_dir (or subjects for several)")
        if not cfg.instance_prompt or not cfg.instance_prompt.strip():
            problems.append("instance_prompt: expected a prompt with an identifier token (e.g. 'a photo of sks dog'), "
                            "got nothing")
    pairs = [(s.instance_prompt, s.class_prompt) for s in cfg.subjects] or [(cfg.instance_prompt, cfg.class_prompt)]
    for i, (instance, klass) in enumerate(pairs):
        where = f"subjects.{i}." if cfg.subjects else ""
        if cfg.subjects and not instance.strip():
            problems.append(f"{where}instance_prompt: expected a prompt with an identifier token, got nothing")
        if cfg.with_prior_preservation and not klass:
            problems.append(f"{where}class_prompt: with_prior_preservation needs a class prompt (e.g. 'a photo of "
                            "dog'); set it or turn with_prior_preservation off")
        # The identifier (a rare token such as "sks") is what the subject binds to: it must be in the
        # instance prompt and not in the class prompt, or prior preservation trains the class itself.
        if klass and instance and instance.strip() and not _words(instance) - _words(klass):
            problems.append(f"{where}instance_prompt: {instance!r} has no identifier token that class_prompt "
                            f"{klass!r} lacks; add a rare token, e.g. {('sks ' + klass)!r}")
    prompts = [s.instance_prompt for s in cfg.subjects]
    if len(set(prompts)) < len(prompts):
        problems.append("subjects: two subjects share one instance_prompt, so nothing tells them apart; give each "
                        "its own identifier token")
    return problems


def _option_problems(cfg: Config) -> list[str]:
    problems = []
    if cfg.lora_format == "kohya" and cfg.method == "perfusion":
        problems.append("lora_format: 'kohya' exports a LoRA, and Perfusion's gated rank-1 edits are not one; "
                        "use lora_format: diffusers with method perfusion")
    if cfg.lora_format == "kohya" and cfg.use_dora:
        problems.append("lora_format: 'kohya' has no DoRA magnitude vector, and use_dora is on; use lora_format: "
                        "diffusers (plain diffusers loads its DoRA) or turn use_dora off")
    if cfg.lora_format == "kohya" and cfg.method == "dreambooth":
        problems.append("lora_format: 'kohya' exports a LoRA, and dreambooth fine-tunes every UNet weight and bias, "
                        "which no LoRA carries; use lora_format: diffusers (the result is unet/) or method "
                        "attn2_finetune (its change is exported as a LoRA)")
    if cfg.lora_format == "kohya" and cfg.method == "attn2_finetune" and cfg.train_text_encoder:
        problems.append("lora_format: 'kohya' exports a LoRA, and attn2_finetune with train_text_encoder trains the "
                        "whole text encoder, which no LoRA carries; use lora_format: diffusers (the result is unet/ "
                        "and text_encoder/)")
    if cfg.lora_format == "kohya" and cfg.method == "oft":
        problems.append("lora_format: 'kohya' exports a LoRA, and OFT's learned rotations are not one; use "
                        "lora_format: diffusers with method oft (the result is peft's adapter folder oft/)")
    if cfg.train_text_encoder and cfg.method == "oft":
        problems.append("train_text_encoder: method oft trains the UNet's attention only; turn train_text_encoder "
                        "off, or use method lora for a LoRA on the text encoder too")
    if cfg.train_text_encoder and cfg.method == "perfusion":
        problems.append("train_text_encoder: Perfusion trains only its concept token's embedding — its keys are "
                        "locked to the frozen encoder's superclass encoding; turn train_text_encoder off")
    if cfg.pre_compute_text_embeddings and (cfg.train_text_encoder or cfg.method == "perfusion"):
        what = "train_text_encoder trains the text encoder" if cfg.train_text_encoder else \
            "method perfusion trains its concept token's embedding"
        problems.append(f"pre_compute_text_embeddings: {what}, so its encodings cannot be computed once; turn "
                        "pre_compute_text_embeddings off")
    if cfg.text_encoder_lr is not None and not cfg.train_text_encoder:
        problems.append("text_encoder_lr: is only used with train_text_encoder: true; set it or remove text_encoder_lr")
    for key, method in (("lora_dropout", "lora"), ("use_dora", "lora"), ("lora_targets", "lora"),
                        ("oft_block_size", "oft")):
        if getattr(cfg, key) != Config.model_fields[key].default and cfg.method != method:
            problems.append(f"{key}: applies to method {method} only, got method {cfg.method!r}; remove {key}")
    if cfg.use_8bit_adam and cfg.optimizer != "adamw":
        problems.append("use_8bit_adam: is an AdamW variant, and optimizer is 'prodigy'; set one of them")
    if cfg.lr_warmup_steps > cfg.max_train_steps and "num_train_epochs" not in cfg.model_fields_set:
        problems.append(f"lr_warmup_steps: {cfg.lr_warmup_steps} exceeds max_train_steps {cfg.max_train_steps}")
    return problems


def training_problems(cfg: Config) -> list[str]:
    """Every reason ``cfg`` cannot be trained from, as ``field: what is wrong; how to fix`` lines."""
    problems = _subject_problems(cfg)
    if cfg.method == "nullbooth":
        nb = cfg.nullbooth
        if not nb.enable:
            problems.append("nullbooth.enable: method 'nullbooth' needs enable: true; for an unconstrained run set "
                            "method: attn2_finetune (the same weights) or dreambooth (the whole UNet)")
        if nb.scope == "unet" and cfg.nullbooth_update == "adapter" and "nullbooth_update" in cfg.model_fields_set:
            problems.append("nullbooth_update: adapter factors ΔW = M Uᵀ of attn2 only, and nullbooth.scope unet trains "
                            "every UNet weight in place; remove nullbooth_update or set it to projected")
        if nb.scope == "unet" and cfg.train_text_encoder:
            problems.append("train_text_encoder: nullbooth.scope unet writes the whole unet/ folder, which carries no "
                            "text-encoder LoRA; turn train_text_encoder off, or use nullbooth.scope attn2")
        if nb.stats_run is None and nb.original_knowledge_prompts is None:
            problems.append("nullbooth.original_knowledge_prompts: method 'nullbooth' needs a statistics run; give the "
                            "prior prompts file (the run is collected or reused) or nullbooth.stats_run")
    return problems + _option_problems(cfg)


def check_training(cfg: Config, source: str = "config") -> None:
    """Raise one ``NullBoothError`` listing every :func:`training_problems` entry."""
    problems = training_problems(cfg)
    if problems:
        raise NullBoothError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))
