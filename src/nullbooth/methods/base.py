"""What is trained: one small strategy object per method, all driven by the same loop (:mod:`nullbooth.training.loop`).

Every method reports the change of the same protected weights — the ``to_q``/``to_k``/``to_v``/``to_out.0``
weights of the selected ``attn2`` layers — so the leakage report compares like with like; what each trains:

- ``nullbooth``  those weights, ΔW confined to the null space of the prior-knowledge features (docs/design.md §2),
  :mod:`nullbooth.methods.nullbooth`.
- ``dreambooth`` the whole UNet (diffusers' ``train_dreambooth.py``), ``attn2_finetune`` the protected weights
  unconstrained (Custom-Diffusion-like), ``lora`` (peft LoRA on every attention projection, or attn2 only):
  :mod:`nullbooth.methods.baselines`; ``oft`` (peft OFT on every attention projection), :mod:`nullbooth.methods.oft`.
- ``perfusion``  key-locked rank-1 edits, :mod:`nullbooth.methods.perfusion.method`.

:mod:`nullbooth.methods.registry` maps the config's ``method`` name to the class. The loop only talks to
:class:`Method`: ``prepare`` (mutate the pipeline, return optimizer parameter groups), ``context``
(entered around the loop), ``encode_prompt``, ``loss`` (the instance term), ``after_step``,
``penalty``, ``checkpoint_state``/``load_checkpoint_state``, ``weight_changes`` (for the leakage report), ``report``,
``unprotected`` and ``save``.

``train_text_encoder`` (diffusers' flag) adds the text encoder, in its own optimizer group ``{"name":
"text_encoder"}`` at ``text_encoder_lr``: dreambooth trains all of it (diffusers' ``train_dreambooth.py``; SD only),
lora and nullbooth a LoRA of rank ``lora_rank`` on the self-attention projections of every text encoder — SDXL's
two, as diffusers' ``train_dreambooth_lora_sdxl.py`` — (:meth:`Method.text_encoder_lora`). No method constrains it;
nullbooth says so in ``unprotected``.

Both pipeline families go through :mod:`nullbooth.conditioning`: :meth:`Method.encode_prompt` takes the list of text
encoders and token ids ``[E, B, 77]`` and returns an :class:`~nullbooth.conditioning.Encoded`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nullbooth.conditioning import Encoded, encode_ids, encoder_names, is_sdxl, text_encoders
from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.methods.adapters import adapter_targets
from nullbooth.methods.lora_export import export_kohya_lora
from nullbooth.stats.capture import cross_attention_layers

ParamGroups = list[dict[str, Any]]
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # a CLIP self-attention's projections


class WeightChanges(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """Target path → ``(ΔW, W₀)``, both ``[out, in]``: ``change(path)``, computed when the pair is read.

    The report reads one weight at a time; the float64 ΔW of every protected weight at once is 4.8 GB on SDXL
    (70 attn2 layers), which ran a 23 GB machine out of memory after training.
    """

    def __init__(self, paths: Iterable[str] = (),
                 change: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self._paths, self._change = dict.fromkeys(paths), change  # ordered, O(1) membership

    def __contains__(self, path: object) -> bool:  # Mapping's own would compute the pair to answer
        return path in self._paths

    def __getitem__(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        if path not in self._paths or self._change is None:
            raise KeyError(path)
        return self._change(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


# --------------------------------------------------------------------------- the interface


class Method:
    """Strategy base class. Subclasses set ``name``/``default_lr`` and implement ``prepare`` and ``save``.

    ``trains_text_encoder`` (per instance) is the class's value — a method that always trains part of the encoder
    (Perfusion's concept embedding) sets ``True`` — or else the config's ``train_text_encoder``; the loop then
    encodes token ids every step through :meth:`encode_prompt`.
    """

    name: ClassVar[str] = ""
    default_lr: ClassVar[float] = 5e-6
    trains_text_encoder: bool = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.trains_text_encoder = type(self).trains_text_encoder or cfg.train_text_encoder
        self.pipe = None
        self.stats_run: Path | None = None  # the collection run whose statistics the report (and nullbooth) use
        self.targets: dict[str, nn.Linear] = {}

    @property
    def lr(self) -> float:
        return self.cfg.learning_rate if self.cfg.learning_rate is not None else self.default_lr

    @property
    def text_encoder_lr(self) -> float:
        return self.cfg.text_encoder_lr if self.cfg.text_encoder_lr is not None else self.lr

    # -- set-up

    def check(self, pipe) -> None:
        """Refuse, before anything is computed for the run, a pipeline this method and config cannot train or export.

        kohya's SDXL files name UNet modules by the original SGM layout (``input_blocks_…``), which the kohya export
        does not write, so ``lora_format: kohya`` is refused on SDXL."""
        if self.cfg.lora_format == "kohya" and is_sdxl(pipe):
            raise NullBoothError("lora_format: 'kohya' is written for SD 1.x/2.x module names; this is an SDXL "
                                 "pipeline, whose kohya files use the SGM layout (input_blocks_…) that this export "
                                 "does not write; use lora_format: diffusers (diffusers and ComfyUI load it)")

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        """Freeze the pipeline, make the method's parameters trainable; return optimizer parameter groups."""
        raise NotImplementedError

    def _freeze(self, pipe) -> None:
        self.pipe = pipe
        for part in (pipe.unet, pipe.vae, *text_encoders(pipe)):
            part.requires_grad_(False)
        self.targets = adapter_targets(pipe.unet, self.layers(pipe), self.features())

    def text_encoder_full(self, pipe) -> dict[str, Any]:
        """Every text-encoder parameter trainable (diffusers' DreamBooth); its optimizer group."""
        pipe.text_encoder.requires_grad_(True)
        pipe.text_encoder.train()
        return {"params": list(pipe.text_encoder.parameters()), "lr": self.text_encoder_lr, "name": "text_encoder"}

    def text_encoder_lora(self, pipe, *, dropout: float = 0.0, dora: bool = False) -> dict[str, Any]:
        """peft LoRA (rank ``lora_rank``, ``α = r``) on the ``q/k/v/out_proj`` of every self-attention of each text
        encoder (SDXL: both), as diffusers' ``train_dreambooth_lora.py`` / ``train_dreambooth_lora_sdxl.py``; one
        optimizer group for all of them. The encoders are put in train mode (LoRA dropout) and encoder ``e``'s
        factors drawn from the config's seed + 1 + e, as for the UNet's LoRA."""
        from peft import LoraConfig, inject_adapter_in_model

        params = []
        for e, encoder in enumerate(text_encoders(pipe)):
            # Structural: the modules that hold all four projections, whatever the encoder's nesting.
            targets = [f"{path}.{p}" for path, m in encoder.named_modules()
                       if all(isinstance(getattr(m, p, None), nn.Linear) for p in TEXT_ATTENTION) for p in TEXT_ATTENTION]
            if not targets:
                raise NullBoothError(f"train_text_encoder: expected a CLIP text encoder with self-attention "
                                     f"{'/'.join(TEXT_ATTENTION)} projections, got {type(encoder).__name__} without "
                                     "any; turn train_text_encoder off for this model")
            config = LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_rank, lora_dropout=dropout,
                                use_dora=dora, init_lora_weights="gaussian", target_modules=targets)
            with torch.random.fork_rng():
                torch.manual_seed(self.cfg.seed + 1 + e)  # + 1: not the UNet LoRA's draws
                # peft's own injector: transformers' add_adapter demands a newer peft than diffusers does.
                inject_adapter_in_model(config, encoder)
            encoder.train()
            params += [p for p in encoder.parameters() if p.requires_grad]
        return {"params": params, "lr": self.text_encoder_lr, "name": "text_encoder"}

    def layers(self, pipe) -> list:
        return cross_attention_layers(pipe.unet, self.cfg.nullbooth.cross_attention_layers)

    def features(self) -> tuple[str, ...]:
        return self.cfg.nullbooth.collect_features.selected()

    # -- in the loop

    def context(self) -> contextlib.AbstractContextManager:
        """Entered around the whole loop (Perfusion records text-encoder calls here)."""
        return contextlib.nullcontext()

    def encode_prompt(self, encoders: Sequence[nn.Module], ids: torch.Tensor) -> Encoded:
        """Encodings of token ids ``[E, B, 77]`` by the pipeline's ``E`` text encoders
        (:func:`nullbooth.conditioning.encode_ids`); the encoders are frozen unless the method trains them."""
        with torch.set_grad_enabled(self.trains_text_encoder and torch.is_grad_enabled()):
            return encode_ids(encoders, ids)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """The instance loss of the batch's instance examples ``idx`` (DreamBooth: plain MSE; Perfusion may mask it)."""
        return F.mse_loss(pred, target.float())

    def after_step(self) -> None:
        """Called after every optimizer step (the projected update and the leakage budget live here)."""

    def penalty(self) -> torch.Tensor | None:
        """A regulariser added once per optimizer step to the loss (NullBooth's soft budget); ``None``: none."""
        return None

    # -- checkpoints, report, output

    def trainable(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by a structural name (``unet.<path>`` / ``text_encoder.<path>`` /
        ``text_encoder_2.<path>``)."""
        out = {}
        for prefix in ("unet", *encoder_names(self.pipe)):
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
        return WeightChanges()

    def report(self) -> dict[str, dict[str, Any]]:
        """Per target path: method-specific facts (null dims, ranks, …)."""
        return {path: {"trained": True} for path in self.targets}

    def unprotected(self) -> dict[str, str]:
        """Parts of the model this run trains outside the method's guarantee, each with why (one line): the
        training report lists them (summary ``unprotected``, and its warnings). Methods without a guarantee: none."""
        return {}

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        """Write the trained result; ``info`` is the common JSON config (method, base model, run, versions)."""
        raise NotImplementedError

    def kohya_export(self, output_dir: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     scales: dict[str, float] | None = None) -> list[Path]:
        """``lora_format: kohya``: the LoRA factors ``ΔW = scale · B A`` once more, with kohya's key names."""
        return [export_kohya_lora(output_dir, factors, scales)] if self.cfg.lora_format == "kohya" else []
