"""The unconstrained baselines users compare against: ``dreambooth``, ``attn2_finetune`` and ``lora``.

- ``dreambooth``: diffusers' ``train_dreambooth.py`` — every UNet parameter (weights and biases) trainable; the result
  is the whole ``unet/`` folder. Its change is not a low-rank attention update, so no LoRA is exported.
- ``attn2_finetune``: Custom-Diffusion-like: the cross-attention weights nullbooth protects (``attn2``
  ``to_q``/``to_k``/``to_v``/``to_out.0`` of the selected layers, biases frozen), trained without constraint, so a
  comparison with nullbooth differs only in the constraint; ``unet/`` plus an exact SVD LoRA export of ``ΔW``.
- ``lora``: peft LoRA on diffusers' default targets (``train_dreambooth_lora.py``: ``to_q``/``to_k``/``to_v``/
  ``to_out.0`` of every attention, attn1 and attn2) or, with ``lora_targets: attn2``, on nullbooth's weights.

With ``train_text_encoder`` dreambooth and attn2_finetune train the whole text encoder (saved as ``text_encoder/``
beside ``unet/``; SD only) and lora a LoRA on each text encoder (in the same LoRA file; SDXL: both, as diffusers'
``train_dreambooth_lora_sdxl.py``). Every method's ``weight_changes`` is ``(ΔW, W₀)`` of the protected ``attn2``
weights, the leakage report's rows, whatever else it trains. peft's OFT is :mod:`nullbooth.methods.oft`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from nullbooth.conditioning import encoder_names, is_sdxl
from nullbooth.errors import NullBoothError
from nullbooth.filenames import FULL_TEXT_ENCODER_DIR, FULL_UNET_DIR
from nullbooth.methods.adapters import attention_targets
from nullbooth.methods.base import Method, ParamGroups, WeightChanges
from nullbooth.methods.lora_export import (
    PEFT_ADAPTER,
    dense_deltas,
    export_diffusers_lora,
    peft_lora_factors,
    peft_lora_tensors,
    update_factors,
    write_diffusers_lora,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- attn2_finetune, dreambooth


class Attn2Finetune(Method):
    """Custom-Diffusion-like: the cross-attention weights nullbooth protects, trained without constraint (biases
    frozen, like nullbooth)."""

    name = "attn2_finetune"

    def check(self, pipe) -> None:
        super().check(pipe)
        if self.trains_text_encoder and is_sdxl(pipe):
            # The output would need a second full encoder folder that generate and the model card do not read.
            raise NullBoothError(f"train_text_encoder: {self.name} trains the whole text encoder on SD 1.x/2.x only; "
                                 "this SDXL pipeline has two; use method lora or nullbooth (a LoRA on both encoders, "
                                 "as diffusers' train_dreambooth_lora_sdxl.py) or turn train_text_encoder off")

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        self._freeze(pipe)
        self.stats_run = stats_run
        self.W0 = {f"{p}.weight": m.weight.detach().clone() for p, m in self.targets.items()}
        for m in self.targets.values():
            m.weight.requires_grad_(True)
        groups = [{"params": [m.weight for m in self.targets.values()], "lr": self.lr, "name": "unet"}]
        return groups + ([self.text_encoder_full(pipe)] if self.trains_text_encoder else [])

    def weight_changes(self) -> WeightChanges:
        return WeightChanges(self.targets, lambda p: (self.targets[p].weight.detach() - self.W0[f"{p}.weight"],
                                                      self.W0[f"{p}.weight"]))

    def _save_full(self, output_dir: Path) -> list[Path]:
        """``unet/`` and, with ``train_text_encoder``, ``text_encoder/``: diffusers' own folders."""
        self.pipe.unet.save_pretrained(output_dir / FULL_UNET_DIR)
        paths = [output_dir / FULL_UNET_DIR]
        if self.trains_text_encoder:
            self.pipe.text_encoder.save_pretrained(output_dir / FULL_TEXT_ENCODER_DIR, safe_serialization=True)
            paths.append(output_dir / FULL_TEXT_ENCODER_DIR)
        return paths

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        paths = self._save_full(output_dir)
        if self.trains_text_encoder:
            # A LoRA file would load the UNet's change without the encoder's: no export that tells half the story.
            log.info("%s with train_text_encoder: no LoRA export (the whole text encoder changed); load %s/ and %s/",
                     self.name, FULL_UNET_DIR, FULL_TEXT_ENCODER_DIR)
            return paths
        # ΔW is generally full rank: the LoRA export is an exact SVD factorisation (rank ≤ min(out, in)).
        deltas = dense_deltas(self.W0, self.pipe.unet, self.layers(self.pipe), self.features())
        if any(bool(d.abs().max() > 0) for d in deltas.values()):
            factors = update_factors(deltas)
            paths += [export_diffusers_lora(output_dir, factors), *self.kohya_export(output_dir, factors)]
        return paths


class DreamBooth(Attn2Finetune):
    """diffusers' ``train_dreambooth.py``: every UNet parameter, weights and biases, trained without constraint.

    ``weight_changes`` (the leakage report) still covers the protected ``attn2`` weights, whose ``W₀`` alone is kept.
    """

    name = "dreambooth"

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        self._freeze(pipe)
        self.stats_run = stats_run
        self.W0 = {f"{p}.weight": m.weight.detach().clone() for p, m in self.targets.items()}
        pipe.unet.requires_grad_(True)
        groups = [{"params": list(pipe.unet.parameters()), "lr": self.lr, "name": "unet"}]
        return groups + ([self.text_encoder_full(pipe)] if self.trains_text_encoder else [])

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        log.info("dreambooth: the result is the whole %s/ folder; no LoRA export, since a full-UNet fine-tune changes "
                 "every weight and bias, which is no low-rank attention update (method attn2_finetune or lora give "
                 "one)", FULL_UNET_DIR)
        return self._save_full(output_dir)


# --------------------------------------------------------------------------- lora


class Lora(Method):
    """peft LoRA (rank ``lora_rank``, ``α = r``, ``lora_dropout``, DoRA with ``use_dora``) on ``lora_targets``: every
    attention's projections (``attention``, diffusers' default) or the protected ``attn2`` weights (``attn2``)."""

    name = "lora"
    default_lr = 1e-4

    def lora_modules(self, pipe) -> list[str]:
        """The module paths the LoRA goes on (``self.targets``, the protected weights, must be set)."""
        return list(attention_targets(pipe.unet) if self.cfg.lora_targets == "attention" else self.targets)

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        from peft import LoraConfig

        self._freeze(pipe)
        self.stats_run = stats_run
        self.W0 = {p: m.weight.detach().clone() for p, m in self.targets.items()}
        # peft draws A from the global RNG; seeding it from the config makes a run reproducible.
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            pipe.unet.add_adapter(LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_rank,
                                             lora_dropout=self.cfg.lora_dropout, use_dora=self.cfg.use_dora,
                                             init_lora_weights="gaussian", target_modules=self.lora_modules(pipe)))
        groups = [{"params": [p for p in pipe.unet.parameters() if p.requires_grad], "lr": self.lr, "name": "unet"}]
        if self.trains_text_encoder:
            groups.append(self.text_encoder_lora(pipe, dropout=self.cfg.lora_dropout, dora=self.cfg.use_dora))
        return groups

    def weight_changes(self) -> WeightChanges:
        return WeightChanges(self.W0, lambda p: (peft_delta(self.pipe.unet.get_submodule(p)), self.W0[p]))

    def report(self) -> dict[str, dict[str, Any]]:
        return {p: {"trained": True, "rank": self.cfg.lora_rank, **({"dora": True} if self.cfg.use_dora else {})}
                for p in self.targets}

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        parts = {"unet": peft_lora_tensors(self.pipe.unet, "unet")}
        factors, scales = peft_lora_factors(self.pipe.unet, "unet")
        for name in encoder_names(self.pipe) if self.trains_text_encoder else ():
            parts[name] = peft_lora_tensors(getattr(self.pipe, name), name)
            te_factors, te_scales = peft_lora_factors(getattr(self.pipe, name), name)
            factors, scales = {**factors, **te_factors}, {**scales, **te_scales}
        return [write_diffusers_lora(output_dir, parts), *self.kohya_export(output_dir, factors, scales)]


@torch.no_grad()
def peft_delta(layer) -> torch.Tensor:
    """The weight change ``W' − W`` a peft LoRA layer applies, ``[out, in]``: ``s B A``, or with DoRA
    (Liu et al. 2024, eq. 5) ``W' = m · (W + s B A) / ‖W + s B A‖_c`` with the norm of every output row (peft's
    layout), computed in float64."""
    delta = layer.get_delta_weight(PEFT_ADAPTER).double()  # s B A
    if not layer.use_dora[PEFT_ADAPTER]:
        return delta
    W = layer.get_base_layer().weight.double()
    m = layer.lora_magnitude_vector[PEFT_ADAPTER].weight.double()  # [out]
    merged = W + delta
    return (m / merged.norm(dim=1))[:, None] * merged - W
