"""Which rows of a cross-attention input hold a concept, and the superclass encodings that lock their keys.

Product contract (stricter than the paper): the edit of eq. 3 is applied **only to text sequences that
contain a concept token**, and only for the concepts they contain. Every other sequence -- plain prompts,
the empty/negative prompt of classifier-free guidance -- goes through ``F.linear(e, W)``, the very op of the
wrapped ``nn.Linear``, so the base model's outputs are reproduced exactly.

Why a context at all: diffusers calls ``attn.to_k(encoder_hidden_states)`` with one tensor and nothing
else. A :class:`PerfusionContext` hooks the text encoder; every call whose ``input_ids`` contain a concept
token is recorded (encoding, concept positions, and a second no-grad pass with the concept token replaced
by the superclass word for key locking, ``o*_K = W_K e_H``). Each rank-1 module matches the rows of its
input against the recorded encodings (same storage, else exact value equality -- the pipelines only
cast/repeat/concatenate them), so a plain ``StableDiffusionPipeline.__call__`` and manual
``text_encoder`` → ``unet`` calls in a training loop both work without extra arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    hidden: Tensor  # [B, N, d] detached text encoding of a prompt batch holding concept tokens
    positions: Tensor  # [B, K] long, first position of each concept, -1 where absent
    super_at: Tensor  # [B, K, d] superclass encoding at the concept position (zeros where absent)


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
