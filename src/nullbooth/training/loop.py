"""``nullbooth train``: the DreamBooth recipe in one loop you can read top to bottom.

The objective is DreamBooth's (Ruiz et al., CVPR 2023, eq. 2): the denoising loss on the instance
images with the identifier prompt, plus ``prior_loss_weight`` times the same loss on class images
with the class prompt. *What* is trained is a strategy from :mod:`nullbooth.methods` — the
null-space constrained ``nullbooth`` (docs/design.md §2), or the ``dreambooth`` / ``lora`` baselines on the
same weights. accelerate supplies devices, mixed precision and multi-process data parallelism;
gradient accumulation is written out.

:func:`train` is set-up (:mod:`nullbooth.training.setup`) → :func:`loop` → :func:`finish` (the method's files,
the report of :mod:`nullbooth.training.report` and the model card), holding ``output_dir``'s lock throughout.

Determinism: the VAE and text encoder are frozen, so the latent distributions of the images are
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
import torch.nn.functional as F
from tqdm.auto import tqdm

from nullbooth.config import Config
from nullbooth.dataset import batch_indices
from nullbooth.errors import NullBoothError
from nullbooth.filenames import TRAIN_CONFIG, TRAIN_REPORT
from nullbooth.io import write_json
from nullbooth.report.model_card import write_model_card
from nullbooth.runs.write import disk_errors
from nullbooth.training.checkpoint import load_checkpoint, save_checkpoint
from nullbooth.training.report import build_report, nan_message, output_info, validate, write_report_html
from nullbooth.training.setup import Setup, setup

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
    with ts.lock or nullcontext():  # output_dir stays this process's until its result is written
        losses, step_seconds, seconds = loop(ts, cfg, progress, on_step)
        # -- finish: the method's files and the report
        return finish(cfg, ts, losses, step_seconds, seconds=seconds)


def loop(ts: Setup, cfg: Config, progress: bool, on_step: Callable[[int, float], None] | None,
         ) -> tuple[list[float], list[float], float]:
    """One optimizer step per iteration, from the resumed step to ``max_train_steps``, checkpointing and
    validating on schedule; returns every step's loss, this session's step times and its seconds."""
    accelerator, method, optimizer, lr_scheduler = ts.accelerator, ts.method, ts.optimizer, ts.lr_scheduler
    output_dir = Path(cfg.output_dir)
    step, losses, step_seconds = 0, [], []
    if ts.resume_dir is not None:
        step, losses = load_checkpoint(ts.resume_dir, cfg, method, optimizer, lr_scheduler, ts.generator, accelerator)
        log.info("resumed from %s at step %d", ts.resume_dir, step)
    ts.unet.train()
    started = time.perf_counter()
    with tqdm(total=cfg.max_train_steps, initial=step, desc=f"train {method.name}", unit="step",
              disable=not (progress and accelerator.is_main_process)) as bar, method.context():
        while step < cfg.max_train_steps:
            tick = time.perf_counter()
            step_loss = accumulate_gradients(ts, cfg, step)
            if not torch.isfinite(step_loss):
                raise NullBoothError(nan_message(cfg, step + 1, output_dir))
            accelerator.clip_grad_norm_(ts.params, cfg.max_grad_norm)
            optimizer.step()
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
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                save_checkpoint(output_dir, step, losses, cfg, method, optimizer, lr_scheduler, ts.generator,
                                accelerator)
            if (cfg.validation_prompt and accelerator.is_main_process
                    and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps)):
                validate(cfg, ts.pipe, output_dir, step, ts.resolution)
    return losses, step_seconds, time.perf_counter() - started


def accumulate_gradients(ts: Setup, cfg: Config, step: int) -> torch.Tensor:
    """Backpropagate the DreamBooth loss (eq. 2) of optimizer step ``step``'s ``gradient_accumulation_steps``
    micro-batches; returns the step's loss, averaged over micro-steps and processes (a 0-d tensor)."""
    accelerator, method, scheduler = ts.accelerator, ts.method, ts.noise_scheduler
    accum, scaling = cfg.gradient_accumulation_steps, ts.pipe.vae.config.scaling_factor
    step_loss = torch.zeros((), device=accelerator.device)
    for micro in range(accum):
        idx, mean, std, prompt = micro_batch(ts, cfg, step * accum + micro)
        eps = torch.randn(mean.shape, generator=ts.generator, device=mean.device)
        latents = (mean + std * eps) * scaling  # [bsz, 4, h, w]: a fresh sample of q(z | image), as encode() would draw
        noise = torch.randn(latents.shape, generator=ts.generator, device=latents.device)  # ε [bsz, 4, h, w]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=ts.generator, device=latents.device)  # [bsz]
        noisy = scheduler.add_noise(latents, noise, t)  # √ᾱ_t z + √(1−ᾱ_t) ε
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        # Gradients are all-reduced only on the last micro-step of an accumulation.
        with accelerator.no_sync(ts.unet) if micro < accum - 1 else nullcontext():
            with accelerator.autocast():
                text = method.encode_prompt(ts.text_encoder, prompt) if method.trains_text_encoder else prompt
                pred = ts.unet(noisy, t, text).sample.float()  # [bsz, 4, h, w]
            if ts.classes is not None:  # DreamBooth eq. 2: instance loss + λ · prior-preservation loss
                pred, pred_prior = pred.chunk(2)
                target, target_prior = target.chunk(2)
                loss = method.loss(pred, target, idx) + cfg.prior_loss_weight * F.mse_loss(
                    pred_prior, target_prior.float())
            else:
                loss = method.loss(pred, target, idx)
            penalty = method.penalty()  # e.g. γ Σ L(ΔW)²; once per step in total, kept out of the logged loss
            accelerator.backward((loss if penalty is None else loss + penalty) / accum)
        step_loss += accelerator.reduce(loss.detach(), "mean") / accum
    return step_loss


def micro_batch(ts: Setup, cfg: Config, m: int) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Micro-step ``m``'s examples on this process: the instance indices, then ``q(z | x)`` mean, std and prompt
    inputs of the instance examples followed, with prior preservation, by as many class examples. The batch
    order is a function of ``m`` alone, so a resumed run continues it exactly."""
    rank, world, B = ts.accelerator.process_index, ts.accelerator.num_processes, cfg.train_batch_size
    idx = batch_indices(len(ts.instance), B, m, rank, world, cfg.seed)
    mean, std = ts.instance.mean[idx], ts.instance.std[idx]  # [B, 4, h, w] each
    prompt = ts.instance.text[idx]  # [B, 77(, d)]
    if ts.classes is not None:
        cidx = batch_indices(len(ts.classes), B, m, rank, world, cfg.seed + 1)
        mean, std = torch.cat([mean, ts.classes.mean[cidx]]), torch.cat([std, ts.classes.std[cidx]])  # [2B, 4, h, w]
        prompt = torch.cat([prompt, ts.classes.text[cidx]])  # [2B, 77(, d)]
    return idx, mean, std, prompt


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
