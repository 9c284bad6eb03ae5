"""Perfusion: key-locked, gated rank-1 edits of the cross-attention K/V projections.

Tewel, Gal, Chechik, Atzmon, *Key-Locked Rank One Editing for Text-to-Image Personalization*
(SIGGRAPH 2023). Every ``to_k`` / ``to_v`` of a cross-attention (``attn2``) layer is a bias-free
linear map ``W`` of the text encoding ``e``. Perfusion replaces it by the gated rank-1 edit
(eq. 3, Algorithm 1 of the paper)::

    s(e)   = i*ᵀ C⁻¹ e / (i*ᵀ C⁻¹ i*)                      similarity of e to the concept input i*
    W'(e)  = W e − s(e) · W i*  +  σ((s(e) − β) / τ) · o*   remove e's i*-component, add the gated o*

* ``i*`` — the concept token's text encoding at its own position, an EMA over training batches.
* ``C``  — the uncentered second moment of text encodings (DESIGN §2); only ``C⁻¹`` is used.
* ``o*`` — for **values** a trainable vector (the "what"); for **keys** it is *locked* to the
  superclass: ``o*_K = W_K · e_H`` with ``e_H`` the superclass word's encoding at the concept
  position of the same prompt (the "where"). Keys therefore have no trainable parameter at all.
* ``β, τ`` — gate bias/temperature (train 0.75/0.1, inference 0.70/0.15; overridable per call).

Several concepts (Appendix B): the concept-removal term becomes the C⁻¹-orthogonal projection on
``span{i*_k}``; ``multi_concepts_use_cholesky=False`` uses the paper's approximation
``Σ_k s_k W i*_k`` (exact when the ``i*_k`` are C⁻¹-orthogonal), ``True`` the exact projection via
the Cholesky factor of ``C⁻¹`` and a QR step (eqs. 6-10; done here in the C⁻¹ metric, which the
seed's code gets wrong).

Product contract (stricter than the paper): the edit is applied **only to text sequences that
contain a concept token**, and only for the concepts they contain. Every other sequence -- plain
prompts, the empty/negative prompt of classifier-free guidance -- goes through ``F.linear(e, W)``,
the very op of the wrapped ``nn.Linear``, so the base model's outputs are reproduced exactly.

How the modules learn which rows hold a concept: diffusers calls ``attn.to_k(encoder_hidden_states)``
with one tensor. A :class:`PerfusionContext` hooks the text encoder; every call whose ``input_ids``
contain a concept token is recorded (encoding, concept positions, and a second no-grad pass with the
concept token replaced by the superclass word for key locking). Each rank-1 module matches the rows
of its input against the recorded encodings (same storage, else exact value equality -- the
pipelines only cast/repeat/concatenate them), so a plain ``StableDiffusionPipeline.__call__`` and
manual ``text_encoder`` → ``unet`` calls in a training loop both work without extra arguments.

The high-level entry point is :class:`PerfusionEditor` (attach / trainable_parameters / context /
save / load / detach).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nullbooth import __version__
from nullbooth.errors import NullBoothError
from nullbooth.filenames import SHIPPED_COVARIANCE
from nullbooth.stats.capture import cross_attention_layers
from nullbooth.stats.moments import SecondMoment

logger = logging.getLogger(__name__)

__all__ = [
    "CONCEPT_FORMAT", "CONCEPT_FORMAT_VERSION", "DEFAULT_EMBEDDING_LR", "DEFAULT_VALUE_LR",
    "SD15_ATTN2_VALUE_WIDTHS", "ConceptToken", "ConceptTokenEmbedding", "PerfusionConcept",
    "PerfusionContext", "PerfusionEditor", "Rank1EditModule", "add_concept_token_",
    "calculate_input_covariance", "concept_file_bytes", "default_covariance",
    "find_cross_attention_layers", "inverse_covariance", "load_concept", "load_shipped_covariance",
    "loss_fn_weighted_by_mask", "make_key_value_proj_rank1_edit_modules_",
    "make_unet_rank1_edit_modules_", "merge_rank1_edit_modules", "remove_unet_rank1_edit_modules_",
    "save_concept", "superclass_token_ids",
]

# --------------------------------------------------------------------------------------------------
# constants

CLIP_L14_TEXT_WIDTH = 768
CLIP_VOCAB_SIZE = 49408

CONCEPT_FORMAT = "nullbooth.methods.perfusion.core.concept"
CONCEPT_FORMAT_VERSION = 1
_COVARIANCE_CACHE_VERSION = 1

# Learning rates of the two trainable tensors. The paper trains the concept embedding with a lower
# rate than o*_V; these values follow lucidrains' reading of it ("0.006 vs 0.03").
DEFAULT_VALUE_LR = 0.03
DEFAULT_EMBEDDING_LR = 0.006

# Prompts used to initialise i* and o*_V when a concept is attached (the mean over them).
_INIT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a good photo of a {}", "a photo of one {}", "a photo of the {}",
)

# SD 1.x/1.5 UNet: the 16 cross-attention layers and the output width of their to_v (= to_k).
SD15_ATTN2_VALUE_WIDTHS: dict[str, int] = {
    **{f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2": w
       for b, w in enumerate((320, 640, 1280)) for a in range(2)},
    **{f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2": w
       for b, w in zip((1, 2, 3), (1280, 640, 320)) for a in range(3)},
    "mid_block.attentions.0.transformer_blocks.0.attn2": 1280,
}


# --------------------------------------------------------------------------------------------------
# the input second moment C and its inverse


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


def _text_components(obj: Any) -> tuple[nn.Module, Any]:
    """(text_encoder, tokenizer) from a pipeline or a ``(text_encoder, tokenizer)`` pair."""
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    te, tok = getattr(obj, "text_encoder", None), getattr(obj, "tokenizer", None)
    if te is None or tok is None:
        raise NullBoothError(
            f"expected a diffusers pipeline with text_encoder and tokenizer, or a (text_encoder, tokenizer) pair; "
            f"got {type(obj).__name__}"
        )
    return te, tok


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def accumulate_text_second_moment(text_encoder: nn.Module, tokenizer: Any, texts: Sequence[str],
                                  batch_size: int = 32, *, tokens: Literal["all", "real"] = "all") -> SecondMoment:
    """Streaming float64 ``Σ e eᵀ`` and count over text encodings (see :func:`calculate_input_covariance`)."""
    if tokens not in ("all", "real"):
        raise NullBoothError(f"expected tokens='all' or 'real', got {tokens!r}")
    texts = list(texts)
    if not texts:
        raise NullBoothError("expected at least one prompt to compute the covariance from, got none")
    if batch_size < 1:
        raise NullBoothError(f"expected batch_size >= 1, got {batch_size}")
    device = _module_device(text_encoder)
    stat: SecondMoment | None = None
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding="max_length", truncation=True,
                          max_length=tokenizer.model_max_length, return_tensors="pt")
        enc = text_encoder(batch.input_ids.to(device))[0]  # [b, n, d]
        if stat is None:
            stat = SecondMoment(enc.shape[-1])
        if tokens == "real":
            enc = enc[batch.attention_mask.to(device).bool()]  # [Σ real tokens, d]: BOS, words, EOS
        stat.add(enc)
    assert stat is not None
    return stat


def calculate_input_covariance(pipe_or_text_encoder_and_tokenizer: Any, texts: Sequence[str],
                               batch_size: int = 32, *, tokens: Literal["all", "real"] = "all") -> Tensor:
    """The input second moment ``C = Σ e eᵀ / n`` (float64 ``[d, d]``) of the model's own text encodings.

    ``tokens='all'`` (default) counts every one of the ``model_max_length`` (77) positions, padding
    included: SD 1.x/2.x pipelines pass no attention mask to the UNet, so every cross-attention
    layer's ``to_k``/``to_v`` really reads all of them, and the edit is applied to all of them.
    ``tokens='real'`` keeps only the tokenizer's attention mask (BOS, words, EOS) -- how the shipped
    CLIP-L/14 matrix was computed upstream. ``n`` is the number of token encodings accumulated.
    """
    text_encoder, tokenizer = _text_components(pipe_or_text_encoder_and_tokenizer)
    return accumulate_text_second_moment(text_encoder, tokenizer, texts, batch_size, tokens=tokens).moment()


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


def _hash_text_encoder(text_encoder: nn.Module, tokenizer: Any) -> hashlib._Hash:
    h = hashlib.sha256()
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
    """``C`` for ``pipe``'s text encoder (float64): shipped, cached, or computed and cached.

    * no ``prompts`` and an SD 1.x CLIP ViT-L/14 text encoder (CLIP text model, width 768, CLIP vocab):
      the shipped matrix;
    * otherwise ``C`` is computed from ``prompts`` (default :func:`builtin_covariance_prompts`) and
      cached as safetensors under ``cache_dir`` (default ``$NULLBOOTH_CACHE/perfusion``), keyed by a
      hash of the text-encoder weights, the tokenizer, the prompts and ``tokens``.
    """
    text_encoder, tokenizer = _text_components(pipe)
    width = text_encoder.config.hidden_size
    if prompts is None and _is_clip_l14(text_encoder):
        logger.info("using the shipped CLIP ViT-L/14 text covariance (%s)", SHIPPED_COVARIANCE.name)
        return load_shipped_covariance()
    prompts = list(prompts) if prompts is not None else builtin_covariance_prompts()
    h = _hash_text_encoder(text_encoder, tokenizer)
    h.update(json.dumps({"prompts": prompts, "tokens": tokens, "v": _COVARIANCE_CACHE_VERSION}).encode())
    key = h.hexdigest()[:24]
    if cache_dir is None:
        from nullbooth.models import cache_dir as _nullbooth_cache

        cache_dir = _nullbooth_cache() / "perfusion"
    path = Path(cache_dir) / f"text_covariance_{key}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        C = load_file(str(path))["C"]
        if C.shape != (width, width):
            raise NullBoothError(
                f"cached covariance {path} has shape {tuple(C.shape)}, expected ({width}, "
                f"{width}); delete it"
            )
        logger.info("loaded cached text covariance %s", path)
        return C
    stat = accumulate_text_second_moment(text_encoder, tokenizer, prompts, batch_size, tokens=tokens)
    C = stat.moment()
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cov-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({"C": C, "sum": stat.sum.cpu(), "count": torch.tensor([stat.count], dtype=torch.int64)}, tmp,
                  metadata={"key": key, "n_prompts": str(len(prompts)), "tokens": tokens,
                            "nullbooth_version": __version__})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("computed text covariance from %d prompts (%d encodings), cached at %s", len(prompts), stat.count, path)
    return C


# --------------------------------------------------------------------------------------------------
# loss


def loss_fn_weighted_by_mask(pred: Tensor, target: Tensor, mask: Tensor, normalized_mask_min_value: float = 0.0) -> Tensor:
    """MSE over channels, weighted per pixel by ``mask`` normalised to max 1 per image.

    ``pred``/``target``: ``[b, c, h, w]``; ``mask``: ``[b, h, w]`` or ``[b, 1, h, w]`` at the same
    ``h × w`` (resize an image-resolution mask to the latent size first). Weights below
    ``normalized_mask_min_value`` are raised to it, so background keeps some loss.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise NullBoothError(
            "expected pred and target of one shape [b, c, h, w], "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise NullBoothError(f"expected a single-channel mask [b, 1, h, w], got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise NullBoothError(f"expected a mask [b, h, w] or [b, 1, h, w], got {tuple(mask.shape)}")
    if mask.shape[-2:] != pred.shape[-2:]:
        raise NullBoothError(
            f"expected a mask of spatial size {tuple(pred.shape[-2:])} (the prediction's), got {tuple(mask.shape[-2:])}; "
            "resize it first, e.g. F.interpolate(mask[:, None], size=latents.shape[-2:], mode='nearest')"
        )
    if mask.shape[0] != pred.shape[0]:
        raise NullBoothError(f"expected one mask per sample ({pred.shape[0]}), got {mask.shape[0]}")
    if (mask < 0).any():
        raise NullBoothError("expected mask values >= 0, got negative values")
    if not 0.0 <= normalized_mask_min_value <= 1.0:
        raise NullBoothError(f"expected normalized_mask_min_value in [0, 1], got {normalized_mask_min_value}")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=1)  # [b, h, w]
    peak = mask.float().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-5)  # per-image max
    weight = (mask.float() / peak).clamp(min=normalized_mask_min_value)
    return (loss * weight).mean()


# --------------------------------------------------------------------------------------------------
# tokenizer / concept token embedding


@dataclasses.dataclass(frozen=True)
class ConceptToken:
    """A concept token added to a tokenizer, with the superclass it is locked to."""

    token: str
    token_id: int
    superclass: str
    superclass_ids: tuple[int, ...]


def superclass_token_ids(tokenizer: Any, superclass: str) -> tuple[int, ...]:
    """Token ids of the superclass word(s) without BOS/EOS (a multi-token superclass gives several)."""
    if not isinstance(superclass, str) or not superclass.strip():
        raise NullBoothError(f"expected a superclass word such as 'dog', got {superclass!r}")
    ids = tuple(int(i) for i in tokenizer(superclass, add_special_tokens=False).input_ids)
    if not ids:
        raise NullBoothError(f"the superclass {superclass!r} tokenizes to nothing; give a real word")
    return ids


def _check_new_token(tokenizer: Any, token: str) -> None:
    if not isinstance(token, str) or not token or re.search(r"\s", token):
        raise NullBoothError(f"expected a concept token without whitespace such as '<my-teddy>', got {token!r}")
    vocab = tokenizer.get_vocab()
    if token in vocab or f"{token}</w>" in vocab or token.lower() in vocab or f"{token.lower()}</w>" in vocab:
        raise NullBoothError(
            f"the concept token {token!r} already exists in the tokenizer's vocabulary; Perfusion adds a new token -- "
            "pick an unused string such as '<my-teddy>'"
        )


def add_concept_token_(tokenizer: Any, text_encoder: nn.Module, concept_token: str, superclass: str) -> ConceptToken:
    """Add ``concept_token`` to ``tokenizer`` (in place) and grow the text encoder's token embeddings.

    The new embedding row is initialised from the superclass: the mean of its tokens' input
    embeddings (one token: exactly its embedding; ``"sea lion"``: the mean of ``sea`` and ``lion``).
    Raises if the token already exists in the vocabulary.
    """
    _check_new_token(tokenizer, concept_token)
    sup_ids = superclass_token_ids(tokenizer, superclass)
    old = text_encoder.get_input_embeddings()
    if not isinstance(old, nn.Embedding):
        raise NullBoothError(
            "expected the text encoder's input embeddings to be an nn.Embedding, "
            f"got {type(old).__name__}"
        )
    if tokenizer.add_tokens([concept_token]) != 1:
        raise NullBoothError(
            f"the tokenizer refused to add {concept_token!r}; "
            "it already knows it -- pick another token"
        )
    token_id = int(tokenizer.convert_tokens_to_ids(concept_token))
    rows = max(token_id + 1, old.num_embeddings)
    new = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx,
                       device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.num_embeddings].copy_(old.weight)
        new.weight[token_id].copy_(old.weight[list(sup_ids)].mean(0))
    new.weight.requires_grad_(old.weight.requires_grad)
    text_encoder.set_input_embeddings(new)
    text_encoder.config.vocab_size = rows
    return ConceptToken(concept_token, token_id, superclass, sup_ids)


class ConceptTokenEmbedding(nn.Module):
    """Token embedding whose concept rows come from a small trainable ``vectors`` parameter.

    Wraps the (grown) ``nn.Embedding`` of the text encoder, which stays frozen. Ids that are not
    concept tokens return the base rows bit for bit; only ``vectors`` (``[k, d]``) is trainable, so
    the optimiser (and its weight decay) can never touch the rest of the vocabulary.
    """

    def __init__(self, base: nn.Embedding, token_ids: Sequence[int]) -> None:
        super().__init__()
        self.base_layer = base
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=base.weight.device)
        self.register_buffer("token_ids", ids, persistent=False)
        self.vectors = nn.Parameter(base.weight.detach()[ids].clone())  # [k, d]

    @property
    def weight(self) -> Tensor:  # for code that reads get_input_embeddings().weight
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.base_layer(input_ids)  # [..., d]
        hit = input_ids[..., None] == self.token_ids.to(input_ids.device)  # [..., k]
        if not bool(hit.any()):
            return out
        which = hit.to(torch.uint8).argmax(-1)  # [...] index of the concept
        concept = self.vectors.to(out.dtype)[which]  # [..., d]
        return torch.where(hit.any(-1)[..., None], concept, out)


# --------------------------------------------------------------------------------------------------
# per-call context: which rows / positions hold a concept, and the superclass encodings


@dataclasses.dataclass
class RowPlan:
    """Which rows of a ``[b, n, d]`` text encoding carry concepts (``r`` of them, ``K`` concepts)."""

    rows: Tensor  # [r] long, batch rows that contain at least one concept token
    active: Tensor  # [r, K] bool, concept k occurs in the row
    positions: Tensor  # [r, K] long, first position of concept k (0 where absent)
    superclass_enc: Tensor | None  # [r, K, d] superclass encoding at that position (zeros where absent)


@dataclasses.dataclass
class _Record:
    hidden: Tensor  # [B, N, d] detached text encoding of a prompt batch holding concept tokens
    positions: Tensor  # [B, K] long, first position of each concept, -1 where absent
    super_at: Tensor  # [B, K, d] superclass encoding at the concept position (zeros where absent)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient × ``scale`` backward (the paper's lower rate into the concept embedding)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class PerfusionContext:
    """Per-call information for the rank-1 edit modules, gathered from the text encoder.

    ``install(text_encoder)`` registers a forward hook. Every text-encoder call whose ``input_ids``
    contain a concept token is recorded: the encoding (``last_hidden_state``; with
    ``output_hidden_states=True`` also every layer after ``final_layer_norm``, which is what the SD
    pipelines feed the UNet with ``clip_skip``), the first position of each concept, and -- from a
    second, no-grad pass where each concept token is replaced by its superclass tokens -- the
    superclass encoding at the concept position (for a multi-token superclass: at its *last* token,
    which in a causal text encoder has seen the whole word). Records are kept in a bounded queue.

    :meth:`plan` maps the rows of a cross-attention input to those records. Use ``with ctx:`` (or
    :meth:`PerfusionEditor.context`) to start and end with an empty record and to override β/τ.
    """

    def __init__(self, concepts: Sequence[ConceptToken], *, max_records: int = 32) -> None:
        self.concepts: list[ConceptToken] = list(concepts)
        self.beta: float | None = None
        self.tau: float | None = None
        self._records: deque[_Record] = deque(maxlen=max_records)
        self._cache: tuple[Tensor, int, RowPlan | None] | None = None
        self._hook: Any = None
        self._busy = False
        self._recorded = 0
        self._matched = 0
        self._depth = 0

    # -- concepts --
    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    def _token_ids(self, device: torch.device) -> Tensor:
        return torch.tensor([c.token_id for c in self.concepts], dtype=torch.long, device=device)

    # -- hook --
    def install(self, text_encoder: nn.Module) -> None:
        if self._hook is not None:
            raise NullBoothError("this PerfusionContext is already installed on a text encoder")
        self._hook = text_encoder.register_forward_hook(self._on_text_encoder, with_kwargs=True)

    def uninstall(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.clear()

    def clear(self) -> None:
        self._records.clear()
        self._cache = None

    def _substitute(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """Replace every concept token by its superclass ids (truncated to the original length)."""
        B, N = input_ids.shape
        index = {c.token_id: k for k, c in enumerate(self.concepts)}
        out, mask = input_ids.clone(), None if attention_mask is None else attention_mask.clone()
        sup_pos = torch.full((B, self.num_concepts), -1, dtype=torch.long)
        for b, row in enumerate(input_ids.tolist()):
            if not any(t in index for t in row):
                continue
            new: list[int] = []
            new_mask: list[int] = []
            m_row = None if attention_mask is None else attention_mask[b].tolist()
            for t, tok in enumerate(row):
                k = index.get(tok)
                span = [tok] if k is None else list(self.concepts[k].superclass_ids)
                new.extend(span)
                if m_row is not None:
                    new_mask.extend([m_row[t]] * len(span))
                if k is not None and sup_pos[b, k] < 0:
                    sup_pos[b, k] = min(len(new) - 1, N - 1)  # the superclass's last token
            out[b] = torch.tensor(new[:N], dtype=out.dtype)
            if mask is not None:
                mask[b] = torch.tensor(new_mask[:N], dtype=mask.dtype)
        return out, mask, sup_pos

    def _candidates(self, module: nn.Module, output: Any) -> list[Tensor]:
        """The encodings a pipeline may pass on: last_hidden_state, and with hidden states every normed layer."""
        last = output[0]
        found = [last]
        hidden_states = getattr(output, "hidden_states", None)
        # transformers 5 keeps final_layer_norm on CLIPTextModel itself, 4.x under .text_model
        norm = getattr(module, "final_layer_norm", None)
        if norm is None:
            norm = getattr(getattr(module, "text_model", None), "final_layer_norm", None)
        if hidden_states is not None and norm is not None:
            with torch.no_grad():
                found += [norm(h) for h in hidden_states]
        return found

    def _on_text_encoder(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._busy or not self.concepts:
            return None
        input_ids = args[0] if args else kwargs.get("input_ids")
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            return None
        hit = input_ids[..., None] == self._token_ids(input_ids.device)  # [B, N, K]
        if not bool(hit.any()):
            return None
        present = hit.any(1)  # [B, K]
        positions = torch.where(present, hit.to(torch.uint8).argmax(1), torch.full_like(present, -1, dtype=torch.long))
        attention_mask = kwargs.get("attention_mask")
        cpu_mask = None if attention_mask is None else attention_mask.cpu()
        sup_ids, sup_mask, sup_pos = self._substitute(input_ids.cpu(), cpu_mask)
        call_kwargs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
        if sup_mask is not None:
            call_kwargs["attention_mask"] = sup_mask.to(attention_mask.device)
        self._busy = True
        try:
            with torch.no_grad():
                sup_out = module(sup_ids.to(input_ids.device), **call_kwargs)
        finally:
            self._busy = False
        concept_encs, super_encs = self._candidates(module, output), self._candidates(module, sup_out)
        sup_pos = sup_pos.to(input_ids.device)
        for enc, sup in zip(concept_encs, super_encs):
            B = enc.shape[0]
            gather = sup_pos.clamp(min=0)  # [B, K]
            super_at = sup.detach()[torch.arange(B, device=sup.device)[:, None], gather.to(sup.device)]  # [B, K, d]
            super_at = super_at * present.to(super_at.device)[..., None]
            self._records.append(_Record(enc.detach(), positions.to(enc.device), super_at))
        self._recorded += 1
        return None

    # -- matching --
    def record(self, input_ids: Tensor, hidden: Tensor, superclass_hidden: Tensor) -> None:
        """Record an encoding computed elsewhere (``superclass_hidden``: the same prompts with superclass words)."""
        hit = input_ids[..., None] == self._token_ids(input_ids.device)
        present = hit.any(1)
        positions = torch.where(present, hit.to(torch.uint8).argmax(1), torch.full_like(present, -1, dtype=torch.long))
        _, _, sup_pos = self._substitute(input_ids.cpu(), None)
        sup_pos = sup_pos.clamp(min=0).to(superclass_hidden.device)
        B = hidden.shape[0]
        super_at = superclass_hidden.detach()[torch.arange(B, device=superclass_hidden.device)[:, None], sup_pos]
        super_at = super_at * present.to(super_at.device)[..., None]
        self._records.append(_Record(hidden.detach(), positions.to(hidden.device), super_at))
        self._recorded += 1

    def plan(self, x: Tensor) -> RowPlan | None:
        """Rows of ``x`` (``[b, n, d]``) that are recorded concept encodings; ``None`` when there are none."""
        if self._cache is not None and self._cache[0] is x and self._cache[1] == x._version:
            return self._cache[2]
        plan = self._match(x)
        self._cache = (x, x._version, plan)
        if plan is not None:
            self._matched += 1
        return plan

    def _match(self, x: Tensor) -> RowPlan | None:
        if x.ndim != 3 or not self._records:
            return None
        K, b, d = self.num_concepts, x.shape[0], x.shape[-1]
        found: dict[int, tuple[_Record, int]] = {}
        xd = x.detach()
        for rec in reversed(self._records):  # newest first
            h = rec.hidden
            if h.shape[1:] != x.shape[1:]:
                continue
            same_storage = h.data_ptr() == xd.data_ptr() and h.dtype == xd.dtype
            if same_storage and h.shape == xd.shape and h.stride() == xd.stride():  # the very tensor: every row
                for r in range(b):
                    found.setdefault(r, (rec, r))
                break
            hc = h.to(device=xd.device, dtype=xd.dtype)
            same_last = (xd[:, -1, None, :] == hc[None, :, -1, :]).all(-1)  # [b, B] cheap signature: last position
            for r, j in same_last.nonzero().tolist():
                if r not in found and torch.equal(xd[r], hc[j]):
                    found[r] = (rec, j)
            if len(found) == b:
                break
        # only rows that really hold a concept: the others must keep the exact F.linear output
        rows = sorted(r for r, (rec, j) in found.items() if bool((rec.positions[j] >= 0).any()))
        if not rows:
            return None
        positions = torch.stack([found[r][0].positions[found[r][1]].to(x.device) for r in rows])  # [r, K]
        super_at = torch.stack([found[r][0].super_at[found[r][1]].to(x.device) for r in rows])  # [r, K, d]
        active = positions >= 0
        assert super_at.shape[-1] == d and positions.shape[-1] == K
        return RowPlan(torch.tensor(rows, dtype=torch.long, device=x.device), active, positions.clamp(min=0), super_at)

    # -- scoping --
    @contextlib.contextmanager
    def override(self, beta: float | None = None, tau: float | None = None) -> Iterator["PerfusionContext"]:
        """Temporarily override the gate's β and τ (both phases) for calls inside the block."""
        if tau is not None and tau <= 0:
            raise NullBoothError(f"expected a gate temperature tau > 0, got {tau}")
        old = (self.beta, self.tau)
        self.beta = beta if beta is not None else self.beta
        self.tau = tau if tau is not None else self.tau
        try:
            yield self
        finally:
            self.beta, self.tau = old

    def __enter__(self) -> "PerfusionContext":
        if self._depth == 0:
            self.clear()
            self._recorded = self._matched = 0
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            if exc[0] is None and self._recorded and not self._matched:
                warnings.warn(
                    "prompts with a Perfusion concept token were encoded but no cross-attention input matched their "
                    "encodings, so the concept was not applied; pass the text encoder's output (or the pipeline's "
                    "prompt_embeds) to the UNet unchanged", stacklevel=3,
                )
            self.clear()


# --------------------------------------------------------------------------------------------------
# the rank-1 edit module


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. gradient-checkpoint recomputation)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _as_concept_ids(concept_id: int | tuple[int, ...], K: int) -> tuple[int, ...]:
    ids = (concept_id,) if isinstance(concept_id, int) else tuple(concept_id)
    if not ids or len(set(ids)) != len(ids) or any(not 0 <= c < K for c in ids):
        raise NullBoothError(f"expected distinct concept ids in [0, {K}), got {concept_id}")
    return ids


class Rank1EditModule(nn.Module):
    """A bias-free K or V projection ``W`` (``[o, i]``) with Perfusion's gated rank-1 edit (eq. 3).

    ``out = W e − Σ_k s_k W i*_k + Σ_k σ((s_k − β)/τ) o*_k`` over the concepts ``k`` present in the
    row, ``s_k = i*_kᵀC⁻¹e / i*_kᵀC⁻¹i*_k``; rows without a concept get ``F.linear(e, W)`` exactly.

    * values (``is_key_proj=False``): ``concept_outputs`` ``[K, o]`` is the trainable ``o*``,
      initialised to ``W i_H`` (superclass encoding at the concept position) on first use.
    * keys (``is_key_proj=True``): ``o* = W e_H`` per prompt, from the superclass encoding of the same
      prompt; keys have no trainable parameter.
    * ``ema_concept_text_encs`` ``[K, i]`` holds ``i*``, updated in training as
      ``i* ← decay·i* + (1−decay)·mean(e at the concept position)`` (Algorithm 1), with the straight-
      through gradient into the current concept encoding.
    * ``C_inv`` is a non-persistent buffer: it is never part of a saved state.
    * ``frac_gradient_concept_embed`` scales the gradient flowing from the edited rows back into the
      text encoder (hence the concept embedding); the forward value is unchanged. Under Adam a
      constant gradient scale is nearly a no-op, so :meth:`PerfusionEditor.trainable_parameters`
      also gives the embedding its own, lower learning rate.

    The wrapped ``weight`` is the same ``Parameter`` object as the original linear's (state-dict key
    unchanged); ``base_layer`` is kept for an exact undo.
    """

    def __init__(
        self,
        key_or_values_proj: nn.Linear,
        *,
        num_concepts: int = 1,
        C: Tensor | np.ndarray | None = None,
        C_inv: Tensor | None = None,
        default_model: str = "SD15",
        text_seq_len: int | None = None,
        is_key_proj: bool = False,
        input_decay: float = 0.99,
        train_beta: float = 0.75,
        train_temperature: float = 0.1,
        eval_beta: float = 0.70,
        eval_temperature: float = 0.15,
        frac_gradient_concept_embed: float = 0.1,
        multi_concepts_use_cholesky: bool = False,
        eigenvalue_floor: float | Literal["auto"] | None = None,
        context: PerfusionContext | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(key_or_values_proj, nn.Linear):
            raise NullBoothError(f"expected an nn.Linear K/V projection, got {type(key_or_values_proj).__name__}")
        if key_or_values_proj.bias is not None:
            raise NullBoothError(
                "expected a bias-free K/V projection (a rank-1 edit of W e), "
                "got an nn.Linear with a bias"
            )
        if num_concepts < 1:
            raise NullBoothError(f"expected num_concepts >= 1, got {num_concepts}")
        if not 0.0 <= input_decay < 1.0:
            raise NullBoothError(f"expected input_decay in [0, 1), got {input_decay}")
        if train_temperature <= 0 or eval_temperature <= 0:
            raise NullBoothError(
                f"expected gate temperatures > 0, got train {train_temperature}, "
                f"eval {eval_temperature}"
            )
        if not 0.0 < frac_gradient_concept_embed <= 1.0:
            raise NullBoothError(f"expected frac_gradient_concept_embed in (0, 1], got {frac_gradient_concept_embed}")
        self.weight = key_or_values_proj.weight  # the same Parameter: state-dict key "<proj>.weight" is unchanged
        self.register_parameter("bias", None)
        self.__dict__["base_layer"] = key_or_values_proj  # not a submodule: no duplicate state
        dim_out, dim_in = self.weight.shape
        self.in_features, self.out_features = dim_in, dim_out
        self.is_key_proj = is_key_proj
        self.input_decay = input_decay
        self.train_beta, self.train_temperature = train_beta, train_temperature
        self.eval_beta, self.eval_temperature = eval_beta, eval_temperature
        self.frac_gradient_concept_embed = frac_gradient_concept_embed
        self.multi_concepts_use_cholesky = multi_concepts_use_cholesky
        self.text_seq_len = text_seq_len
        self.context = context

        if C_inv is None:
            if C is None:
                if default_model != "SD15" or dim_in != CLIP_L14_TEXT_WIDTH:
                    raise NullBoothError(
                        f"no shipped covariance fits text width {dim_in} (only SD15 CLIP-L/14, width 768); pass "
                        "C=calculate_input_covariance(pipe, prompts) or default_covariance(pipe)"
                    )
                C = load_shipped_covariance()
            C_inv = inverse_covariance(C, dim=dim_in, eigenvalue_floor=eigenvalue_floor)
        elif C_inv.shape != (dim_in, dim_in):
            raise NullBoothError(f"expected C_inv of shape ({dim_in}, {dim_in}), got {tuple(C_inv.shape)}")
        self.__dict__["_C_inv_master"] = C_inv.detach().to("cpu", torch.float64)
        self.register_buffer("C_inv", C_inv.detach().to(self.weight.device, torch.float32), persistent=False)
        self._chol: Tensor | None = None

        dev, dt = self.weight.device, self.weight.dtype
        self.register_buffer("initted", torch.zeros(num_concepts, dtype=torch.bool, device=dev))
        self.register_buffer("ema_concept_text_encs", torch.zeros(num_concepts, dim_in, dtype=dt, device=dev))
        if not is_key_proj:
            self.concept_outputs = nn.Parameter(torch.zeros(num_concepts, dim_out, dtype=dt, device=dev))

    # -- helpers --
    @property
    def num_concepts(self) -> int:
        return self.ema_concept_text_encs.shape[0]

    def extra_repr(self) -> str:
        kind = "key (locked to superclass)" if self.is_key_proj else "value"
        return f"in={self.in_features}, out={self.out_features}, {kind}, concepts={self.num_concepts}"

    def trainable_parameters(self) -> list[nn.Parameter]:
        """``[o*_V]`` for a value module, ``[]`` for a key module (W is never trained)."""
        return [] if self.is_key_proj else [self.concept_outputs]

    def _gate_params(self) -> tuple[float, float]:
        beta, tau = (self.train_beta, self.train_temperature) if self.training else (self.eval_beta, self.eval_temperature)
        if self.context is not None:
            beta = self.context.beta if self.context.beta is not None else beta
            tau = self.context.tau if self.context.tau is not None else tau
        return beta, tau

    def _c_inv(self, dtype: torch.dtype) -> Tensor:
        if dtype == torch.float64:  # a float64 computation gets the float64 master, not an upcast float32 copy
            return self._C_inv_master.to(self.C_inv.device)
        if self.C_inv.dtype not in (torch.float32, torch.float64):  # a .half() of the UNet: rebuild, keep precision
            self.C_inv = self._C_inv_master.to(self.C_inv.device, torch.float32)
        return self.C_inv.to(dtype)

    def _cholesky(self, dtype: torch.dtype) -> Tensor:
        """Lower ``L`` with ``C⁻¹ = L Lᵀ`` (Appendix B), cached."""
        if self._chol is None or self._chol.device != self.C_inv.device:
            try:
                L = torch.linalg.cholesky(self._C_inv_master)
            except RuntimeError:
                raise NullBoothError(
                    "C⁻¹ has no Cholesky factor (C is not positive definite); "
                    "use multi_concepts_use_cholesky=False"
                ) from None
            self._chol = L.to(self.C_inv.device)
        return self._chol.to(dtype)

    def _explicit_plan(self, text_enc: Tensor, concept_indices: Tensor, text_enc_with_superclass: Tensor | None,
                       concept_id: int | tuple[int, ...]) -> RowPlan:
        K, b = self.num_concepts, text_enc.shape[0]
        ids = _as_concept_ids(concept_id, K)
        ci = torch.as_tensor(concept_indices, device=text_enc.device).long()
        ci = ci[:, None] if ci.ndim == 1 else ci
        if ci.shape != (b, len(ids)) or (ci < 0).any() or (ci >= text_enc.shape[1]).any():
            raise NullBoothError(
                f"expected concept_indices of shape ({b},) or ({b}, "
                f"{len(ids)}) within the sequence, got {tuple(ci.shape)}"
            )
        positions = torch.zeros(b, K, dtype=torch.long, device=text_enc.device)
        active = torch.zeros(b, K, dtype=torch.bool, device=text_enc.device)
        positions[:, list(ids)] = ci
        active[:, list(ids)] = True
        sup = None
        if text_enc_with_superclass is not None:
            if text_enc_with_superclass.shape != text_enc.shape:
                raise NullBoothError(
                    f"expected text_enc_with_superclass of shape {tuple(text_enc.shape)}, "
                    f"got {tuple(text_enc_with_superclass.shape)}"
                )
            sup = text_enc_with_superclass.detach()[torch.arange(b, device=text_enc.device)[:, None], positions]  # [b, K, d]
            sup = sup * active[..., None]
        return RowPlan(torch.arange(b, device=text_enc.device), active, positions, sup)

    # -- forward --
    def forward(self, text_enc: Tensor, *, concept_indices: Tensor | None = None,
                text_enc_with_superclass: Tensor | None = None,
                concept_id: int | tuple[int, ...] = 0) -> Tensor:
        """``text_enc`` ``[b, n, i]`` → ``[b, n, o]``.

        Rows holding concepts come from ``concept_indices`` (``[b]`` or ``[b, len(concept_id)]``
        positions, all rows edited) when given, else from the attached :class:`PerfusionContext`.
        """
        if self.text_seq_len is not None and text_enc.shape[-2] != self.text_seq_len:
            raise NullBoothError(f"expected text encodings of length {self.text_seq_len}, got {text_enc.shape[-2]}")
        base = F.linear(text_enc, self.weight)  # [b, n, o]: exactly what the wrapped nn.Linear returns
        if concept_indices is not None:
            plan = self._explicit_plan(text_enc, concept_indices, text_enc_with_superclass, concept_id)
        elif self.context is not None and text_enc.ndim == 3:
            plan = self.context.plan(text_enc)
        else:
            plan = None
        if plan is None or plan.rows.numel() == 0:
            return base
        if plan.active.shape[-1] != self.num_concepts:
            raise NullBoothError(f"the context knows {plan.active.shape[-1]} concepts, this module {self.num_concepts}")
        edited = self._edit(text_enc[plan.rows], plan)  # [r, n, o]
        return base.index_put((plan.rows,), edited.to(base.dtype))

    def _edit(self, e: Tensor, plan: RowPlan) -> Tensor:
        if self.frac_gradient_concept_embed < 1.0 and e.requires_grad:
            e = _ScaleGrad.apply(e, self.frac_gradient_concept_embed)
        dtype = torch.promote_types(e.dtype, torch.float32)
        e = e.to(dtype)  # [r, n, i]
        W = self.weight.to(dtype)  # [o, i]
        Ci = self._c_inv(dtype)  # [i, i]
        active = plan.active  # [r, K]
        r = e.shape[0]
        cur = e[torch.arange(r, device=e.device)[:, None], plan.positions]  # [r, K, i] concept encodings
        present = active.any(0)  # [K]
        counts = active.sum(0).clamp(min=1).to(dtype)  # [K]
        cur_mean = (cur * active[..., None]).sum(0) / counts[:, None]  # [K, i] mean over rows holding k

        if self.training and not _in_backward():  # a checkpointed forward is re-run in backward: update once
            self._update_ema(cur_mean.detach(), present, plan, W)
        missing = present & ~self.initted
        if bool(missing.any()):
            raise NullBoothError(
                f"concept(s) {missing.nonzero().flatten().tolist()} have no i* yet; train (module.train()), "
                "initialise the editor, or load a concept file before inference"
            )
        i_star = self.ema_concept_text_encs.to(dtype).clone()  # [K, i]; clone: later EMA updates are in place
        if self.training:  # straight-through: value i*, gradient into this batch's concept encodings
            i_star = i_star + (cur_mean - cur_mean.detach()) * present[:, None]

        u = i_star @ Ci  # [K, i]  rows C⁻¹ i*_k (C⁻¹ symmetric)
        energy = (u * i_star).sum(-1)  # [K]   i*ᵀ C⁻¹ i*
        energy = torch.where(present, energy, torch.ones_like(energy))  # absent concepts never enter below
        s = (e @ u.T) / energy  # [r, n, K]  eq. 3 similarity
        a = active[:, None, :].to(dtype)  # [r, 1, K]
        We = e @ W.T  # [r, n, o]
        Wi = i_star @ W.T  # [K, o]
        if self.multi_concepts_use_cholesky and int(active.sum(1).max()) > 1:
            orth = self._orthogonal_cholesky(e, We, W, i_star, s, a, active)
        else:
            orth = We - (s * a) @ Wi  # W e − Σ_k s_k W i*_k (exact for one concept)
        beta, tau = self._gate_params()
        gate = torch.sigmoid((s - beta) / tau) * a  # [r, n, K]
        if self.is_key_proj:
            if plan.superclass_enc is None:
                raise NullBoothError("a key module locks o* to the superclass: pass text_enc_with_superclass with concept_indices")
            o_star = plan.superclass_enc.to(dtype) @ W.T  # [r, K, o]  o*_K = W e_H, per prompt
            gated = torch.einsum("rnk,rko->rno", gate, o_star)
        else:
            gated = gate @ self.concept_outputs.to(dtype)  # [r, n, o]
        return orth + gated

    def _orthogonal_cholesky(self, e: Tensor, We: Tensor, W: Tensor, i_star: Tensor, s: Tensor, a: Tensor,
                             active: Tensor) -> Tensor:
        """``W(e − Π e)`` with ``Π`` the C⁻¹-orthogonal projection on ``span{i*_k : k active}`` (App. B).

        With ``C⁻¹ = L Lᵀ``, the metric becomes Euclidean for ``ẽ = Lᵀ e``; ``Q = qr([Lᵀ i*_k])`` and
        ``Π e = L⁻ᵀ Q Qᵀ Lᵀ e``.
        """
        L = self._cholesky(e.dtype)  # [i, i] lower
        out = We - (s * a) @ (i_star @ W.T)  # rows with one active concept: the single formula
        patterns, inverse = torch.unique(active.to(torch.uint8), dim=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            ks = pattern.nonzero().flatten()
            if ks.numel() < 2:
                continue
            rows = (inverse == p).nonzero().flatten()
            Q, _ = torch.linalg.qr((i_star[ks] @ L).T)  # [i, m]  columns: orthonormal basis of {Lᵀ i*_k}
            coef = e[rows] @ (L @ Q)  # [r', n, m]  Qᵀ Lᵀ e
            U = torch.linalg.solve_triangular(L.T, Q, upper=True)  # [i, m]  L⁻ᵀ Q
            out[rows] = We[rows] - coef @ (U.T @ W.T)
        return out

    @torch.no_grad()
    def _update_ema(self, cur_mean: Tensor, present: Tensor, plan: RowPlan, W: Tensor) -> None:
        decay = self.input_decay
        for k in present.nonzero().flatten().tolist():
            x = cur_mean[k].to(self.ema_concept_text_encs.dtype)
            if not bool(self.initted[k]):
                self.ema_concept_text_encs[k] = x
                self.initted[k] = True
                if not self.is_key_proj:  # o*_V starts at the superclass's value W i_H
                    rows = plan.active[:, k]
                    src = plan.superclass_enc[rows, k].mean(0) if plan.superclass_enc is not None else cur_mean[k]
                    self.concept_outputs[k] = (W @ src.to(W.dtype)).to(self.concept_outputs.dtype)
            else:
                self.ema_concept_text_encs[k] = self.ema_concept_text_encs[k] * decay + x * (1.0 - decay)

    @torch.no_grad()
    def set_concept(self, k: int, i_star: Tensor, o_star: Tensor | None = None) -> None:
        """Set concept ``k``'s ``i*`` (and, for a value module, ``o*``), marking it initialised."""
        if i_star.shape != (self.in_features,):
            raise NullBoothError(f"expected i* of shape ({self.in_features},), got {tuple(i_star.shape)}")
        self.ema_concept_text_encs[k] = i_star.to(self.ema_concept_text_encs)
        if not self.is_key_proj:
            if o_star is None or o_star.shape != (self.out_features,):
                raise NullBoothError(
                    f"expected o* of shape ({self.out_features},), "
                    f"got {None if o_star is None else tuple(o_star.shape)}"
                )
            self.concept_outputs[k] = o_star.to(self.concept_outputs)
        self.initted[k] = True


def merge_rank1_edit_modules(*modules: Rank1EditModule, use_cholesky: bool = False) -> Rank1EditModule:
    """One module holding every concept of ``modules`` (concept ids in argument order).

    All modules must wrap the same ``W``, use the same ``C⁻¹``, be of one kind (keys or values) and
    be initialised. ``use_cholesky`` selects the exact multi-concept projection (Appendix B).
    """
    if not modules:
        raise NullBoothError("expected at least one Rank1EditModule to merge, got none")
    first = modules[0]
    for m in modules:
        if not isinstance(m, Rank1EditModule):
            raise NullBoothError(f"expected Rank1EditModule instances, got {type(m).__name__}")
        if not bool(m.initted.all()):
            raise NullBoothError("all modules must be initialised (trained or loaded) before merging")
        if m.is_key_proj != first.is_key_proj:
            raise NullBoothError(
                "cannot merge key and value modules together; merge keys with keys, "
                "values with values"
            )
        if m.weight.shape != first.weight.shape or not (m.weight is first.weight or torch.equal(m.weight, first.weight)):
            raise NullBoothError("cannot merge modules that wrap different projection weights W")
        if not torch.allclose(m._C_inv_master, first._C_inv_master, rtol=1e-6, atol=0):
            raise NullBoothError("cannot merge modules built with different covariances C")
    merged = Rank1EditModule(
        first.base_layer, num_concepts=sum(m.num_concepts for m in modules), C_inv=first._C_inv_master,
        is_key_proj=first.is_key_proj, input_decay=first.input_decay, train_beta=first.train_beta,
        train_temperature=first.train_temperature, eval_beta=first.eval_beta, eval_temperature=first.eval_temperature,
        frac_gradient_concept_embed=first.frac_gradient_concept_embed, multi_concepts_use_cholesky=use_cholesky,
        context=first.context, text_seq_len=first.text_seq_len,
    )
    merged.to(first.C_inv.device)
    with torch.no_grad():
        merged.ema_concept_text_encs.copy_(torch.cat([m.ema_concept_text_encs for m in modules]))
        if not first.is_key_proj:
            merged.concept_outputs.copy_(torch.cat([m.concept_outputs for m in modules]))
        merged.initted.fill_(True)
    merged.train(first.training)
    return merged


# --------------------------------------------------------------------------------------------------
# wiring into diffusers cross-attention


def make_key_value_proj_rank1_edit_modules_(cross_attention: nn.Module, *, C: Tensor | np.ndarray | None,
                                            key_proj_name: str = "to_k", value_proj_name: str = "to_v",
                                            **kwargs: Any) -> tuple[Rank1EditModule, Rank1EditModule]:
    """Replace ``cross_attention.<key_proj_name>`` / ``<value_proj_name>`` by rank-1 edit modules, in place.

    ``C`` is the input covariance (``None``: the shipped SD 1.x one, width 768 only); a precomputed
    ``C_inv=`` may be passed in ``kwargs`` instead to share one inverse across layers.
    Returns ``(key_module, value_module)``.
    """
    linears = {}
    for name in (key_proj_name, value_proj_name):
        lin = getattr(cross_attention, name, None)
        if isinstance(lin, Rank1EditModule):
            raise NullBoothError(f"{name} is already a Rank1EditModule; remove the existing edit first")
        if not isinstance(lin, nn.Linear):
            raise NullBoothError(
                f"expected {name} to be the nn.Linear K/V projection of the cross-attention, "
                f"got {type(lin).__name__}"
            )
        if lin.bias is not None:
            raise NullBoothError(f"expected a bias-free {name} (Perfusion edits W e), got a projection with a bias")
        linears[name] = lin
    if linears[key_proj_name].in_features != linears[value_proj_name].in_features:
        raise NullBoothError("the key and value projections read text encodings of different widths")
    C_inv = kwargs.pop("C_inv", None)
    if C_inv is None:
        dim = linears[key_proj_name].in_features
        C_inv = inverse_covariance(C if C is not None else _shipped_for(dim), dim=dim,
                                   eigenvalue_floor=kwargs.pop("eigenvalue_floor", None))
    else:
        kwargs.pop("eigenvalue_floor", None)
    key = Rank1EditModule(linears[key_proj_name], C_inv=C_inv, is_key_proj=True, **kwargs)
    value = Rank1EditModule(linears[value_proj_name], C_inv=C_inv, is_key_proj=False, **kwargs)
    setattr(cross_attention, key_proj_name, key)
    setattr(cross_attention, value_proj_name, value)
    return key, value


def _shipped_for(dim: int) -> Tensor:
    if dim != CLIP_L14_TEXT_WIDTH:
        raise NullBoothError(
            f"no shipped covariance fits text width {dim} (only CLIP-L/14, 768); pass C=default_covariance(pipe)"
        )
    return load_shipped_covariance()


def find_cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """``{name: attention}`` for every cross-attention module (diffusers ``attn2``) of ``unet``, in order."""
    return {layer.name: layer.module for layer in cross_attention_layers(unet)}


def make_unet_rank1_edit_modules_(
    unet: nn.Module,
    *,
    C: Tensor | np.ndarray | None,
    layers: Sequence[str] | None = None,
    context: PerfusionContext | None = None,
    eigenvalue_floor: float | Literal["auto"] | None = None,
    **kwargs: Any,
) -> dict[str, tuple[Rank1EditModule, Rank1EditModule]]:
    """Wire every cross-attention K/V of ``unet`` (or the named ``layers``) in place; validates all first."""
    attns = find_cross_attention_layers(unet)
    if not attns:
        raise NullBoothError("expected a UNet with cross-attention (attn2) layers, found none")
    if layers is not None:
        unknown = sorted(set(layers) - set(attns))
        if unknown:
            raise NullBoothError(f"unknown cross-attention layers {unknown}; this UNet has {list(attns)}")
        attns = {n: attns[n] for n in attns if n in set(layers)}
    widths = set()
    for name, attn in attns.items():
        for proj in ("to_k", "to_v"):
            lin = getattr(attn, proj)
            if isinstance(lin, Rank1EditModule):
                raise NullBoothError(
                    f"{name}.{proj} already carries a rank-1 edit; "
                    "call remove_unet_rank1_edit_modules_ first"
                )
            if not isinstance(lin, nn.Linear) or lin.bias is not None:
                raise NullBoothError(f"expected {name}.{proj} to be a bias-free nn.Linear, got {lin}")
            widths.add(lin.in_features)
    if len(widths) != 1:
        raise NullBoothError(f"expected one text width across cross-attention layers, got {sorted(widths)}")
    (dim,) = widths
    C_inv = kwargs.pop("C_inv", None)
    if C_inv is None:
        C_inv = inverse_covariance(C if C is not None else _shipped_for(dim), dim=dim, eigenvalue_floor=eigenvalue_floor)
    elif C_inv.shape != (dim, dim):
        raise NullBoothError(f"expected C_inv of shape ({dim}, {dim}), got {tuple(C_inv.shape)}")
    wired = {}
    for name, attn in attns.items():
        wired[name] = make_key_value_proj_rank1_edit_modules_(attn, C=None, C_inv=C_inv, context=context, **kwargs)
        wired[name][0].train(unet.training)
        wired[name][1].train(unet.training)
    return wired


def remove_unet_rank1_edit_modules_(unet: nn.Module) -> int:
    """Put the original ``nn.Linear`` objects back (exact undo); returns how many were restored."""
    restored = 0
    for attn in find_cross_attention_layers(unet).values():
        for proj in ("to_k", "to_v"):
            m = getattr(attn, proj)
            if isinstance(m, Rank1EditModule):
                setattr(attn, proj, m.base_layer)
                restored += 1
    return restored


def _wired_modules(unet: nn.Module) -> dict[str, tuple[Rank1EditModule, Rank1EditModule]]:
    return {n: (a.to_k, a.to_v) for n, a in find_cross_attention_layers(unet).items()
            if isinstance(a.to_k, Rank1EditModule) and isinstance(a.to_v, Rank1EditModule)}


# --------------------------------------------------------------------------------------------------
# concept files


@dataclasses.dataclass
class PerfusionConcept:
    """Everything one trained concept needs (and nothing model-sized): 107 440 bytes for SD 1.5 in float32.

    ``i_star`` and ``o_star`` map each cross-attention layer name to ``i*`` (``[text_dim]``) and the
    value output ``o*_V`` (``[layer width]``). Keys need no tensor: they are locked to the superclass
    per prompt. A layer's K and V modules read the same encodings, so they share one ``i*``. No
    ``C⁻¹`` is stored: it belongs to the base model (:func:`default_covariance`).
    """

    token: str
    superclass: str
    token_embedding: Tensor  # [text_dim]
    i_star: dict[str, Tensor]
    o_star: dict[str, Tensor]
    eval_beta: float = 0.70
    eval_temperature: float = 0.15
    train_beta: float = 0.75
    train_temperature: float = 0.1
    input_decay: float = 0.99

    @property
    def text_dim(self) -> int:
        return int(self.token_embedding.shape[0])

    @property
    def layer_widths(self) -> dict[str, int]:
        return {n: int(t.shape[0]) for n, t in self.o_star.items()}

    def check_compatible(self, layer_widths: Mapping[str, int], text_dim: int, *, source: str = "concept") -> None:
        """Raise unless this concept fits a model with these cross-attention layers and text width."""
        if text_dim != self.text_dim:
            raise NullBoothError(f"{source} was trained for text width {self.text_dim}, this model's text encoder has {text_dim}; "
                                 "load it onto the base model it was trained on")
        ours, theirs = self.layer_widths, dict(layer_widths)
        if set(ours) != set(theirs):
            missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise NullBoothError(f"{source} has cross-attention layers that differ from this model's "
                                 f"(only in file: {missing[:3]}{'...' if len(missing) > 3 else ''}; only in model: "
                                 f"{extra[:3]}{'...' if len(extra) > 3 else ''}); load it onto the model it was trained on")
        bad = {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]}
        if bad:
            n, (a, b) = next(iter(bad.items()))
            raise NullBoothError(f"{source} layer {n} has value width {a}, this model's has {b} ({len(bad)} layers differ); "
                                 "load it onto the model it was trained on")


def _concept_payload(concept: PerfusionConcept, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors = {"token_embedding": concept.token_embedding.detach().to("cpu", dtype).contiguous()}
    for name in concept.o_star:
        tensors[f"i_star.{name}"] = concept.i_star[name].detach().to("cpu", dtype).contiguous()
        tensors[f"o_star.{name}"] = concept.o_star[name].detach().to("cpu", dtype).contiguous()
    metadata = {
        "format": CONCEPT_FORMAT, "format_version": str(CONCEPT_FORMAT_VERSION), "nullbooth_version": __version__,
        "token": concept.token, "superclass": concept.superclass, "text_dim": str(concept.text_dim),
        "layers": json.dumps(list(concept.layer_widths.items())),
        "gate": json.dumps({"eval_beta": concept.eval_beta, "eval_temperature": concept.eval_temperature,
                            "train_beta": concept.train_beta, "train_temperature": concept.train_temperature,
                            "input_decay": concept.input_decay}),
    }
    return tensors, metadata


def save_concept(path: str | os.PathLike, concept: PerfusionConcept, *, dtype: torch.dtype = torch.float32) -> int:
    """Write ``concept`` as one safetensors file (tensors + JSON metadata, no C⁻¹); returns its size in bytes."""
    from safetensors.torch import save

    if set(concept.i_star) != set(concept.o_star):
        raise NullBoothError("expected i* and o* for the same layers")
    tensors, metadata = _concept_payload(concept, dtype)
    data = save(tensors, metadata=metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(data)


def load_concept(path: str | os.PathLike) -> PerfusionConcept:
    """Read a concept file written by :func:`save_concept` (float32 tensors on CPU)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NullBoothError(f"expected a Perfusion concept file at {path}, found nothing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise NullBoothError(f"could not read {path} as safetensors: {err}") from None
    if meta.get("format") != CONCEPT_FORMAT:
        raise NullBoothError(
            f"{path} is not a Perfusion concept file (format {meta.get('format')!r}, "
            f"expected {CONCEPT_FORMAT!r})"
        )
    if int(meta.get("format_version", "0")) > CONCEPT_FORMAT_VERSION:
        raise NullBoothError(f"{path} has concept format version {meta['format_version']}, newer than this nullbooth "
                             f"({CONCEPT_FORMAT_VERSION}); upgrade nullbooth")
    layers = [(n, int(w)) for n, w in json.loads(meta["layers"])]
    gate = json.loads(meta.get("gate", "{}"))
    text_dim = int(meta["text_dim"])
    try:
        emb = tensors["token_embedding"].float()
        i_star = {n: tensors[f"i_star.{n}"].float() for n, _ in layers}
        o_star = {n: tensors[f"o_star.{n}"].float() for n, _ in layers}
    except KeyError as err:
        raise NullBoothError(f"{path} is missing tensor {err}; the file is incomplete") from None
    if emb.shape != (text_dim,) or any(i_star[n].shape != (text_dim,) or o_star[n].shape != (w,) for n, w in layers):
        raise NullBoothError(f"{path} has tensors whose shapes disagree with its metadata; the file is corrupt")
    return PerfusionConcept(meta["token"], meta["superclass"], emb, i_star, o_star, **gate)


def concept_file_bytes(layer_widths: Mapping[str, int] | Sequence[int], text_dim: int,
                       dtype: torch.dtype = torch.float32) -> int:
    """Exact size in bytes of a concept file for these layers (serialised with placeholder strings).

    Payload: ``(Σ widths + (layers + 1) · text_dim) · itemsize`` plus the safetensors header.
    SD 1.5 (:data:`SD15_ATTN2_VALUE_WIDTHS`: 16 layers, Σ widths 12 480; text width 768): payload
    ``(12 480 + 17 · 768) · 4 = 102 144`` bytes, file **107 440 bytes** in float32 and 56 360 bytes in
    float16 (measured with safetensors 0.8; the JSON header is ≈5 KB).
    """
    from safetensors.torch import save

    if not isinstance(layer_widths, Mapping):
        layer_widths = {f"layer_{k}": int(w) for k, w in enumerate(layer_widths)}
    concept = PerfusionConcept(
        "<concept>", "superclass", torch.zeros(text_dim),
        {n: torch.zeros(text_dim) for n in layer_widths}, {n: torch.zeros(int(w)) for n, w in layer_widths.items()},
    )
    tensors, metadata = _concept_payload(concept, dtype)
    return len(save(tensors, metadata=metadata))


# --------------------------------------------------------------------------------------------------
# high-level API


class PerfusionEditor:
    """Perfusion on a diffusers Stable Diffusion pipeline: attach, train, save, load, generate, detach.

    >>> editor = PerfusionEditor.attach(pipe, "<my-teddy>", "teddy")   # C: default_covariance(pipe)
    >>> opt = torch.optim.AdamW(editor.trainable_parameters())           # o*_V of every layer + the token embedding
    >>> pipe.unet.train(); enc = pipe.text_encoder(ids)[0]; pred = pipe.unet(x_t, t, enc).sample   # as usual
    >>> editor.save("teddy.safetensors")
    >>> editor = PerfusionEditor.load(pipe, "teddy.safetensors", "cat.safetensors")   # multi-concept
    >>> with editor.context(beta=0.7, tau=0.15): image = pipe("a <my-teddy> next to a <my-cat>").images[0]
    >>> editor.detach()   # exact undo: original tokenizer, embeddings, nn.Linear objects, requires_grad flags

    While attached, a plain ``pipe(...)`` call applies the concepts (the text encoder is hooked).
    Mode follows the UNet: ``pipe.unet.train()`` updates the EMA of ``i*`` and uses the training gate.
    """

    def __init__(self, pipe: Any, concepts: list[ConceptToken], context: PerfusionContext,
                 modules: dict[str, tuple[Rank1EditModule, Rank1EditModule]], embedding: ConceptTokenEmbedding,
                 undo: dict[str, Any]) -> None:
        self.pipe = pipe
        self.concepts = concepts
        self.ctx = context
        self.modules = modules
        self.embedding = embedding
        self._undo = undo
        self.attached = True

    # -- construction --
    @classmethod
    def attach(cls, pipe: Any, concept_token: str, superclass: str, C: Tensor | np.ndarray | None = None, *,
               layers: Sequence[str] | None = None, init_prompts: Sequence[str] | None = None,
               eigenvalue_floor: float | Literal["auto"] | None = "auto", **module_kwargs: Any) -> "PerfusionEditor":
        """Add ``concept_token`` (initialised from ``superclass``), wire every attn2 and initialise ``i*``/``o*_V``.

        ``C=None`` uses :func:`default_covariance`; ``eigenvalue_floor="auto"`` regularises a singular
        ``C`` with a warning (``None``: refuse it). ``init_prompts`` (templates with ``{}``) set the
        initial ``i*`` / ``o*_V`` as means over those prompts. ``module_kwargs`` go to
        :class:`Rank1EditModule` (``input_decay``, β/τ, ``frac_gradient_concept_embed``, ...).
        """
        editor = cls._build(pipe, [(concept_token, superclass)], C, layers=layers, eigenvalue_floor=eigenvalue_floor,
                            **module_kwargs)
        try:
            editor.initialize(init_prompts)
        except BaseException:
            editor.detach()
            raise
        return editor

    @classmethod
    def load(cls, pipe: Any, *paths: str | os.PathLike, C: Tensor | np.ndarray | None = None,
             use_cholesky: bool = False, eigenvalue_floor: float | Literal["auto"] | None = "auto",
             **module_kwargs: Any) -> "PerfusionEditor":
        """Attach one or more saved concepts (multi-concept generation); refuses files that do not fit the model."""
        if not paths:
            raise NullBoothError("expected at least one concept file to load, got none")
        concepts = [load_concept(p) for p in paths]
        layer_widths = {n: a.to_v.out_features for n, a in find_cross_attention_layers(pipe.unet).items()}
        text_dim = pipe.text_encoder.config.hidden_size
        for p, c in zip(paths, concepts):
            c.check_compatible(layer_widths, text_dim, source=str(p))
        tokens = [c.token for c in concepts]
        if len(set(tokens)) != len(tokens):
            raise NullBoothError(f"two concept files use the same token ({tokens}); each concept needs its own token")
        gates = {(c.eval_beta, c.eval_temperature, c.train_beta, c.train_temperature) for c in concepts}
        if len(gates) > 1:
            warnings.warn(
                f"concept files use different gate parameters {sorted(gates)}; "
                f"using those of {paths[0]}", stacklevel=2,
            )
        first = concepts[0]
        gate = dict(eval_beta=first.eval_beta, eval_temperature=first.eval_temperature, train_beta=first.train_beta,
                    train_temperature=first.train_temperature, input_decay=first.input_decay)
        gate.update(module_kwargs)
        editor = cls._build(pipe, [(c.token, c.superclass) for c in concepts], C, layers=list(first.o_star),
                            eigenvalue_floor=eigenvalue_floor, multi_concepts_use_cholesky=use_cholesky, **gate)
        try:
            with torch.no_grad():
                for k, c in enumerate(concepts):
                    editor.embedding.vectors[k] = c.token_embedding.to(editor.embedding.vectors)
                    for name, (key, value) in editor.modules.items():
                        key.set_concept(k, c.i_star[name])
                        value.set_concept(k, c.i_star[name], c.o_star[name])
        except BaseException:
            editor.detach()
            raise
        return editor

    @classmethod
    def _build(cls, pipe: Any, specs: Sequence[tuple[str, str]], C: Tensor | np.ndarray | None, *,
               layers: Sequence[str] | None, eigenvalue_floor: float | Literal["auto"] | None,
               **module_kwargs: Any) -> "PerfusionEditor":
        for part in ("unet", "text_encoder", "tokenizer"):
            if getattr(pipe, part, None) is None:
                raise NullBoothError(f"expected a Stable Diffusion pipeline with a {part}, got none")
        unet, text_encoder = pipe.unet, pipe.text_encoder
        if _wired_modules(unet) or isinstance(text_encoder.get_input_embeddings(), ConceptTokenEmbedding):
            raise NullBoothError("this pipeline already has a Perfusion editor attached; detach it first")
        text_dim = text_encoder.config.hidden_size
        cross_dim = {a.to_k.in_features for a in find_cross_attention_layers(unet).values()}
        if cross_dim != {text_dim}:
            raise NullBoothError(
                f"the UNet's cross-attention reads width {sorted(cross_dim)}, "
                f"the text encoder gives {text_dim}"
            )
        # validate every input before the first mutation
        unknown = sorted(set(layers or ()) - set(find_cross_attention_layers(unet)))
        if unknown:
            raise NullBoothError(f"unknown cross-attention layers {unknown[:3]}; see find_cross_attention_layers(pipe.unet)")
        for token, superclass in specs:
            _check_new_token(pipe.tokenizer, token)
            superclass_token_ids(pipe.tokenizer, superclass)
        if C is None:
            C = default_covariance(pipe)
        C_inv = inverse_covariance(C, dim=text_dim, eigenvalue_floor=eigenvalue_floor)
        Rank1EditModule(nn.Linear(text_dim, 1, bias=False), C_inv=C_inv, **module_kwargs)  # validates kwargs

        undo: dict[str, Any] = {
            "tokenizer": pipe.tokenizer, "embedding": text_encoder.get_input_embeddings(),
            "vocab_size": text_encoder.config.vocab_size,
            "requires_grad": {id(p): (p, p.requires_grad) for part in ("unet", "text_encoder", "vae")
                              if getattr(pipe, part, None) is not None for p in getattr(pipe, part).parameters()},
        }
        tokenizer = copy.deepcopy(pipe.tokenizer)
        concepts = [add_concept_token_(tokenizer, text_encoder, tok, sup) for tok, sup in specs]
        embedding = ConceptTokenEmbedding(text_encoder.get_input_embeddings(), [c.token_id for c in concepts])
        text_encoder.set_input_embeddings(embedding)
        pipe.tokenizer = tokenizer
        context = PerfusionContext(concepts)
        modules = make_unet_rank1_edit_modules_(unet, C=None, C_inv=C_inv, layers=layers, context=context,
                                                num_concepts=len(concepts), **module_kwargs)
        context.install(text_encoder)
        for part in ("unet", "text_encoder", "vae"):  # freeze everything (incl. the grown embedding) ...
            if getattr(pipe, part, None) is not None:
                getattr(pipe, part).requires_grad_(False)
        embedding.vectors.requires_grad_(True)  # ... but the two trainable tensors
        for _, value in modules.values():
            value.concept_outputs.requires_grad_(True)
        return cls(pipe, concepts, context, modules, embedding, undo)

    # -- use --
    def _check(self) -> None:
        if not self.attached:
            raise NullBoothError("this Perfusion editor was detached; attach or load again")

    @torch.no_grad()
    def initialize(self, prompts: Sequence[str] | None = None) -> None:
        """Set ``i*`` (mean concept encoding) and ``o*_V = W_V e_H`` (mean superclass encoding) of every concept."""
        self._check()
        templates = list(prompts) if prompts is not None else list(_INIT_TEMPLATES)
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        device = _module_device(te)
        for k, concept in enumerate(self.concepts):
            texts = [t.format(concept.token) if "{}" in t else f"{t} {concept.token}" for t in templates]
            ids = tok(texts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                      return_tensors="pt").input_ids.to(device)
            with self.ctx:
                hidden = te(ids)[0]  # [b, n, d]
                plan = self.ctx.plan(hidden)
            if plan is None or not bool(plan.active[:, k].all()):
                raise NullBoothError(f"could not find the concept token {concept.token!r} in the initialisation prompts")
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            i_star = hidden[rows, plan.positions[:, k]].double().mean(0)  # [d]
            e_h = plan.superclass_enc[:, k].double().mean(0)  # [d]
            for key, value in self.modules.values():
                key.set_concept(k, i_star)
                value.set_concept(k, i_star, value.weight.double() @ e_h)

    def trainable_parameters(self, value_lr: float = DEFAULT_VALUE_LR, embedding_lr: float = DEFAULT_EMBEDDING_LR,
                             weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer param groups: every value module's ``o*_V`` and the concept token embedding(s).

        Nothing else requires grad while attached (W, keys, the rest of the model are frozen). The
        default rates (o*_V 0.03, embedding 0.006) follow lucidrains' reading of the paper's two rates.
        """
        self._check()
        values = [v.concept_outputs for _, v in self.modules.values()]
        return [
            {"params": values, "lr": value_lr, "weight_decay": weight_decay, "name": "perfusion_values"},
            {"params": [self.embedding.vectors], "lr": embedding_lr, "weight_decay": weight_decay, "name": "concept_embedding"},
        ]

    @contextlib.contextmanager
    def context(self, beta: float | None = None, tau: float | None = None) -> Iterator["PerfusionEditor"]:
        """Scope for ``pipe(...)`` / UNet calls: fresh records, optional β/τ override, a warning if nothing matched."""
        self._check()
        with self.ctx, self.ctx.override(beta, tau):
            yield self

    def concept_state(self, concept: int | str = 0) -> PerfusionConcept:
        """The per-concept tensors of one concept (by index or token)."""
        self._check()
        k = self._index(concept)
        key0, value0 = next(iter(self.modules.values()))
        i_star, o_star = {}, {}
        for name, (key, value) in self.modules.items():
            i_star[name] = value.ema_concept_text_encs[k].detach().float().cpu()
            o_star[name] = value.concept_outputs[k].detach().float().cpu()
            if not torch.allclose(key.ema_concept_text_encs[k].float().cpu(), i_star[name], rtol=1e-5, atol=1e-6):
                warnings.warn(f"key and value i* differ in {name}; saving the value module's", stacklevel=2)
        return PerfusionConcept(
            self.concepts[k].token, self.concepts[k].superclass, self.embedding.vectors[k].detach().float().cpu(),
            i_star, o_star, eval_beta=value0.eval_beta, eval_temperature=value0.eval_temperature,
            train_beta=value0.train_beta, train_temperature=value0.train_temperature, input_decay=value0.input_decay,
        )

    def save(self, path: str | os.PathLike, concept: int | str = 0, *, dtype: torch.dtype = torch.float32) -> int:
        """Write one concept to a safetensors concept file; returns the bytes written."""
        return save_concept(path, self.concept_state(concept), dtype=dtype)

    def _index(self, concept: int | str) -> int:
        if isinstance(concept, str):
            for k, c in enumerate(self.concepts):
                if c.token == concept:
                    return k
            raise NullBoothError(f"unknown concept token {concept!r}; attached: {[c.token for c in self.concepts]}")
        if not 0 <= concept < len(self.concepts):
            raise NullBoothError(f"expected a concept index in [0, {len(self.concepts)}), got {concept}")
        return concept

    def detach(self) -> None:
        """Exact undo: original nn.Linear objects, token embedding, vocab size, tokenizer and requires_grad flags."""
        if not self.attached:
            return
        pipe, undo = self.pipe, self._undo
        self.ctx.uninstall()
        remove_unet_rank1_edit_modules_(pipe.unet)
        current = pipe.text_encoder.get_input_embeddings().weight  # follow any pipe.to(device/dtype) since attach
        pipe.text_encoder.set_input_embeddings(undo["embedding"].to(device=current.device, dtype=current.dtype))
        pipe.text_encoder.config.vocab_size = undo["vocab_size"]
        pipe.tokenizer = undo["tokenizer"]
        for p, flag in undo["requires_grad"].values():
            p.requires_grad_(flag)
        self.attached = False
