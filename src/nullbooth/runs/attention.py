"""Cross-attention maps recorded from the attention the UNet really applied (docs/design.md §7, seed 000: ``visual_attention_map``).

A cross-attention layer (``attn2``) lets every latent pixel ``i`` read the text tokens ``j`` with weights

    A = softmax(Q Kᵀ · s),   Q = W_q h,  K = W_k e,  s = 1/√d_head          (Vaswani et al. 2017, eq. 1)

averaged here over heads. Row ``i`` of ``A`` sums to 1 over the 77 token positions, so column ``j``
reshaped to the layer's ``h × w`` grid is "where token ``j`` is read".

For the observed batch only, :func:`record_attention` replaces each selected layer's processor by
:class:`RecordingAttnProcessor`, which runs diffusers' classic attention (``attn.get_attention_scores``
then ``bmm`` with ``V``) and hands the very probabilities it multiplies with ``V`` to a sink. The default
``AttnProcessor2_0`` computes the same function with a fused kernel, so outputs differ only by float
round-off; the original processors are put back on exit, also on error. Only the conditional CFG rows of
the chosen prompts are kept, averaged over heads, and only the prompt's real tokens (plus one column with
the attention mass that went to padding), which bounds memory by
``prompts × layers × timesteps × pixels × (tokens + 1)`` float32 numbers.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nullbooth.errors import NullBoothError
from nullbooth.filenames import ATTENTION_INDEX, ATTENTION_MAPS_DIR, ATTENTION_TENSORS, VISUALIZATIONS_DIR
from nullbooth.io import load_tensors, read_json, save_tensors, write_json
from nullbooth.stats.capture import CrossAttentionLayer

log = logging.getLogger(__name__)

# Processors that compute exactly softmax(QKᵀ·s)V with the layer's own to_q/to_k/to_v/to_out (only the kernel
# differs); swapping any of them for the classic computation changes the output by round-off only.
EQUIVALENT_PROCESSORS = frozenset({"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU"})
PADDING = "[padding]"

# sink(layer name, probabilities [rows, N pixels, T tokens] float32, (h, w) when the layer saw a 4-D input)
AttentionSink = Callable[[str, torch.Tensor, "tuple[int, int] | None"], None]


# --------------------------------------------------------------------------- the recording processor


class RecordingAttnProcessor:
    """diffusers' classic attention, ``A = softmax(QKᵀ·s)`` via ``attn.get_attention_scores``, with ``A`` recorded.

    ``rows`` are the batch rows (prompt index in the UNet batch, e.g. the conditional half under CFG) whose
    head-averaged probabilities go to ``sink``; ``batch_size`` guards that the batch has the layout the rows
    refer to (a mismatch records nothing and warns once). The output is computed from the same ``A``.
    """

    def __init__(self, name: str, rows: Sequence[int], sink: AttentionSink, batch_size: int | None = None) -> None:
        self.name = name
        self.rows = list(rows)
        self.sink = sink
        self.batch_size = batch_size
        self._warned = False

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        grid: tuple[int, int] | None = None
        if hidden_states.ndim == 4:  # [B, C, h, w] → [B, h·w, C]
            b, c, h, w = hidden_states.shape
            grid = (h, w)
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, n_tokens = context.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, n_tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # [B, N, inner]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # [B, T, inner]
        value = attn.to_v(encoder_hidden_states)  # [B, T, inner]

        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))  # [B·H, ·, d_head]
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B·H, N, T] = softmax(QKᵀ·s)
        self._record(probs, batch, attn.heads, grid)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # [B, N, inner]: A V
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout

        if grid is not None:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @torch.no_grad()
    def _record(self, probs: torch.Tensor, batch: int, heads: int, grid: tuple[int, int] | None) -> None:
        if not self.rows:
            return
        if self.batch_size is not None and batch != self.batch_size:
            if not self._warned:
                warnings.warn(f"{self.name}: expected a UNet batch of {self.batch_size} (CFG: unconditional + "
                              f"conditional), got {batch}; attention maps of this call are not recorded", stacklevel=2)
                self._warned = True
            return
        # head_to_batch_dim orders rows as b·H + h, so [B·H, N, T] views as [B, H, N, T].
        chosen = probs.view(batch, heads, *probs.shape[1:])[self.rows]  # [R, H, N, T]
        self.sink(self.name, chosen.to(torch.float64).mean(1).to(torch.float32).cpu(), grid)


def _processor_name(module) -> str:
    return type(getattr(module, "processor", None)).__name__


@contextmanager
def record_attention(layers: Sequence[CrossAttentionLayer], rows: Sequence[int], sink: AttentionSink,
                     *, batch_size: int | None = None) -> Iterator[list[CrossAttentionLayer]]:
    """Install :class:`RecordingAttnProcessor` on ``layers``; yield the layers really recorded; restore on exit.

    Layers whose processor is not a plain softmax attention (LoRA/IP-Adapter/custom processors) are left
    alone with a warning: replacing them would change what the model computes.
    """
    originals: list[tuple[Any, Any]] = []
    recorded: list[CrossAttentionLayer] = []
    try:
        for layer in layers:
            attn = layer.module
            name = _processor_name(attn)
            if name not in EQUIVALENT_PROCESSORS or not hasattr(attn, "get_attention_scores"):
                warnings.warn(f"{layer.name}: attention processor {name} is not a plain softmax attention; "
                              "no attention map is recorded for this layer", stacklevel=3)
                continue
            originals.append((attn, attn.processor))
            attn.set_processor(RecordingAttnProcessor(layer.name, rows, sink, batch_size))
            recorded.append(layer)
        yield recorded
    finally:
        for attn, processor in reversed(originals):
            attn.set_processor(processor)


# --------------------------------------------------------------------------- tokens and grids


def display_tokens(tokenizer, prompt: str) -> tuple[list[str], int]:
    """The prompt's token strings as the text encoder sees them (``<sot>``, words, ``<eot>``) and their count."""
    enc = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    ids = enc["input_ids"]
    n_real = int(sum(enc["attention_mask"])) if "attention_mask" in enc else len(ids)
    names = []
    for token in tokenizer.convert_ids_to_tokens(ids[:n_real]):
        token = {"<|startoftext|>": "<sot>", "<|endoftext|>": "<eot>"}.get(token, token)
        names.append(token.removesuffix("</w>"))
    return names, n_real


def grid_shape(n_pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``h × w`` grid of a layer with ``n_pixels`` queries, from the latent size and stride-2 downsampling."""
    H, W = latent_hw
    for level in range(8):
        h, w = math.ceil(H / 2**level), math.ceil(W / 2**level)
        if h * w == n_pixels:
            return h, w
    side = math.isqrt(n_pixels)
    if side * side == n_pixels:
        return side, side
    raise NullBoothError(f"cannot place {n_pixels} attention queries on a grid for latents of {H}×{W}; "
                         "this UNet's attention resolution is not a halving of the latent size")


def upsample_map(attention: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``[..., h, w]`` maps onto an image of ``size = (height, width)`` pixels."""
    t = torch.as_tensor(np.asarray(attention), dtype=torch.float32)
    lead = t.shape[:-2]
    flat = t.reshape(-1, 1, *t.shape[-2:])
    up = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return up.reshape(*lead, *size).numpy()


# --------------------------------------------------------------------------- the collection observer


@dataclass
class AttentionMaps:
    """What was recorded: per (prompt index, layer, timestep) a ``[tokens + 1, h, w]`` map (last = padding mass)."""

    prompts: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, list[str]] = field(default_factory=dict)
    images: dict[int, Any] = field(default_factory=dict)  # PIL images of the chosen prompts
    maps: dict[tuple[int, str, int], torch.Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for _, layer, _ in self.maps))

    @property
    def timesteps(self) -> list[int]:
        return sorted({t for _, _, t in self.maps}, reverse=True)

    def save(self, folder: Path) -> None:
        """Raw maps (float16 safetensors), the images (PNG) and an index (JSON) under ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{p:06d}/{layer}/{t:04d}": m.to(torch.float16) for (p, layer, t), m in self.maps.items()}
        save_tensors(folder / ATTENTION_TENSORS, tensors, {"format": "nullbooth-attention-maps"})
        for p, image in self.images.items():
            image.save(folder / f"prompt_{p:06d}.png")
        mass = {f"{p:06d}/{layer}/{t:04d}": [float(x) for x in m.double().mean((1, 2))]
                for (p, layer, t), m in self.maps.items()}
        write_json(folder / ATTENTION_INDEX, {
            "prompts": {str(p): s for p, s in self.prompts.items()},
            "tokens": {str(p): tok for p, tok in self.tokens.items()},
            "layers": self.layers, "timesteps": self.timesteps,
            "token_mass": mass,  # mean over pixels of each column: the share of attention per token
        })

    @classmethod
    def load(cls, folder: Path) -> "AttentionMaps":
        from PIL import Image

        index = read_json(folder / ATTENTION_INDEX, "an attention-map index")
        tensors, _ = load_tensors(folder / ATTENTION_TENSORS, "attention maps")
        out = cls()
        out.prompts = {int(p): s for p, s in index["prompts"].items()}
        out.tokens = {int(p): tok for p, tok in index["tokens"].items()}
        for p in out.prompts:
            path = folder / f"prompt_{p:06d}.png"
            if path.is_file():
                with Image.open(path) as im:
                    out.images[p] = im.convert("RGB")
        for key, value in tensors.items():
            p, layer, t = key.split("/")
            out.maps[(int(p), layer, int(t))] = value.to(torch.float32)
        return out


class AttentionRecorder:
    """A :class:`nullbooth.runs.collect.CollectionObserver` that records attention maps of the first prompts.

    ``n_prompts``: how many prompts (from the top of the prompt file) get maps
    (``nullbooth.attention_map_prompts``); ``timesteps``: restrict to these timesteps (default all).
    ``summaries`` and ``report_timesteps`` are read by the picture-drawing subclass
    (:class:`nullbooth.report.attention.AttentionMapObserver`): whether to also write the covariance
    summaries and ``report.html``, embedding at most ``report_timesteps`` evenly spaced timesteps.
    """

    needs_images = True

    def __init__(self, n_prompts: int = 2, *, timesteps: Sequence[int] | None = None, summaries: bool = True,
                 report_timesteps: int | None = 10) -> None:
        if n_prompts < 0:
            raise NullBoothError(f"attention_map_prompts: expected a count ≥ 0, got {n_prompts}")
        self.n_prompts = n_prompts
        self.timesteps = None if timesteps is None else {int(t) for t in timesteps}
        self.summaries = summaries
        self.report_timesteps = report_timesteps
        self.recorded = AttentionMaps()
        self._latent_hw: tuple[int, int] = (0, 0)

    @classmethod
    def from_config(cls, cfg) -> "AttentionRecorder":
        return cls(cfg.nullbooth.attention_map_prompts)

    def batch(self, pipe, plan, start: int, prompts: list[str], timestep: list[int]) -> AbstractContextManager:
        chosen = [i for i in range(len(prompts)) if start + i < self.n_prompts]
        if not chosen:
            return nullcontext()
        scale = getattr(pipe, "vae_scale_factor", 8)
        self._latent_hw = (plan.height // scale, plan.width // scale)
        n_real: list[int] = []
        for i in chosen:
            tokens, n = display_tokens(pipe.tokenizer, prompts[i])
            self.recorded.prompts[start + i] = prompts[i]
            self.recorded.tokens[start + i] = tokens
            n_real.append(n)

        def sink(layer: str, probs: torch.Tensor, grid: tuple[int, int] | None) -> None:
            t = int(timestep[0])
            if self.timesteps is not None and t not in self.timesteps:
                return
            h, w = grid or grid_shape(probs.shape[1], self._latent_hw)
            for j, i in enumerate(chosen):
                n = min(n_real[j], probs.shape[2])
                p = probs[j]  # [N, T], rows sum to 1
                kept = torch.cat([p[:, :n], p[:, n:].sum(-1, keepdim=True)], dim=-1)  # [N, n + 1]
                self.recorded.maps[(start + i, layer, t)] = kept.T.reshape(n + 1, h, w).contiguous()

        # CFG batches are [unconditional…, conditional…] (StableDiffusionPipeline.encode_prompt): keep the latter.
        rows = [len(prompts) + i for i in chosen]
        return record_attention(plan.layers, rows, sink, batch_size=2 * len(prompts))

    def images(self, start: int, images: list) -> None:
        for i, image in enumerate(images):
            if start + i in self.recorded.prompts:
                self.recorded.images[start + i] = image.convert("RGB")

    def finish(self, run_dir: Path) -> None:
        """Store the raw maps under ``visualizations/attention_maps`` (pictures: :mod:`nullbooth.report.attention`)."""
        if self.recorded.maps:
            self.recorded.save(Path(run_dir) / VISUALIZATIONS_DIR / ATTENTION_MAPS_DIR)
        elif self.n_prompts:
            log.info("no attention maps were recorded (the prompts' batches ran before a resume)")
