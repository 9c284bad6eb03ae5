"""Drop-in names of lucidrains/perfusion-pytorch (``perfusion_pytorch.perfusion``) for code written against it.

``calculate_input_covariance`` is defined here; the other names are this package's own implementations,
re-exported under lucidrains' spelling. nullbooth's own code imports them from where they are defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor

from nullbooth.methods.perfusion.covariance import encoding_second_moment
from nullbooth.methods.perfusion.loss import loss_fn_weighted_by_mask
from nullbooth.methods.perfusion.module import Rank1EditModule, merge_rank1_edit_modules
from nullbooth.methods.perfusion.wiring import make_key_value_proj_rank1_edit_modules_

__all__ = [
    "Rank1EditModule", "calculate_input_covariance", "loss_fn_weighted_by_mask", "make_key_value_proj_rank1_edit_modules_",
    "merge_rank1_edit_modules",
]


def calculate_input_covariance(pipe_or_text_encoder_and_tokenizer: Any, texts: Sequence[str],
                               batch_size: int = 32, *, tokens: Literal["all", "real"] = "all") -> Tensor:
    """The input second moment ``C = Σ e eᵀ / n`` (float64 ``[d, d]``) of the model's own text encodings
    (an SDXL pipeline's: both encoders' penultimate hidden states side by side, what its ``attn2`` reads).

    ``tokens='all'`` (default) counts every one of the ``model_max_length`` (77) positions, padding
    included: SD 1.x/2.x pipelines pass no attention mask to the UNet, so every cross-attention
    layer's ``to_k``/``to_v`` really reads all of them, and the edit is applied to all of them.
    ``tokens='real'`` keeps only the tokenizer's attention mask (BOS, words, EOS) -- how the shipped
    CLIP-L/14 matrix was computed upstream. ``n`` is the number of token encodings accumulated.
    """
    return encoding_second_moment(pipe_or_text_encoder_and_tokenizer, texts, batch_size, tokens=tokens).moment()
