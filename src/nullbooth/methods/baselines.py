"""The baselines, on the same weights as ``nullbooth``: ``dreambooth`` (unconstrained) and ``lora`` (peft LoRA).

Both train the ``attn2`` ``to_q``/``to_k``/``to_v``/``to_out.0`` weights that nullbooth protects, with
biases frozen, so a comparison differs only in the constraint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nullbooth.filenames import FULL_UNET_DIR, LORA_WEIGHTS
from nullbooth.methods.base import Method, ParamGroups, WeightChanges
from nullbooth.methods.lora_export import dense_deltas, export_diffusers_lora, update_factors

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
        self.pipe.unet.save_pretrained(output_dir / FULL_UNET_DIR)
        # ΔW is generally full rank: the LoRA export is an exact SVD factorisation (rank ≤ min(out, in)).
        deltas = dense_deltas(self.W0, self.pipe.unet, self.layers(self.pipe), self.features())
        paths = [output_dir / FULL_UNET_DIR]
        if any(bool(d.abs().max() > 0) for d in deltas.values()):
            factors = update_factors(deltas)
            paths += [export_diffusers_lora(output_dir, factors), *self.kohya_export(output_dir, factors)]
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
        factors, scales = {}, {}
        for path in self.targets:
            layer = self.pipe.unet.get_submodule(path)
            factors[path] = (layer.lora_B["default"].weight, layer.lora_A["default"].weight)
            scales[path] = float(layer.scaling["default"])
        return [output_dir / LORA_WEIGHTS, *self.kohya_export(output_dir, factors, scales)]
