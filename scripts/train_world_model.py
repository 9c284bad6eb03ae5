#!/usr/bin/env python
"""Train the base model ``tiny-sd`` from scratch on the shapes world (``nullbooth.world.scenes``).

A Stable-Diffusion-architecture pipeline (AutoencoderKL, UNet2DConditionModel with cross-attention,
CLIPTextModel with the real CLIP tokenizer) built by ``nullbooth.models.build_tiny_pipeline`` and trained
in three stages, each to a step budget (``RECIPE_STEPS``: the same steps under any load, the same weights on the
same machine — another CPU's kernels round differently and the run diverges; ``--vae-steps 0`` / ``--unet-steps 0``
end a stage by the time budget ``--minutes`` instead, see ``Clock``):

1. VAE: reconstruction (L1 + MSE) with a small KL term, a general-purpose codec: 30 % world images (half of
   them striped or dotted), 70 % the broad distribution of :mod:`nullbooth.world.broad` (any colour, texture,
   shape, outlines, several objects), so any subject is encodable although the base world never shows it; half-size
   crops first (``--vae-crops objects`` centres a broad image's crop on one of its objects), full images last.
2. Latents: a fixed set of world images — and, with ``--n-objects``, captioned objects of the whole space
   (:mod:`nullbooth.world.objects`: any shape, colour and pattern, worded with the nearest palette name) — is
   encoded once (posterior mean and std); each latent channel is centred and all are divided by one pooled scale
   (``--latent-scale channel``: each standardised on its own) by folding the affine map into the VAE's 1×1
   convolutions (``scaling_factor`` = 1).
3. UNet + text encoder: the denoising loss ``E_{t, z0, ε} ‖target − f_θ(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, τ_θ(y))‖²``
   with the scheduler's target — ε with Min-SNR-γ weights (Hang et al. 2023) for the shipped SD schedule,
   v = √ᾱ_t ε − √(1−ᾱ_t) z0 for ``--schedule zero-snr`` (Salimans & Ho 2022; Lin et al. 2024) —, 10 % caption
   dropout for classifier-free guidance, captions re-drawn on every presentation, and an EMA of the weights.
   The token embedding stays at its random init; after ``--text-frac`` of the stage the whole text encoder is
   frozen.

Then it saves an fp16 diffusers folder (plain ``StableDiffusionPipeline.from_pretrained`` loads it), measures
the VAE gate on held-out random subjects (``scripts/vae_gate.py``: ``vae_gate.json``, ``vae_grid.png``) and
the composition gate with the judge (``scripts/composition_gate.py``: ``composition_gate.json``, sample grids):
the fraction of generations for held-out shape × colour prompts whose shape and colour the judge reads as
prompted.

    python scripts/train_world_model.py             # the shipped tiny-sd, byte for byte (87 CPU-min alone, one thread)
    python scripts/train_world_model.py --smoke     # 1-minute end-to-end check (timed stages)
    python scripts/train_world_model.py --vae-steps 0 --unet-steps 0 --vae-batch 32 --vae-crops anywhere \
        --vae-full-frac 0.4 --latent-scale channel --minutes 82   # the 4,238-step model shipped before (timed stages)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from nullbooth.filenames import WORLD_MODEL_MARKER
from nullbooth.models import WORLD_ARCH, build_tiny_pipeline
from nullbooth.world.broad import broad_scene
from nullbooth.world.objects import OBJECT_SEED, object_arrays
from nullbooth.world.scenes import World, WorldConfig
from nullbooth.world.subjects import HELDOUT_SEED, random_subject, subject_instances, write_prompt_lists

log = logging.getLogger("train_world_model")
WORLD_SHARE = 0.3  # of the VAE's images; the rest are broad images
# The default recipe's step budgets (benchmarks/results/rebuild_vae20k): the same steps on any machine and load.
RECIPE_STEPS = {"vae": 20000, "unet": 9783}

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "nullbooth" / "data" / "models" / "tiny-sd"

class Clock:
    """The training budget, shared by the stages, in seconds of this process's CPU time (``--clock cpu``,
    default) or of wall-clock time (``--clock wall``).

    CPU time makes the budget independent of other load on a shared machine: with ``--threads 1`` on an
    idle machine the two agree; on a busy one the same amount of computation simply takes longer.
    """

    def __init__(self, minutes: float, kind: str = "cpu") -> None:
        self.now = time.process_time if kind == "cpu" else time.monotonic
        self.kind = kind
        self.t0 = self.now()
        self.total = minutes * 60.0

    def elapsed(self) -> float:
        return self.now() - self.t0

    def deadline(self, fraction_of_total: float) -> float:
        """An absolute deadline (on this clock) ``fraction_of_total`` of the budget from now, capped at the end."""
        return min(self.now() + fraction_of_total * self.total, self.t0 + self.total)


class Stage:
    """Where a training stage ends and how far along it is: after ``steps`` optimizer steps when given (not 0), else
    at ``deadline`` on the clock. ``fraction(step)`` drives the stage's schedules (learning rate, crops → full images).

    A time budget buys fewer steps on a slower machine (the previous model's VAE stage: 4,238 steps in 22 CPU-minutes
    where it was trained, about 2,100 on a machine half as fast), so the default recipe, and recipes compared, use step
    budgets: the same steps and schedules on any machine, and under any load.
    """

    def __init__(self, clock: Clock, deadline: float, steps: int | None = None) -> None:
        self.clock, self.start, self.deadline, self.steps = clock, clock.now(), deadline, steps or None

    def fraction(self, step: int) -> float:
        if self.steps is not None:
            return step / self.steps
        return (self.clock.now() - self.start) / max(self.deadline - self.start, 1e-6)

    def done(self, step: int) -> bool:
        return step >= self.steps if self.steps is not None else self.clock.now() >= self.deadline


def cosine_to_tenth(frac: float) -> float:
    """The learning-rate factor of every stage: a cosine from 1 at ``frac`` = 0 down to 0.1 at ``frac`` = 1."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


# --------------------------------------------------------------------------------------------- stage 1: VAE


def vae_batch(world: World, rng: np.random.Generator, n: int, pattern_world: World,
              crop: int | None = None, crops_at: str = "anywhere") -> torch.Tensor:
    """``n`` fresh images in [-1, 1], ``[n, 3, S, S]``: ``WORLD_SHARE`` world renders (half of them striped or
    dotted), the rest from the broad distribution (:mod:`nullbooth.world.broad`: any colour, texture and shape).

    With ``crop``, each image is cut to ``crop × crop`` around its shape (world renders) or, for broad images, around
    one of its objects (``crops_at="objects"``) or anywhere (``"anywhere"``), so the expensive full-resolution
    decoder layers train on the informative part at a fraction of the cost.
    """
    imgs = []
    res = world.config.resolution
    for _ in range(n):
        if rng.random() < WORLD_SHARE:
            w = pattern_world if rng.random() < 0.5 else world
            attrs = w.sample_attributes(rng, "all")
            a = np.asarray(w.render(attrs), dtype=np.float32)
            centre = (round(attrs.cx), round(attrs.cy))
        else:
            a, centres = broad_scene(rng, res)
            a = a.astype(np.float32)
            if crops_at == "objects":
                cx, cy = centres[int(rng.integers(len(centres)))]
                centre = (round(cx), round(cy))
            else:
                centre = tuple(int(v) for v in rng.integers(0, res, size=2))
        if crop is not None:
            jx, jy = rng.integers(-crop // 4, crop // 4 + 1, size=2)
            x0 = int(np.clip(centre[0] - crop // 2 + jx, 0, res - crop))
            y0 = int(np.clip(centre[1] - crop // 2 + jy, 0, res - crop))
            a = a[y0:y0 + crop, x0:x0 + crop]
        imgs.append(a)
    x = np.stack(imgs) / 127.5 - 1.0
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def subject_psnr(vae, seed: int, n_subjects: int = 40) -> dict:
    """PSNR (dB, per image, then median and 5th percentile) of posterior-mode reconstructions of every view of
    ``n_subjects`` random subjects of family ``seed`` — the VAE gate's family, never trained on."""
    from vae_gate import psnr, reconstruct  # scripts/vae_gate.py, beside this script

    views = [im for i in range(n_subjects) for im in subject_instances(5, random_subject(seed, i))]
    values = np.array([psnr(a, b) for a, b in zip(views, reconstruct(vae, views))])
    return {"psnr_median_db": float(np.median(values)), "psnr_p05_db": float(np.percentile(values, 5)),
            "psnr_min_db": float(values.min()), "images": int(len(values))}


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstruction term, L1 + MSE (per-pixel means)."""
    return F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x)


def train_vae(vae, world: World, stage: Stage, args) -> dict:
    """Stage 1: L1 + MSE reconstruction plus ``kl_weight`` × KL(q(z|x) ‖ N(0, I)) per latent element.

    The first ``1 − vae_full_frac`` of the stage trains on half-size crops (4× cheaper per image; the VAE is
    convolutional), the rest on full images so the mid-block attention sees the full latent grid.
    """
    rng = np.random.default_rng([args.seed, 1])
    with torch.no_grad():
        # Start with a near-deterministic posterior (σ ≈ 0.05): with σ ≈ 1 at init the decoder first sees
        # mostly noise, and the small KL weight takes thousands of steps to shrink it.
        vae.encoder.conv_out.bias[vae.config.latent_channels:].fill_(-6.0)
    pattern_world = World(WorldConfig(resolution=world.config.resolution, pattern_prob=1.0))
    # foreach: the per-tensor loop's arithmetic (bit-identical weights) at ~25 % less optimizer time on CPU.
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, foreach=True)
    vae.to(memory_format=torch.channels_last)  # oneDNN: crop steps ≈ 15 % faster, full-image steps the same (one thread)
    vae.train()
    step, recent = 0, []
    while not stage.done(step):
        frac = stage.fraction(step)
        full = frac >= 1.0 - args.vae_full_frac
        for g in opt.param_groups:  # cosine decay to 10 % over the stage
            g["lr"] = args.vae_lr * cosine_to_tenth(frac)
        crop = None if full else world.config.resolution // 2
        n = args.vae_batch // (2 if full else 1)
        x = vae_batch(world, rng, n, pattern_world, crop, args.vae_crops)  # [B, 3, S, S]
        x = x.contiguous(memory_format=torch.channels_last)
        post = vae.encode(x).latent_dist
        z = post.sample()  # [B, 4, S/f, S/f]
        x_hat = vae.decode(z).sample  # [B, 3, S, S]
        rec = reconstruction_loss(x_hat, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        recent.append(float(F.mse_loss(x_hat.detach(), x)))
        if step % 50 == 0:
            log.info("vae step %d  mse %.5f  kl %.3f  %s", step, np.mean(recent[-50:]), float(kl.detach()),
                     "full" if full else "crops")
    vae.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
    vae.eval()
    # Held-out reconstruction error in pixel units (0–255) on fresh images, and PSNR on held-out random subjects.
    with torch.no_grad():
        x = vae_batch(world, np.random.default_rng([args.seed, 99]), 64, pattern_world)
        x_hat = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mae = float((x_hat - x).abs().mean() * 127.5)
    return {"steps": step, "heldout_mae_0_255": mae, "heldout_subjects": subject_psnr(vae, HELDOUT_SEED)}


# ----------------------------------------------------------------------------------------- stage 2: latents


@torch.no_grad()
def encode_images(vae, source, n: int, chunk: int = 128):
    """Encode ``n`` images of ``source(m, start) → (uint8 [m, H, W, 3], attributes)`` once: posterior mean/std
    ``[n, C, h, w]`` + attributes."""
    means, stds, attrs = [], [], []
    for start in range(0, n, chunk):
        imgs, a = source(min(chunk, n - start), start)
        x = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        post = vae.encode(x).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
        attrs.extend(a)
    return torch.cat(means), torch.cat(stds), attrs


def training_latents(vae, world: World, n_images: int, n_objects: int, seed: int):
    """The denoiser's data: ``n_images`` world training-split images and ``n_objects`` captioned objects of the
    whole space (:mod:`nullbooth.world.objects`), encoded once."""
    def world_source(m, start):
        imgs, _, a = world.arrays(m, seed, "train", start=start)
        return imgs, a

    parts = [encode_images(vae, world_source, n_images)]
    if n_objects:
        parts.append(encode_images(vae, lambda m, start: object_arrays(world, m, OBJECT_SEED + seed, start), n_objects))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), [a for p in parts for a in p[2]]


def latent_divisors(spread: torch.Tensor, scale: str) -> torch.Tensor:
    """Per-channel divisors ``s`` (``[C]``) for :func:`standardise_latents` from the centred latent channels' standard
    deviations ``spread``: each channel to unit variance (``"channel"``), or all divided by one scale, their pooled
    standard deviation (``"global"``, SD's single ``scaling_factor``: quiet channels stay quiet in the denoising
    loss)."""
    if scale == "global":
        return spread.pow(2).mean().sqrt().expand_as(spread).clone()
    return spread


@torch.no_grad()
def standardise_latents(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold a per-channel affine map ``z' = (z − m) / s`` into the VAE's 1×1 ``quant_conv`` / ``post_quant_conv``.

    The SD 1.x pipeline only multiplies latents by ``scaling_factor``; it has no shift. Our VAE's raw latent
    channels have means up to ±2 (offsets that leak layout through the noise, see WORLD_SCHEDULE) and spreads
    that differ up to 5× (see :func:`latent_divisors`). Folding the map into the two 1×1 convolutions is exact:
    the encoder emits standardised moments, the decoder undoes the map first, reconstructions do not change, and
    ``scaling_factor`` becomes 1.
    """
    c = vae.config.latent_channels
    q, p = vae.quant_conv, vae.post_quant_conv
    # Encoder: μ' = (μ − m)/s,  log σ'² = log σ² − 2 log s.
    q.weight[:c] /= std.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2 * torch.log(std)
    # Decoder: W z + b with z = s z' + m  →  (W diag s) z' + (W m + b).
    p.bias += p.weight[:, :, 0, 0] @ mean
    p.weight *= std.view(1, c, 1, 1)
    vae.register_to_config(scaling_factor=1.0)


# ---------------------------------------------------------------------------------------- stage 3: denoiser


class EMA:
    """Exponential moving average of parameters with the usual warm-up ``min(decay, (1+n)/(10+n))``."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (twice restores the live ones)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def compiled(module: torch.nn.Module, enable: bool):
    """``torch.compile(module)`` (≈ 30 % faster UNet steps on CPU, ≈ 2 min to compile) or ``module`` itself.

    Compilation runs in this process (``compile_threads = 1``) so its cost counts against the CPU-time
    budget; without a working C++ toolchain it falls back to eager mode.
    """
    if not enable:
        return module
    try:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        return torch.compile(module)
    except Exception as err:  # compile errors surface at the first call too: see train_denoiser
        log.warning("torch.compile unavailable (%s); training eagerly", err)
        return module


class Tokens:
    """Caption → CLIP ids ``[77]``, cached (captions repeat often)."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tok(missing, padding="max_length", max_length=self.tok.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


class FrozenEncodings:
    """Caption → the frozen text encoder's output ``τ_θ(y)`` (``[77, D]``), computed once per distinct caption.

    A frozen encoder's output never changes and captions repeat: the default stage draws ~313k captions, ~83k of them
    distinct (73 % hits), and the encoder's forward is ~65 ms of a ~370 ms step (batch 32, one thread). A row computed
    in a smaller batch is bit-identical to the same row of a full batch on CPU (checked for every batch size 1–32 on
    the machine the recipe was measured on), so the cache changes the speed, not the trained weights. It holds
    ``77·D·4`` bytes per caption (39 KB at D = 128, ~3.3 GB for the default stage) up to ``max_bytes``; captions past
    the cap are encoded every time.
    """

    def __init__(self, text_encoder, tokens: Tokens, max_bytes: float) -> None:
        self.encoder, self.tokens, self.max_bytes = text_encoder, tokens, max_bytes
        self.rows: dict[str, torch.Tensor] = {}
        self.bytes = 0

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.rows]
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            enc = self.encoder(self.tokens(missing))[0]  # [m, 77, D]
            fresh = dict(zip(missing, enc))
            size = enc.numel() * enc.element_size()
            if self.bytes + size <= self.max_bytes:
                self.rows.update(fresh)
                self.bytes += size
        return torch.stack([fresh[c] if c in fresh else self.rows[c] for c in captions])


def train_denoiser(pipe, world: World, means, stds, attrs, scale: float, clock: Clock, stage: Stage,
                   args) -> dict:
    """Stage 3: v- or ε-prediction (the scheduler's), caption dropout and EMA; the text encoder freezes late."""
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor

    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.set_attn_processor(AttnProcessor())  # plain bmm attention: faster than SDPA on CPU for 1–2 heads
    unet.to(memory_format=torch.channels_last)  # oneDNN convolutions: 15 % faster steps (measured, one thread)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_sched.alphas_cumprod.float()  # ᾱ_t, [T]
    snr = alphas_cumprod / (1 - alphas_cumprod)  # SNR(t) = ᾱ_t / (1 − ᾱ_t)
    v_prediction = noise_sched.config.prediction_type == "v_prediction"
    unet_fwd = compiled(unet, args.compile)
    tokens = Tokens(pipe.tokenizer)
    frozen_encodings = FrozenEncodings(text_encoder, tokens, args.text_cache_gb * 2**30)
    rng = np.random.default_rng([args.seed, 3])
    gen = torch.Generator().manual_seed(args.seed)

    # The token embedding stays at its random initialisation: distinct random vectors are all the layers above
    # need, and a dense Adam update of all 49,408 rows (6.3 M parameters, ~100 of them ever used) cost ~40 %
    # of a training step (measured: 0.86 s vs 0.38 s for the UNet's forward + backward, batch 32, one thread).
    text_encoder.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99), foreach=True)  # see train_vae
    ema = EMA([unet, text_encoder], args.ema)
    unet.train()
    text_encoder.train()
    t_start = clock.now()
    text_frozen = False
    n = means.shape[0]
    step, recent = 0, []
    last_snapshot = clock.now()
    while not stage.done(step):
        frac = stage.fraction(step)
        if not text_frozen and frac >= args.text_frac:
            text_encoder.requires_grad_(False)
            text_encoder.eval()
            text_frozen = True
            log.info("step %d: text encoder frozen", step)
        # Learning rate: linear warm-up, then cosine to 10 % by budget fraction.
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * cosine_to_tenth(frac)
        for g in opt.param_groups:
            g["lr"] = lr

        idx = rng.integers(0, n, size=args.batch)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale  # [B, 4, h, w]
        captions = [world.random_caption(attrs[i], rng) if rng.random() >= args.uncond_prob else "" for i in idx]
        if text_frozen:
            enc = frozen_encodings(captions)  # [B, 77, D]
            enc.requires_grad_(True)  # same autograd signature as before: no recompilation of the UNet
        else:
            enc = text_encoder(tokens(captions))[0]
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=gen)
        zt = noise_sched.add_noise(z0, eps, t).contiguous(memory_format=torch.channels_last)  # √ᾱ_t z0 + √(1−ᾱ_t) ε
        try:
            pred = unet_fwd(zt, t, enc).sample  # ε_θ, [B, 4, h, w]
        except Exception as err:  # compilation happens at the first call; fall back rather than lose the run
            if unet_fwd is unet:
                raise
            log.warning("torch.compile failed (%s); training eagerly", str(err).splitlines()[0][:200])
            unet_fwd = unet
            pred = unet(zt, t, enc).sample
        if v_prediction:
            # v = √ᾱ_t ε − √(1−ᾱ_t) z0 (Salimans & Ho 2022); unweighted, i.e. (1 + SNR)-weighted in z0 terms,
            # which keeps the weight of t = T (SNR = 0, where the layout is decided) at 1.
            per = F.mse_loss(pred, noise_sched.get_velocity(z0, eps, t), reduction="none").mean(dim=(1, 2, 3))
            loss = per.mean()
        else:
            per = F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))  # [B]
            weight = torch.clamp(snr[t], max=args.min_snr_gamma) / snr[t]  # Min-SNR-γ for ε-prediction
            loss = (weight * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        recent.append(float(per.detach().mean()))
        if args.snapshot_every and clock.now() - last_snapshot >= args.snapshot_every * 60:
            # Intermediate EMA models, to read the learning curve off the quality gate later.
            last_snapshot = clock.now()
            ema.swap()
            folder = args.out.with_name(f"{args.out.name}.snap-{(clock.now() - clock.t0) / 60:04.1f}min")
            snap = copy.deepcopy(pipe)
            snap.unet.set_default_attn_processor()
            snap.unet.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
            snap.to(torch.float16).save_pretrained(folder, safe_serialization=True)
            ema.swap()
            log.info("snapshot %s at step %d", folder, step)
        if step % 100 == 0:
            log.info("unet step %d  mse %.4f  lr %.2e  %.2fs/step", step, np.mean(recent[-100:]), lr,
                     (clock.now() - t_start) / step)
    ema.copy_to()
    unet.set_default_attn_processor()
    unet.to(memory_format=torch.contiguous_format)
    unet.eval()
    text_encoder.eval()
    return {"steps": step, "samples_seen": step * args.batch, "final_mse": float(np.mean(recent[-200:] or [0]))}


# --------------------------------------------------------------------------------------------- evaluation


def mark_float32_default(folder: Path) -> None:
    """Make a plain ``from_pretrained(folder)`` load every component in float32.

    diffusers upcasts fp16 files to float32 unless told otherwise, but transformers 5 loads a model in the
    ``dtype`` its config records (``"auto"``); a float16 text encoder next to a float32 UNet then fails in
    the first matmul. The weights stay fp16 on disk (size); only the recorded default changes.
    """
    cfg_path = folder / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------- main


def with_vae_widths(arch, widths: tuple[int, ...]):
    """``arch`` with VAE block widths ``widths``: each block after the first halves the 64-px side."""
    return replace(arch, vae_channels=widths, latent_size=64 // 2 ** (len(widths) - 1))


def with_vae_geometry(arch, vae_config, explicit: bool):
    """``arch`` with the latent channels and VAE widths of a VAE taken from a saved model, so the UNet is built
    for its latents; an explicit ``--latent-channels`` that disagrees with the VAE is refused."""
    c = int(vae_config.latent_channels)
    if explicit and c != arch.latent_channels:
        raise SystemExit(f"error: --latent-channels {arch.latent_channels} does not match the --vae-from VAE, which "
                         f"has {c} latent channels; drop --latent-channels or pass {c}")
    return with_vae_widths(replace(arch, latent_channels=c), tuple(int(w) for w in vae_config.block_out_channels))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help=f"output diffusers folder (default {DEFAULT_OUT})")
    p.add_argument("--minutes", type=float, default=90.0,
                   help="time budget in minutes of --clock time for stages given 0 steps (evaluation excluded)")
    p.add_argument("--smoke", action="store_true", help="tiny end-to-end run (~1 min) into outputs/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="budget in CPU time of this process (robust to other load) or wall-clock time")
    p.add_argument("--vae-frac", type=float, default=0.27, help="fraction of the budget for the VAE")
    p.add_argument("--vae-steps", type=int, default=None,
                   help=f"VAE optimizer steps (default {RECIPE_STEPS['vae']}; 0: its share of --minutes instead)")
    p.add_argument("--unet-steps", type=int, default=None,
                   help=f"UNet optimizer steps (default {RECIPE_STEPS['unet']}; 0: the rest of --minutes instead)")
    p.add_argument("--vae-batch", type=int, default=8, help="crops per VAE step (half as many full images)")
    p.add_argument("--vae-crops", choices=("objects", "anywhere"), default="objects",
                   help="where the VAE's crops of broad images are centred: on one of their objects or anywhere")
    p.add_argument("--vae-full-frac", type=float, default=0.2, help="last fraction of the VAE stage on full images")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--latent-scale", choices=("channel", "global"), default="global",
                   help="standardise each latent channel, or centre each and divide all by one scale")
    p.add_argument("--n-images", type=int, default=24000, help="encoded world training images")
    p.add_argument("--n-objects", type=int, default=0, help="encoded captioned objects of the whole space")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--text-frac", type=float, default=0.0, help="train the text encoder for this fraction")
    p.add_argument("--text-cache-gb", type=float, default=4.0,
                   help="memory for the frozen text encoder's outputs per distinct caption (0: encode every step)")
    p.add_argument("--eval-n", type=int, default=500, help="prompts per composition-gate split")
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--judge", type=str, default=None, help="judge folder (default: the shipped judge)")
    p.add_argument("--unet-channels", type=str, default=None, help="e.g. 32,64,64 (default: nullbooth.models.WORLD_ARCH)")
    p.add_argument("--attention-levels", type=str, default=None,
                   help="UNet levels with cross-attention, e.g. 0,1 (default: nullbooth.models.WORLD_ARCH's)")
    p.add_argument("--vae-channels", type=str, default=None, help="e.g. 16,32,64,64 (latent = 64 / 2^(n−1))")
    p.add_argument("--latent-channels", type=int, default=None, help="VAE latent channels (default: WORLD_ARCH's)")
    p.add_argument("--schedule", choices=("sd", "ddpm", "zero-snr"), default=None,
                   help="noise schedule (default: nullbooth.models.WORLD_ARCH's), see TinyArch.schedule")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the UNet for training (default on)")
    p.add_argument("--snapshot-every", type=float, default=0.0, help="save EMA snapshots every N minutes")
    p.add_argument("--vae-from", type=Path, default=None, help="take the VAE of this saved model (skip stage 1)")
    p.add_argument("--init", type=Path, default=None, help="resume from a saved folder: skip the VAE stage")
    args = p.parse_args(argv)
    for stage, steps in RECIPE_STEPS.items():  # a smoke run is timed; any other counts steps unless told 0
        given = getattr(args, f"{stage}_steps")
        if given is None:
            setattr(args, f"{stage}_steps", 0 if args.smoke else steps)
        elif given < 0:
            p.error(f"expected --{stage}-steps ≥ 0, got {given}")
    if args.smoke:
        args.minutes = min(args.minutes, 1.0)
        args.n_images = min(args.n_images, 256)
        args.n_objects = min(args.n_objects, 256)
        args.eval_n = min(args.eval_n, 10)
        args.eval_steps = min(args.eval_steps, 5)
        args.warmup = 10
        args.compile = False
        args.out = args.out or REPO / "outputs" / "tiny-sd-smoke"
    args.out = args.out or DEFAULT_OUT
    arch = WORLD_ARCH
    if args.unet_channels:
        arch = replace(arch, unet_channels=tuple(int(c) for c in args.unet_channels.split(",")))
    if args.attention_levels:
        arch = replace(arch, attention_levels=tuple(int(c) for c in args.attention_levels.split(",")))
    if args.vae_channels:
        arch = with_vae_widths(arch, tuple(int(c) for c in args.vae_channels.split(",")))
    if args.latent_channels is not None:
        if args.latent_channels < 1:
            p.error(f"--latent-channels must be at least 1, got {args.latent_channels}")
        arch = replace(arch, latent_channels=args.latent_channels)
    if args.schedule:
        arch = replace(arch, schedule=args.schedule)
    args.arch = arch
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock = Clock(args.minutes, args.clock)
    wall0 = time.monotonic()
    arch = args.arch
    world = World(WorldConfig(resolution=arch.latent_size * 2 ** (len(arch.vae_channels) - 1)))

    if args.init is not None:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.init, dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        vae_info = {"resumed_from": str(args.init)}
    elif args.vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", dtype=torch.float32)
        arch = args.arch = with_vae_geometry(arch, vae.config, explicit=args.latent_channels is not None)
        pipe = build_tiny_pipeline(arch)
        pipe.register_modules(vae=vae)
        vae_info = {"vae_from": str(args.vae_from)}
    else:
        pipe = build_tiny_pipeline(arch)
        log.info("stage 1: VAE for %s",
                 f"{args.vae_steps} steps" if args.vae_steps else f"{args.vae_frac * args.minutes:.1f} min")
        vae_info = train_vae(pipe.vae, world, Stage(clock, clock.deadline(args.vae_frac), args.vae_steps), args)
        log.info("vae: %s", vae_info)
    pipe.vae.requires_grad_(False)

    log.info("stage 2: encoding %d world images and %d objects", args.n_images, args.n_objects)
    means, stds, attrs = training_latents(pipe.vae, world, args.n_images, args.n_objects, seed=args.seed)
    if args.init is None:  # a resumed model is standardised already
        m, spread = means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3))  # per channel, [C]
        sd = latent_divisors(spread, args.latent_scale)
        log.info("latent channel means %s stds %s → divided by %s in the VAE", m.tolist(), spread.tolist(), sd.tolist())
        standardise_latents(pipe.vae, m, sd)
        means = (means - m[None, :, None, None]) / sd[None, :, None, None]
        stds = stds / sd[None, :, None, None]
    scale = float(pipe.vae.config.scaling_factor)
    log.info("latents: mean %.3f std %.3f, scaling_factor %.3f (%.0fs elapsed)", float(means.mean()),
             float(means.std()), scale, clock.elapsed())

    log.info("stage 3: UNet + text encoder until the budget ends")
    den_info = train_denoiser(pipe, world, means, stds, attrs, scale, clock,
                              Stage(clock, clock.t0 + clock.total, args.unet_steps), args)
    train_seconds, wall_seconds = clock.elapsed(), time.monotonic() - wall0
    log.info("denoiser: %s; training took %.1f %s-min (%.1f wall-min)", den_info, train_seconds / 60,
             clock.kind, wall_seconds / 60)

    # Save fp16 weights: the folder is what users load; the eval below reloads it to test exactly that.
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    mark_float32_default(tmp)
    write_prompt_lists(tmp / "prompts")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp)  # exactly what a user does
    pipe.set_progress_bar_config(disable=True)

    info = {
        "arch": {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.__dict__.items()},
        "world": {"resolution": world.config.resolution, "held_out": [list(p) for p in world.config.held_out]},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "arch"},
        "vae": vae_info, "denoiser": den_info, "train_minutes": round(train_seconds / 60, 2),
        "clock": clock.kind, "train_wall_minutes": round(wall_seconds / 60, 2),
        "threads": args.threads,
    }
    try:
        from nullbooth.world.judge import load_judge

        judge = load_judge(args.judge)
    except Exception as err:  # the gate is informative; a missing judge must not lose an hour of training
        log.warning("no judge, skipping the quality gate: %s", err)
        judge = None
    if judge is not None:
        t0 = time.monotonic()
        from composition_gate import SEED, composition_gate, save_grid  # scripts/composition_gate.py, beside this
        from vae_gate import vae_gate  # scripts/vae_gate.py, beside this script

        gate, heldout, train = composition_gate(pipe, judge, args.eval_n, args.eval_steps, args.guidance,
                                                seed=SEED + args.seed)
        save_grid(heldout[:50], tmp / "heldout_grid.png")
        save_grid(train[:50], tmp / "train_grid.png")
        gate["seconds"] = round(time.monotonic() - t0, 1)
        (tmp / "composition_gate.json").write_text(json.dumps(gate, indent=2) + "\n")
        log.info("composition gate: %s", json.dumps(gate))

        vae_result, grid = vae_gate(pipe.vae, judge)
        grid.save(tmp / "vae_grid.png")
        (tmp / "vae_gate.json").write_text(json.dumps(vae_result, indent=2) + "\n")
        log.info("vae gate: %s", json.dumps(vae_result))
    (tmp / WORLD_MODEL_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*.safetensors")) / 2**20
    log.info("saved %s (%.1f MB of safetensors)", args.out, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
