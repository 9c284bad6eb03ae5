"""``nullbooth train``: the DreamBooth recipe in one loop you can read top to bottom.

The objective is DreamBooth's (Ruiz et al., CVPR 2023, eq. 2): the denoising loss on the instance
images with the identifier prompt, plus ``prior_loss_weight`` times the same loss on class images
with the class prompt. *What* is trained is a strategy from :mod:`nullbooth.methods` — the
null-space constrained ``nullbooth`` (docs/design.md §2), ``perfusion``, or the baselines (``dreambooth``,
``attn2_finetune``, ``lora``, ``oft``). accelerate supplies devices, mixed precision and multi-process data parallelism;
gradient accumulation is written out.

:func:`train` is set-up (:mod:`nullbooth.training.setup`) → :func:`loop` → :func:`finish` (the method's files,
the report of :mod:`nullbooth.training.report` and the model card), holding ``output_dir``'s lock throughout.

Both pipeline families run this one loop: prompts are encoded by :meth:`Method.encode_prompt` (or once, in the
set-up, when no text encoder is trained) and the UNet is called with
:func:`nullbooth.conditioning.unet_conditioning` — on SDXL also the pooled text embedding and each image's size
micro-conditioning (original size, crop, target size; Podell et al. 2023, §2.2).

Determinism: the VAE and text encoders are frozen, so the latent distributions of the images are
computed once; every random draw of the loop (latent sample, noise, timestep) comes from one
generator per process whose state is checkpointed, and the batch order is a pure function of the
step (:func:`nullbooth.dataset.batch_indices`). Checkpoints are safetensors + JSON
(:mod:`nullbooth.training.checkpoint`), and a resumed run ends with the same weights, bit for bit, as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nullbooth.conditioning import Encoded, text_encoders, unet_conditioning
from nullbooth.config import Config
from nullbooth.dataset import batch_indices
from nullbooth.errors import NullBoothError
from nullbooth.filenames import TRAIN_CONFIG, TRAIN_REPORT
from nullbooth.io import write_json
from nullbooth.report.model_card import write_model_card
from nullbooth.runs.layout import load_summed_statistics
from nullbooth.runs.write import disk_errors
from nullbooth.training.checkpoint import load_checkpoint, save_checkpoint
from nullbooth.training.optim import instance_loss, min_snr_weights, prior_loss, tf32
from nullbooth.training.report import build_report, nan_message, output_info, validate, write_report_html
from nullbooth.training.setup import Setup, setup
from nullbooth.training.trackers import leakage_scalars, learning_rates, open_tracker, validation_interval

log = logging.getLogger(__name__)


def train(cfg: Config, *, pipe=None, accelerator=None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` on the instance images; write the result and the report to ``cfg.output_dir``.

    Returns the report (also written to ``train_report.json``). ``pipe`` (a loaded base pipeline) and
    ``accelerator`` may be passed in, e.g. by tests and benchmarks; otherwise they are created here.
    ``on_step(step, loss)`` is called after every optimizer step (loggers, benchmarks).
    """
    # -- set-up: data, method, optimizer; the checkpoint to resume from; output_dir's lock
    ts = setup(cfg, pipe=pipe, accelerator=accelerator, progress=progress)
    cfg = ts.cfg  # as trained: max_train_steps resolved from num_train_epochs
    with ts.lock or nullcontext():  # output_dir stays this process's until its result is written
        with tf32(cfg.allow_tf32):  # the flags are restored after the loop
            losses, step_seconds, seconds = loop(ts, cfg, progress, on_step)
        # -- finish: the method's files and the report
        report = finish(cfg, ts, losses, step_seconds, seconds=seconds)
    for encoder in text_encoders(ts.pipe):  # back from the CPU (pre_compute_text_embeddings): a whole pipeline
        encoder.to(ts.accelerator.device)
    return report


def loop(ts: Setup, cfg: Config, progress: bool, on_step: Callable[[int, float], None] | None,
         ) -> tuple[list[float], list[float], float]:
    """One optimizer step per iteration, from the resumed step to ``max_train_steps``, checkpointing and
    validating on schedule; returns every step's loss, this session's step times and its seconds."""
    accelerator, method, optimizer, lr_scheduler = ts.accelerator, ts.method, ts.optimizer, ts.lr_scheduler
    output_dir = Path(cfg.output_dir)
    validate_every = validation_interval(cfg, len(ts.instance), len(ts.classes) if ts.classes else 0,
                                         accelerator.num_processes)
    step, losses, step_seconds = 0, [], []
    if ts.resume_dir is not None:
        step, losses = load_checkpoint(ts.resume_dir, cfg, method, optimizer, lr_scheduler, ts.generator, accelerator)
        log.info("resumed from %s at step %d", ts.resume_dir, step)
    tracker = open_tracker(cfg, accelerator.is_main_process)  # a missing tracker package stops the run here
    # The preserved features' statistics, read once for every leakage the tracker logs.
    preserved = load_summed_statistics(ts.stats_run) if tracker.active and ts.stats_run else None
    ts.unet.train()
    started = time.perf_counter()
    with tracker, tqdm(total=cfg.max_train_steps, initial=step, desc=f"train {method.name}", unit="step",
                       disable=not (progress and accelerator.is_main_process)) as bar, method.context():
        while step < cfg.max_train_steps:
            tick = time.perf_counter()
            step_loss = accumulate_gradients(ts, cfg, step)
            if not torch.isfinite(step_loss):
                raise NullBoothError(nan_message(cfg, step + 1, output_dir))
            accelerator.clip_grad_norm_(ts.params, cfg.max_grad_norm)
            optimizer.step()
            rates = learning_rates(optimizer)  # the rates this step used; the scheduler sets the next step's
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step()  # nullbooth: W ← W₀ + (W − W₀) P (projected), the leakage budget
            step += 1
            losses.append(float(step_loss))
            step_seconds.append(time.perf_counter() - tick)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(step, losses[-1])
            tracker.log_scalars({"train/loss": losses[-1], **rates}, step)
            checkpointing = step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps
            if checkpointing:
                save_checkpoint(output_dir, step, losses, cfg, method, optimizer, lr_scheduler, ts.generator,
                                accelerator)
            validating = bool(cfg.validation_prompt) and (step % validate_every == 0 or step == cfg.max_train_steps)
            if validating and accelerator.is_main_process:
                with accelerator.autocast():  # the frozen weights may be half, the trained ones float32
                    images = validate(cfg, ts.pipe, output_dir, step, ts.resolution)
                tracker.log_images("validation", images, step)
            if tracker.active and (checkpointing or validating):
                tracker.log_scalars(leakage_scalars(method, preserved, ts.heldout), step)
    return losses, step_seconds, time.perf_counter() - started


def accumulate_gradients(ts: Setup, cfg: Config, step: int) -> torch.Tensor:
    """Backpropagate the DreamBooth loss (eq. 2) of optimizer step ``step``'s ``gradient_accumulation_steps``
    micro-batches; returns the step's loss, averaged over micro-steps and processes (a 0-d tensor)."""
    accelerator, method, scheduler = ts.accelerator, ts.method, ts.noise_scheduler
    accum, scaling = cfg.gradient_accumulation_steps, ts.pipe.vae.config.scaling_factor
    step_loss = torch.zeros((), device=accelerator.device)
    for micro in range(accum):
        idx, mean, std, prompt, sizes = micro_batch(ts, cfg, step * accum + micro)
        eps = torch.randn(mean.shape, generator=ts.generator, device=mean.device)
        latents = (mean + std * eps) * scaling  # [bsz, 4, h, w]: a fresh sample of q(z | image), as encode() would draw
        noise = torch.randn(latents.shape, generator=ts.generator, device=latents.device)  # ε [bsz, 4, h, w]
        if cfg.noise_offset > 0:  # offset noise (Guttenberg 2023): a per-image, per-channel shift of ε; drawn only
            # when asked, so default runs draw exactly what they always drew
            noise += cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=ts.generator,
                                                    device=latents.device)  # [bsz, 4, 1, 1]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=ts.generator, device=latents.device)  # [bsz]
        weights = min_snr_weights(scheduler, t, cfg.snr_gamma) if cfg.snr_gamma is not None else None  # [bsz]
        noisy = scheduler.add_noise(latents, noise, t)  # √ᾱ_t z + √(1−ᾱ_t) ε
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        # Gradients are all-reduced only on the last micro-step of an accumulation.
        with accelerator.no_sync(ts.unet) if micro < accum - 1 else nullcontext():
            with accelerator.autocast():
                # ids [bsz, E, 77] → [E, bsz, 77] for the E encoders
                text = method.encode_prompt(ts.text_encoders, prompt.transpose(0, 1)) if method.trains_text_encoder \
                    else prompt
                conditioning = unet_conditioning(ts.pipe, text, sizes, ts.resolution)
                dtype = ts.pipe.unet.dtype  # frozen weights may be half precision (mixed_precision)
                conditioning["encoder_hidden_states"] = conditioning["encoder_hidden_states"].to(dtype)
                pred = ts.unet(noisy.to(dtype), t, **conditioning).sample.float()  # [bsz, 4, h, w]
            if ts.classes is not None:  # DreamBooth eq. 2: instance loss + λ · prior-preservation loss
                pred, pred_prior = pred.chunk(2)
                target, target_prior = target.chunk(2)
                w, w_prior = weights.chunk(2) if weights is not None else (None, None)  # Min-SNR-γ, each term
                loss = instance_loss(method, pred, target, idx, w) + cfg.prior_loss_weight * prior_loss(
                    pred_prior, target_prior, w_prior)
            else:
                loss = instance_loss(method, pred, target, idx, weights)
            penalty = method.penalty()  # e.g. γ Σ L(ΔW)²; once per step in total, kept out of the logged loss
            accelerator.backward((loss if penalty is None else loss + penalty) / accum)
        step_loss += accelerator.reduce(loss.detach(), "mean") / accum
    return step_loss


def micro_batch(ts: Setup, cfg: Config, m: int,
                ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | Encoded, torch.Tensor]:
    """Micro-step ``m``'s examples on this process: the instance indices, then ``q(z | x)`` mean, std, prompt
    inputs and SDXL time ids of the instance examples followed, with prior preservation, by as many class examples
    (each image's time ids those of the variant drawn, :meth:`Examples.take`). The batch
    order is a function of ``m`` alone, so a resumed run continues it exactly; which crop / mirror image of an
    example is used is drawn from the loop's generator (checkpointed), and only when a set has such variants."""
    rank, world, B = ts.accelerator.process_index, ts.accelerator.num_processes, cfg.train_batch_size
    idx = batch_indices(len(ts.instance), B, m, rank, world, cfg.seed)
    mean, std, prompt, sizes = ts.instance.take(idx, ts.generator)  # [B, 4, h, w] each, [B, E, 77] | Encoded, [B, 6]
    if ts.classes is not None:
        cidx = batch_indices(len(ts.classes), B, m, rank, world, cfg.seed + 1)
        cmean, cstd, cprompt, csizes = ts.classes.take(cidx, ts.generator)
        mean, std, sizes = torch.cat([mean, cmean]), torch.cat([std, cstd]), torch.cat([sizes, csizes])  # [2B, …]
        prompt = Encoded.cat([prompt, cprompt]) if isinstance(prompt, Encoded) else torch.cat([prompt, cprompt])
    return idx, mean, std, prompt, sizes


def finish(cfg: Config, ts: Setup, losses: list[float], step_seconds: list[float], *, seconds: float) -> dict[str, Any]:
    """Write the method's result, the config and the report (main process; the weights are identical on every
    process); returns the report (empty on the other processes)."""
    accelerator = ts.accelerator
    accelerator.wait_for_everyone()
    report: dict[str, Any] = {}
    if accelerator.is_main_process:
        output_dir = Path(cfg.output_dir)
        info = output_info(cfg, ts.method, ts.stats_run)
        # The last checkpoint is always written before this point, so a failed write loses no training.
        with disk_errors(f"writing the result in {output_dir}", f"checkpoint-{len(losses)} is intact; free space "
                         "and resume with resume_from_checkpoint: latest (it finishes without training)"):
            files = ts.method.save(output_dir, info)  # first: the report then measures what was saved
            report = build_report(cfg, ts.method, ts.stats_run, ts.heldout, losses, info, seconds)
            report["step_seconds"] = step_seconds  # this session's steps (a resumed run times only its own)
            report["files"] = [str(p) for p in files]
            write_json(output_dir / TRAIN_CONFIG, cfg.model_dump(mode="json"))
            write_json(output_dir / TRAIN_REPORT, report)
            write_report_html(output_dir, report)
            write_model_card(output_dir, report, cfg.model_dump(mode="json"))
    accelerator.wait_for_everyone()
    return report
