"""diffusers' DreamBooth training options, each as ``train_dreambooth.py`` / ``train_dreambooth_lora.py`` does it.

- the optimizer: AdamW, bitsandbytes' 8-bit AdamW (``use_8bit_adam``) or Prodigy (Mishchenko & Defazio 2023,
  ``optimizer: prodigy``), with ``scale_lr`` and the learning-rate schedule (:func:`make_optimizer`);
- ``num_train_epochs`` → ``max_train_steps`` (:func:`resolve_train_steps`);
- Min-SNR-γ loss weighting (Hang et al., ICCV 2023; :func:`min_snr_weights`, :func:`instance_loss`,
  :func:`prior_loss`);
- ``allow_tf32`` while training (:func:`tf32`).

One difference in bookkeeping, not in effect: diffusers' accelerate-prepared scheduler steps once per process
per optimizer step, so its scripts multiply ``lr_warmup_steps`` and ``max_train_steps`` by the number of
processes; our loop steps the scheduler once per optimizer step, so both are passed as they are and the
learning rate at optimizer step ``k`` is the same as diffusers'.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.methods.base import Method, ParamGroups

log = logging.getLogger(__name__)

PRODIGY_LOW_LR = 0.1  # diffusers warns at or below this: Prodigy's lr multiplies its own step-size estimate d


# --------------------------------------------------------------------------- optimizer and schedule


def make_optimizer(cfg: Config, param_groups: ParamGroups, num_processes: int = 1) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over the method's parameter groups (``scale_lr`` applied to every group) and the
    learning-rate schedule over ``max_train_steps`` (``lr_num_cycles``, ``lr_power`` as diffusers passes them)."""
    from diffusers.optimization import get_scheduler

    groups = scaled_groups(cfg, param_groups, num_processes)
    if cfg.optimizer == "prodigy":
        optimizer = _prodigy(cfg, groups)
    else:
        optimizer_class = _adamw_8bit(groups) if cfg.use_8bit_adam else torch.optim.AdamW
        optimizer = optimizer_class(groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles,
                                 power=cfg.lr_power)
    return optimizer, lr_scheduler


def scaled_groups(cfg: Config, param_groups: ParamGroups, num_processes: int) -> ParamGroups:
    """``scale_lr``: every group's lr × train_batch_size × gradient_accumulation_steps × processes, the linear
    scaling rule diffusers applies (to ``learning_rate``; here to the text encoder's group too)."""
    if not cfg.scale_lr:
        return param_groups
    factor = cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes
    return [{**group, "lr": group["lr"] * factor} for group in param_groups]


def _prodigy(cfg: Config, groups: ParamGroups) -> torch.optim.Optimizer:
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise NullBoothError("optimizer: 'prodigy' needs the prodigyopt package, which is not installed; run "
                             "`pip install prodigyopt` (or `pip install nullbooth[prodigy]`), or use optimizer: adamw") from None
    lr = groups[0]["lr"]
    if any(group["lr"] != lr for group in groups):
        # Prodigy refuses groups with different rates; diffusers gives the text encoder learning_rate too.
        log.warning("optimizer prodigy: every parameter group trains at the first group's lr %g (Prodigy estimates "
                    "one step size for all; text_encoder_lr and per-group rates are not used)", lr)
        groups = [{**group, "lr": lr} for group in groups]
    if lr <= PRODIGY_LOW_LR:
        log.warning("optimizer prodigy: learning rate %g is too low; with Prodigy it is generally better set "
                    "around 1.0 (learning_rate: 1.0)", lr)
    return Prodigy(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), beta3=cfg.prodigy_beta3,
                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, decouple=cfg.prodigy_decouple,
                   use_bias_correction=cfg.prodigy_use_bias_correction,
                   safeguard_warmup=cfg.prodigy_safeguard_warmup)


def _adamw_8bit(groups: ParamGroups) -> type[torch.optim.Optimizer]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise NullBoothError("use_8bit_adam: needs the bitsandbytes package, which is not installed; run "
                             "`pip install bitsandbytes` (it needs a CUDA GPU), or set use_8bit_adam: false") from None
    if any(p.device.type != "cuda" for group in groups for p in group["params"]):
        raise NullBoothError("use_8bit_adam: bitsandbytes' 8-bit AdamW needs the parameters on a CUDA GPU and this "
                             "run trains on the CPU; train on a GPU or set use_8bit_adam: false")
    return bnb.optim.AdamW8bit


# --------------------------------------------------------------------------- epochs → steps


def steps_per_epoch(num_examples: int, batch_size: int, processes: int, accumulation: int) -> int:
    """Optimizer steps in one epoch of ``num_examples``: every micro-step takes ``batch_size`` examples on each of
    ``processes``, and ``accumulation`` micro-steps make a step (diffusers' ``num_update_steps_per_epoch``)."""
    return math.ceil(math.ceil(num_examples / (batch_size * processes)) / accumulation)


def steps_from_epochs(cfg: Config) -> bool:
    """Whether ``max_train_steps`` is still to be derived from ``num_train_epochs`` (the user set epochs and not
    steps); :func:`resolve_train_steps` returns a config for which this is false."""
    return cfg.num_train_epochs is not None and "max_train_steps" not in cfg.model_fields_set


def resolve_train_steps(cfg: Config, num_instances: int, num_classes: int, num_processes: int) -> Config:
    """``cfg`` with ``max_train_steps = num_train_epochs × steps per epoch`` when :func:`steps_from_epochs`.

    An epoch is one pass over diffusers' DreamBooth dataset, whose length is the number of instance images, or
    of class images when prior preservation brings more; it is sharded over the processes and accumulated
    into optimizer steps: ``⌈⌈N / (train_batch_size · processes)⌉ / gradient_accumulation_steps⌉``.
    """
    if steps_from_epochs(cfg):
        epochs, n = cfg.num_train_epochs or 0, max(num_instances, num_classes)
        per_epoch = steps_per_epoch(n, cfg.train_batch_size, num_processes, cfg.gradient_accumulation_steps)
        cfg = cfg.model_copy(update={"max_train_steps": epochs * per_epoch})
        log.info("num_train_epochs %d over %d examples: max_train_steps %d", epochs, n, cfg.max_train_steps)
    if cfg.lr_warmup_steps > cfg.max_train_steps:
        raise NullBoothError(f"lr_warmup_steps: {cfg.lr_warmup_steps} exceeds max_train_steps {cfg.max_train_steps} "
                             f"(from num_train_epochs {cfg.num_train_epochs}); lower lr_warmup_steps or train longer")
    return cfg


# --------------------------------------------------------------------------- Min-SNR-γ loss weighting


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023, §3.4 and §4.2) per example, ``[bsz]``.

    With ``SNR(t) = ᾱ_t / (1 − ᾱ_t)`` (diffusers' ``compute_snr``) the x₀-loss weight ``min(SNR, γ)`` becomes
    ``min(SNR, γ) / SNR`` for an ε-prediction loss and ``min(SNR, γ) / (SNR + 1)`` for a v-prediction loss.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)  # [bsz]
    clipped = torch.clamp(snr, max=gamma)  # min(SNR, γ)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def instance_loss(method: Method, pred: torch.Tensor, target: torch.Tensor, idx: list[int],
                  weights: torch.Tensor | None) -> torch.Tensor:
    """The method's instance loss; with Min-SNR ``weights`` ``[B]`` the weighted mean of its per-example values.

    ``Method.loss`` reduces a batch to its mean, so each example's loss is the method's loss of that example
    alone (for plain and mask-weighted MSE their mean is the batch loss).
    """
    if weights is None:
        return method.loss(pred, target, idx)
    per_example = torch.stack([method.loss(pred[i:i + 1], target[i:i + 1], idx[i:i + 1])
                               for i in range(pred.shape[0])])  # [B]
    return (per_example * weights).mean()


def prior_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The prior-preservation MSE (DreamBooth eq. 2's second term); with ``weights`` ``[B]`` Min-SNR weighted."""
    if weights is None:
        return F.mse_loss(pred, target.float())
    per_example = F.mse_loss(pred, target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))  # [B]
    return (per_example * weights).mean()


# --------------------------------------------------------------------------- TF32


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """``allow_tf32``: TF32 matmuls and cuDNN convolutions inside, the previous flags restored after."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
