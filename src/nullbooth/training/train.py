"""``nullbooth train``: the DreamBooth recipe in one loop you can read top to bottom.

The objective is DreamBooth's (Ruiz et al., CVPR 2023, eq. 2): the denoising loss on the instance
images with the identifier prompt, plus ``prior_loss_weight`` times the same loss on class images
with the class prompt. *What* is trained is a strategy from :mod:`nullbooth.methods.base` — the
null-space constrained ``nullbooth`` (DESIGN §2), or the ``dreambooth`` / ``lora`` baselines on the
same weights. accelerate supplies devices, mixed precision and multi-process data parallelism;
gradient accumulation is written out.

Determinism: the VAE and text encoder are frozen, so the latent distributions of the images are
computed once; every random draw of the loop (latent sample, noise, timestep) comes from one
generator per process whose state is checkpointed, and the batch order is a pure function of the
step (:func:`nullbooth.dataset.batch_indices`). Checkpoints are safetensors + JSON (accelerate's
``save_state`` pickles the optimizer and RNG states, which DESIGN §4 rules out), and a resumed run
ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nullbooth import __version__
from nullbooth.config import Config, check_training
from nullbooth.dataset import (
    Example,
    batch_indices,
    collection_examples,
    generate_class_images,
    load_examples,
    read_image_folder,
    tokenize,
)
from nullbooth.errors import NullBoothError
from nullbooth.filenames import CHECKPOINT_PREFIX
from nullbooth.filenames import TRAIN_CONFIG as CONFIG_COPY
from nullbooth.filenames import TRAIN_REPORT as REPORT
from nullbooth.io import load_tensors, read_json, save_tensors, write_json
from nullbooth.methods.adapters import relative_leakage, split_target
from nullbooth.methods.base import Method
from nullbooth.methods.registry import make_method
from nullbooth.prompts import read_prompt_file
from nullbooth.runs.layout import load_summed_statistics, read_manifest
from nullbooth.stats.capture import (
    CrossAttentionLayer,
    cross_attention_layers,
    record_inputs,
)
from nullbooth.stats.moments import SecondMoment
from nullbooth.stats.nullspace import empty_fix

log = logging.getLogger(__name__)

# Settings a checkpoint can only be resumed under (the rest, e.g. max_train_steps, may change).
RESUME_KEYS = ("method", "nullbooth_update", "lora_rank", "seed", "train_batch_size", "gradient_accumulation_steps",
               "instance_prompt", "class_prompt", "with_prior_preservation", "resolution")


# --------------------------------------------------------------------------- the loop


def train(cfg: Config, *, pipe=None, accelerator=None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` on the instance images; write the result and the report to ``cfg.output_dir``.

    Returns the report (also written to ``train_report.json``). ``pipe`` (a loaded base pipeline) and
    ``accelerator`` may be passed in, e.g. by tests and benchmarks; otherwise they are created here.
    ``on_step(step, loss)`` is called after every optimizer step (loggers, benchmarks).
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    check_training(cfg)
    # Without CUDA, accelerate only runs several processes (torchrun / accelerate launch) when told to use the CPU.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=multi_cpu)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    output_dir = Path(cfg.output_dir)
    resume_dir = find_checkpoint(output_dir, cfg.resume_from_checkpoint)  # fail before loading anything
    if pipe is None:
        from nullbooth.models import load_pipeline

        pipe = load_pipeline(cfg.pretrained_model_name_or_path, device=accelerator.device)
    pipe.to(accelerator.device)
    resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    method = make_method(cfg)
    instance = load_examples(cfg.instance_data_dir, cfg.instance_prompt, resolution, "instance_data_dir")

    # -- everything the base model must see before the method changes it
    stats_run = statistics_run(cfg, pipe, accelerator, create=method.name == "nullbooth", progress=progress)
    layers = cross_attention_layers(pipe.unet, cfg.nullbooth.cross_attention_layers)
    heldout = heldout_statistics(cfg, pipe, layers) if cfg.heldout_prompts and main else None
    classes = class_examples(cfg, pipe, accelerator, stats_run, resolution, progress)

    # -- the method's parameters, data on the device, optimizer
    param_groups = method.prepare(pipe, stats_run)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    # The VAE is frozen: each image's q(z | x) is computed once. So is each prompt's encoding when the
    # text encoder is frozen too (the method says); otherwise the loop encodes the token ids.
    inst_mean, inst_std = latent_distributions(pipe.vae, instance)  # [N, 4, h, w] each
    inst_text = prompt_inputs(method, pipe, [e.prompt for e in instance])  # [N, 77] ids or [N, 77, d] encodings
    if classes:
        cls_mean, cls_std = latent_distributions(pipe.vae, classes)
        cls_text = prompt_inputs(method, pipe, [e.prompt for e in classes])
    optimizer = torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
    if method.trains_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(pipe.unet, pipe.text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
        text_encoder = pipe.text_encoder
    params = [p for group in optimizer.param_groups for p in group["params"]]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scaling = pipe.vae.config.scaling_factor
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 1000 + rank)

    step, losses, step_seconds = 0, [], []
    if resume_dir is not None:
        step, losses = load_checkpoint(resume_dir, cfg, method, optimizer, lr_scheduler, generator, accelerator)
        log.info("resumed from %s at step %d", resume_dir, step)
    B, accum = cfg.train_batch_size, cfg.gradient_accumulation_steps
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc=f"train {method.name}", unit="step",
               disable=not (progress and main))
    unet.train()
    started = time.perf_counter()
    with method.context():
        while step < cfg.max_train_steps:
            tick = time.perf_counter()
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(accum):
                m = step * accum + micro  # micro-step index: the batch order is a function of it alone
                idx = batch_indices(len(instance), B, m, rank, world, cfg.seed)
                mean, std, prompt = inst_mean[idx], inst_std[idx], inst_text[idx]  # [B, 4, h, w], …, [B, 77(, d)]
                if classes:
                    cidx = batch_indices(len(classes), B, m, rank, world, cfg.seed + 1)
                    mean, std = torch.cat([mean, cls_mean[cidx]]), torch.cat([std, cls_std[cidx]])  # [2B, 4, h, w]
                    prompt = torch.cat([prompt, cls_text[cidx]])  # [2B, 77(, d)]
                eps = torch.randn(mean.shape, generator=generator, device=mean.device)
                latents = (mean + std * eps) * scaling  # a fresh sample of q(z | image), as encode() would draw
                noise = torch.randn(latents.shape, generator=generator, device=latents.device)  # ε
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=latents.device)  # [bsz]
                noisy = noise_scheduler.add_noise(latents, noise, t)  # √ᾱ_t z + √(1−ᾱ_t) ε
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, t)
                else:
                    target = noise
                # Gradients are all-reduced only on the last micro-step of an accumulation.
                with accelerator.no_sync(unet) if micro < accum - 1 else nullcontext():
                    with accelerator.autocast():
                        text = method.encode_prompt(text_encoder, prompt) if method.trains_text_encoder else prompt
                        pred = unet(noisy, t, text).sample.float()  # [bsz, 4, h, w]
                    if classes:  # DreamBooth eq. 2: instance loss + λ · prior-preservation loss
                        pred, pred_prior = pred.chunk(2)
                        target, target_prior = target.chunk(2)
                        loss = method.loss(pred, target, idx) + cfg.prior_loss_weight * F.mse_loss(
                            pred_prior, target_prior.float())
                    else:
                        loss = method.loss(pred, target, idx)
                    accelerator.backward(loss / accum)
                step_loss += accelerator.reduce(loss.detach(), "mean") / accum
            if not torch.isfinite(step_loss):
                raise NullBoothError(nan_message(cfg, step + 1, output_dir))
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step()  # nullbooth/projected: W ← W₀ + (W − W₀) P
            step += 1
            losses.append(float(step_loss))
            step_seconds.append(time.perf_counter() - tick)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(step, losses[-1])
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                save_checkpoint(output_dir, step, losses, cfg, method, optimizer, lr_scheduler, generator, accelerator)
            if cfg.validation_prompt and main and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps):
                validate(cfg, pipe, output_dir, step, resolution)
    bar.close()
    seconds = time.perf_counter() - started

    # -- output and report (main process; the weights are identical on every process)
    accelerator.wait_for_everyone()
    report: dict[str, Any] = {}
    if main:
        info = output_info(cfg, method, stats_run)
        report = build_report(cfg, method, stats_run, heldout, losses, info, seconds)
        report["step_seconds"] = step_seconds  # this session's steps (a resumed run times only its own)
        files = method.save(output_dir, info)
        report["files"] = [str(p) for p in files]
        write_json(output_dir / CONFIG_COPY, cfg.model_dump(mode="json"))
        write_json(output_dir / REPORT, report)
        write_report_html(output_dir, report)
    accelerator.wait_for_everyone()
    return report


def write_report_html(output_dir: Path, report: dict[str, Any]) -> Path:
    """``train_report.html``: the report in the run-report style — loss curve, leakage per weight, validation images."""
    from PIL import Image

    from nullbooth.report.visualize import render_training_report

    leakage = [{"layer": r["layer"], "weight": f"{r['feature']} ({where})", "leakage": r[key]}
               for r in report["weights"]
               for key, where in (("leak_preserved", "preserved"), ("leak_heldout", "held-out"))
               if r.get(key) is not None]
    images = [(f"validation, {p.stem}", Image.open(p)) for p in sorted((output_dir / "validation").glob("step-*.png"))]
    page = {"title": f"{report['method']} training report", "loss": report["losses"], "leakage": leakage,
            **{k: v for k, v in report.items() if k not in ("losses", "weights", "format")},
            "weights": report["weights"]}
    return render_training_report(page, output_dir / "train_report.html", images)


def nan_message(cfg: Config, step: int, output_dir: Path) -> str:
    last = latest_checkpoint(output_dir)
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return (f"the training loss became NaN/Inf at step {step}; stopped without applying that step ({keep}); "
            f"lower learning_rate (now {cfg.learning_rate or 'the method default'}), use mixed_precision 'no' or "
            "'bf16', then resume with resume_from_checkpoint: latest")


# --------------------------------------------------------------------------- inputs of the loop


def statistics_run(cfg: Config, pipe, accelerator, *, create: bool, progress: bool = True) -> Path | None:
    """The collection run of this model and config: ``nullbooth.stats_run``, a matching run (collected first
    when ``create`` and none exists), or ``None`` (baselines without statistics)."""
    from nullbooth.runs.diagnostics import check_model

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
    from nullbooth.report.observers import collection_observers
    from nullbooth.runs.collect import collect, find_run, make_plan

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


def class_examples(cfg: Config, pipe, accelerator, stats_run: Path | None, resolution: int,
                   progress: bool = True) -> list[Example]:
    """Prior-preservation examples: the collection run's own generations (each with its prompt) when the run
    kept them and no ``class_data_dir`` is given; otherwise ``class_data_dir``, topped up by the base model."""
    if not cfg.with_prior_preservation:
        return []
    if cfg.class_data_dir is None and stats_run is not None and (stats_run / "generations").is_dir():
        prompts = run_prompts(stats_run)
        if prompts:
            found = collection_examples(stats_run, prompts, resolution, cfg.num_class_images)
            if found:
                log.info("prior preservation: %d generation(s) of the collection run %s with their prompts",
                         len(found), stats_run)
                return found
    folder = Path(cfg.class_data_dir or Path(cfg.output_dir) / "class_images")
    have = len(read_image_folder(folder, "class_data_dir", allow_empty=True))
    if have < cfg.num_class_images:
        if accelerator.is_main_process:
            log.info("generating %d class image(s) of %r into %s", cfg.num_class_images - have, cfg.class_prompt, folder)
            generate_class_images(pipe, cfg.class_prompt, folder, cfg.num_class_images - have, start=have,
                                  resolution=resolution, steps=cfg.class_generation_steps,
                                  batch_size=cfg.sample_batch_size, seed=cfg.seed, progress=progress)
        accelerator.wait_for_everyone()
    return load_examples(folder, cfg.class_prompt, resolution, "class_data_dir", limit=cfg.num_class_images)


def run_prompts(run_dir: Path) -> list[str] | None:
    """The prompts a run was collected on, when its prompt file is still there unchanged."""
    import hashlib

    manifest = read_manifest(run_dir)
    path = manifest.get("prompts_file")
    try:
        prompts = read_prompt_file(path)
    except NullBoothError:
        return None
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return prompts if digest == manifest["identity"].get("prompts_sha256") else None


def prompt_inputs(method: Method, pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``[N, 77]`` when the method trains the text encoder, else the (fixed) encodings ``[N, 77, d]``."""
    ids = tokenize(pipe.tokenizer, prompts).to(pipe.text_encoder.device)
    if method.trains_text_encoder:
        return ids
    with torch.no_grad():
        return torch.cat([method.encode_prompt(pipe.text_encoder, ids[i:i + 16]) for i in range(0, len(ids), 16)])


@torch.no_grad()
def latent_distributions(vae, examples: Sequence[Example], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``q(z | x)`` for every example (the VAE is frozen: computed once), ``[N, 4, h, w]``."""
    means, stds = [], []
    for i in range(0, len(examples), batch_size):
        pixels = torch.stack([e.pixels for e in examples[i:i + batch_size]]).to(vae.device, vae.dtype)  # [b, 3, H, W]
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

    size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    batch = cfg.nullbooth.collection_batch_size
    with record_inputs(layers, hooked, sink):
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            generators = [torch.Generator(device=pipe.unet.device).manual_seed(cfg.seed + i + j) for j in range(len(chunk))]
            pipe(prompt=chunk, height=size, width=size, num_inference_steps=cfg.heldout_steps,
                 guidance_scale=cfg.nullbooth.guidance_scale, generator=generators, output_type="latent")
    for layer in layers:
        for f in ("k", "v"):
            if f in features and text:
                stats[(layer.name, f)] = text[0]
    return stats


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders (complete ones only), oldest first."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            suffix = p.name.removeprefix(CHECKPOINT_PREFIX)
            if p.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and (p / "trainer_state.json").is_file():
                found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def find_checkpoint(output_dir: Path, spec: str | None) -> Path | None:
    """``resume_from_checkpoint``: ``None``, ``"latest"`` or a checkpoint folder (absolute or in ``output_dir``)."""
    if spec is None:
        return None
    if spec == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise NullBoothError(f"resume_from_checkpoint: 'latest' but {output_dir} holds no checkpoint-<step> folder; "
                                 "train without resume_from_checkpoint, or point output_dir at the earlier run")
        return found
    for candidate in (Path(spec), output_dir / spec):
        if (candidate / "trainer_state.json").is_file():
            return candidate
    have = [p.name for p in checkpoint_dirs(output_dir)]
    raise NullBoothError(
        f"resume_from_checkpoint: expected a checkpoint folder (with trainer_state.json) at {spec}, found nothing; "
        f"use 'latest' or one of {have}" if have else
        f"resume_from_checkpoint: expected a checkpoint folder (with trainer_state.json) at {spec}, found nothing, "
        f"and {output_dir} has no checkpoints; remove resume_from_checkpoint to start fresh"
    )


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(output_dir: Path, step: int, losses: list[float], cfg: Config, method: Method, optimizer,
                    lr_scheduler, generator: torch.Generator, accelerator) -> Path:
    """``checkpoint-<step>/``: method state and optimizer moments (safetensors), one RNG file per process,
    ``trainer_state.json``. Written into a temporary folder and renamed, so a crash leaves the previous one."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_tensors(tmp / f"rng-{accelerator.process_index}.safetensors", _rng_tensors(generator))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        opt = optimizer.state_dict()
        tensors = {f"method.{k}": v for k, v in method.checkpoint_state().items()}
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in opt["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        save_tensors(tmp / "state.safetensors", tensors, {"format": "pt"})
        scaler = getattr(accelerator, "scaler", None)
        write_json(tmp / "trainer_state.json", {
            "format": "nullbooth-checkpoint", "nullbooth_version": __version__, "step": step, "losses": losses,
            "num_processes": accelerator.num_processes, "settings": {k: getattr(cfg, k) for k in RESUME_KEYS},
            "optimizer_param_groups": opt["param_groups"], "optimizer_scalars": scalars,
            "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler.state_dict() if scaler else None,
        })
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if cfg.checkpoints_total_limit is not None:
            for old in checkpoint_dirs(output_dir)[:-cfg.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, cfg: Config, method: Method, optimizer, lr_scheduler, generator: torch.Generator,
                    accelerator) -> tuple[int, list[float]]:
    """Restore everything :func:`save_checkpoint` wrote; returns ``(step, losses)``."""
    state = read_json(folder / "trainer_state.json", "a checkpoint state (trainer_state.json)")
    if state.get("format") != "nullbooth-checkpoint":
        raise NullBoothError(f"{folder} is not a nullbooth checkpoint (format={state.get('format')!r})")
    changed = [f"{k}: {state['settings'].get(k)!r} → {getattr(cfg, k)!r}" for k in RESUME_KEYS
               if state["settings"].get(k) != getattr(cfg, k)]
    if changed:
        raise NullBoothError(f"{folder} was written with other settings ({'; '.join(changed)}); resume with the "
                             "original values or start a fresh run")
    if state["num_processes"] != accelerator.num_processes:
        raise NullBoothError(f"{folder} was written by {state['num_processes']} process(es), this run has "
                             f"{accelerator.num_processes}; resume with the same number of processes")
    tensors, _ = load_tensors(folder / "state.safetensors", "checkpoint tensors (state.safetensors)")
    method.load_checkpoint_state({k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            opt_state.setdefault(int(index), {})[key] = value
    for index, values in state["optimizer_scalars"].items():
        opt_state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["optimizer_param_groups"]]
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise NullBoothError(f"{folder}: the optimizer state does not fit this run ({err}); resume with the original "
                             "configuration") from None
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("grad_scaler") and getattr(accelerator, "scaler", None):
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    rng, _ = load_tensors(folder / f"rng-{accelerator.process_index}.safetensors", "checkpoint RNG state")
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return int(state["step"]), list(state["losses"])


# --------------------------------------------------------------------------- validation, report


def validate(cfg: Config, pipe, output_dir: Path, step: int, resolution: int) -> Path:
    """Sample the validation prompt with the model as it is now; a grid in ``validation/step-<step>.png``."""
    from nullbooth.report.grids import image_grid

    generators = [torch.Generator(device=pipe.unet.device).manual_seed(cfg.seed + i)
                  for i in range(cfg.num_validation_images)]
    training = pipe.unet.training
    pipe.unet.eval()  # inference: e.g. Perfusion's i* EMA must not move while sampling
    try:
        images = pipe([cfg.validation_prompt] * cfg.num_validation_images, height=resolution, width=resolution,
                      num_inference_steps=cfg.generate.num_inference_steps,
                      guidance_scale=cfg.generate.guidance_scale, generator=generators).images
    finally:
        pipe.unet.train(training)
    path = output_dir / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    return path


def output_info(cfg: Config, method: Method, stats_run: Path | None) -> dict[str, Any]:
    """The common header of every output: what was trained from what, and with which software."""
    import accelerate
    import diffusers
    import peft
    import transformers

    nb = cfg.nullbooth
    return {
        "method": method.name,
        "pretrained_model_name_or_path": cfg.pretrained_model_name_or_path,
        "stats_run": str(stats_run) if stats_run else None,
        "nullspace_mode": nb.nullspace_mode, "nullspace_threshold": nb.nullspace_threshold,
        "instance_prompt": cfg.instance_prompt, "class_prompt": cfg.class_prompt,
        "max_train_steps": cfg.max_train_steps, "learning_rate": method.lr, "resolution": cfg.resolution,
        "versions": {"nullbooth": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__},
    }


def leakage_rows(method: Method, preserved: dict | None, heldout: dict | None) -> list[dict[str, Any]]:
    """Per trained weight: ``‖ΔW‖/‖W‖``, the leakage ``‖ΔW X₀‖/‖W X₀‖`` on the preserved (run) and held-out
    features, and for null-space methods the bound ``‖ΔW‖_F √λ_max(null) / ‖W X₀‖`` its threshold implies."""
    facts = method.report()
    changes = method.weight_changes()
    rows = []
    for path in facts or changes:
        layer, feature = split_target(path)
        row: dict[str, Any] = {"weight": path, "layer": layer, "feature": feature, **facts.get(path, {})}
        if path in changes:
            dW, W = (t.detach().to("cpu", torch.float64) for t in changes[path])
            row["delta_rel"] = float(dW.norm() / W.norm()) if W.norm() > 0 else math.inf
            if preserved and (layer, feature) in preserved:
                stat = preserved[(layer, feature)]
                row["leak_preserved"] = relative_leakage(dW, W, stat)
                if "lambda_max_null" in row:
                    denom = float(((W @ stat.moment()) * W).sum())
                    row["leak_bound"] = math.sqrt(float(dW.square().sum()) * row["lambda_max_null"] / denom) if denom > 0 else math.inf
            if heldout and (layer, feature) in heldout:
                row["leak_heldout"] = relative_leakage(dW, W, heldout[(layer, feature)])
        rows.append(row)
    return rows


def build_report(cfg: Config, method: Method, stats_run: Path | None, heldout: dict | None, losses: list[float],
                 info: dict[str, Any], seconds: float) -> dict[str, Any]:
    preserved = load_summed_statistics(stats_run) if stats_run else None
    rows = leakage_rows(method, preserved, heldout)
    warnings_ = []
    for row in rows:
        if row.get("null_dim") == 0:
            spectrum = [(row["lambda_min"], row["lambda_max"])] if "lambda_max" in row else []
            warnings_.append(f"{row['weight']}: the null space is empty ({cfg.nullbooth.nullspace_mode} threshold "
                             f"{cfg.nullbooth.nullspace_threshold:g}): nothing was learned there; "
                             f"{empty_fix(cfg.nullbooth.nullspace_mode, spectrum)}")
    for w in warnings_:
        log.warning(w)

    def summary(key: str) -> float | None:
        values = [r[key] for r in rows if key in r and r.get("trained", True)]
        return max(values) if values else None

    return {
        **info, "format": "nullbooth-train-report", "steps": len(losses), "seconds": seconds,
        "heldout_prompts": cfg.heldout_prompts,
        "summary": {"max_leak_preserved": summary("leak_preserved"), "max_leak_heldout": summary("leak_heldout"),
                    "max_leak_bound": summary("leak_bound"), "final_loss": losses[-1] if losses else None,
                    "trained_weights": sum(1 for r in rows if r.get("trained", True)), "weights": len(rows)},
        "weights": rows, "losses": losses, "warnings": warnings_,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what ``nullbooth train`` prints)."""
    def num(v: Any, fmt: str = ".3g") -> str:
        return "-" if v is None else format(v, fmt) if isinstance(v, float) else str(v)

    head = ["weight", "dim", "null", "|dW|/|W|", "leak prior", "bound", "leak held-out"]
    body = [[r["weight"].replace("transformer_blocks.", "tb.").replace("attentions.", "a."), num(r.get("dim")),
             num(r.get("null_dim")), num(r.get("delta_rel")), num(r.get("leak_preserved")), num(r.get("leak_bound")),
             num(r.get("leak_heldout"))] for r in report["weights"]]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *body]]
    s = report["summary"]
    losses = report["losses"]
    curve = ", ".join(f"{x:.4f}" for x in losses[:: max(1, len(losses) // 10)])
    lines += [f"method {report['method']}: {report['steps']} steps in {report['seconds']:.1f} s, final loss "
              f"{num(s['final_loss'], '.4f')}; max leakage on prior features {num(s['max_leak_preserved'])}, on held-out "
              f"prompts {num(s['max_leak_heldout'])}", f"loss curve: {curve}"]
    return "\n".join(lines)
