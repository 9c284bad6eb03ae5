"""``oft``: peft's Orthogonal Finetuning (Qiu et al. 2023) on diffusers' default attention targets.

Every ``to_q``/``to_k``/``to_v``/``to_out.0`` of every UNet attention (attn1 and attn2, the targets of diffusers'
``train_dreambooth_lora.py``) gets peft's ``OFTConfig(oft_block_size=b, r=0)``: the layer rotates its input,

    y = W Rᵀ x + b,      R = diag(R₁, …, R_r),  R_i = Cayley(Q_i) = (I + Q_i)(I − Q_i)⁻¹,  Q_i = −Q_iᵀ ∈ ℝ^{b×b}   (1)

with ``r = in_features / b`` blocks (peft's Cayley–Neumann series by default), so ``ΔW = W (Rᵀ − I)`` keeps the
angles between the neurons of ``W`` (OFT's "hyperspherical energy"). ``Q = 0`` at the start: the model starts equal to
the base model. Biases stay frozen. The leakage report gets eq. (1)'s ``ΔW`` of the protected ``attn2`` weights.

The result is what a peft user expects: peft's own adapter folder, ``<output_dir>/oft/`` with ``adapter_config.json``
(the ``OFTConfig``, stamped with peft's version and the base model) and ``adapter_model.safetensors``
(``base_model.model.<module>.oft_R.weight``, float32), the layout ``PeftModel.save_pretrained`` writes, so
``PeftModel.from_pretrained(pipe.unet, "<output_dir>/oft")`` loads it without nullbooth. ``nullbooth generate`` /
``evaluate`` inject it with peft's ``inject_adapter_in_model`` + ``set_peft_model_state_dict`` (:func:`load_oft`),
unmerged, so the loaded UNet computes exactly what the trained one did. A file that is not such an adapter, or that
does not fit the model, is one ``NullBoothError`` line (:func:`oft_expectations`, :func:`load_oft`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nullbooth import __version__
from nullbooth.errors import NullBoothError
from nullbooth.filenames import OFT_DIR
from nullbooth.io import load_tensors, read_json, save_tensors, write_json
from nullbooth.methods.adapters import attention_targets
from nullbooth.methods.base import Method, ParamGroups, WeightChanges
from nullbooth.methods.lora_export import PEFT_ADAPTER

if TYPE_CHECKING:
    from peft import OFTConfig

PEFT_CONFIG = "adapter_config.json"  # peft's CONFIG_NAME
PEFT_WEIGHTS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before a module path in the files it saves
OFT_KEY = ".oft_R.weight"  # one tensor per layer: the r skew-symmetric blocks' upper triangles, [r, b(b−1)/2]


class Oft(Method):
    """peft OFT (block size ``oft_block_size``) on every attention projection of the UNet, eq. (1)."""

    name = "oft"
    default_lr = 1e-4  # lora's (diffusers' train_dreambooth_lora.py): an adapter's few parameters, not 5e-6

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        from peft import OFTConfig, inject_adapter_in_model

        self._freeze(pipe)
        self.stats_run = stats_run
        self.W0 = {p: m.weight.detach().clone() for p, m in self.targets.items()}
        config = OFTConfig(r=0, oft_block_size=self.cfg.oft_block_size, init_weights=True,
                           target_modules=list(attention_targets(pipe.unet)),
                           base_model_name_or_path=self.cfg.pretrained_model_name_or_path)
        inject_adapter_in_model(config, pipe.unet)  # Q = 0: R = I, nothing drawn from any RNG
        return [{"params": [p for p in pipe.unet.parameters() if p.requires_grad], "lr": self.lr, "name": "unet"}]

    def weight_changes(self) -> WeightChanges:
        return WeightChanges(self.W0, lambda p: (oft_delta(self.pipe.unet.get_submodule(p)), self.W0[p]))

    def report(self) -> dict[str, dict[str, Any]]:
        layers = {p: self.pipe.unet.get_submodule(p) for p in self.targets}
        return {p: {"trained": True, "oft_block_size": int(m.oft_block_size[PEFT_ADAPTER])} for p, m in layers.items()}

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        return [save_oft(output_dir / OFT_DIR, self.pipe.unet)]


@torch.no_grad()
def oft_delta(layer: nn.Module) -> torch.Tensor:
    """``ΔW = W Rᵀ − W`` (``[out, in]``, float64) of a peft OFT layer: its merged weight minus its base weight."""
    R = layer.get_delta_weight(PEFT_ADAPTER).double()  # [in, in], block-diagonal
    W = layer.get_base_layer().weight.double()  # [out, in]
    return W @ R.T - W


# --------------------------------------------------------------------------- files


def save_oft(folder: Path, unet: nn.Module) -> Path:
    """peft's adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel`` key layout)."""
    from peft import get_peft_model_state_dict

    config = unet.peft_config[PEFT_ADAPTER].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in memory, a list in JSON (as peft writes)
    state = get_peft_model_state_dict(unet, adapter_name=PEFT_ADAPTER, save_embedding_layers=False)  # <path>.oft_R.weight
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_tensors(folder / PEFT_WEIGHTS, tensors, {"format": "pt", "nullbooth_version": __version__})
    write_json(folder / PEFT_CONFIG, {**config, "peft_type": "OFT"})
    return folder


def read_oft_config(folder: Path) -> OFTConfig:
    """The ``OFTConfig`` of the adapter folder ``folder``; anything else is one ``NullBoothError`` line."""
    from peft import OFTConfig

    meta = read_json(folder / PEFT_CONFIG, f"a peft OFT adapter config ({PEFT_CONFIG})")
    if meta.get("peft_type") != "OFT":
        raise NullBoothError(f"adapter: expected a peft OFT adapter config at {folder / PEFT_CONFIG}, got peft_type "
                             f"{meta.get('peft_type')!r}; point --adapter at the output_dir of a method oft run")
    try:
        return OFTConfig.from_pretrained(str(folder))
    except (TypeError, ValueError, OSError) as err:
        raise NullBoothError(f"adapter: {folder / PEFT_CONFIG} is not an OFT config this peft reads "
                             f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__}); it is corrupt "
                             "or from another peft version") from None


def _block_size(n_elements: int) -> int:
    """``b`` with ``b (b − 1) / 2 = n``: the block size of a row of ``oft_R`` (0 when ``n`` is no such number)."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements else 0


def oft_expectations(unet: nn.Module, shapes: dict[str, tuple[int, ...]]
                     ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...] | None]]:
    """For every ``oft_R`` tensor of an adapter file (``shapes`` from its header): its shape ``[r, b(b−1)/2]`` and the
    shape ``unet``'s layer needs, ``[in_features / b, b(b−1)/2]`` (``None``: no such ``nn.Linear``); keys of other
    kinds are refused."""
    got, need = {}, {}
    for key, shape in shapes.items():
        path = key.removeprefix(PEFT_PREFIX).removesuffix(OFT_KEY)
        if not key.endswith(OFT_KEY) or len(shape) != 2 or not _block_size(shape[1]):
            raise NullBoothError(f"adapter: expected peft OFT tensors <module>{OFT_KEY} of shape [r, b(b-1)/2] in "
                                 f"{PEFT_WEIGHTS}, got {key!r} {list(shape)}; the file is foreign (only OFT without "
                                 "bias or extra modules is read)")
        got[key] = tuple(shape)
        try:
            linear = unet.get_submodule(path)
        except AttributeError:
            linear = None
        b = _block_size(shape[1])
        need[key] = (-(-linear.in_features // b), shape[1]) if isinstance(linear, nn.Linear) else None
    return got, need


def load_oft(unet: nn.Module, folder: Path) -> dict[str, Any]:
    """Inject the OFT adapter in ``folder`` into ``unet`` (peft's injector and state-dict loader, unmerged); returns
    its config as a dict. Call :func:`oft_expectations` first: this checks only that every tensor found a layer."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    config = read_oft_config(folder)
    tensors, _ = load_tensors(folder / PEFT_WEIGHTS, f"peft OFT adapter weights ({PEFT_WEIGHTS})")
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
    inject_adapter_in_model(config, unet)
    result = set_peft_model_state_dict(unet, state, adapter_name=PEFT_ADAPTER)
    missing = [k for k in result.missing_keys if ".oft_" in k]
    if result.unexpected_keys or missing:
        raise NullBoothError(f"adapter: {folder} does not fit this UNet (unexpected {list(result.unexpected_keys)[:3]}, "
                             f"missing {missing[:3]}); load it into the model it was trained on")
    return config.to_dict()
