"""Every weight of a UNet as one matrix acting on one input: what ``nullbooth.scope: unet`` protects.

A ``nn.Linear`` computes ``y = W x`` with ``W`` ``[out, in]``. A ``nn.Conv2d`` is the same linear map applied to
every input patch: with ``x̃`` the unfolded patch (``[in·kh·kw]``, channel-major as :func:`torch.nn.functional.unfold`
orders it) and ``W̃ = W.reshape(out, in·kh·kw)``, each output pixel is ``W̃ x̃``. So a convolution is protected
exactly like a linear layer (``ΔW̃ X̃₀ = 0`` keeps its output on every prior patch), over the second moment of its
patches. Biases and normalisation layers are left out: an input-space projector cannot protect them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from nullbooth.errors import NullBoothError

Weighted = nn.Linear | nn.Conv2d


def unet_weights(unet: nn.Module, exclude: Iterable[str] = ()) -> dict[str, Weighted]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` of ``unet`` by dotted path, in ``named_modules`` order, minus ``exclude``.

    Refuses (one line) a convolution whose patches are not a plain unfold: grouped, or with string padding.
    """
    skip = set(exclude)
    found: dict[str, Weighted] = {}
    for path, module in unet.named_modules():
        if path in skip or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)):
            raise NullBoothError(f"nullbooth.scope unet: {path} is a convolution with groups={module.groups}, "
                                 f"padding={module.padding!r}; expected groups=1 and integer padding (Stable Diffusion "
                                 "UNets); use nullbooth.scope: attn2 for this model")
        found[path] = module
    return found


def weight_matrix(module: Weighted) -> torch.Tensor:
    """``W`` as the ``[out, d]`` matrix that acts on :func:`input_rows`: a view, so in-place edits reach the layer."""
    return module.weight.view(module.weight.shape[0], -1)


def input_width(module: Weighted) -> int:
    """``d``: the width of one row of :func:`input_rows`."""
    return weight_matrix(module).shape[1]


def input_rows(module: Weighted, x: torch.Tensor) -> torch.Tensor:
    """The rows ``[n, d]`` the layer's matrix multiplies for input ``x``: tokens of a linear layer, patches of a conv."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if module.padding_mode != "zeros":  # padded by the layer's own rule, then unfolded without padding
        pad = [p for p in reversed(module.padding) for _ in range(2)]
        x, padding = F.pad(x, pad, mode=module.padding_mode), 0
    else:
        padding = module.padding
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # [B·L, in·kh·kw]
