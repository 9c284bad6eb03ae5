"""Find a UNet's cross-attention layers and record what their linear layers receive.

Recording uses forward pre-hooks on ``to_q``/``to_k``/``to_v``/``to_out.0``: the tensors are the
ones the model really computes with (whatever attention processor is installed), nothing is
re-derived, and no raw activation is kept — each input goes straight into a callback. Hooks are
removed on exit, also on error, so the model is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from nullbooth.errors import NullBoothError

Feature = Literal["q", "k", "v", "out"]
WEIGHT_OF_FEATURE: dict[str, str] = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One ``attn2``: its dotted name in the UNet, the module, and the input width of each protected weight."""

    name: str
    module: nn.Module

    def linear(self, feature: str) -> nn.Linear:
        """The weight's ``nn.Linear`` (the wrapped one when an adapter wraps it: it receives the same input)."""
        linear = _linear_at(self.module, WEIGHT_OF_FEATURE[feature])
        assert linear is not None, f"{self.name} lost its {WEIGHT_OF_FEATURE[feature]} after it was found"
        return linear

    def in_features(self, feature: str) -> int:
        return self.linear(feature).in_features

    def weight_shapes(self) -> dict[str, list[int]]:
        return {f: list(self.linear(f).weight.shape) for f in WEIGHT_OF_FEATURE}


def unwrap_linear(module: nn.Module | None) -> nn.Linear | None:
    """The ``nn.Linear`` under any adapter wrappers, or ``None``.

    One convention for every wrapper, peft's: a wrapper keeps the layer it wraps as ``base_layer``
    (peft's LoRA/OFT layers, :class:`nullbooth.methods.adapters.NullSpaceLinear`, Perfusion's
    ``Rank1EditModule``). The wrapped layer receives the same input as the wrapper.
    """
    while module is not None and not isinstance(module, nn.Linear):
        module = getattr(module, "base_layer", None)
    return module


def _linear_at(module: nn.Module, path: str) -> nn.Linear | None:
    try:
        return unwrap_linear(module.get_submodule(path))
    except AttributeError:
        return None


def is_cross_attention(module: nn.Module) -> bool:
    """A diffusers cross-attention (``attn2``): ``is_cross_attention`` set and q/k/v/out linear (wrapped or not)."""
    return bool(getattr(module, "is_cross_attention", False)) and all(
        _linear_at(module, w) is not None for w in WEIGHT_OF_FEATURE.values())


def cross_attention_layers(unet: nn.Module, selection: str | Sequence[int] = "all") -> list[CrossAttentionLayer]:
    """The UNet's cross-attention (``attn2``) modules in ``named_modules`` order, optionally a subset by index.

    The one finder every part of nullbooth uses (capture, adapters, Perfusion, training): structural, and
    blind to adapter wrappers, so it finds the same layers before and after any method is injected.
    Raises a one-line ``NullBoothError`` when the UNet has no cross-attention or an index is out of range.
    """
    found = [CrossAttentionLayer(name, module) for name, module in unet.named_modules() if is_cross_attention(module)]
    if not found:
        raise NullBoothError(
            "expected a UNet with cross-attention (attn2) layers, found none; "
            "give a text-conditioned Stable Diffusion model (UNet2DConditionModel with cross_attention_dim)"
        )
    if selection == "all":
        return found
    indices = list(selection)
    unknown = sorted({i for i in indices if not 0 <= i < len(found)})
    if unknown:
        raise NullBoothError(
            f"cross_attention_layers: indices {unknown} do not exist; this UNet has {len(found)} attn2 layers "
            f"(valid indices 0..{len(found) - 1})"
        )
    return [found[i] for i in sorted(set(indices))]


Sink = Callable[[CrossAttentionLayer, str, torch.Tensor], None]


@contextmanager
def record_inputs(layers: Sequence[CrossAttentionLayer], features: Sequence[str], sink: Sink) -> Iterator[None]:
    """Call ``sink(layer, feature, x)`` with the input ``x`` (``[B, N, d]``) of each selected weight on every forward."""
    handles = []
    try:
        for layer in layers:
            for feature in features:
                def hook(_module: nn.Module, args: tuple, layer=layer, feature=feature) -> None:
                    sink(layer, feature, args[0])

                handles.append(layer.linear(feature).register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_timestep(unet: nn.Module) -> Iterator[list[int]]:
    """Yield a one-element list that always holds the timestep of the UNet call in progress."""
    current = [-1]

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise NullBoothError("the UNet was called without a timestep; cannot attribute features to a timestep")
        t = torch.as_tensor(t).flatten()
        if t.numel() > 1 and not torch.all(t == t[0]):
            raise NullBoothError(f"expected one timestep per UNet call during collection, got {t.tolist()}")
        current[0] = int(round(float(t[0])))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield current
    finally:
        handle.remove()
