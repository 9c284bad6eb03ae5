"""The high-level entry point: :class:`PerfusionEditor` (attach / trainable_parameters / context / save / load / detach).

It composes the parts of this package on a diffusers Stable Diffusion pipeline: the concept token
(:mod:`~nullbooth.methods.perfusion.concept`), the text-encoder hook (:mod:`~nullbooth.methods.perfusion.context`),
one rank-1 edit per cross-attention K/V (:mod:`~nullbooth.methods.perfusion.wiring`) and concept files
(:mod:`~nullbooth.methods.perfusion.files`), and undoes all of it exactly.

SD 1.x/2.x and SDXL share this code (:mod:`nullbooth.conditioning`): on SDXL the concept token is added to both
tokenizers and both embedding tables (each row initialised from the superclass in that table, both trained), and
``i*``, ``e_H`` and ``C`` live in the concatenated encoding ``attn2`` reads.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from nullbooth.conditioning import encode_ids, encoder_names, text_encoders, tokenize, tokenizers
from nullbooth.errors import NullBoothError
from nullbooth.methods.perfusion.concept import (
    ConceptToken,
    ConceptTokenEmbedding,
    add_concept_token_,
    check_new_token,
    superclass_token_ids,
)
from nullbooth.methods.perfusion.context import PerfusionContext
from nullbooth.methods.perfusion.covariance import default_covariance, inverse_covariance, text_width
from nullbooth.methods.perfusion.files import PerfusionConcept, load_concept, save_concept
from nullbooth.methods.perfusion.module import Rank1EditModule
from nullbooth.methods.perfusion.wiring import (
    find_cross_attention_layers,
    make_unet_rank1_edit_modules_,
    remove_unet_rank1_edit_modules_,
    wired_modules,
)

__all__ = ["DEFAULT_EMBEDDING_LR", "DEFAULT_VALUE_LR", "PerfusionEditor", "read_concepts"]

# Learning rates of the two trainable tensors. The paper trains the concept embedding with a lower
# rate than o*_V; these values follow lucidrains' reading of it ("0.006 vs 0.03").
DEFAULT_VALUE_LR = 0.03
DEFAULT_EMBEDDING_LR = 0.006

# Prompts used to initialise i* and o*_V when a concept is attached (the mean over them).
_INIT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a good photo of a {}", "a photo of one {}", "a photo of the {}",
)


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

    def __init__(self, pipe: Any, encoder_concepts: list[list[ConceptToken]], context: PerfusionContext,
                 modules: dict[str, tuple[Rank1EditModule, Rank1EditModule]], embeddings: list[ConceptTokenEmbedding],
                 undo: dict[str, Any]) -> None:
        self.pipe = pipe
        self.encoder_concepts = encoder_concepts  # per text encoder: the concepts as its tokenizer numbers them
        self.concepts = encoder_concepts[0]
        self.ctx = context
        self.modules = modules
        self.embeddings = embeddings  # per text encoder, in concatenation order
        self._undo = undo
        self.attached = True

    @property
    def embedding(self) -> ConceptTokenEmbedding:
        """The (first) text encoder's concept embedding (SD's only one)."""
        return self.embeddings[0]

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
        return cls.attach_concepts(pipe, [(concept_token, superclass)], C, layers=layers, init_prompts=init_prompts,
                                   eigenvalue_floor=eigenvalue_floor, **module_kwargs)

    @classmethod
    def attach_concepts(cls, pipe: Any, specs: Sequence[tuple[str, str]], C: Tensor | np.ndarray | None = None, *,
                        layers: Sequence[str] | None = None, init_prompts: Sequence[str] | None = None,
                        eigenvalue_floor: float | Literal["auto"] | None = "auto",
                        **module_kwargs: Any) -> "PerfusionEditor":
        """:meth:`attach` for several ``(concept_token, superclass)`` pairs at once, trained side by side.

        Concept ``k`` gets its own ``o*_V`` row, embedding row, ``i*`` and key lock to its own superclass;
        a prompt holding only concept ``k`` is edited for ``k`` alone (eq. 3 sums over the concepts present).
        """
        tokens = [token for token, _ in specs]
        if not tokens or len(set(tokens)) != len(tokens):
            raise NullBoothError(f"expected one or more distinct concept tokens, got {tokens}")
        editor = cls._build(pipe, list(specs), C, layers=layers, eigenvalue_floor=eigenvalue_floor, **module_kwargs)
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
        concepts = read_concepts(pipe, paths)
        tokens = [c.token for c in concepts]
        if len(set(tokens)) != len(tokens):
            raise NullBoothError(f"two concept files use the same token ({tokens}); each concept needs its own token")
        gates = {(c.eval_beta, c.eval_temperature, c.train_beta, c.train_temperature, c.gate_scope) for c in concepts}
        if len(gates) > 1:
            warnings.warn(
                f"concept files use different gate parameters {sorted(gates)}; "
                f"using those of {paths[0]}", stacklevel=2,
            )
        first = concepts[0]
        gate = dict(eval_beta=first.eval_beta, eval_temperature=first.eval_temperature, train_beta=first.train_beta,
                    train_temperature=first.train_temperature, input_decay=first.input_decay,
                    gate_scope=first.gate_scope)
        gate.update(module_kwargs)
        editor = cls._build(pipe, [(c.token, c.superclass) for c in concepts], C, layers=list(first.o_star),
                            eigenvalue_floor=eigenvalue_floor, multi_concepts_use_cholesky=use_cholesky, **gate)
        try:
            with torch.no_grad():
                for k, c in enumerate(concepts):
                    for embedding, vector in zip(editor.embeddings, c.token_embeddings):
                        embedding.vectors[k] = vector.to(embedding.vectors)
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
        unet, encoders, toks = pipe.unet, text_encoders(pipe), tokenizers(pipe)
        if wired_modules(unet) or any(isinstance(te.get_input_embeddings(), ConceptTokenEmbedding) for te in encoders):
            raise NullBoothError("this pipeline already has a Perfusion editor attached; detach it first")
        text_dim = text_width(pipe)
        cross_dim = {a.to_k.in_features for a in find_cross_attention_layers(unet).values()}
        if cross_dim != {text_dim}:
            raise NullBoothError(
                f"the UNet's cross-attention reads width {sorted(cross_dim)}, "
                f"the text encoder{'s give' if len(encoders) > 1 else ' gives'} {text_dim}"
            )
        # validate every input before the first mutation
        unknown = sorted(set(layers or ()) - set(find_cross_attention_layers(unet)))
        if unknown:
            raise NullBoothError(f"unknown cross-attention layers {unknown[:3]}; see find_cross_attention_layers(pipe.unet)")
        for token, superclass in specs:
            for tok in toks:
                check_new_token(tok, token)
                superclass_token_ids(tok, superclass)
        if C is None:
            C = default_covariance(pipe)
        C_inv = inverse_covariance(C, dim=text_dim, eigenvalue_floor=eigenvalue_floor)
        Rank1EditModule(nn.Linear(text_dim, 1, bias=False), C_inv=C_inv, **module_kwargs)  # validates kwargs

        parts = ["unet", *encoder_names(pipe), "vae"]  # what the editor freezes and restores the flags of
        undo: dict[str, Any] = {
            "tokenizers": toks, "embeddings": [te.get_input_embeddings() for te in encoders],
            "vocab_sizes": [te.config.vocab_size for te in encoders],
            "requires_grad": {id(p): (p, p.requires_grad) for part in parts for p in getattr(pipe, part).parameters()},
        }
        # each tokenizer its own copy (SDXL pipelines may share one object) and its own ids for the concepts
        new_toks = [copy.deepcopy(tok) for tok in toks]
        encoder_concepts = [[add_concept_token_(tok, te, token, sup) for token, sup in specs]
                            for tok, te in zip(new_toks, encoders)]
        embeddings = []
        for te, concepts in zip(encoders, encoder_concepts):
            embeddings.append(ConceptTokenEmbedding(te.get_input_embeddings(), [c.token_id for c in concepts]))
            te.set_input_embeddings(embeddings[-1])
        _set_tokenizers(pipe, new_toks)
        context = PerfusionContext(encoder_concepts[0])
        modules = make_unet_rank1_edit_modules_(unet, C=None, C_inv=C_inv, layers=layers, context=context,
                                                num_concepts=len(specs), **module_kwargs)
        context.install(encoders, encoder_concepts)
        for part in parts:  # freeze everything (incl. the grown embeddings) ...
            getattr(pipe, part).requires_grad_(False)
        for embedding in embeddings:  # ... but the two trainable tensors
            embedding.vectors.requires_grad_(True)
        for _, value in modules.values():
            value.concept_outputs.requires_grad_(True)
        return cls(pipe, encoder_concepts, context, modules, embeddings, undo)

    # -- use --
    def _check(self) -> None:
        if not self.attached:
            raise NullBoothError("this Perfusion editor was detached; attach or load again")

    @torch.no_grad()
    def initialize(self, prompts: Sequence[str] | None = None) -> None:
        """Set ``i*`` (mean concept encoding) and ``o*_V = W_V e_H`` (mean superclass encoding) of every concept."""
        self._check()
        templates = list(prompts) if prompts is not None else list(_INIT_TEMPLATES)
        encoders = text_encoders(self.pipe)
        for k, concept in enumerate(self.concepts):
            texts = [t.format(concept.token) if "{}" in t else f"{t} {concept.token}" for t in templates]
            with self.ctx:
                hidden = encode_ids(encoders, tokenize(self.pipe, texts)).hidden  # [b, n, d]: what attn2 reads
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
        """Optimizer param groups: every value module's ``o*_V`` and the concept token embedding(s) (of every
        text encoder).

        Nothing else requires grad while attached (W, keys, the rest of the model are frozen). The
        default rates (o*_V 0.03, embedding 0.006) follow lucidrains' reading of the paper's two rates.
        """
        self._check()
        values = [v.concept_outputs for _, v in self.modules.values()]
        vectors = [embedding.vectors for embedding in self.embeddings]  # SDXL: the token's row in both tables
        return [
            {"params": values, "lr": value_lr, "weight_decay": weight_decay, "name": "perfusion_values"},
            {"params": vectors, "lr": embedding_lr, "weight_decay": weight_decay, "name": "concept_embedding"},
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
        vectors = [embedding.vectors[k].detach().float().cpu() for embedding in self.embeddings]
        return PerfusionConcept(
            self.concepts[k].token, self.concepts[k].superclass, vectors[0],
            i_star, o_star, eval_beta=value0.eval_beta, eval_temperature=value0.eval_temperature,
            train_beta=value0.train_beta, train_temperature=value0.train_temperature, input_decay=value0.input_decay,
            gate_scope=value0.gate_scope, token_embedding_2=vectors[1] if len(vectors) > 1 else None,
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
        """Exact undo: original nn.Linear objects, token embeddings, vocab sizes, tokenizers and requires_grad flags."""
        if not self.attached:
            return
        pipe, undo = self.pipe, self._undo
        self.ctx.uninstall()
        remove_unet_rank1_edit_modules_(pipe.unet)
        for te, embedding, vocab_size in zip(text_encoders(pipe), undo["embeddings"], undo["vocab_sizes"]):
            current = te.get_input_embeddings().weight  # follow any pipe.to(device/dtype) since attach
            te.set_input_embeddings(embedding.to(device=current.device, dtype=current.dtype))
            te.config.vocab_size = vocab_size
        _set_tokenizers(pipe, undo["tokenizers"])
        for p, flag in undo["requires_grad"].values():
            p.requires_grad_(flag)
        self.attached = False


def _set_tokenizers(pipe: Any, toks: Sequence[Any]) -> None:
    """Put ``toks`` in the pipeline's tokenizer slots, in :func:`nullbooth.conditioning.tokenizers` order."""
    pipe.tokenizer = toks[0]
    if len(toks) > 1:
        pipe.tokenizer_2 = toks[1]


def read_concepts(pipe: Any, paths: Sequence[str | os.PathLike]) -> list[PerfusionConcept]:
    """The concept files at ``paths``, each checked against ``pipe`` (family, text widths, cross-attention layers)."""
    concepts = [load_concept(p) for p in paths]
    layer_widths = {n: a.to_v.out_features for n, a in find_cross_attention_layers(pipe.unet).items()}
    embedding_widths = [int(te.config.hidden_size) for te in text_encoders(pipe)]
    for p, c in zip(paths, concepts):
        c.check_compatible(layer_widths, embedding_widths, source=str(p))
    return concepts
