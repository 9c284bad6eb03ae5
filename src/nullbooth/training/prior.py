"""What the loop learns from, taken from the base model and the data before the method changes anything.

- the collection run whose statistics define the null spaces (:func:`statistics_run`);
- the instance examples of every subject, each with its own prompt (:func:`instance_examples`);
- the prior-preservation class examples of DreamBooth eq. 2 (:func:`class_examples`): the run's own
  generations with their prompts, or each subject's ``class_data_dir`` topped up by the base model;
- the held-out features the report measures leakage on (:func:`heldout_statistics`);
- the frozen VAE's ``q(z | x)`` and the frozen text encoders' encodings, computed once
  (:func:`latent_distributions`, :func:`prompt_inputs`), and each image variant's SDXL size conditioning
  (:func:`variant_time_ids`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from nullbooth import conditioning
from nullbooth.conditioning import Encoded
from nullbooth.config import Config, SubjectBlock
from nullbooth.dataset import (
    Augmentation,
    Example,
    collection_examples,
    generate_class_images,
    load_examples,
    read_image_folder,
)
from nullbooth.errors import NullBoothError
from nullbooth.methods.base import Method
from nullbooth.prompts import read_prompt_file
from nullbooth.report.observers import collection_observers
from nullbooth.runs.collect import collect, find_run
from nullbooth.runs.diagnostics import check_model
from nullbooth.runs.layout import read_manifest
from nullbooth.runs.plan import make_plan
from nullbooth.sampling import sample
from nullbooth.stats.capture import CrossAttentionLayer, record_inputs
from nullbooth.stats.moments import SecondMoment

log = logging.getLogger(__name__)


def statistics_run(cfg: Config, pipe, accelerator, *, create: bool, progress: bool = True) -> Path | None:
    """The collection run of this model and config: ``nullbooth.stats_run``, a matching run (collected first
    when ``create`` and none exists), or ``None`` (baselines without statistics)."""
    nb = cfg.nullbooth
    if nb.stats_run is not None:
        run = Path(nb.stats_run)
        manifest = read_manifest(run)
        if manifest.get("status") != "complete":
            raise NullBoothError(f"nullbooth.stats_run: {run} is incomplete (status {manifest.get('status')!r}); "
                                 "finish it with `nullbooth collect` or point at a complete run")
        check_model(run, pipe)  # refuses runs of other models / other layer shapes
        return run
    if nb.original_knowledge_prompts is None:
        return None
    if create:
        # Every process calls collect (it shares the sampling out under torchrun / accelerate launch and
        # returns the same run everywhere); a matching complete run is reused, a partial one resumed.
        return collect(cfg, pipe=pipe, progress=progress and accelerator.is_main_process,
                       observers=collection_observers(cfg))
    plan = make_plan(cfg, pipe, read_prompt_file(nb.original_knowledge_prompts))
    run = find_run(Path(nb.cov_matrices_output_dir), plan.key, complete=True)
    if run is None:
        log.info("no complete statistics run of this model and prompts under %s: the report leaves out the leakage "
                 "on preserved features (run `nullbooth collect` first to get it)", nb.cov_matrices_output_dir)
    return run


def augmentation(cfg: Config) -> Augmentation:
    """The variants every training image is encoded in (``center_crop``, ``random_flip``; crops seeded by ``seed``)."""
    return Augmentation(center_crop=cfg.center_crop, random_flip=cfg.random_flip, seed=cfg.seed)


def instance_examples(cfg: Config, resolution: int) -> list[Example]:
    """Every subject's instance images, subject after subject, each paired with its subject's ``instance_prompt``."""
    subjects = cfg.subject_list()
    return [e for i, s in enumerate(subjects)
            for e in load_examples(s.instance_data_dir, s.instance_prompt, resolution,
                                   _where(cfg, i, "instance_data_dir"), augmentation=augmentation(cfg),
                                   workers=cfg.dataloader_num_workers)]


def generation_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype class images are generated in (``prior_generation_precision``; ``None``: no autocast,
    the model's own dtype). fp16 is refused without CUDA, where it would silently not be used."""
    if cfg.prior_generation_precision == "fp16" and torch.device(device).type != "cuda":
        raise NullBoothError(f"prior_generation_precision: fp16 needs a CUDA device and this machine generates on "
                             f"{torch.device(device).type}; use fp32 or bf16 (or leave it unset)")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.prior_generation_precision or "")


def class_examples(cfg: Config, pipe, accelerator, stats_run: Path | None, resolution: int,
                   progress: bool = True) -> list[Example]:
    """Prior-preservation examples: the collection run's own generations (each with its prompt;
    ``num_class_images`` per subject) when the run kept them and no subject gives a ``class_data_dir``;
    otherwise, subject after subject, its ``class_data_dir`` topped up by the base model with its ``class_prompt``."""
    if not cfg.with_prior_preservation:
        return []
    subjects = cfg.subject_list()
    own_folders = any(s.class_data_dir is not None for s in subjects)
    if not own_folders and stats_run is not None and (stats_run / "generations").is_dir():
        prompts = run_prompts(stats_run)
        if prompts:
            found = collection_examples(stats_run, prompts, resolution, cfg.num_class_images * len(subjects),
                                        augmentation(cfg), cfg.dataloader_num_workers)
            if found:
                log.info("prior preservation: %d generation(s) of the collection run %s with their prompts",
                         len(found), stats_run)
                return found
    return [e for i, s in enumerate(subjects)
            for e in subject_class_examples(cfg, pipe, accelerator, i, s, resolution, progress)]


def subject_class_examples(cfg: Config, pipe, accelerator, index: int, subject: SubjectBlock, resolution: int,
                           progress: bool = True) -> list[Example]:
    """``num_class_images`` of subject ``index``'s ``class_data_dir`` (default ``<output_dir>/class_images``, with
    several subjects ``<output_dir>/class_images/<index>``), generated with its class prompt where missing."""
    default = Path(cfg.output_dir) / "class_images"
    folder = Path(subject.class_data_dir or (default / str(index) if len(cfg.subject_list()) > 1 else default))
    what = _where(cfg, index, "class_data_dir")
    have = len(read_image_folder(folder, what, allow_empty=True, workers=cfg.dataloader_num_workers))
    if have < cfg.num_class_images:
        if accelerator.is_main_process:
            log.info("generating %d class image(s) of %r into %s", cfg.num_class_images - have, subject.class_prompt,
                     folder)
            generate_class_images(pipe, subject.class_prompt, folder, cfg.num_class_images - have, start=have,
                                  resolution=resolution, steps=cfg.class_generation_steps,
                                  batch_size=cfg.sample_batch_size, seed=cfg.seed,
                                  autocast=generation_dtype(cfg, pipe.unet.device), progress=progress)
        accelerator.wait_for_everyone()
    return load_examples(folder, subject.class_prompt, resolution, what, limit=cfg.num_class_images,
                         augmentation=augmentation(cfg), workers=cfg.dataloader_num_workers)


def _where(cfg: Config, index: int, key: str) -> str:
    """How errors name a subject's key: ``instance_data_dir``, or ``subjects.1.instance_data_dir``."""
    return f"subjects.{index}.{key}" if cfg.subjects else key


def run_prompts(run_dir: Path) -> list[str] | None:
    """The prompts a run was collected on, when its prompt file is still there unchanged."""
    manifest = read_manifest(run_dir)
    path = manifest.get("prompts_file")
    try:
        prompts = read_prompt_file(path)
    except NullBoothError:
        return None
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return prompts if digest == manifest["identity"].get("prompts_sha256") else None


def prompt_inputs(method: Method, pipe, prompts: Sequence[str]) -> torch.Tensor | Encoded:
    """Token ids ``[N, E, 77]`` (row ``i``: prompt ``i`` for each of the ``E`` tokenizers) when the method trains a
    text encoder, else the fixed encodings (:class:`~nullbooth.conditioning.Encoded`: ``hidden [N, 77, D]``, SDXL's
    ``pooled [N, P]``), 16 prompts at a time."""
    ids = conditioning.tokenize(pipe, prompts).to(pipe.text_encoder.device)  # [E, N, 77]
    if method.trains_text_encoder:
        return ids.transpose(0, 1)
    encoders = conditioning.text_encoders(pipe)
    with torch.no_grad():
        return Encoded.cat([method.encode_prompt(encoders, ids[:, i:i + 16]) for i in range(0, len(prompts), 16)])


def variant_time_ids(examples: Sequence[Example], resolution: int) -> torch.Tensor:
    """SDXL's ``time_ids [M, 6]`` of every variant of every example, in :func:`latent_distributions`' row order:
    the image's original ``(h, w)``, the variant's crop ``(top, left)`` and the target ``(resolution, resolution)``
    (:func:`nullbooth.conditioning.time_ids`, as diffusers' ``train_dreambooth_lora_sdxl.py``). An example without
    recorded sizes counts as a whole ``resolution``² image."""
    original, crops = [], []
    for e in examples:
        original += [e.original_size or (resolution, resolution)] * len(e.variants)
        crops += list(e.crops_top_left) or [(0, 0)] * len(e.variants)
    return conditioning.time_ids(torch.tensor(original), torch.tensor(crops), (resolution, resolution))


@torch.no_grad()
def latent_distributions(vae, examples: Sequence[Example], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``q(z | x)`` for every variant of every example, example after example (the VAE is
    frozen: computed once), ``[M, 4, h, w]`` with ``M = Σ V`` (``N`` without augmentation)."""
    variants = [v for e in examples for v in e.variants]  # [3, H, W] each
    means, stds = [], []
    for i in range(0, len(variants), batch_size):
        pixels = torch.stack(variants[i:i + batch_size]).to(vae.device, vae.dtype)  # [b, 3, H, W]
        dist = vae.encode(pixels).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def heldout_statistics(cfg: Config, pipe, layers: Sequence[CrossAttentionLayer]) -> dict[tuple[str, str], SecondMoment]:
    """Second moments of the base model's attn2 inputs on the held-out prompts (``heldout_steps`` sampling
    steps, guidance on); k and v share one text statistic."""
    prompts = read_prompt_file(cfg.heldout_prompts, "heldout_prompts")
    features = [f for f in cfg.nullbooth.collect_features.selected()]
    hooked = sorted({"k" if f in ("k", "v") else f for f in features})
    stats: dict[tuple[str, str], SecondMoment] = {}
    text: list[SecondMoment] = []

    def sink(layer: CrossAttentionLayer, feature: str, x: torch.Tensor) -> None:
        if feature == "k":  # the same text encodings reach every layer: accumulate them once
            if layer.name != layers[0].name:
                return
            if not text:
                text.append(SecondMoment(x.shape[-1], device=x.device))
            text[0].add(x)
            return
        key = (layer.name, feature)
        if key not in stats:
            stats[key] = SecondMoment(x.shape[-1], device=x.device)
        stats[key].add(x)

    with record_inputs(layers, hooked, sink):  # the latents are not needed, only what the hooks saw
        sample(pipe, prompts, range(cfg.seed, cfg.seed + len(prompts)), steps=cfg.heldout_steps,
               guidance=cfg.nullbooth.guidance_scale, size=cfg.resolution,
               batch_size=cfg.nullbooth.collection_batch_size, output_type="latent")
    for layer in layers:
        for f in ("k", "v"):
            if f in features and text:
                stats[(layer.name, f)] = text[0]
    return stats
