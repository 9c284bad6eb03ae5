"""The gated rank-1 edit of one bias-free K or V projection ``W`` (eq. 3, Algorithm 1 of the paper).

Tewel, Gal, Chechik, Atzmon, *Key-Locked Rank One Editing for Text-to-Image Personalization*
(SIGGRAPH 2023). Every ``to_k`` / ``to_v`` of a cross-attention (``attn2``) layer is a bias-free
linear map ``W`` of the text encoding ``e``. Perfusion replaces it by::

    s(e)   = i*ᵀ C⁻¹ e / (i*ᵀ C⁻¹ i*)                      similarity of e to the concept input i*
    W'(e)  = W e − s(e) · W i*  +  σ((s(e) − β) / τ) · o*   remove e's i*-component, add the gated o*

* ``i*`` — the concept token's text encoding at its own position, an EMA over training batches.
* ``C``  — the uncentered second moment of text encodings (docs/design.md §2); only ``C⁻¹`` is used
  (:mod:`nullbooth.methods.perfusion.covariance`).
* ``o*`` — for **values** a trainable vector (the "what"); for **keys** it is *locked* to the
  superclass: ``o*_K = W_K · e_H`` with ``e_H`` the superclass word's encoding at the concept
  position of the same prompt (the "where"). Keys therefore have no trainable parameter at all.
* ``β, τ`` — gate bias/temperature (train 0.75/0.1, inference 0.70/0.15; overridable per call).
* ``gate_scope`` — which tokens eq. 3 may edit: ``"all_tokens"`` (the paper: every token, by its ``s(e)``) or
  ``"concept_token"`` (the edit, removal and gate, only at the concept's own positions). A causal text encoder
  carries the concept into every later encoding; where ``C`` is singular in the directions the new token adds (a text encoder that has
  seen few words: its encodings span few directions, and the floored ``C⁻¹`` magnifies the rest), those later
  tokens score ``s ≈ s(i*)``, the gate opens on the whole prompt and ``o*`` replaces it.

Several concepts (Appendix B): the concept-removal term becomes the C⁻¹-orthogonal projection on
``span{i*_k}``; ``multi_concepts_use_cholesky=False`` uses the paper's approximation
``Σ_k s_k W i*_k`` (exact when the ``i*_k`` are C⁻¹-orthogonal), ``True`` the exact projection via
the Cholesky factor of ``C⁻¹`` and a QR step (eqs. 6-10; done here in the C⁻¹ metric, which the
seed's code gets wrong).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nullbooth.errors import NullBoothError
from nullbooth.methods.perfusion.context import PerfusionContext, RowPlan
from nullbooth.methods.perfusion.covariance import CLIP_L14_TEXT_WIDTH, inverse_covariance, load_shipped_covariance

__all__ = ["GATE_SCOPES", "GateScope", "Rank1EditModule", "merge_rank1_edit_modules"]

GateScope = Literal["all_tokens", "concept_token"]
GATE_SCOPES: tuple[str, ...] = get_args(GateScope)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient × ``scale`` backward (the paper's lower rate into the concept embedding)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


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
        gate_scope: GateScope = "all_tokens",
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
        if gate_scope not in GATE_SCOPES:
            raise NullBoothError(f"expected gate_scope one of {GATE_SCOPES}, got {gate_scope!r}")
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
        self.gate_scope = gate_scope
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
        return (f"in={self.in_features}, out={self.out_features}, {kind}, concepts={self.num_concepts}, "
                f"gate_scope={self.gate_scope}")

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
        a = active[:, None, :].to(dtype)  # [r, 1, K]: which tokens concept k may edit
        own = None
        if self.gate_scope == "concept_token":  # only where concept k sits in row r (its gate σ(−β/τ) > 0 elsewhere)
            own = (torch.arange(e.shape[1], device=e.device)[None, :, None] == plan.positions[:, None, :]) \
                & active[:, None, :]  # [r, n, K]
            a = own.to(dtype)
        We = e @ W.T  # [r, n, o]
        Wi = i_star @ W.T  # [K, o]
        if self.multi_concepts_use_cholesky and int(active.sum(1).max()) > 1:
            orth = self._orthogonal_cholesky(e, We, W, i_star, s, a, active)
            if own is not None:  # the joint projection is per row: keep it at the concepts' own tokens only
                orth = torch.where(own.any(-1, keepdim=True), orth, We)
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
        context=first.context, text_seq_len=first.text_seq_len, gate_scope=first.gate_scope,
    )
    merged.to(first.C_inv.device)
    with torch.no_grad():
        merged.ema_concept_text_encs.copy_(torch.cat([m.ema_concept_text_encs for m in modules]))
        if not first.is_key_proj:
            merged.concept_outputs.copy_(torch.cat([m.concept_outputs for m in modules]))
        merged.initted.fill_(True)
    merged.train(first.training)
    return merged
