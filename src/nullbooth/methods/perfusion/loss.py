"""The mask-weighted diffusion loss of Perfusion's training (lucidrains' ``loss_fn_weighted_by_mask``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from nullbooth.errors import NullBoothError

__all__ = ["loss_fn_weighted_by_mask"]


def loss_fn_weighted_by_mask(pred: Tensor, target: Tensor, mask: Tensor, normalized_mask_min_value: float = 0.0) -> Tensor:
    """MSE over channels, weighted per pixel by ``mask`` normalised to max 1 per image.

    ``pred``/``target``: ``[b, c, h, w]``; ``mask``: ``[b, h, w]`` or ``[b, 1, h, w]`` at the same
    ``h × w`` (resize an image-resolution mask to the latent size first). Weights below
    ``normalized_mask_min_value`` are raised to it, so background keeps some loss.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise NullBoothError(
            "expected pred and target of one shape [b, c, h, w], "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise NullBoothError(f"expected a single-channel mask [b, 1, h, w], got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise NullBoothError(f"expected a mask [b, h, w] or [b, 1, h, w], got {tuple(mask.shape)}")
    if mask.shape[-2:] != pred.shape[-2:]:
        raise NullBoothError(
            f"expected a mask of spatial size {tuple(pred.shape[-2:])} (the prediction's), got {tuple(mask.shape[-2:])}; "
            "resize it first, e.g. F.interpolate(mask[:, None], size=latents.shape[-2:], mode='nearest')"
        )
    if mask.shape[0] != pred.shape[0]:
        raise NullBoothError(f"expected one mask per sample ({pred.shape[0]}), got {mask.shape[0]}")
    if (mask < 0).any():
        raise NullBoothError("expected mask values >= 0, got negative values")
    if not 0.0 <= normalized_mask_min_value <= 1.0:
        raise NullBoothError(f"expected normalized_mask_min_value in [0, 1], got {normalized_mask_min_value}")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=1)  # [b, h, w]
    peak = mask.float().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-5)  # per-image max
    weight = (mask.float() / peak).clamp(min=normalized_mask_min_value)
    return (loss * weight).mean()
