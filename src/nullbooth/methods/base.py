"""What is trained: one small strategy object per method, all driven by the same loop in ``train.py``.

Every method trains (a re-parametrisation of) the same weights — the ``to_q``/``to_k``/``to_v``/
``to_out.0`` weights of the selected ``attn2`` layers, biases frozen — so the baselines compare
like with like:

- ``nullbooth``  ΔW confined to the null space of the prior-knowledge features (DESIGN §2):
  ``adapter`` trains ``M`` in ``ΔW = M Uᵀ`` (exact, default); ``projected`` trains the full weight
  and projects the whole optimizer update after each step, ``W ← W₀ + (W − W₀) P``.
- ``dreambooth`` the same weights, unconstrained (the baseline users compare against).
- ``lora``       peft LoRA ``ΔW = (α/r) B A`` on the same modules (the other baseline).
- ``perfusion``  key-locked rank-1 edits, registered by :mod:`nullbooth.methods.perfusion.method`.

The loop only talks to :class:`Method`: ``prepare`` (mutate the pipeline, return optimizer
parameter groups), ``context`` (entered around the loop), ``encode_prompt``, ``loss`` (the instance
term), ``after_step``, ``checkpoint_state``/``load_checkpoint_state``, ``weight_changes`` (for the
leakage report), ``report`` and ``save``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_WEIGHTS
from nullbooth.methods.adapters import (
    adapter_targets,
    bases_from_run,
    dense_deltas,
    export_diffusers_lora,
    inject_null_space_adapters,
    null_space_adapters,
    project_update_,
    save_adapter,
)
from nullbooth.stats.capture import cross_attention_layers
from nullbooth.stats.nullspace import empty_fix

log = logging.getLogger(__name__)

ParamGroups = list[dict[str, Any]]
WeightChanges = dict[str, tuple[torch.Tensor, torch.Tensor]]  # target path → (ΔW, W₀), both [out, in]


# --------------------------------------------------------------------------- the interface


class Method:
    """Strategy base class. Subclasses set ``name``/``default_lr`` and implement ``prepare`` and ``save``."""

    name: ClassVar[str] = ""
    default_lr: ClassVar[float] = 5e-6
    trains_text_encoder: ClassVar[bool] = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.pipe = None
        self.stats_run: Path | None = None  # the collection run whose statistics the report (and nullbooth) use
        self.targets: dict[str, nn.Linear] = {}

    @property
    def lr(self) -> float:
        return self.cfg.learning_rate if self.cfg.learning_rate is not None else self.default_lr

    # -- set-up

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        """Freeze the pipeline, make the method's parameters trainable; return optimizer parameter groups."""
        raise NotImplementedError

    def _freeze(self, pipe) -> None:
        self.pipe = pipe
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):
            part.requires_grad_(False)
        self.targets = adapter_targets(pipe.unet, self.layers(pipe), self.features())

    def layers(self, pipe) -> list:
        return cross_attention_layers(pipe.unet, self.cfg.nullbooth.cross_attention_layers)

    def features(self) -> tuple[str, ...]:
        return self.cfg.nullbooth.collect_features.selected()

    # -- in the loop

    def context(self) -> contextlib.AbstractContextManager:
        """Entered around the whole loop (Perfusion records text-encoder calls here)."""
        return contextlib.nullcontext()

    def encode_prompt(self, text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Text encodings ``[B, 77, d]``; the text encoder is frozen unless the method trains it."""
        with torch.set_grad_enabled(self.trains_text_encoder and torch.is_grad_enabled()):
            return text_encoder(input_ids)[0]

    def loss(self, pred: torch.Tensor, target: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """The instance loss of the batch's instance examples ``idx`` (DreamBooth: plain MSE; Perfusion may mask it)."""
        return F.mse_loss(pred, target.float())

    def after_step(self) -> None:
        """Called after every optimizer step (the projected update lives here)."""

    # -- checkpoints, report, output

    def trainable(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by a structural name (``unet.<path>`` / ``text_encoder.<path>``)."""
        out = {}
        for prefix in ("unet", "text_encoder"):
            for name, p in getattr(self.pipe, prefix).named_parameters():
                if p.requires_grad:
                    out[f"{prefix}.{name}"] = p
        return out

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to resume exactly (default: the trainable tensors)."""
        return {k: v.detach() for k, v in self.trainable().items()}

    @torch.no_grad()
    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.checkpoint_state()
        if set(own) != set(tensors):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise NullBoothError(
                f"the checkpoint does not fit this {self.name} run (missing {missing[:3]}, unexpected {extra[:3]}); "
                "resume with the configuration (method, layers, thresholds) the checkpoint was written with"
            )
        for name, value in own.items():
            if value.shape != tensors[name].shape:
                raise NullBoothError(f"checkpoint tensor {name} has shape {tuple(tensors[name].shape)}, this run "
                                     f"expects {tuple(value.shape)}; the null spaces or ranks differ from the checkpoint's")
            value.copy_(tensors[name])

    def weight_changes(self) -> WeightChanges:
        """Per target ``(ΔW, W₀)`` for the leakage report; empty when the method has no fixed ΔW."""
        return {}

    def report(self) -> dict[str, dict[str, Any]]:
        """Per target path: method-specific facts (null dims, ranks, …)."""
        return {path: {"trained": True} for path in self.targets}

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        """Write the trained result; ``info`` is the common JSON config (method, base model, run, versions)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- nullbooth


class NullBooth(Method):
    """ΔW in the null space of the prior-knowledge features of every protected weight (DESIGN §2).

    ``adapter``: ``W' = W + M Uᵀ`` with ``U`` from the run's timestep-summed statistics, ``M`` trained.
    ``projected``: ``W`` trained, then ``W ← W₀ + (W − W₀) P`` after each step (``P = U Uᵀ``), which
    projects Adam's whole update including weight decay; the result is saved as the same adapter,
    ``M = (W − W₀) U``, since ``W − W₀ = (W − W₀) U Uᵀ``.
    """

    name = "nullbooth"

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        if stats_run is None:
            raise NullBoothError("method 'nullbooth' needs a statistics run; set nullbooth.original_knowledge_prompts "
                                 "or nullbooth.stats_run")
        self.stats_run = Path(stats_run)
        nb = self.cfg.nullbooth
        # Every check on the run happens before the model is touched.
        bases, self.info = bases_from_run(stats_run, self.layers(pipe), self.features(), nb.nullspace_mode,
                                          nb.nullspace_threshold)
        self.bases = {p: U for p, U in bases.items() if U.shape[1] > 0}
        if not self.bases:
            spectra = [(i["lambda_min"], i["lambda_max"]) for i in self.info.values()]
            raise NullBoothError(
                f"every null space of {stats_run} is empty under nullspace_mode '{nb.nullspace_mode}' threshold "
                f"{nb.nullspace_threshold:g}: nothing can be trained; {empty_fix(nb.nullspace_mode, spectra)}"
            )
        self._freeze(pipe)
        self.update = self.cfg.nullbooth_update
        if self.update == "adapter":
            wrappers = inject_null_space_adapters(pipe.unet, self.bases)
            return [{"params": [w.M for w in wrappers.values()], "lr": self.lr}]
        # projected: full weights of the targets with room to move; W₀ and one P per distinct basis kept.
        self.W0: dict[str, torch.Tensor] = {}
        self.P: dict[str, torch.Tensor] = {}
        shared: dict[int, torch.Tensor] = {}
        for path, U in self.bases.items():
            weight = self.targets[path].weight
            weight.requires_grad_(True)
            self.W0[path] = weight.detach().clone()
            if id(U) not in shared:  # k and v share the text basis: one P for both
                shared[id(U)] = (U @ U.T).to(device=weight.device, dtype=torch.float32)  # P [in, in]
            self.P[path] = shared[id(U)]
        return [{"params": [self.targets[p].weight for p in self.bases], "lr": self.lr}]

    @torch.no_grad()
    def after_step(self) -> None:
        if self.update == "projected":
            for path, W0 in self.W0.items():
                # Project the cumulative update from W₀: equal to projecting each step's update (earlier
                # ones are already in the null space, P is idempotent) without accumulating round-off.
                project_update_(self.targets[path].weight, W0, self.P[path])

    def weight_changes(self) -> WeightChanges:
        if self.update == "adapter":
            return {p: (w.get_delta_weight().detach(), w.base_layer.weight.detach())
                    for p, w in null_space_adapters(self.pipe.unet).items()}
        return {p: (self.targets[p].weight.detach() - W0, W0) for p, W0 in self.W0.items()}

    def report(self) -> dict[str, dict[str, Any]]:
        return {p: {"trained": p in self.bases, "dim": i["dim"], "null_dim": i["null_dim"],
                    "lambda_max_null": i["lambda_max_null"], "lambda_min": i["lambda_min"],
                    "lambda_max": i["lambda_max"]}
                for p, i in self.info.items()}

    @torch.no_grad()
    def to_adapter(self) -> None:
        """Projected mode: restore W₀ and express ``W − W₀`` exactly as adapters ``M = (W − W₀) U``."""
        if self.update != "projected":
            return
        deltas = {}
        for path, W0 in self.W0.items():
            weight = self.targets[path].weight
            deltas[path] = weight.detach().to(torch.float64) - W0.to(torch.float64)
            weight.copy_(W0)
            weight.requires_grad_(False)
        wrappers = inject_null_space_adapters(self.pipe.unet, self.bases)
        for path, wrapper in wrappers.items():
            wrapper.M.copy_((deltas[path] @ wrapper.basis.to(torch.float64)).to(wrapper.M.dtype))  # [out, k]
        self.update = "adapter"

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        self.to_adapter()
        save_adapter(output_dir, self.pipe.unet, {**info, "nullbooth_update": self.cfg.nullbooth_update})
        lora = export_diffusers_lora(output_dir, unet=self.pipe.unet)
        return [output_dir / ADAPTER_WEIGHTS, output_dir / ADAPTER_CONFIG, lora]


# --------------------------------------------------------------------------- dreambooth


class DreamBooth(Method):
    """The protected weights trained without constraint (biases frozen, like nullbooth)."""

    name = "dreambooth"

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        self._freeze(pipe)
        self.stats_run = stats_run
        self.W0 = {f"{p}.weight": m.weight.detach().clone() for p, m in self.targets.items()}
        for m in self.targets.values():
            m.weight.requires_grad_(True)
        return [{"params": [m.weight for m in self.targets.values()], "lr": self.lr}]

    def weight_changes(self) -> WeightChanges:
        return {p: (m.weight.detach() - self.W0[f"{p}.weight"], self.W0[f"{p}.weight"]) for p, m in self.targets.items()}

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        self.pipe.unet.save_pretrained(output_dir / "unet")
        # ΔW is generally full rank: the LoRA export is an exact SVD factorisation (rank ≤ min(out, in)).
        deltas = dense_deltas(self.W0, self.pipe.unet, self.layers(self.pipe), self.features())
        paths = [output_dir / "unet"]
        if any(bool(d.abs().max() > 0) for d in deltas.values()):
            paths.append(export_diffusers_lora(output_dir, deltas=deltas))
        return paths


# --------------------------------------------------------------------------- lora


class Lora(Method):
    """peft LoRA (rank ``lora_rank``, ``α = r``) on the protected modules."""

    name = "lora"
    default_lr = 1e-4

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        from peft import LoraConfig

        self._freeze(pipe)
        self.stats_run = stats_run
        self.W0 = {p: m.weight.detach().clone() for p, m in self.targets.items()}
        # peft draws A from the global RNG; seeding it from the config makes a run reproducible.
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            pipe.unet.add_adapter(LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_rank,
                                             init_lora_weights="gaussian", target_modules=list(self.targets)))
        return [{"params": [p for p in pipe.unet.parameters() if p.requires_grad], "lr": self.lr}]

    def weight_changes(self) -> WeightChanges:
        out = {}
        for path, W0 in self.W0.items():
            layer = self.pipe.unet.get_submodule(path)
            out[path] = (layer.get_delta_weight("default").detach(), W0)
        return out

    def report(self) -> dict[str, dict[str, Any]]:
        return {p: {"trained": True, "rank": self.cfg.lora_rank} for p in self.targets}

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet))
        StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=layers, safe_serialization=True)
        return [output_dir / LORA_WEIGHTS]
