"""How a prompt conditions the UNet, for both pipeline families nullbooth personalises, in one place.

- **SD 1.x / 2.x**: one CLIP text encoder; the UNet's cross-attention (``attn2``) reads its last hidden state,
  ``encoder_hidden_states [N, 77, D]``.
- **SDXL** (Podell et al. 2023, §2.1–2.2): two encoders; ``attn2`` reads the concatenation of both *penultimate*
  hidden states, ``[N, 77, D₁ + D₂]`` (768 + 1280 = 2048 for SDXL base), and the UNet's added embedding reads the
  second encoder's pooled projection ``text_embeds [N, P]`` with the six size numbers ``time_ids = (original h,
  original w, crop top, crop left, target h, target w)`` — exactly what ``StableDiffusionXLPipeline.encode_prompt``
  and ``_get_add_time_ids`` build, so statistics collected from the pipeline and the training loop's inputs agree.

Everything else in nullbooth (collection, training, the methods, generation) calls these functions instead of
``pipe.text_encoder`` directly, so the two families share one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def is_sdxl(pipe: Any) -> bool:
    """Whether ``pipe`` conditions like SDXL (a second text encoder and size micro-conditioning)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def encoder_names(pipe: Any) -> list[str]:
    """The pipeline attributes of its text encoders — also diffusers' key prefixes of their LoRA weights."""
    return ["text_encoder", "text_encoder_2"] if is_sdxl(pipe) else ["text_encoder"]


def text_encoders(pipe: Any) -> list[nn.Module]:
    """The pipeline's text encoders, in the order their hidden states are concatenated."""
    return [getattr(pipe, name) for name in encoder_names(pipe)]


def tokenizers(pipe: Any) -> list[Any]:
    return [pipe.tokenizer, pipe.tokenizer_2] if is_sdxl(pipe) else [pipe.tokenizer]


@dataclass
class Encoded:
    """A batch of encoded prompts: what ``attn2`` reads, and SDXL's pooled text embedding."""

    hidden: torch.Tensor  # [N, 77, D]
    pooled: torch.Tensor | None = None  # [N, P] (SDXL), else None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, idx: Any) -> Encoded:
        return Encoded(self.hidden[idx], None if self.pooled is None else self.pooled[idx])

    def to(self, *args: Any, **kwargs: Any) -> Encoded:
        return Encoded(self.hidden.to(*args, **kwargs), None if self.pooled is None else self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(parts: Sequence[Encoded]) -> Encoded:
        pooled = [p.pooled for p in parts]
        return Encoded(torch.cat([p.hidden for p in parts]),
                       None if any(p is None for p in pooled) else torch.cat(pooled))  # type: ignore[arg-type]


def tokenize(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``[E, N, 77]`` for each of the ``E`` tokenizers, padded and truncated as the pipelines do (SDXL's
    second tokenizer pads with its own token)."""
    ids = [tok(list(prompts), padding="max_length", truncation=True, max_length=tok.model_max_length,
               return_tensors="pt").input_ids for tok in tokenizers(pipe)]
    return torch.stack(ids)


def encode_ids(encoders: Sequence[nn.Module], ids: torch.Tensor) -> Encoded:
    """Encode token ids ``[E, N, 77]`` with the ``E`` encoders (gradients flow when enabled by the caller).

    One encoder (SD): its last hidden state. Two (SDXL): both penultimate hidden states concatenated, and the
    second encoder's pooled projection (``CLIPTextModelWithProjection.text_embeds``).
    """
    if len(encoders) == 1:
        encoder = encoders[0]
        return Encoded(encoder(ids[0].to(_device(encoder)))[0])
    hidden, pooled = [], None
    for encoder, ids_e in zip(encoders, ids):
        out = encoder(ids_e.to(_device(encoder)), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:  # the projection model's text_embeds: the last encoder's is the pooled embedding
            pooled = out[0]
    return Encoded(torch.cat([h.to(hidden[0].device) for h in hidden], dim=-1), pooled)


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str], batch_size: int = 16) -> Encoded:
    """The (frozen) pipeline's encodings of ``prompts``, ``batch_size`` at a time."""
    ids = tokenize(pipe, prompts)
    encoders = text_encoders(pipe)
    return Encoded.cat([encode_ids(encoders, ids[:, i:i + batch_size]) for i in range(0, len(prompts), batch_size)])


def time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's ``add_time_ids [N, 6]``: original ``(h, w)``, crop ``(top, left)`` and target ``(h, w)`` per image."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(len(original_sizes), 2)
    return torch.cat([original_sizes.float(), crops_top_left.float(), target], dim=1)


def unet_conditioning(pipe: Any, encoded: Encoded, sizes: torch.Tensor | None, resolution: int) -> dict[str, Any]:
    """Keyword arguments of ``pipe.unet(latents, t, **kwargs)`` for ``encoded`` prompts.

    SDXL also gets ``added_cond_kwargs``: the pooled embedding and ``time_ids``, from ``sizes [N, 6]``
    (:func:`time_ids`) or, when ``None``, the pipeline's default for a ``resolution``² image (original = target,
    no crop).
    """
    kwargs: dict[str, Any] = {"encoder_hidden_states": encoded.hidden}
    if is_sdxl(pipe):
        n = len(encoded)
        if sizes is None:
            sizes = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
            sizes = sizes.expand(n, 6)
        kwargs["added_cond_kwargs"] = {"text_embeds": encoded.pooled,
                                       "time_ids": sizes.to(encoded.hidden.device, encoded.hidden.dtype)}
    return kwargs


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
