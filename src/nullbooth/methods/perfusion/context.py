"""Which rows of a cross-attention input hold a concept, and the superclass encodings that lock their keys.

Product contract (stricter than the paper): the edit of eq. 3 is applied **only to text sequences that
contain a concept token**, and only for the concepts they contain. Every other sequence -- plain prompts,
the empty/negative prompt of classifier-free guidance -- goes through ``F.linear(e, W)``, the very op of the
wrapped ``nn.Linear``, so the base model's outputs are reproduced exactly.

Why a context at all: diffusers calls ``attn.to_k(encoder_hidden_states)`` with one tensor and nothing
else. A :class:`PerfusionContext` hooks the text encoder(s); every call whose ``input_ids`` contain a concept
token is recorded (encoding, concept positions, and a second no-grad pass with the concept token replaced
by the superclass word for key locking, ``o*_K = W_K e_H``). Each rank-1 module matches the rows of its
input against the recorded encodings (same storage, else exact value equality -- the pipelines only
cast/repeat/concatenate them), so a plain ``StableDiffusionPipeline.__call__`` and manual
``text_encoder`` → ``unet`` calls in a training loop both work without extra arguments.

SDXL (:mod:`nullbooth.conditioning`): ``attn2`` reads both encoders' penultimate hidden states concatenated
along the width. Each encoder's calls are recorded separately; a cross-attention input is split at the
encoders' widths and each slice matched against its own encoder's records, so ``i*``, ``e`` and the superclass
encoding ``e_H`` are all vectors of the concatenated width (768 + 1280 = 2048 on SDXL base).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nullbooth.errors import NullBoothError
from nullbooth.methods.perfusion.concept import ConceptToken

__all__ = ["PerfusionContext", "RowPlan"]


@dataclasses.dataclass
class RowPlan:
    """Which rows of a ``[b, n, d]`` text encoding carry concepts (``r`` of them, ``K`` concepts)."""

    rows: Tensor  # [r] long, batch rows that contain at least one concept token
    active: Tensor  # [r, K] bool, concept k occurs in the row
    positions: Tensor  # [r, K] long, first position of concept k (0 where absent)
    superclass_enc: Tensor | None  # [r, K, d] superclass encoding at that position (zeros where absent)


@dataclasses.dataclass
class _Record:
    """One text-encoder call on a prompt batch holding concept tokens: every encoding a pipeline may pass on."""

    encoder: int  # which text encoder (its place in the concatenation attn2 reads)
    hidden: list[Tensor]  # candidates [B, N, d_e], detached
    positions: Tensor  # [B, K] long, first position of each concept, -1 where absent
    super_at: list[Tensor]  # per candidate [B, K, d_e]: superclass encoding at the concept position (zeros where absent)


@dataclasses.dataclass
class _Encoder:
    """A hooked text encoder: the concept tokens as its tokenizer numbers them, and its width."""

    concepts: list[ConceptToken]
    width: int | None  # config.hidden_size (needed only to split a concatenation)
    hook: Any


class PerfusionContext:
    """Per-call information for the rank-1 edit modules, gathered from the text encoder.

    ``install(text_encoders)`` registers a forward hook on each. Every text-encoder call whose ``input_ids``
    contain a concept token is recorded: the encoding (``last_hidden_state``; with
    ``output_hidden_states=True`` also every layer -- after ``final_layer_norm`` with one encoder, which is
    what the SD pipelines feed the UNet with ``clip_skip``, as they are with two, which is what SDXL's
    feed it), the first position of each concept, and -- from a
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
        self._encoders: list[_Encoder] = []
        self._busy = False
        self._recorded = 0
        self._matched = 0
        self._depth = 0

    # -- concepts --
    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    def _token_ids(self, device: torch.device, encoder: int = 0) -> Tensor:
        return torch.tensor([c.token_id for c in self._concepts(encoder)], dtype=torch.long, device=device)

    def _concepts(self, encoder: int) -> list[ConceptToken]:
        return self._encoders[encoder].concepts if self._encoders else self.concepts

    # -- hook --
    def install(self, text_encoders: nn.Module | Sequence[nn.Module],
                concepts: Sequence[Sequence[ConceptToken]] | None = None) -> None:
        """Hook the text encoder(s), in the order their encodings are concatenated for ``attn2``.

        ``concepts[e]`` are the concept tokens as encoder ``e``'s tokenizer numbers them (default: ``self.concepts``
        for each); all lists name the same concepts in the same order.
        """
        if self._encoders:
            raise NullBoothError("this PerfusionContext is already installed on a text encoder")
        encoders = [text_encoders] if isinstance(text_encoders, nn.Module) else list(text_encoders)
        per_encoder = [self.concepts] * len(encoders) if concepts is None else [list(c) for c in concepts]
        if len(per_encoder) != len(encoders) or any(len(c) != self.num_concepts for c in per_encoder):
            raise NullBoothError(f"expected the {self.num_concepts} concept(s) for each of the {len(encoders)} text "
                                 f"encoder(s), got {[len(c) for c in per_encoder]}")
        widths = [getattr(getattr(encoder, "config", None), "hidden_size", None) for encoder in encoders]
        if len(encoders) > 1 and None in widths:
            raise NullBoothError("expected text encoders with a config.hidden_size (their width in the concatenation), "
                                 f"got {widths}")
        for e, (encoder, cs, width) in enumerate(zip(encoders, per_encoder, widths)):
            hook = encoder.register_forward_hook(functools.partial(self._on_text_encoder, e), with_kwargs=True)
            self._encoders.append(_Encoder(cs, width, hook))

    def uninstall(self) -> None:
        for encoder in self._encoders:
            encoder.hook.remove()
        self._encoders = []
        self.clear()

    def clear(self) -> None:
        self._records.clear()
        self._cache = None

    def _substitute(self, input_ids: Tensor, attention_mask: Tensor | None,
                    encoder: int = 0) -> tuple[Tensor, Tensor | None, Tensor]:
        """Replace every concept token by its superclass ids (truncated to the original length)."""
        B, N = input_ids.shape
        concepts = self._concepts(encoder)
        index = {c.token_id: k for k, c in enumerate(concepts)}
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
                span = [tok] if k is None else list(concepts[k].superclass_ids)
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
        """The encodings a pipeline may pass on: ``last_hidden_state`` and, with hidden states, every layer --
        normed by ``final_layer_norm`` with one encoder (SD's ``clip_skip``), raw with several (SDXL feeds the
        penultimate layer as it is)."""
        last = getattr(output, "last_hidden_state", None)
        found = [output[0] if last is None else last]
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is not None and len(self._encoders) > 1:
            return found + list(hidden_states)
        # transformers 5 keeps final_layer_norm on CLIPTextModel itself, 4.x under .text_model
        norm = getattr(module, "final_layer_norm", None)
        if norm is None:
            norm = getattr(getattr(module, "text_model", None), "final_layer_norm", None)
        if hidden_states is not None and norm is not None:
            with torch.no_grad():
                found += [norm(h) for h in hidden_states]
        return found

    def _on_text_encoder(self, encoder: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._busy or not self.concepts:
            return None
        input_ids = args[0] if args else kwargs.get("input_ids")
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            return None
        hit = input_ids[..., None] == self._token_ids(input_ids.device, encoder)  # [B, N, K]
        if not bool(hit.any()):
            return None
        present = hit.any(1)  # [B, K]
        positions = torch.where(present, hit.to(torch.uint8).argmax(1), torch.full_like(present, -1, dtype=torch.long))
        attention_mask = kwargs.get("attention_mask")
        cpu_mask = None if attention_mask is None else attention_mask.cpu()
        sup_ids, sup_mask, sup_pos = self._substitute(input_ids.cpu(), cpu_mask, encoder)
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
        hidden, super_ats = [], []
        for enc, sup in zip(concept_encs, super_encs):
            B = enc.shape[0]
            gather = sup_pos.clamp(min=0)  # [B, K]
            super_at = sup.detach()[torch.arange(B, device=sup.device)[:, None], gather.to(sup.device)]  # [B, K, d]
            hidden.append(enc.detach())
            super_ats.append(super_at * present.to(super_at.device)[..., None])
        self._records.append(_Record(encoder, hidden, positions.to(concept_encs[0].device), super_ats))
        self._recorded += 1
        return None

    # -- matching --
    def record(self, input_ids: Tensor, hidden: Tensor, superclass_hidden: Tensor) -> None:
        """Record an encoding of the (first) text encoder computed elsewhere (``superclass_hidden``: the same
        prompts with superclass words)."""
        hit = input_ids[..., None] == self._token_ids(input_ids.device)
        present = hit.any(1)
        positions = torch.where(present, hit.to(torch.uint8).argmax(1), torch.full_like(present, -1, dtype=torch.long))
        _, _, sup_pos = self._substitute(input_ids.cpu(), None)
        sup_pos = sup_pos.clamp(min=0).to(superclass_hidden.device)
        B = hidden.shape[0]
        super_at = superclass_hidden.detach()[torch.arange(B, device=superclass_hidden.device)[:, None], sup_pos]
        super_at = super_at * present.to(super_at.device)[..., None]
        self._records.append(_Record(0, [hidden.detach()], positions.to(hidden.device), [super_at]))
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
        widths = [enc.width for enc in self._encoders]
        if len(widths) > 1:  # SDXL: x is the encoders' encodings side by side; each slice is matched on its own
            if x.shape[-1] != sum(widths):
                return None
            slices = list(x.detach().split(widths, dim=-1))
        else:
            slices = [x.detach()]
        found = [self._match_slice(xs, e) for e, xs in enumerate(slices)]
        # only rows found in every slice that really hold a concept: the others must keep the exact F.linear output
        rows = sorted(r for r, (rec, _, j) in found[0].items()
                      if all(r in f for f in found[1:]) and bool((rec.positions[j] >= 0).any()))
        if not rows:
            return None
        K, d = self.num_concepts, x.shape[-1]
        positions = torch.stack([found[0][r][0].positions[found[0][r][2]].to(x.device) for r in rows])  # [r, K]
        super_at = torch.stack([torch.cat([f[r][0].super_at[f[r][1]][f[r][2]].to(x.device) for f in found], dim=-1)
                                for r in rows])  # [r, K, d]
        active = positions >= 0
        assert super_at.shape[-1] == d and positions.shape[-1] == K
        return RowPlan(torch.tensor(rows, dtype=torch.long, device=x.device), active, positions.clamp(min=0), super_at)

    def _match_slice(self, xd: Tensor, encoder: int) -> dict[int, tuple[_Record, int, int]]:
        """``{row of xd: (record, candidate, row of it)}`` for the rows of ``xd`` that are encoder ``encoder``'s
        recorded encodings (newest record first)."""
        b = xd.shape[0]
        found: dict[int, tuple[_Record, int, int]] = {}
        for rec in reversed(self._records):
            if rec.encoder != encoder:
                continue
            for c in reversed(range(len(rec.hidden))):
                h = rec.hidden[c]
                if h.ndim != 3 or h.shape[1:] != xd.shape[1:]:
                    continue
                same_storage = h.data_ptr() == xd.data_ptr() and h.dtype == xd.dtype
                if same_storage and h.shape == xd.shape and h.stride() == xd.stride():  # the very tensor: every row
                    for r in range(b):
                        found.setdefault(r, (rec, c, r))
                    return found
                hc = h.to(device=xd.device, dtype=xd.dtype)
                same_last = (xd[:, -1, None, :] == hc[None, :, -1, :]).all(-1)  # [b, B] cheap signature: last position
                for r, j in same_last.nonzero().tolist():
                    if r not in found and torch.equal(xd[r], hc[j]):
                        found[r] = (rec, c, j)
                if len(found) == b:
                    return found
        return found

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
