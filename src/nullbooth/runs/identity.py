"""What identifies a run's inputs: the model's weights, the prompts with their seeds, and the key hashing both.

Two runs with the same key hold the same sums (up to the order of float64 additions), so a complete
run with the plan's key is reused and a partial one resumed. Prompt ``i`` of a run is sampled with
the generator seed ``seed + i`` (``i`` its global index); a run's prompts are described by segments
``{start, n, seed}`` so runs extended (:func:`nullbooth.runs.merge.extend`) or merged from parts
describe their prompts exactly as a fresh run on the concatenated prompt file does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nullbooth.conditioning import encoder_names, is_sdxl, tokenizers
from nullbooth.errors import NullBoothError

# The identity fields that describe the prompts (a merge recomputes them; every other field must agree).
PROMPT_FIELDS = ("prompts_sha256", "n_prompts", "seed", "prompt_segments")

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _tokenizer_summary(tokenizer) -> str:
    """What of a tokenizer changes the encodings of the same vocabulary: its sequence length and padding token."""
    return f"{type(tokenizer).__name__}|{tokenizer.model_max_length}|{tokenizer.pad_token_id}"


def model_fingerprint(pipe) -> dict[str, Any]:
    """Identify the weights that determine the features: UNet and text encoder(s) (shapes + strided samples).

    Every element enters through an integer checksum of its bits: integer addition is associative, so
    the digest does not depend on the thread count or device (a float sum's rounding does, and a
    one-thread ``torchrun`` worker must find the run a two-thread process collected). SDXL's second encoder
    enters too, and with it both tokenizers' padding: SDXL's second pads with ``!`` where the first pads with
    ``<|endoftext|>``, and a pipeline saved with another padding token encodes every prompt differently.
    """
    digest = hashlib.sha256()
    encoders = encoder_names(pipe)
    for part in ["unet", *encoders]:  # SD 1.x/2.x: ["unet", "text_encoder"], the digest it always had
        for name, tensor in sorted(getattr(pipe, part).state_dict().items()):
            flat = tensor.detach().contiguous().flatten()
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].to("cpu", torch.float64)
            bits = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.is_floating_point() else flat
            checksum = int(bits.to(torch.int64).sum())  # wraps on overflow, deterministically
            digest.update(f"{part}.{name}:{tuple(tensor.shape)}:{tensor.dtype}:{checksum}".encode())
            digest.update(sample.numpy().tobytes())
    widths = [int(getattr(pipe, part).config.hidden_size) for part in encoders]
    out: dict[str, Any] = {"unet_class": type(pipe.unet).__name__, "text_width": sum(widths)}  # attn2's k/v width
    if is_sdxl(pipe):
        for tokenizer in tokenizers(pipe):
            digest.update(_tokenizer_summary(tokenizer).encode())
        out["text_widths"] = widths
    return {**out, "weights_sha256": digest.hexdigest()}


def normalize_segments(parts: Sequence[tuple[Mapping[str, int], Sequence[str]]]) -> tuple[list[dict[str, int]], list[str]]:
    """Canonical prompt segments of a run and its prompts in that order.

    A segment ``{start, n, seed}`` holds prompts sampled with generator seeds ``seed + start + i``. Segments
    are sorted by ``(start, seed)`` and contiguous ones with the same seed fused, so a run extended by
    prompts ``[n, n + m)`` or merged from ``[0, n)`` and ``[n, n + m)`` describes its prompts exactly as a
    fresh run on the concatenated file does. The same prompt with the same generator seed in two parts
    would count one trajectory twice: refused.
    """
    ordered = sorted(((dict(seg), list(prompts)) for seg, prompts in parts if seg["n"]),
                     key=lambda part: (part[0]["start"], part[0]["seed"]))
    seen: dict[tuple[str, int], int] = {}
    for seg, prompts in ordered:
        if len(prompts) != seg["n"]:
            raise NullBoothError(f"prompt segment {seg} lists {len(prompts)} prompts; the run's prompts.txt is out of sync")
        for i, prompt in enumerate(prompts):
            sample = (prompt, seg["seed"] + seg["start"] + i)
            if sample in seen:
                raise NullBoothError(
                    f"prompt {prompt!r} with generator seed {sample[1]} (prompt index {seg['start'] + i}) is in both "
                    "parts: the same trajectory would be counted twice; drop it from one prompt file, or collect "
                    "the new part with --prompt-offset past the first part's prompts (or with another seed)"
                )
            seen[sample] = seg["start"] + i
    fused: list[tuple[dict[str, int], list[str]]] = []
    for seg, prompts in ordered:
        last = fused[-1][0] if fused else None
        if last is not None and last["seed"] == seg["seed"] and last["start"] + last["n"] == seg["start"]:
            fused[-1] = ({**last, "n": last["n"] + seg["n"]}, fused[-1][1] + prompts)
        else:
            fused.append((seg, prompts))
    return [seg for seg, _ in fused], [p for _, prompts in fused for p in prompts]


def prompts_identity(segments: Sequence[Mapping[str, int]], prompts: Sequence[str]) -> dict[str, Any]:
    """The prompt part of a run's identity; ``prompt_segments`` only when it is not one segment from index 0."""
    out: dict[str, Any] = {"prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                           "n_prompts": len(prompts), "seed": int(segments[0]["seed"])}
    if len(segments) != 1 or segments[0]["start"] != 0:
        out["prompt_segments"] = [dict(seg) for seg in segments]
    return out


def identity_key(identity: Mapping[str, Any]) -> str:
    """SHA-256 of the identity as canonical JSON (sorted keys): equal inputs, equal key."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
