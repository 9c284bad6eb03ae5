"""The concept token: a new word in the tokenizer whose input embedding is one of Perfusion's two trained tensors.

The token is added next to its superclass (the word the keys are locked to) and its embedding row starts at
the superclass's; :class:`ConceptTokenEmbedding` then serves that row from a small trainable ``[K, d]``
parameter, so the optimiser never sees the frozen vocabulary.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nullbooth.errors import NullBoothError

__all__ = ["ConceptToken", "ConceptTokenEmbedding", "add_concept_token_", "check_new_token", "superclass_token_ids"]


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


def check_new_token(tokenizer: Any, token: str) -> None:
    """Refuse a concept token with whitespace or one the tokenizer already knows (in any case, as a word end)."""
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
    check_new_token(tokenizer, concept_token)
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
