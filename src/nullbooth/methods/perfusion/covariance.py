"""The input second moment ``C`` of the K/V projections, and its inverse ``C⁻¹`` (the metric of eq. 3).

``C = Σ e eᵀ / n`` over the text encodings ``e`` that every cross-attention ``to_k``/``to_v`` reads
(docs/design.md §2, uncentered). Perfusion uses only ``C⁻¹``, in ``s(e) = i*ᵀ C⁻¹ e / i*ᵀ C⁻¹ i*``, which is
invariant to ``C → cC``. Where ``C`` comes from (:func:`default_covariance`): the shipped CLIP ViT-L/14
matrix for SD 1.x, else one accumulated in float64 from prompts and cached per text encoder(s). The
encodings are the pipeline's own (:func:`nullbooth.conditioning.encode_prompts`): on SDXL both encoders'
penultimate hidden states side by side, so ``C`` is ``2048 × 2048`` there and the shipped matrix never applies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from nullbooth import __version__
from nullbooth.conditioning import encode_prompts, is_sdxl, text_encoders, tokenizers
from nullbooth.config import PerfusionBlock
from nullbooth.errors import NullBoothError
from nullbooth.filenames import SHIPPED_COVARIANCE
from nullbooth.io import save_tensors
from nullbooth.models import cache_dir as nullbooth_cache_dir
from nullbooth.prompts import read_prompt_file
from nullbooth.stats.moments import SecondMoment

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_EIGENVALUE_FLOOR", "CLIP_L14_TEXT_WIDTH", "builtin_covariance_prompts",
    "default_covariance", "encoding_second_moment", "inverse_covariance", "load_shipped_covariance", "module_device",
    "read_covariance_file", "resolve_covariance", "shipped_covariance_for", "text_components", "text_width",
]

# the shipped C fits only SD 1.x's text encoder, recognised by its width and vocabulary
CLIP_L14_TEXT_WIDTH = 768
CLIP_VOCAB_SIZE = 49408
# part of the cache key: bump it when what is cached changes, so stale files are not read
_COVARIANCE_CACHE_VERSION = 1

AUTO_EIGENVALUE_FLOOR = 1e-6


def inverse_covariance(C: Tensor | np.ndarray, *, dim: int | None = None,
                       eigenvalue_floor: float | Literal["auto"] | None = None) -> Tensor:
    """Validate the input second moment ``C`` (``[d, d]``) and return ``C⁻¹`` in float64.

    ``C`` must be square, of width ``dim`` (the text width the K/V projections read), finite,
    symmetric and positive definite. A singular or non-PSD ``C`` is refused with a clear error unless
    ``eigenvalue_floor`` is given: then the eigenvalues are clamped to ``floor · λ_max`` (a relative
    Tikhonov-style floor, scale-free like ``s`` itself) before inverting. ``"auto"`` inverts exactly
    when ``C`` is well conditioned and otherwise applies ``AUTO_EIGENVALUE_FLOOR`` with a warning
    (a clearly negative eigenvalue is still an error).

    Why a floor is harmless where ``C`` is *structurally* singular: a text encoder ending in a
    LayerNorm with untrained gain/bias (the built-in tiny models) gives encodings orthogonal to the
    all-ones vector, so ``C`` is rank ``d − 1``; no ``e`` or ``i*`` has a component along that
    direction, so its (floored) eigenvalue never enters ``s``.
    """
    if eigenvalue_floor == "auto":
        try:
            return inverse_covariance(C, dim=dim)
        except NullBoothError as err:
            if "singular" not in str(err):
                raise
            warnings.warn(f"{err}; regularising with eigenvalue_floor={AUTO_EIGENVALUE_FLOOR}", stacklevel=2)
            return inverse_covariance(C, dim=dim, eigenvalue_floor=AUTO_EIGENVALUE_FLOOR)
    if isinstance(C, np.ndarray):
        C = torch.from_numpy(C)
    if not isinstance(C, Tensor):
        raise NullBoothError(f"expected the covariance C as a torch.Tensor or numpy array, got {type(C).__name__}")
    C = C.detach().to(device="cpu", dtype=torch.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise NullBoothError(f"expected a square covariance C of shape (d, d), got {tuple(C.shape)}")
    if dim is not None and C.shape[0] != dim:
        raise NullBoothError(
            f"expected a covariance C of width {dim} (the text-encoding width the cross-attention K/V "
            f"projections read), got {tuple(C.shape)}; compute one for this text encoder with "
            "calculate_input_covariance(pipe, prompts) or default_covariance(pipe)"
        )
    if not torch.isfinite(C).all():
        raise NullBoothError("the covariance C contains NaN or Inf values; recompute it (in float64)")
    scale = C.abs().max().item()
    if scale == 0.0:
        raise NullBoothError("the covariance C is all zeros; it was computed from no data")
    if (C - C.T).abs().max().item() > 1e-6 * scale:
        raise NullBoothError("expected a symmetric covariance C (a second moment Σxxᵀ/n), got a non-symmetric matrix")
    C = (C + C.T) / 2
    lam, V = torch.linalg.eigh(C)  # ascending eigenvalues λ, C = V diag(λ) Vᵀ
    lam_max = lam[-1].item()
    if lam_max <= 0:
        raise NullBoothError(
            f"the covariance C has no positive eigenvalue (λ_max = {lam_max:.3g}); "
            "it is not a second moment"
        )
    if eigenvalue_floor is not None:
        if not 0.0 < eigenvalue_floor < 1.0:
            raise NullBoothError(f"expected eigenvalue_floor in (0, 1) (relative to λ_max), got {eigenvalue_floor}")
        lam = lam.clamp(min=eigenvalue_floor * lam_max)
    else:
        lam_min = lam[0].item()
        if lam_min < -1e-9 * lam_max:
            raise NullBoothError(
                f"the covariance C is not positive semi-definite (λ_min = {lam_min:.3g}, λ_max = {lam_max:.3g}); "
                "a second moment Σxxᵀ/n never is -- recompute it in float64, or pass eigenvalue_floor=1e-6 to regularise"
            )
        if lam_min <= 1e-10 * lam_max:
            raise NullBoothError(
                f"the covariance C is singular (λ_min = {lam_min:.3g}, λ_max = {lam_max:.3g}, width {C.shape[0]}); "
                "compute it from more prompts, or pass eigenvalue_floor=1e-6 to regularise it"
            )
    C_inv = (V / lam) @ V.T  # V diag(1/λ) Vᵀ
    return (C_inv + C_inv.T) / 2


def load_shipped_covariance() -> Tensor:
    """The shipped CLIP ViT-L/14 text second moment (768×768, SD 1.x), as float64.

    Computed upstream over the *real* tokens of 100K LAION captions (see ``data/NOTICE.md``).
    Its overall scale is irrelevant: ``s`` is invariant to ``C → cC``.
    """
    if not SHIPPED_COVARIANCE.is_file():
        raise NullBoothError(
            f"expected the shipped covariance at {SHIPPED_COVARIANCE}, found nothing; "
            "reinstall nullbooth"
        )
    return torch.from_numpy(np.load(SHIPPED_COVARIANCE, allow_pickle=False)).to(torch.float64)


def text_components(obj: Any) -> tuple[nn.Module, Any]:
    """(text_encoder, tokenizer) from a pipeline or a ``(text_encoder, tokenizer)`` pair (SDXL: the first ones)."""
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    te, tok = getattr(obj, "text_encoder", None), getattr(obj, "tokenizer", None)
    if te is None or tok is None:
        raise NullBoothError(
            f"expected a diffusers pipeline with text_encoder and tokenizer, or a (text_encoder, tokenizer) pair; "
            f"got {type(obj).__name__}"
        )
    return te, tok


def _text_pipe(obj: Any) -> Any:
    """What :mod:`nullbooth.conditioning` encodes with: the pipeline itself, or a pair standing in for one."""
    text_encoder, tokenizer = text_components(obj)
    if isinstance(obj, (tuple, list)):
        return types.SimpleNamespace(text_encoder=text_encoder, tokenizer=tokenizer)
    return obj


def text_width(pipe: Any) -> int:
    """Width of the text encodings the cross-attention K/V read: one encoder's, or SDXL's two side by side."""
    return sum(int(encoder.config.hidden_size) for encoder in text_encoders(_text_pipe(pipe)))


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def encoding_second_moment(pipe: Any, texts: Sequence[str], batch_size: int = 32, *,
                           tokens: Literal["all", "real"] = "all") -> SecondMoment:
    """Streaming float64 ``Σ e eᵀ`` and count over ``pipe``'s own encodings of ``texts`` (what ``attn2`` reads:
    :func:`nullbooth.conditioning.encode_prompts`), ``batch_size`` prompts at a time.

    ``tokens='real'`` keeps the positions the (first) tokenizer's attention mask marks (BOS, words, EOS); see
    :func:`nullbooth.methods.perfusion.compat.calculate_input_covariance`.
    """
    if tokens not in ("all", "real"):
        raise NullBoothError(f"expected tokens='all' or 'real', got {tokens!r}")
    texts = list(texts)
    if not texts:
        raise NullBoothError("expected at least one prompt to compute the covariance from, got none")
    if batch_size < 1:
        raise NullBoothError(f"expected batch_size >= 1, got {batch_size}")
    pipe = _text_pipe(pipe)
    stat: SecondMoment | None = None
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        enc = encode_prompts(pipe, batch, batch_size=len(batch)).hidden  # [b, n, d]
        if stat is None:
            stat = SecondMoment(enc.shape[-1])
        if tokens == "real":
            tokenizer = tokenizers(pipe)[0]
            mask = tokenizer(batch, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                             return_tensors="pt").attention_mask
            enc = enc[mask.to(enc.device).bool()]  # [Σ real tokens, d]: BOS, words, EOS
        stat.add(enc)
    assert stat is not None
    return stat


def builtin_covariance_prompts() -> list[str]:
    """A fixed, generic prompt list (templates × subjects) for computing ``C`` of other text encoders."""
    templates = ("a photo of a {}", "a painting of a {}", "a close-up photo of the {}", "a {} in the garden",
                 "a drawing of a {} on a table", "a blurry photo of a {}", "a 3d rendering of a {}",
                 "a black and white photo of the {}", "a {} on the beach at sunset", "an oil painting of a {} in a city",
                 "a cartoon {} wearing a hat", "two {}s next to each other")
    subjects = ("dog", "cat", "teddy bear", "car", "house", "tree", "woman", "man", "child", "bird", "horse",
                "chair", "cup", "mountain", "river", "flower", "guitar", "robot", "castle", "boat", "pizza",
                "bicycle", "clock", "lamp", "book", "shoe", "backpack", "vase", "sculpture", "dragon", "bridge",
                "forest", "computer", "train", "airplane", "apple", "cake", "owl", "lion", "fish")
    return [t.format(s) for t in templates for s in subjects]


def _hash_text_encoders(pipe: Any) -> hashlib._Hash:
    """SHA-256 over every text encoder's weights and its tokenizer, in concatenation order."""
    h = hashlib.sha256()
    for text_encoder, tokenizer in zip(text_encoders(pipe), tokenizers(pipe)):
        for name, t in sorted(text_encoder.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|{tokenizer.model_max_length}".encode())
    return h


def _is_clip_l14(text_encoder: nn.Module) -> bool:
    cfg = getattr(text_encoder, "config", None)
    return (getattr(cfg, "model_type", None) == "clip_text_model"
            and getattr(cfg, "hidden_size", None) == CLIP_L14_TEXT_WIDTH
            and getattr(cfg, "vocab_size", 0) >= CLIP_VOCAB_SIZE)


def default_covariance(pipe: Any, prompts: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
                       *, tokens: Literal["all", "real"] = "all", batch_size: int = 32) -> Tensor:
    """``C`` for ``pipe``'s text encoding (float64): shipped, cached, or computed and cached.

    * no ``prompts`` and an SD 1.x CLIP ViT-L/14 text encoder alone (CLIP text model, width 768, CLIP vocab):
      the shipped matrix (SDXL's first encoder is one too, but its ``attn2`` reads 2048 wide: never shipped);
    * otherwise ``C`` is computed from ``prompts`` (default :func:`builtin_covariance_prompts`) with
      :func:`encoding_second_moment` and cached as safetensors under ``cache_dir`` (default
      ``$NULLBOOTH_CACHE/perfusion``), keyed by a hash of the text-encoder weights, the tokenizers, the prompts and
      ``tokens``.
    """
    text_pipe = _text_pipe(pipe)
    width = text_width(text_pipe)
    if prompts is None and not is_sdxl(text_pipe) and _is_clip_l14(text_pipe.text_encoder):
        logger.info("using the shipped CLIP ViT-L/14 text covariance (%s)", SHIPPED_COVARIANCE.name)
        return load_shipped_covariance()
    prompts = list(prompts) if prompts is not None else builtin_covariance_prompts()
    h = _hash_text_encoders(text_pipe)
    h.update(json.dumps({"prompts": prompts, "tokens": tokens, "v": _COVARIANCE_CACHE_VERSION}).encode())
    key = h.hexdigest()[:24]
    if cache_dir is None:
        cache_dir = nullbooth_cache_dir() / "perfusion"
    path = Path(cache_dir) / f"text_covariance_{key}.safetensors"
    if path.is_file():
        C = load_file(str(path))["C"]
        if C.shape != (width, width):
            raise NullBoothError(
                f"cached covariance {path} has shape {tuple(C.shape)}, expected ({width}, "
                f"{width}); delete it"
            )
        logger.info("loaded cached text covariance %s", path)
        return C
    stat = encoding_second_moment(text_pipe, prompts, batch_size, tokens=tokens)
    C = stat.moment()
    save_tensors(path, {"C": C, "sum": stat.sum, "count": torch.tensor([stat.count], dtype=torch.int64)},
                 {"key": key, "n_prompts": str(len(prompts)), "tokens": tokens, "nullbooth_version": __version__})
    logger.info("computed text covariance from %d prompts (%d encodings), cached at %s", len(prompts), stat.count, path)
    return C


def shipped_covariance_for(dim: int) -> Tensor:
    """The shipped ``C`` where the text width ``dim`` is CLIP ViT-L/14's; refuses any other width."""
    if dim != CLIP_L14_TEXT_WIDTH:
        raise NullBoothError(
            f"no shipped covariance fits text width {dim} (only CLIP-L/14, 768); pass C=default_covariance(pipe)"
        )
    return load_shipped_covariance()


# --------------------------------------------------------------------------- where a run's C comes from


def read_covariance_file(path: str | Path) -> Tensor:
    """``C`` (float64 ``[d, d]``) from a ``.npy`` file or a ``.safetensors`` file with tensor ``C``."""
    path = Path(path)
    if not path.is_file():
        raise NullBoothError(f"perfusion.covariance_file: expected a file at {path}, found nothing")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise NullBoothError(f"perfusion.covariance_file: {path} is not a plain .npy array ({err})") from None
        return torch.from_numpy(np.asarray(array, dtype=np.float64))
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if "C" not in tensors:
            raise NullBoothError(f"perfusion.covariance_file: {path} has no tensor 'C' (has {sorted(tensors)[:4]})")
        return tensors["C"].to(torch.float64)
    raise NullBoothError(f"perfusion.covariance_file: expected a .npy or .safetensors file, got {path.name}")


def _sha256(C: Tensor) -> str:
    return hashlib.sha256(C.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()


def resolve_covariance(pipe: Any, block: PerfusionBlock) -> tuple[Tensor, dict[str, Any]]:
    """``C`` for ``pipe``'s (base) text encoding and how it was obtained (recorded in ``perfusion_config.json``).

    ``covariance_file`` → that matrix (:func:`inverse_covariance` refuses one that is not as wide as the encodings
    ``attn2`` reads, :func:`text_width`, when the editor is built); ``covariance_prompts`` → computed from those
    prompts (cached); otherwise :func:`default_covariance` (shipped for SD 1.x, else computed from a built-in prompt
    list and cached). Call it before the concept token is added.
    """
    if block.covariance_file is not None:
        path = Path(block.covariance_file).resolve()
        C, source = read_covariance_file(path), {"kind": "file", "path": str(path)}
    elif block.covariance_prompts is not None:
        path = Path(block.covariance_prompts).resolve()
        prompts = read_prompt_file(path, "perfusion.covariance_prompts")
        C, source = default_covariance(pipe, prompts), {"kind": "prompts", "path": str(path), "n_prompts": len(prompts)}
    else:
        C, source = default_covariance(pipe), {"kind": "default"}
    source["shape"] = list(C.shape)
    source["sha256"] = _sha256(C)
    return C, source
