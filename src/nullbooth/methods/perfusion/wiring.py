"""Putting rank-1 edit modules on a UNet's cross-attention K/V projections, and taking them off again.

The layers are found by the one finder, :func:`nullbooth.stats.capture.cross_attention_layers`, so Perfusion
edits exactly the projections whose inputs the statistics code captures. A wrapped ``nn.Linear`` is kept
as the module's ``base_layer`` (peft's convention): removing an edit puts that very object back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from torch import Tensor, nn

from nullbooth.errors import NullBoothError
from nullbooth.methods.perfusion.context import PerfusionContext
from nullbooth.methods.perfusion.covariance import inverse_covariance, shipped_covariance_for
from nullbooth.methods.perfusion.module import Rank1EditModule
from nullbooth.stats.capture import cross_attention_layers

__all__ = [
    "find_cross_attention_layers", "make_key_value_proj_rank1_edit_modules_", "make_unet_rank1_edit_modules_",
    "remove_unet_rank1_edit_modules_", "wired_modules",
]


def make_key_value_proj_rank1_edit_modules_(cross_attention: nn.Module, *, C: Tensor | np.ndarray | None,
                                            key_proj_name: str = "to_k", value_proj_name: str = "to_v",
                                            **kwargs: Any) -> tuple[Rank1EditModule, Rank1EditModule]:
    """Replace ``cross_attention.<key_proj_name>`` / ``<value_proj_name>`` by rank-1 edit modules, in place.

    ``C`` is the input covariance (``None``: the shipped SD 1.x one, width 768 only); a precomputed
    ``C_inv=`` may be passed in ``kwargs`` instead to share one inverse across layers.
    Returns ``(key_module, value_module)``.
    """
    linears = {}
    for name in (key_proj_name, value_proj_name):
        lin = getattr(cross_attention, name, None)
        if isinstance(lin, Rank1EditModule):
            raise NullBoothError(f"{name} is already a Rank1EditModule; remove the existing edit first")
        if not isinstance(lin, nn.Linear):
            raise NullBoothError(
                f"expected {name} to be the nn.Linear K/V projection of the cross-attention, "
                f"got {type(lin).__name__}"
            )
        if lin.bias is not None:
            raise NullBoothError(f"expected a bias-free {name} (Perfusion edits W e), got a projection with a bias")
        linears[name] = lin
    if linears[key_proj_name].in_features != linears[value_proj_name].in_features:
        raise NullBoothError("the key and value projections read text encodings of different widths")
    C_inv = kwargs.pop("C_inv", None)
    if C_inv is None:
        dim = linears[key_proj_name].in_features
        C_inv = inverse_covariance(C if C is not None else shipped_covariance_for(dim), dim=dim,
                                   eigenvalue_floor=kwargs.pop("eigenvalue_floor", None))
    else:
        kwargs.pop("eigenvalue_floor", None)
    key = Rank1EditModule(linears[key_proj_name], C_inv=C_inv, is_key_proj=True, **kwargs)
    value = Rank1EditModule(linears[value_proj_name], C_inv=C_inv, is_key_proj=False, **kwargs)
    setattr(cross_attention, key_proj_name, key)
    setattr(cross_attention, value_proj_name, value)
    return key, value


def find_cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """``{name: attention}`` for every cross-attention module (diffusers ``attn2``) of ``unet``, in order."""
    return {layer.name: layer.module for layer in cross_attention_layers(unet)}


def make_unet_rank1_edit_modules_(
    unet: nn.Module,
    *,
    C: Tensor | np.ndarray | None,
    layers: Sequence[str] | None = None,
    context: PerfusionContext | None = None,
    eigenvalue_floor: float | Literal["auto"] | None = None,
    **kwargs: Any,
) -> dict[str, tuple[Rank1EditModule, Rank1EditModule]]:
    """Wire every cross-attention K/V of ``unet`` (or the named ``layers``) in place; validates all first."""
    attns = find_cross_attention_layers(unet)
    if not attns:
        raise NullBoothError("expected a UNet with cross-attention (attn2) layers, found none")
    if layers is not None:
        unknown = sorted(set(layers) - set(attns))
        if unknown:
            raise NullBoothError(f"unknown cross-attention layers {unknown}; this UNet has {list(attns)}")
        attns = {n: attns[n] for n in attns if n in set(layers)}
    widths = set()
    for name, attn in attns.items():
        for proj in ("to_k", "to_v"):
            lin = getattr(attn, proj)
            if isinstance(lin, Rank1EditModule):
                raise NullBoothError(
                    f"{name}.{proj} already carries a rank-1 edit; "
                    "call remove_unet_rank1_edit_modules_ first"
                )
            if not isinstance(lin, nn.Linear) or lin.bias is not None:
                raise NullBoothError(f"expected {name}.{proj} to be a bias-free nn.Linear, got {lin}")
            widths.add(lin.in_features)
    if len(widths) != 1:
        raise NullBoothError(f"expected one text width across cross-attention layers, got {sorted(widths)}")
    (dim,) = widths
    C_inv = kwargs.pop("C_inv", None)
    if C_inv is None:
        C_inv = inverse_covariance(C if C is not None else shipped_covariance_for(dim), dim=dim, eigenvalue_floor=eigenvalue_floor)
    elif C_inv.shape != (dim, dim):
        raise NullBoothError(f"expected C_inv of shape ({dim}, {dim}), got {tuple(C_inv.shape)}")
    wired = {}
    for name, attn in attns.items():
        wired[name] = make_key_value_proj_rank1_edit_modules_(attn, C=None, C_inv=C_inv, context=context, **kwargs)
        wired[name][0].train(unet.training)
        wired[name][1].train(unet.training)
    return wired


def remove_unet_rank1_edit_modules_(unet: nn.Module) -> int:
    """Put the original ``nn.Linear`` objects back (exact undo); returns how many were restored."""
    restored = 0
    for attn in find_cross_attention_layers(unet).values():
        for proj in ("to_k", "to_v"):
            m = getattr(attn, proj)
            if isinstance(m, Rank1EditModule):
                setattr(attn, proj, m.base_layer)
                restored += 1
    return restored


def wired_modules(unet: nn.Module) -> dict[str, tuple[Rank1EditModule, Rank1EditModule]]:
    """``{name: (key, value)}`` of the cross-attention layers that already carry a rank-1 edit."""
    return {n: (a.to_k, a.to_v) for n, a in find_cross_attention_layers(unet).items()
            if isinstance(a.to_k, Rank1EditModule) and isinstance(a.to_v, Rank1EditModule)}
