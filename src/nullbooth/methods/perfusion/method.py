"""``method: perfusion`` for ``nullbooth train``.

The strategy object the training loop in :mod:`nullbooth.training.loop` drives (see :class:`nullbooth.methods.base.Method`),
built on :class:`nullbooth.methods.perfusion.editor.PerfusionEditor`. What is trained (Tewel et al. 2023, Algorithm 1),
per concept:

* ``o*_V`` of every cross-attention layer (value outputs, eq. 3), learning rate ``value_lr`` (paper 0.03);
* the concept token's input embedding, learning rate ``embedding_lr`` (paper 0.006);
* ``i*`` follows the concept token's encoding as an EMA (``input_decay``) -- a buffer, not a parameter;
* keys are locked to the superclass (``o*_K = W_K e_H`` per prompt): nothing to train.

Everything else (``W_K``, ``W_V``, the UNet, the text encoder, the rest of the vocabulary) is frozen, and
prompts without a concept token run through the base model bit for bit.

Data: the DreamBooth inputs of the loop (``instance_data_dir``, ``instance_prompt`` holding the concept
token, optional prior preservation) plus, optionally, one subject mask per instance image
(``perfusion.mask_dir``): the instance loss is then :func:`nullbooth.methods.perfusion.loss.loss_fn_weighted_by_mask`
at latent resolution. With several ``subjects`` each one is its own concept (its ``concept_token``,
``superclass``, ``mask_dir``; :mod:`nullbooth.methods.perfusion.subjects`), all trained in one editor: an
example's prompt is its subject's instance prompt, so it trains that concept only.

SDXL (:mod:`nullbooth.conditioning`): the loop encodes through :meth:`Method.encode_prompt` with both text
encoders; the concept token is in both tokenizers and both embedding tables (both rows trained at
``embedding_lr``), and ``i*``, the key lock and ``C`` live in the concatenated encoding ``attn2`` reads.

Output (``output_dir``): ``perfusion_concept.safetensors`` (the per-concept tensors only, ≈107 KB for
SD 1.5 in float32) -- with several subjects ``perfusion_concept_<i>.safetensors`` per subject -- and
``perfusion_config.json`` (method, base model, token(s), superclass(es), gate, rates, the covariance ``C`` it
was trained with and its SHA-256, versions). ``C`` is not copied: generation rebuilds it from the same
source (:func:`nullbooth.methods.perfusion.generation.perfusion_generation`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nullbooth.conditioning import tokenize
from nullbooth.config import Config, PerfusionBlock
from nullbooth.errors import NullBoothError
from nullbooth.filenames import CONCEPT_FILE, PERFUSION_CONFIG
from nullbooth.io import write_json
from nullbooth.methods.base import Method, ParamGroups, WeightChanges
from nullbooth.methods.perfusion.covariance import read_covariance_file, resolve_covariance
from nullbooth.methods.perfusion.editor import DEFAULT_EMBEDDING_LR, DEFAULT_VALUE_LR, PerfusionEditor
from nullbooth.methods.perfusion.generation import (
    PERFUSION_CONFIG_FORMAT,
    find_concept_files,
    load_perfusion_personalization,
    perfusion_generation,
)
from nullbooth.methods.perfusion.loss import loss_fn_weighted_by_mask
from nullbooth.methods.perfusion.masks import load_masks, subject_masks
from nullbooth.methods.perfusion.subjects import ConceptSpec, concept_file_names, concept_specs, perfusion_problems
from nullbooth.sampling import default_size

log = logging.getLogger(__name__)

# The names this module has always offered (the generation side and the checks now live in their own modules).
__all__ = [
    "CONCEPT_FILE", "PERFUSION_CONFIG", "Perfusion", "find_concept_files", "load_masks", "load_perfusion_personalization",
    "perfusion_generation", "perfusion_problems", "read_covariance_file", "resolve_covariance",
]

# embedding_lr defaults to value_lr × this: the paper's 0.006 / 0.03
EMBEDDING_LR_RATIO = DEFAULT_EMBEDDING_LR / DEFAULT_VALUE_LR


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (``‖a − b‖`` where ``b = 0``)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


class Perfusion(Method):
    """Key-locked rank-1 editing (Tewel et al. 2023): trains ``o*_V`` and the concept embedding only."""

    name = "perfusion"
    default_lr = DEFAULT_VALUE_LR
    trains_text_encoder = True  # the concept embedding is trained: the loop encodes the token ids every step

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        problems = perfusion_problems(cfg)
        if problems:
            raise NullBoothError(f"config: {len(problems)} problem(s): " + "; ".join(problems))
        self.block: PerfusionBlock = cfg.perfusion
        self.specs: list[ConceptSpec] = concept_specs(cfg)
        self.editor: PerfusionEditor | None = None
        self.masks: torch.Tensor | None = None  # [N, h, w] at latent size (every subject's, in order), or None
        self.covariance: dict[str, Any] = {}
        self._start: dict[str, torch.Tensor | dict[str, torch.Tensor]] = {}

    # -- rates

    @property
    def lr(self) -> float:
        """``o*_V``'s rate: ``perfusion.value_lr``, else ``learning_rate``, else the paper's 0.03."""
        if self.block.value_lr is not None:
            return self.block.value_lr
        return self.cfg.learning_rate if self.cfg.learning_rate is not None else self.default_lr

    @property
    def embedding_lr(self) -> float:
        return self.block.embedding_lr if self.block.embedding_lr is not None else self.lr * EMBEDDING_LR_RATIO

    # -- set-up

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        """Read masks and ``C``, then attach the editor (validates everything before it mutates the pipeline)."""
        self.pipe, self.stats_run = pipe, stats_run
        b, cfg = self.block, self.cfg
        resolution = cfg.resolution or default_size(pipe)
        self.masks = subject_masks(self.specs, resolution, resolution // pipe.vae_scale_factor)
        C, self.covariance = resolve_covariance(pipe, b)
        gate: dict[str, Any] = {"train_beta": b.train_beta, "train_temperature": b.train_tau, "gate_scope": b.gate_scope}
        if b.eval_beta is not None:
            gate["eval_beta"] = b.eval_beta
        if b.eval_tau is not None:
            gate["eval_temperature"] = b.eval_tau
        self.editor = PerfusionEditor.attach_concepts(
            pipe, [(s.token, s.superclass) for s in self.specs], C, eigenvalue_floor=b.eigenvalue_floor,
            input_decay=b.input_decay, frac_gradient_concept_embed=b.frac_gradient_concept_embed, **gate)
        self._check_prompts(pipe)
        if self.masks is not None:
            self.masks = self.masks.to(pipe.unet.device)
        values = {n: v for n, (_, v) in self.editor.modules.items()}
        self._start = {"o_star": {n: v.concept_outputs.detach().clone() for n, v in values.items()},  # [K, o]
                       "i_star": {n: v.ema_concept_text_encs.detach().clone() for n, v in values.items()},  # [K, i]
                       "embedding": self._embedding_vectors().detach().clone()}  # [K, Σ d_e]
        return self.editor.trainable_parameters(self.lr, self.embedding_lr, b.weight_decay)

    def _embedding_vectors(self) -> torch.Tensor:
        """Every concept's trained input embedding, the text encoders' side by side: ``[K, Σ d_e]``."""
        return torch.cat([embedding.vectors for embedding in self.editor.embeddings], dim=-1)

    def _check_prompts(self, pipe) -> None:
        """Each subject's instance prompt must tokenize to its concept token (else nothing trains it), in every
        tokenizer."""
        for k, (spec, concept) in enumerate(zip(self.specs, self.editor.concepts)):
            ids = tokenize(pipe, [spec.instance_prompt])[:, 0]  # [E, 77]
            if not all(bool((ids_e == cs[k].token_id).any()) for ids_e, cs in zip(ids, self.editor.encoder_concepts)):
                self.editor.detach()
                raise NullBoothError(
                    f"{spec.field('instance_prompt')}: {spec.instance_prompt!r} does not tokenize to the concept "
                    f"token {concept.token!r} (it is glued to another word or cut off at 77 tokens); separate it "
                    f"with spaces, e.g. 'a photo of {concept.token}'"
                )
            if len(concept.superclass_ids) > 1:
                log.info("superclass %r has %d tokens: the concept embedding starts at their mean and keys lock to "
                         "the encoding of its last token", concept.superclass, len(concept.superclass_ids))

    # -- in the loop

    def context(self) -> contextlib.AbstractContextManager:
        """Around the loop: the editor's records of concept prompts (matched to the UNet's K/V inputs)."""
        return self.editor.context()

    def loss(self, pred: torch.Tensor, target: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """Instance loss of examples ``idx``: plain MSE, or weighted by their masks (``loss_fn_weighted_by_mask``)."""
        if self.masks is None:
            return F.mse_loss(pred, target.float())
        mask = self.masks[list(idx)]  # [B, h, w]
        return loss_fn_weighted_by_mask(pred, target.float(), mask, self.block.normalized_mask_min_value)

    # -- checkpoints, report, output

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (SDXL: both encoders' concept embeddings) plus every module's ``i*`` EMA and its
        initialised flag (exact resume)."""
        state = super().checkpoint_state()
        for name, (key, value) in self.editor.modules.items():
            for proj, module in (("to_k", key), ("to_v", value)):
                state[f"unet.{name}.{proj}.ema_concept_text_encs"] = module.ema_concept_text_encs.detach()
                state[f"unet.{name}.{proj}.initted"] = module.initted.detach()
        return state

    def weight_changes(self) -> WeightChanges:
        """None: Perfusion has no fixed ΔW (its edit is gated per input); plain prompts are unchanged exactly."""
        return WeightChanges()

    @torch.no_grad()
    def concept_changes(self, k: int) -> dict[str, Any]:
        """Concept ``k``: relative change of ``o*_V``, ``i*`` (per layer) and its embedding since training began."""
        out: dict[str, Any] = {"layers": {}}
        for name, (_, value) in self.editor.modules.items():
            out["layers"][name] = {
                "o_star_change_rel": _rel(value.concept_outputs[k], self._start["o_star"][name][k]),
                "i_star_change_rel": _rel(value.ema_concept_text_encs[k], self._start["i_star"][name][k]),
            }
        out["embedding_change_rel"] = _rel(self._embedding_vectors()[k], self._start["embedding"][k])
        return out

    def changes(self) -> dict[str, Any]:
        """One concept: :meth:`concept_changes`; several: ``{"concepts": {token: concept_changes}}``."""
        if len(self.specs) == 1:
            return self.concept_changes(0)
        return {"concepts": {c.token: self.concept_changes(k) for k, c in enumerate(self.editor.concepts)}}

    def report(self) -> dict[str, dict[str, Any]]:
        """Per K/V weight: keys locked to the superclass(es); values trained, with each concept's change."""
        concepts = self.editor.concepts
        changes = [self.concept_changes(k)["layers"] for k in range(len(concepts))]
        several = len(concepts) > 1
        locked = ", ".join(f"{c.superclass} ({c.token})" for c in concepts) if several else concepts[0].superclass
        rows: dict[str, dict[str, Any]] = {}
        for name in self.editor.modules:
            rows[f"{name}.to_k"] = {"trained": False, "locked_to": locked}
            value: dict[str, Any] = {"trained": True, "trained_tensor": "o*_V"}
            for c, change in zip(concepts, changes):
                value.update({f"{key}[{c.token}]" if several else key: v for key, v in change[name].items()})
            rows[f"{name}.to_v"] = value
        return rows

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        """The concept file(s) (per-concept tensors, no ``C⁻¹``) and ``perfusion_config.json``."""
        output_dir = Path(output_dir)
        names = concept_file_names(len(self.specs))
        sizes = [self.editor.save(output_dir / name, k) for k, name in enumerate(names)]
        concepts = [{"concept_file": name, "concept_bytes": size, "concept_token": c.token, "token_id": c.token_id,
                     "superclass": c.superclass, "superclass_ids": list(c.superclass_ids)}
                    for name, size, c in zip(names, sizes, self.editor.concepts)]
        if len(concepts) == 1:
            files: dict[str, Any] = concepts[0]
        else:
            for entry, spec in zip(concepts, self.specs):
                entry.update(instance_prompt=spec.instance_prompt, masks=spec.mask_dir is not None)
            files = {"concept_files": names, "concepts": concepts}
        value = next(iter(self.editor.modules.values()))[1]
        b = self.block
        write_json(output_dir / PERFUSION_CONFIG, {
            **info, "format": PERFUSION_CONFIG_FORMAT, "format_version": 1, **files,
            "value_lr": self.lr, "embedding_lr": self.embedding_lr, "weight_decay": b.weight_decay,
            "gate": {"train_beta": value.train_beta, "train_tau": value.train_temperature,
                     "eval_beta": value.eval_beta, "eval_tau": value.eval_temperature, "input_decay": value.input_decay,
                     "frac_gradient_concept_embed": value.frac_gradient_concept_embed, "gate_scope": value.gate_scope},
            "eigenvalue_floor": b.eigenvalue_floor, "covariance": self.covariance,
            "masks": any(s.mask_dir is not None for s in self.specs),
            "normalized_mask_min_value": b.normalized_mask_min_value,
            "layers": {n: v.out_features for n, (_, v) in self.editor.modules.items()},
            "changes": self.changes(),
        })
        log.info("wrote %s (%s bytes) and %s", ", ".join(names), ", ".join(map(str, sizes)), PERFUSION_CONFIG)
        return [output_dir / name for name in names] + [output_dir / PERFUSION_CONFIG]
