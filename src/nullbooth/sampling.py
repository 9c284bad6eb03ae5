"""The one seeded sampler: every image nullbooth draws from a pipeline goes through :func:`sample`.

Seed convention: image ``k`` is ``prompts[k]`` sampled from its own generator
``torch.Generator(device).manual_seed(seeds[k])``. Each image owns its generator, so an image depends only
on its (prompt, seed) pair — never on the batch size, the batch it lands in, or the other prompts — and
the same pair gives the same image from any model of the same architecture (base and personalised
samples are compared pixel for pixel). :func:`prompt_seed_pairs` spells out "every prompt × every seed";
sequences of one prompt use ``seeds = range(seed, seed + n)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

DEFAULT_BATCH = 8


def prompt_seed_pairs(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    """Every prompt with every seed, prompt-major: ``(p0, s0), (p0, s1), …, (p1, s0), …``."""
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


def default_size(pipe) -> int:
    """The pipeline's native image side (``sample_size × vae_scale_factor``)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
           size: int | None = None, batch_size: int | None = DEFAULT_BATCH, output_type: str = "pil",
           **pipe_kwargs: Any) -> list[Any]:
    """Images (or latents, with ``output_type="latent"``) of ``prompts[k]`` with seed ``seeds[k]``, in order.

    ``batch_size`` images per pipeline call (``None``: all in one call); any batch size gives the same
    images. Extra keyword arguments go to the pipeline call unchanged.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: expected one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    size = size or default_size(pipe)
    device = pipe.unet.device
    step = batch_size or max(len(prompts), 1)
    out: list[Any] = []
    for start in range(0, len(prompts), step):
        chunk = slice(start, start + step)
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[chunk]]
        result = pipe(prompt=list(prompts[chunk]), height=size, width=size, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generators, output_type=output_type, **pipe_kwargs)
        out.extend(result.images)  # a list of PIL images, or an array / tensor iterated over its batch axis
    return out
