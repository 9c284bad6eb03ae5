"""Null-space adapters and full-weight updates as a diffusers LoRA (``pytorch_lora_weights.safetensors``).

:func:`export_diffusers_lora` writes a file that plain ``StableDiffusionPipeline.load_lora_weights``
reads: for an adapter ``ΔW = B A`` with ``B = M``, ``A = Uᵀ`` and scale 1 (exact, rank ``k``); for a
full-weight method (dreambooth) the dense ``ΔW`` of :func:`dense_deltas` factorised by SVD
(:func:`lora_factors`, exact up to the numerical rank). :func:`export_kohya_lora` writes the same factors
with kohya's key names (``lora_format: kohya``) for A1111 and ComfyUI.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from nullbooth.config import FEATURES
from nullbooth.errors import NullBoothError
from nullbooth.filenames import LORA_KOHYA_WEIGHTS, LORA_WEIGHTS
from nullbooth.io import save_tensors
from nullbooth.methods.adapters import NullSpaceLinear, adapter_targets, float_dtype, null_space_adapters
from nullbooth.stats.capture import CrossAttentionLayer

log = logging.getLogger(__name__)


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
                          unet: nn.Module | None = None, rtol: float | None = None) -> Path:
    """Write ``<output_dir>/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(output_dir)``.

    The factors are :func:`update_factors`' (``unet`` adapters or ``deltas``). Keys are peft-style
    ``unet.<module path>.lora_A.weight`` / ``lora_B.weight`` (float32). The file carries diffusers'
    ``lora_adapter_metadata`` with ``lora_alpha = r`` for every module (``alpha_pattern = rank_pattern``),
    so the LoRA scale ``alpha / r`` is exactly 1; diffusers ≥ 0.34 reads it, older versions infer the
    same config from the shapes.
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
    lora_config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                   "target_modules": sorted(ranks), "use_dora": False, "lora_bias": False}
    metadata = {"format": "pt",
                "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in lora_config.items()}, sort_keys=True)}
    output_dir = Path(output_dir)
    save_tensors(output_dir / LORA_WEIGHTS, tensors, metadata)
    return output_dir / LORA_WEIGHTS


def kohya_name(path: str) -> str:
    """kohya / A1111 / ComfyUI module name of a UNet module path: ``lora_unet_`` + the path with ``.`` → ``_``."""
    return "lora_unet_" + path.replace(".", "_")


def export_kohya_lora(output_dir: str | Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                      scales: Mapping[str, float] | None = None) -> Path:
    """Write ``pytorch_lora_weights_kohya.safetensors``: ``<name>.lora_down.weight`` (``A``), ``.lora_up.weight``
    (``B``) and ``.alpha`` per module, the key layout of kohya's sd-scripts that A1111, ComfyUI and diffusers'
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
