"""Concept files: one trained concept's tensors (no model-sized weight, no ``C⁻¹``) as one safetensors file.

An SDXL concept also holds its token's row of the second text encoder's embedding table (``token_embedding_2``);
its ``i*`` are as wide as both encoders' encodings side by side (768 + 1280 = 2048 on SDXL base). SD files are
written exactly as before (format version 1); SDXL files are version 2, which an older nullbooth refuses cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from nullbooth import __version__
from nullbooth.errors import NullBoothError
from nullbooth.io import save_tensors

__all__ = [
    "CONCEPT_FORMAT", "CONCEPT_FORMAT_VERSION", "SD15_ATTN2_VALUE_WIDTHS", "PerfusionConcept", "concept_file_bytes",
    "load_concept", "save_concept",
]

# Written into every file's metadata and checked on load: a format id, not a module path — changing it would
# make every existing concept file unreadable.
CONCEPT_FORMAT = "nullbooth.perfusion.concept"
CONCEPT_FORMAT_VERSION = 2  # the newest this reads: 1 one text encoder, 2 two (SDXL)

# SD 1.x/1.5 UNet: the 16 cross-attention layers and the output width of their to_v (= to_k).
SD15_ATTN2_VALUE_WIDTHS: dict[str, int] = {
    **{f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2": w
       for b, w in enumerate((320, 640, 1280)) for a in range(2)},
    **{f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2": w
       for b, w in zip((1, 2, 3), (1280, 640, 320)) for a in range(3)},
    "mid_block.attentions.0.transformer_blocks.0.attn2": 1280,
}


@dataclasses.dataclass
class PerfusionConcept:
    """Everything one trained concept needs (and nothing model-sized): 107 440 bytes for SD 1.5 in float32.

    ``i_star`` and ``o_star`` map each cross-attention layer name to ``i*`` (``[text_dim]``) and the
    value output ``o*_V`` (``[layer width]``). Keys need no tensor: they are locked to the superclass
    per prompt. A layer's K and V modules read the same encodings, so they share one ``i*``. No
    ``C⁻¹`` is stored: it belongs to the base model (:func:`default_covariance`). ``token_embedding`` is the
    concept token's input embedding in the (first) text encoder, ``token_embedding_2`` in SDXL's second one.
    """

    token: str
    superclass: str
    token_embedding: Tensor  # [d₁]
    i_star: dict[str, Tensor]
    o_star: dict[str, Tensor]
    eval_beta: float = 0.70
    eval_temperature: float = 0.15
    train_beta: float = 0.75
    train_temperature: float = 0.1
    input_decay: float = 0.99
    gate_scope: str = "all_tokens"  # files written before the option gated every token
    token_embedding_2: Tensor | None = None  # [d₂], SDXL only

    @property
    def token_embeddings(self) -> list[Tensor]:
        """The token's input embedding in each text encoder, in concatenation order."""
        return [self.token_embedding] + ([] if self.token_embedding_2 is None else [self.token_embedding_2])

    @property
    def embedding_widths(self) -> tuple[int, ...]:
        return tuple(int(t.shape[0]) for t in self.token_embeddings)

    @property
    def text_dim(self) -> int:
        """Width of ``i*``: the text encodings ``attn2`` reads (SDXL: both encoders' side by side)."""
        return sum(self.embedding_widths)

    @property
    def layer_widths(self) -> dict[str, int]:
        return {n: int(t.shape[0]) for n, t in self.o_star.items()}

    def check_compatible(self, layer_widths: Mapping[str, int], embedding_widths: Sequence[int], *,
                         source: str = "concept") -> None:
        """Raise unless this concept fits a model with these cross-attention layers and text encoders (their
        embedding widths, in concatenation order)."""
        ours = self.embedding_widths
        if len(ours) != len(embedding_widths):
            family = {1: "an SD 1.x/2.x pipeline (one text encoder)", 2: "an SDXL pipeline (two text encoders)"}
            raise NullBoothError(f"{source}: expected {family.get(len(ours), f'{len(ours)} text encoders')}, got "
                                 f"{family.get(len(embedding_widths), f'{len(embedding_widths)} text encoders')}; "
                                 "load the concept onto the base model it was trained on")
        if tuple(embedding_widths) != ours:
            raise NullBoothError(f"{source} was trained for text width {self.text_dim} {list(ours)}, this model's text "
                                 f"encoder(s) give {sum(embedding_widths)} {list(embedding_widths)}; "
                                 "load it onto the base model it was trained on")
        self._check_layers(layer_widths, source)

    def _check_layers(self, layer_widths: Mapping[str, int], source: str) -> None:
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
    if concept.token_embedding_2 is not None:
        tensors["token_embedding_2"] = concept.token_embedding_2.detach().to("cpu", dtype).contiguous()
    for name in concept.o_star:
        tensors[f"i_star.{name}"] = concept.i_star[name].detach().to("cpu", dtype).contiguous()
        tensors[f"o_star.{name}"] = concept.o_star[name].detach().to("cpu", dtype).contiguous()
    metadata = {
        "format": CONCEPT_FORMAT, "format_version": str(len(concept.token_embeddings)), "nullbooth_version": __version__,
        "token": concept.token, "superclass": concept.superclass, "text_dim": str(concept.text_dim),
        "layers": json.dumps(list(concept.layer_widths.items())),
        "gate": json.dumps({"eval_beta": concept.eval_beta, "eval_temperature": concept.eval_temperature,
                            "train_beta": concept.train_beta, "train_temperature": concept.train_temperature,
                            "input_decay": concept.input_decay, "gate_scope": concept.gate_scope}),
    }
    return tensors, metadata


def save_concept(path: str | os.PathLike, concept: PerfusionConcept, *, dtype: torch.dtype = torch.float32) -> int:
    """Write ``concept`` as one safetensors file (tensors + JSON metadata, no C⁻¹; atomic, and the same bytes for the
    same concept: :func:`nullbooth.io.save_tensors`); returns its size in bytes."""
    if set(concept.i_star) != set(concept.o_star):
        raise NullBoothError("expected i* and o* for the same layers")
    tensors, metadata = _concept_payload(concept, dtype)
    path = Path(path)
    save_tensors(path, tensors, metadata)
    return path.stat().st_size


def load_concept(path: str | os.PathLike) -> PerfusionConcept:
    """Read a concept file written by :func:`save_concept` (float32 tensors on CPU)."""
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
        emb_2 = tensors["token_embedding_2"].float() if "token_embedding_2" in tensors else None
        i_star = {n: tensors[f"i_star.{n}"].float() for n, _ in layers}
        o_star = {n: tensors[f"o_star.{n}"].float() for n, _ in layers}
    except KeyError as err:
        raise NullBoothError(f"{path} is missing tensor {err}; the file is incomplete") from None
    concept = PerfusionConcept(meta["token"], meta["superclass"], emb, i_star, o_star, **gate, token_embedding_2=emb_2)
    if (any(t.ndim != 1 for t in concept.token_embeddings) or concept.text_dim != text_dim
            or any(i_star[n].shape != (text_dim,) or o_star[n].shape != (w,) for n, w in layers)):
        raise NullBoothError(f"{path} has tensors whose shapes disagree with its metadata; the file is corrupt")
    return concept


def concept_file_bytes(layer_widths: Mapping[str, int] | Sequence[int], text_dim: int,
                       dtype: torch.dtype = torch.float32) -> int:
    """Exact size in bytes of a concept file for these layers (serialised with placeholder strings).

    Payload: ``(Σ widths + (layers + 1) · text_dim) · itemsize`` plus the safetensors header.
    SD 1.5 (:data:`SD15_ATTN2_VALUE_WIDTHS`: 16 layers, Σ widths 12 480; text width 768): payload
    ``(12 480 + 17 · 768) · 4 = 102 144`` bytes, file **107 440 bytes** in float32 and 56 360 bytes in
    float16 (measured with safetensors 0.8; the JSON header is ≈5 KB).
    """
    if not isinstance(layer_widths, Mapping):
        layer_widths = {f"layer_{k}": int(w) for k, w in enumerate(layer_widths)}
    concept = PerfusionConcept(
        "<concept>", "superclass", torch.zeros(text_dim),
        {n: torch.zeros(text_dim) for n in layer_widths}, {n: torch.zeros(int(w)) for n, w in layer_widths.items()},
    )
    tensors, metadata = _concept_payload(concept, dtype)
    return len(save(tensors, metadata=metadata))
