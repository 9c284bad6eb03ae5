"""Everything the training loop needs, built in the one order that keeps runs reproducible.

The order matters: the configuration and the checkpoint to resume are checked before anything is
loaded; the statistics run, the held-out features and the class images are taken from the *base*
model, before ``method.prepare`` changes it; the frozen VAE and text encoders turn the images and
prompts into ``q(z | x)`` and encodings once; and the loop's one random generator is seeded last
(``seed · 1000 + rank``), so nothing in the set-up draws from it.

Nothing is sampled or decomposed before the first step unless the run needs it: the statistics run is collected
only for ``nullbooth`` when none matches, class images only for the ones missing, held-out features only with
``heldout_prompts`` (and validation images only with ``validation_prompt``, in the loop).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from torch import nn

from nullbooth.conditioning import Encoded, text_encoders
from nullbooth.config import Config, check_training
from nullbooth.dataset import Example
from nullbooth.errors import NullBoothError
from nullbooth.filenames import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_PREFIX,
    CONCEPT_FILE,
    FULL_TEXT_ENCODER_DIR,
    FULL_UNET_DIR,
    LEGACY_ADAPTER_CONFIG,
    LORA_KOHYA_WEIGHTS,
    LORA_WEIGHTS,
    MODEL_INDEX,
    OFT_DIR,
    PERFUSION_CONFIG,
    SUBJECT_CONCEPT_FILE,
    TRAIN_CONFIG,
    TRAIN_REPORT,
    TRAIN_REPORT_HTML,
    VALIDATION_DIR,
)
from nullbooth.io import remove_stale_temporaries
from nullbooth.locks import FolderLock, lock_folder
from nullbooth.methods.base import Method
from nullbooth.methods.registry import make_method
from nullbooth.models import load_pipeline
from nullbooth.sampling import check_size
from nullbooth.stats.capture import cross_attention_layers
from nullbooth.stats.moments import SecondMoment
from nullbooth.training.checkpoint import check_resume, checkpoint_step, find_checkpoint
from nullbooth.training.optim import make_optimizer, resolve_train_steps
from nullbooth.training.prior import (
    class_examples,
    generation_dtype,
    heldout_statistics,
    instance_examples,
    latent_distributions,
    prompt_inputs,
    statistics_run,
    variant_time_ids,
)
from nullbooth.training.trackers import check_backend

log = logging.getLogger(__name__)

# What a finished run leaves in output_dir (each method's files, the report, the config); a new run replaces them.
RESULT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, LEGACY_ADAPTER_CONFIG, LORA_WEIGHTS, LORA_KOHYA_WEIGHTS, CONCEPT_FILE,
                PERFUSION_CONFIG, FULL_UNET_DIR, FULL_TEXT_ENCODER_DIR, OFT_DIR, TRAIN_REPORT, TRAIN_REPORT_HTML,
                TRAIN_CONFIG)


@dataclass
class Examples:
    """An image set as the loop reads it, on the device: ``q(z | x)`` and SDXL's size conditioning of every variant of
    every image (crops and mirror images, :class:`nullbooth.dataset.Augmentation`; rows image after image) and each
    image's prompt input.

    Without augmentation every image has one variant and row ``i`` is image ``i``.
    """

    mean: torch.Tensor  # [M, 4, h, w], M = Σ variants
    std: torch.Tensor  # [M, 4, h, w]
    text: torch.Tensor | Encoded  # [N, E, 77] token ids (a text encoder trained) or fixed encodings (hidden [N, 77, D])
    first: torch.Tensor  # [N] long: the row of image i's first variant
    count: torch.Tensor  # [N] long: image i's number of variants
    sizes: torch.Tensor  # [M, 6] SDXL time_ids of each variant (unused by SD pipelines)

    def __len__(self) -> int:
        return len(self.text)

    @property
    def augmented(self) -> bool:
        """Whether some image has more than one variant (only then does :meth:`take` draw)."""
        return self.mean.shape[0] > len(self)

    def take(self, idx: list[int], generator: torch.Generator,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | Encoded, torch.Tensor]:
        """``q(z | x)`` mean, std ``[B, 4, h, w]``, prompt input (``[B, E, 77]`` ids or encodings) and time ids
        ``[B, 6]`` of images ``idx``, each in a variant drawn uniformly from ``generator`` — which is not drawn from
        when no image has several."""
        rows: list[int] | torch.Tensor = idx
        if self.augmented:
            u = torch.rand(len(idx), generator=generator, device=generator.device)  # [B] in [0, 1)
            pick = torch.minimum((u * self.count[idx]).long(), self.count[idx] - 1)  # [B], uniform over 0..V_i-1
            rows = self.first[idx] + pick
        return self.mean[rows], self.std[rows], self.text[idx], self.sizes[rows]


@dataclass
class Setup:
    """What :func:`setup` hands the loop."""

    cfg: Config  # the config as trained: max_train_steps resolved from num_train_epochs
    accelerator: Accelerator
    pipe: Any  # the diffusers pipeline on the device, its UNet changed by the method
    method: Method
    unet: nn.Module  # pipe.unet as accelerate prepared it
    text_encoders: list[nn.Module]  # the pipeline's (SDXL: two), those the method trains as accelerate prepared them
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    params: list[nn.Parameter]  # everything the optimizer steps: the gradient norm is clipped over these
    noise_scheduler: DDPMScheduler
    generator: torch.Generator  # every random draw of the loop (latent sample, noise, timestep); checkpointed
    instance: Examples
    classes: Examples | None  # prior-preservation examples (DreamBooth eq. 2); None without prior preservation
    stats_run: Path | None
    heldout: dict[tuple[str, str], SecondMoment] | None  # held-out features (main process, heldout_prompts)
    resolution: int
    resume_dir: Path | None
    lock: FolderLock | None = None  # output_dir's, held by the main process while it trains


def setup(cfg: Config, *, pipe=None, accelerator: Accelerator | None = None, progress: bool = True) -> Setup:
    """Check ``cfg``, load what is not passed in, take the base model's statistics, prepare the method's
    parameters, the data and the optimizer (see the module docstring for why in this order).

    The main process holds ``output_dir``'s lock from here until the returned ``Setup.lock`` is released
    (or dropped); on an error here it is released at once.
    """
    check_training(cfg)
    check_backend(cfg)  # a missing tracker package fails before anything is loaded or collected
    accelerator = accelerator or make_accelerator(cfg)
    lock, replaced = prepare_output_dir(cfg, accelerator)
    try:
        ts = _setup(cfg, pipe, accelerator, lock, progress)
        # Only now that everything is checked and loaded: an overwrite that fails early deletes nothing.
        if accelerator.is_main_process:
            for path in replaced:
                log.info("overwrite: deleting %s", path)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        accelerator.wait_for_everyone()
        return ts
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _setup(cfg: Config, pipe, accelerator: Accelerator, lock: FolderLock | None, progress: bool) -> Setup:
    resume_dir = find_checkpoint(Path(cfg.output_dir), cfg.resume_from_checkpoint)  # fail before loading anything
    if resume_dir is not None:
        check_resume(resume_dir, cfg, accelerator.num_processes, accelerator.device)
    if pipe is None:
        pipe = load_pipeline(cfg.pretrained_model_name_or_path, device=accelerator.device)
    pipe.to(accelerator.device)
    resolution = check_size(pipe, cfg.resolution)  # a multiple of the VAE's scale, at most 4× the native size
    method = make_method(cfg)
    method.check(pipe)
    if cfg.with_prior_preservation:
        generation_dtype(cfg, accelerator.device)  # fp16 class images need CUDA: refused before any is made
    instance = instance_examples(cfg, resolution)  # every subject's, each with its own prompt

    # -- everything the base model must see before the method changes it
    stats_run = statistics_run(cfg, pipe, accelerator, create=method.name == "nullbooth", progress=progress)
    layers = cross_attention_layers(pipe.unet, cfg.nullbooth.cross_attention_layers)
    heldout = heldout_statistics(cfg, pipe, layers) if cfg.heldout_prompts and accelerator.is_main_process else None
    classes = class_examples(cfg, pipe, accelerator, stats_run, resolution, progress)
    cfg = resolve_train_steps(cfg, len(instance), len(classes or []), accelerator.num_processes)  # epochs → steps

    # -- the method's parameters, data on the device, optimizer
    pretrained = {id(p) for network in pipeline_modules(pipe) for p in network.parameters()}
    param_groups = method.prepare(pipe, stats_run)
    cast_for_mixed_precision(pipe, pretrained, [p for group in param_groups for p in group["params"]], cfg.mixed_precision)
    # What draws from torch's global RNG inside the loop (LoRA dropout) then draws the same in every run of this
    # config; checkpoints save and restore that RNG, so a resumed run continues it.
    torch.manual_seed(cfg.seed * 1000 + accelerator.process_index)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    instance_data = encode_examples(method, pipe, instance, resolution)
    class_data = encode_examples(method, pipe, classes, resolution) if classes else None
    encoders = text_encoders(pipe)
    if cfg.pre_compute_text_embeddings:
        # Every prompt is encoded now: free the accelerator's copy (diffusers deletes the encoders).
        for encoder in encoders:
            encoder.to("cpu")
    optimizer, lr_scheduler = make_optimizer(cfg, param_groups, accelerator.num_processes)
    # The encoders with trainable parameters go through accelerate (DDP refuses a module with none to train).
    trained = [i for i, e in enumerate(encoders) if method.trains_text_encoder and
               any(p.requires_grad for p in e.parameters())]
    unet, *prepared, optimizer = accelerator.prepare(pipe.unet, *(encoders[i] for i in trained), optimizer)
    for i, encoder in zip(trained, prepared):
        encoders[i] = encoder
    return Setup(
        accelerator=accelerator, pipe=pipe, method=method, unet=unet, text_encoders=encoders,
        optimizer=optimizer, lr_scheduler=lr_scheduler,
        params=[p for group in optimizer.param_groups for p in group["params"]],
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        generator=torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 1000 + accelerator.process_index),
        instance=instance_data, classes=class_data, stats_run=stats_run, heldout=heldout, resolution=resolution,
        resume_dir=resume_dir, lock=lock, cfg=cfg,
    )


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pipeline_modules(pipe) -> list[nn.Module]:
    """The pipeline's networks: UNet, VAE and its text encoder(s)."""
    return [pipe.unet, pipe.vae, *text_encoders(pipe)]


def cast_for_mixed_precision(pipe, pretrained: set[int], trained: list[nn.Parameter], mixed_precision: str) -> None:
    """diffusers' mixed-precision recipe: what the optimizer steps is float32 (a half-precision weight would round
    Adam's updates away), the pretrained weights nobody trains (``pretrained``: their ids) are stored in the
    autocast dtype (a frozen SDXL UNet in 5 GB instead of 10).

    Normalisation layers stay float32: CPU autocast runs layer_norm in float32 and refuses half parameters there,
    and they are a few kB. A half-precision pipeline needs autocast in its dtype (mixed_precision) to meet the
    float32 trained weights; without it, one line says so.
    """
    half = HALF_DTYPES.get(mixed_precision)
    loaded = pipe.unet.dtype
    if loaded in HALF_DTYPES.values() and loaded != half:
        name = {v: k for k, v in HALF_DTYPES.items()}[loaded]
        raise NullBoothError(f"mixed_precision: the pipeline's weights are {loaded}, expected mixed_precision "
                             f"'{name}' for them (got '{mixed_precision}'); set it, or load the pipeline in float32")
    for p in trained:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    if half is None:
        return
    frozen = pretrained - {id(p) for p in trained}
    for network in pipeline_modules(pipe):
        for module in network.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                continue
            for p in module.parameters(recurse=False):
                if id(p) in frozen and p.is_floating_point():
                    p.data = p.data.to(half)


def make_accelerator(cfg: Config) -> Accelerator:
    # Without CUDA, accelerate only runs several processes (torchrun / accelerate launch) when told to use the CPU.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerated = getattr(torch, "accelerator", None)
    has_device = accelerated.is_available() if accelerated is not None else torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and (multi_cpu or not has_device):
        # accelerate would silently train in float32 instead.
        raise NullBoothError("mixed_precision: fp16 needs a CUDA device and this machine trains on the CPU; use 'no' "
                             "or 'bf16' on CPU")
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
        # accelerate keeps one precision per process and raises for another: a second run in a notebook or a
        # script is a new run, so its precision replaces the last one (the process group is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=multi_cpu)


def prepare_output_dir(cfg: Config, accelerator: Accelerator) -> tuple[FolderLock | None, list[Path]]:
    """Check ``output_dir`` before anything is loaded; returns its lock (main process) and what ``overwrite``
    must delete once the set-up has succeeded.

    Refuses a file, an unwritable folder, a folder another nullbooth process trains into (its PID named), a
    diffusers model folder, and one that holds an earlier run's result or checkpoints — unless the run resumes
    (``resume_from_checkpoint``) or ``overwrite`` is set (which replaces only the names nullbooth writes;
    ``class_images/`` and anything else stays). Every process checks; the main process locks.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise NullBoothError(f"output_dir: {out} is a file; pass a folder (it is created if missing)")
    if cfg.overwrite and cfg.resume_from_checkpoint:
        raise NullBoothError("overwrite deletes the checkpoints resume_from_checkpoint would continue; set one of them")
    if (out / MODEL_INDEX).is_file():
        raise NullBoothError(f"output_dir: {out} holds a diffusers pipeline ({MODEL_INDEX}); train into another folder")
    lock = lock_folder(out, "training into it") if accelerator.is_main_process else None
    if lock is not None:
        remove_stale_temporaries(out)  # what a killed run's writers left; the lock says no writer is alive here
    earlier = earlier_results(out, cfg.logging_dir)
    if earlier and not cfg.resume_from_checkpoint and not cfg.overwrite:
        if lock is not None:
            lock.release()
        names = ", ".join(p.name for p in earlier[:4]) + (", …" if len(earlier) > 4 else "")
        raise NullBoothError(
            f"output_dir: {out} already holds an earlier training run ({names}); pass --overwrite (overwrite: true) "
            "to delete it and train anew, resume_from_checkpoint: latest to continue it, or choose another output_dir")
    return lock, earlier if cfg.overwrite else []


def earlier_results(output_dir: Path, logging_dir: str = "logs") -> list[Path]:
    """What an earlier run left in ``output_dir`` that a new run would mix with: its result files, checkpoints
    (finished or half-written), validation grids and tracker logs (when ``logging_dir`` lies inside it)."""
    if not output_dir.is_dir():
        return []
    results = [output_dir / name for name in RESULT_FILES if (output_dir / name).exists()]
    results += sorted(output_dir.glob(SUBJECT_CONCEPT_FILE.format("*")))  # a several-subject Perfusion run's concepts
    checkpoints = sorted(p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None)
    half_written = sorted(p for p in output_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp")
                          if p.is_dir() and checkpoint_step(Path(p.name[1:-4])) is not None)
    if not results and not checkpoints:
        return []  # validation grids or a half-written checkpoint alone: a run that never got anywhere
    logs = (output_dir / logging_dir).resolve()
    inside = logs != output_dir.resolve() and logs.is_relative_to(output_dir.resolve())
    extras = [output_dir / VALIDATION_DIR] + ([output_dir / logging_dir] if inside else [])
    return results + checkpoints + half_written + [p for p in extras if p.is_dir()]


def encode_examples(method: Method, pipe, examples: list[Example], resolution: int) -> Examples:
    """The VAE is frozen, so each image variant's ``q(z | x)`` is computed once; so is each prompt's encoding
    when the text encoders are frozen too (the method says), otherwise the loop encodes the token ids."""
    mean, std = latent_distributions(pipe.vae, examples)  # [M, 4, h, w] each
    count = torch.tensor([len(e.variants) for e in examples], device=mean.device)  # [N]
    first = torch.cumsum(count, 0) - count  # [N]
    sizes = variant_time_ids(examples, resolution).to(mean.device)  # [M, 6]
    return Examples(mean, std, prompt_inputs(method, pipe, [e.prompt for e in examples]), first, count, sizes)
