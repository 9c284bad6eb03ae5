"""Null-space adapters and full-weight updates as a diffusers LoRA (``pytorch_lora_weights.safetensors``).

:func:`export_diffusers_lora` writes a file that plain ``StableDiffusionPipeline.load_lora_weights``
reads: for an adapter ``ΔW = B A`` with ``B = M``, ``A = Uᵀ`` and scale 1 (exact, rank ``k``); for a
full-weight method (attn2_finetune) the dense ``ΔW`` of :func:`dense_deltas` factorised by SVD
(:func:`lora_factors`, exact up to the numerical rank); for peft LoRA layers (method ``lora``, and the
text encoders under ``train_text_encoder``) their own factors and DoRA magnitudes (:func:`peft_lora_tensors`). Text
encoders are keyed by their pipeline attribute, ``text_encoder.`` and (SDXL) ``text_encoder_2.``, as diffusers'
``StableDiffusionXLPipeline.save_lora_weights`` writes them. :func:`export_kohya_lora` writes the same factors with
kohya's key names (``lora_format: kohya``, SD 1.x/2.x) for A1111 and ComfyUI; kohya has no DoRA.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nullbooth.config import FEATURES
from nullbooth.errors import NullBoothError
from nullbooth.filenames import LORA_KOHYA_WEIGHTS, LORA_WEIGHTS
from nullbooth.io import save_tensors
from nullbooth.methods.adapters import NullSpaceLinear, adapter_targets, float_dtype, null_space_adapters
from nullbooth.stats.capture import CrossAttentionLayer

log = logging.getLogger(__name__)
TEXT_ENCODER = "text_encoder"  # the pipeline attribute, and diffusers' key prefix of its LoRA
PEFT_ADAPTER = "default"  # the adapter name peft gives the one adapter a model has


def lora_factors(delta_W: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """An exact low-rank factorisation ``ΔW = B A`` (``B`` ``[out, r]``, ``A`` ``[r, in]``) by float64 SVD.

    Singular values ``s_i ≤ rtol · s_max`` are dropped as zero, with ``rtol`` defaulting to
    ``max(out, in) · ε(dtype of ΔW)`` (the numerical rank at the precision ΔW is given in, as
    ``torch.linalg.matrix_rank``). The factors are balanced: ``B = U_r √S``, ``A = √S V_rᵀ``.
    The third value reports ``rank`` and ``dropped_fro`` (Frobenius norm of what was dropped, the exact
    reconstruction error before float32 storage) relative to ``‖ΔW‖_F``.
    """
    if delta_W.ndim != 2:
        raise NullBoothError(f"expected a weight update [out, in], got shape {tuple(delta_W.shape)}")
    if rtol is None:
        eps = torch.finfo(delta_W.dtype).eps if delta_W.is_floating_point() else torch.finfo(torch.float64).eps
        rtol = max(delta_W.shape) * eps
    D = delta_W.detach().to("cpu", torch.float64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    s_max = float(S[0]) if S.numel() else 0.0
    r = int((S > rtol * s_max).sum()) if s_max > 0 else 0
    root = S[:r].sqrt()
    B = U[:, :r] * root  # [out, r]
    A = root[:, None] * Vh[:r]  # [r, in]
    total = float(S.square().sum().sqrt())
    dropped = float(S[r:].square().sum().sqrt())
    return B, A, {"rank": r, "rtol": rtol, "dropped_fro_relative": dropped / total if total else 0.0}


def update_factors(deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] | None = None, *,
                   unet: nn.Module | None = None, rtol: float | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``ΔW = B A`` per target path: from ``unet``'s :class:`NullSpaceLinear` (``B = M``, ``A = Uᵀ``, exact) or from
    ``deltas`` (``(B, A)`` pairs, or dense ``ΔW`` factorised by :func:`lora_factors`). Rank-0 targets are left out."""
    if (deltas is None) == (unet is None):
        raise NullBoothError("export a LoRA: give exactly one of `deltas` or `unet`")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if unet is not None:
        wrappers = null_space_adapters(unet)
        if not wrappers:
            raise NullBoothError("export a LoRA: the UNet has no null-space adapters; inject or load them first")
        for path, w in wrappers.items():
            if w.M is not None:
                factors[path] = (w.M.detach(), w.basis.detach().T)  # B = M [out, k], A = Uᵀ [k, in]
    else:
        for path, value in deltas.items():
            if isinstance(value, torch.Tensor):
                B, A, report = lora_factors(value, rtol)
                log.info("%s: LoRA rank %d (rtol %.3g, dropped %.3g of ‖ΔW‖_F)", path, report["rank"],
                         report["rtol"], report["dropped_fro_relative"])
            else:
                B, A = value
                if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
                    raise NullBoothError(f"{path}: expected (B [out, r], A [r, in]), got {tuple(B.shape)}, {tuple(A.shape)}")
            if B.shape[1]:
                factors[path] = (B, A)
    if not factors:
        raise NullBoothError(
            "export a LoRA: every update has rank 0 (empty null spaces or no change); nothing to export — "
            "raise nullbooth.nullspace_threshold so the adapters have room to learn"
        )
    return factors


def export_diffusers_lora(output_dir: str | Path,
                          deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] | None = None, *,
                          unet: nn.Module | None = None, rtol: float | None = None,
                          text_encoders: Mapping[str, nn.Module] | None = None) -> Path:
    """Write ``<output_dir>/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(output_dir)``.

    The factors are :func:`update_factors`' (``unet`` adapters or ``deltas``). Keys are peft-style
    ``unet.<module path>.lora_A.weight`` / ``lora_B.weight`` (float32). The file carries diffusers'
    ``lora_adapter_metadata`` with ``lora_alpha = r`` for every module (``alpha_pattern = rank_pattern``),
    so the LoRA scale ``alpha / r`` is exactly 1; diffusers ≥ 0.34 reads it, older versions infer the
    same config from the shapes. ``text_encoders`` carrying peft LoRA layers (``train_text_encoder``), by pipeline
    attribute, are written into the same file under that prefix (:func:`peft_lora_tensors`).
    """
    factors = update_factors(deltas, unet=unet, rtol=rtol)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, (B, A) in factors.items():
        tensors[f"unet.{path}.lora_A.weight"] = A.detach().to("cpu", torch.float32).contiguous()
        tensors[f"unet.{path}.lora_B.weight"] = B.detach().to("cpu", torch.float32).contiguous()
        ranks[path] = int(B.shape[1])
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank, as diffusers does
    pattern = {p: k for p, k in ranks.items() if k != r}
    parts = {"unet": (tensors, {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                                "target_modules": sorted(ranks), "use_dora": False, "lora_bias": False})}
    for name, encoder in (text_encoders or {}).items():
        parts[name] = peft_lora_tensors(encoder, name)
    return write_diffusers_lora(output_dir, parts)


def write_diffusers_lora(output_dir: str | Path,
                         parts: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` from ``{"unet" | "text_encoder" | "text_encoder_2": (tensors, lora
    config)}``: the
    tensors keyed as diffusers reads them, each part's peft ``LoraConfig`` fields as ``lora_adapter_metadata``
    (``<part>.<field>``, the layout of diffusers' ``save_lora_weights``)."""
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    for part, (part_tensors, part_config) in parts.items():
        tensors.update(part_tensors)
        config.update({f"{part}.{k}": v for k, v in part_config.items()})
    output_dir = Path(output_dir)
    save_tensors(output_dir / LORA_WEIGHTS, tensors,
                 {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True)})
    return output_dir / LORA_WEIGHTS


def text_module_path(text_encoder: nn.Module, path: str) -> str:
    """A text-encoder module path as LoRA files spell it, ``text_model.encoder.layers.<i>…``: transformers ≥ 5
    flattens ``CLIPTextModel`` (no ``text_model``), and diffusers strips the prefix again for such a model."""
    return path if hasattr(text_encoder, "text_model") else f"text_model.{path}"


def peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers (adapter ``default``) of ``model`` by module path, found structurally."""
    from peft.tuners.lora import LoraLayer

    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer) and PEFT_ADAPTER in m.lora_A}


def peft_lora_tensors(model: nn.Module, part: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``model``'s peft LoRA as a part of a diffusers LoRA file: ``<part>.<path>.lora_A.weight`` / ``.lora_B.weight``
    and, with DoRA, ``.lora_magnitude_vector.weight`` (the name of peft's parameter, which both diffusers' UNet loader
    and transformers' ``load_adapter`` map onto it), float32; and the ``LoraConfig`` fields diffusers rebuilds it
    from. Text-encoder paths (every ``part`` but ``unet``) are spelled with ``text_model.`` (:func:`text_module_path`)."""
    layers = peft_lora_layers(model)
    if not layers:
        raise NullBoothError(f"export a LoRA: the {part} has no peft LoRA layers; add the adapter first")
    config = model.peft_config[PEFT_ADAPTER]
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        key = f"{part}.{path if part == 'unet' else text_module_path(model, path)}"
        tensors[f"{key}.lora_A.weight"] = _cpu32(layer.lora_A[PEFT_ADAPTER].weight)
        tensors[f"{key}.lora_B.weight"] = _cpu32(layer.lora_B[PEFT_ADAPTER].weight)
        if layer.use_dora[PEFT_ADAPTER]:
            tensors[f"{key}.lora_magnitude_vector.weight"] = _cpu32(layer.lora_magnitude_vector[PEFT_ADAPTER].weight)
    fields = {"r": config.r, "lora_alpha": config.lora_alpha, "rank_pattern": dict(config.rank_pattern or {}),
              "alpha_pattern": dict(config.alpha_pattern or {}), "target_modules": sorted(config.target_modules),
              "use_dora": bool(config.use_dora), "lora_bias": False}
    return tensors, fields


def peft_lora_factors(model: nn.Module, part: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """``(B, A)`` and the scale ``alpha / r`` of every peft LoRA layer of ``model``, keyed as :func:`kohya_name`
    reads them (UNet paths; ``<part>.text_model.…`` for a text encoder)."""
    factors, scales = {}, {}
    for path, layer in peft_lora_layers(model).items():
        key = path if part == "unet" else f"{part}.{text_module_path(model, path)}"
        factors[key] = (layer.lora_B[PEFT_ADAPTER].weight, layer.lora_A[PEFT_ADAPTER].weight)
        scales[key] = float(layer.scaling[PEFT_ADAPTER])
    return factors, scales


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def kohya_name(path: str) -> str:
    """kohya / A1111 / ComfyUI module name: ``lora_unet_`` + a UNet module path, or ``lora_te_`` + a text-encoder path
    given as ``text_encoder.text_model.…``, with ``.`` → ``_``."""
    if path.startswith(f"{TEXT_ENCODER}."):
        return "lora_te_" + path.removeprefix(f"{TEXT_ENCODER}.").replace(".", "_")
    return "lora_unet_" + path.replace(".", "_")


def export_kohya_lora(output_dir: str | Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                      scales: Mapping[str, float] | None = None) -> Path:
    """Write ``pytorch_lora_weights_kohya.safetensors``: ``<name>.lora_down.weight`` (``A``), ``.lora_up.weight``
    (``B``) and ``.alpha`` per module (UNet and, keyed ``text_encoder.…``, text-encoder modules; :func:`kohya_name`),
    the key layout of kohya's sd-scripts that A1111, ComfyUI and diffusers'
    ``load_lora_weights`` read. Those loaders apply ``(alpha / rank) · B A``, so ``alpha = scale · rank``
    (``scales`` per path, default 1: the exact ``ΔW``).

    Every module is written at the largest rank, smaller ones padded with zero rows of ``A`` and zero columns of
    ``B`` (``ΔW`` unchanged): diffusers' kohya converter drops per-module alphas whose rank is not the common one,
    which would rescale those modules."""
    rank = max(int(B.shape[1]) for B, _ in factors.values())
    tensors: dict[str, torch.Tensor] = {}
    for path, (B, A) in factors.items():
        name = kohya_name(path)
        pad = rank - int(B.shape[1])
        A = torch.cat([A.detach().to("cpu", torch.float32), torch.zeros(pad, A.shape[1])])  # [rank, in]
        B = torch.cat([B.detach().to("cpu", torch.float32), torch.zeros(B.shape[0], pad)], dim=1)  # [out, rank]
        tensors[f"{name}.lora_down.weight"] = A.contiguous()
        tensors[f"{name}.lora_up.weight"] = B.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float((scales or {}).get(path, 1.0)) * rank, dtype=torch.float32)
    path = Path(output_dir) / LORA_KOHYA_WEIGHTS
    save_tensors(path, tensors, {"format": "pt", "ss_network_module": "networks.lora"})
    return path


def _effective_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, NullSpaceLinear):
        W = module.base_layer.weight.detach()
        return W if module.merged else W + module.get_delta_weight().to(W.dtype)
    return module.weight.detach()


def dense_deltas(unet_before_state: Mapping[str, torch.Tensor], unet_after: nn.Module,
                 layers: Sequence[CrossAttentionLayer | str] | None = None,
                 features: Sequence[str] = FEATURES) -> dict[str, torch.Tensor]:
    """``ΔW = W_after − W_before`` (``[out, in]``, the weights' dtype, at least float32) per target, for
    full-weight methods (exact whenever the two weights are within a factor 2 of each other, Sterbenz).

    ``unet_before_state`` is a (cloned) ``state_dict`` of the UNet before training (``<path>.weight`` or,
    for a wrapped model, ``<path>.base_layer.weight``). Adapters still injected in ``unet_after`` count with
    their ``ΔW``. Changed biases cannot be expressed as a LoRA: they are reported with a warning.
    """
    out: dict[str, torch.Tensor] = {}
    missing, bias_changed = [], []
    for path in adapter_targets(unet_after, layers, features):
        module = unet_after.get_submodule(path)
        before = unet_before_state.get(f"{path}.weight", unet_before_state.get(f"{path}.base_layer.weight"))
        if before is None:
            missing.append(f"{path}.weight")
            continue
        after = _effective_weight(module)
        if tuple(before.shape) != tuple(after.shape):
            missing.append(f"{path}.weight (shape {tuple(before.shape)} vs {tuple(after.shape)})")
            continue
        # Subtract in float64, store at the weights' precision (≥ float32): that precision is what
        # lora_factors' default tolerance refers to, so float32 rounding noise is not exported as rank.
        diff = after.to("cpu", torch.float64) - before.detach().to("cpu", torch.float64)
        out[path] = diff.to(float_dtype(after.dtype))
        bias_before = unet_before_state.get(f"{path}.bias", unet_before_state.get(f"{path}.base_layer.bias"))
        if bias_before is not None and module.bias is not None and not torch.equal(bias_before.to(module.bias.device), module.bias.detach()):
            bias_changed.append(path)
    if missing:
        raise NullBoothError(
            f"dense_deltas: the saved state lacks {len(missing)} target weight(s) ({', '.join(missing[:4])}"
            f"{', …' if len(missing) > 4 else ''}); pass the state_dict of this UNet taken before training"
        )
    if bias_changed:
        warnings.warn(
            f"{len(bias_changed)} target bias(es) changed during training ({', '.join(bias_changed[:4])}); a LoRA "
            "cannot carry bias changes — freeze biases (docs/design.md §2) or save the full UNet",
            stacklevel=2,
        )
    return out
