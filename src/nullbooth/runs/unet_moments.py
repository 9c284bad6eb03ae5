"""The prior statistics of every UNet weight outside ``attn2`` (``nullbooth.scope: unet``), kept beside a run.

A run's seed-layout store holds per-timestep statistics of the four ``attn2`` weights. ``scope: unet`` protects
every other ``Linear`` / ``Conv2d`` weight as well (:mod:`nullbooth.stats.weights`), and training needs only each
weight's timestep-summed second moment ``S = Σ x xᵀ`` (float64). One more pass over the run's own trajectories —
the same prompts, generator seeds, sampler, steps, guidance and resolution, both guidance branches — records them
into ``unet_moments.safetensors`` in the run folder, written once and reused by every later training.
Per-timestep matrices of convolution patches would be too large to keep (tiny-sd: ≈ 10 MB per weight and timestep).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from nullbooth.errors import NullBoothError
from nullbooth.filenames import UNET_MOMENTS
from nullbooth.runs.accumulate import free_bytes
from nullbooth.runs.layout import RunData, load_statistics, save_statistics
from nullbooth.runs.plan import make_scheduler, using_scheduler
from nullbooth.sampling import sample
from nullbooth.stats.moments import SecondMoment
from nullbooth.stats.weights import Weighted, input_rows, input_width

log = logging.getLogger(__name__)
MOMENTS_FORMAT = "nullbooth-unet-moments-1"
# Training keeps S, G = Uᵀ S U and G's eigenvectors per weight (float64): about this many d × d matrices each.
MATRICES_PER_WEIGHT = 4
MEMORY_SHARE = 0.7  # of the available memory the statistics may plan to take


def moments_bytes(weights: Mapping[str, Weighted]) -> int:
    """Bytes of the float64 ``d × d`` matrices training keeps for ``weights`` (see :data:`MATRICES_PER_WEIGHT`)."""
    return MATRICES_PER_WEIGHT * 8 * sum(input_width(m) ** 2 for m in weights.values())


def check_memory(weights: Mapping[str, Weighted], device: torch.device | str = "cpu") -> None:
    """Refuse, in one line, a UNet whose weight statistics cannot fit (SD 1.5's 3×3 convolutions: d = 11,520)."""
    need, have = moments_bytes(weights), free_bytes(device)
    if need > MEMORY_SHARE * have:
        widest = max(weights, key=lambda p: input_width(weights[p]))
        raise NullBoothError(
            f"nullbooth.scope unet: the float64 input statistics of this UNet's {len(weights)} weights need "
            f"{need / 2**30:.1f} GiB (widest: {widest}, d = {input_width(weights[widest])}), more than "
            f"{MEMORY_SHARE:.0%} of the {have / 2**30:.1f} GiB available; use nullbooth.scope: attn2 for a model this size"
        )


@contextmanager
def _recording(weights: Mapping[str, Weighted], stats: dict[str, SecondMoment]) -> Iterator[None]:
    """Every forward of a weight adds its input rows into its statistic; hooks removed on exit, also on error."""
    handles = []
    try:
        for path, module in weights.items():
            def hook(mod: nn.Module, args: tuple, path: str = path) -> None:
                stats[path].add(input_rows(mod, args[0]))

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _complete(stats: Mapping[str, SecondMoment], weights: Mapping[str, Weighted]) -> bool:
    return all(p in stats and stats[p].dim == input_width(m) and stats[p].count > 0 for p, m in weights.items())


@torch.no_grad()
def unet_moments(run_dir: str | Path, pipe, weights: Mapping[str, Weighted], *,
                 batch_size: int = 8) -> dict[str, SecondMoment]:
    """Timestep-summed float64 second moments of the inputs of ``weights`` over the run's trajectories.

    Read from the run's ``unet_moments.safetensors`` when it holds every weight; otherwise sampled (the run's
    prompts with their seeds ``seed + index``, its sampler, steps, guidance and resolution) and written there.
    """
    run = RunData(run_dir)
    file = run.path / UNET_MOMENTS
    if file.is_file():
        stats, meta = load_statistics(file)
        if meta.get("format") != MOMENTS_FORMAT:
            raise NullBoothError(f"{file} is not a nullbooth UNet statistics file (format {meta.get('format')!r}); "
                                 "delete it and train again to recompute it")
        if meta.get("run_key") == run.key and _complete(stats, weights):
            return {p: stats[p] for p in weights}
        log.info("%s is stale (the run was extended) or lacks some of this UNet's weights: recomputing it", file)
    check_memory(weights, pipe.unet.device)
    stats = {p: SecondMoment(input_width(m), device="cpu") for p, m in weights.items()}
    identity = run.identity
    prompts: list[str] = []
    seeds: list[int] = []
    for seg, part in run.segment_parts():
        prompts += part
        seeds += [seg["seed"] + seg["start"] + i for i in range(len(part))]
    log.info("recording the inputs of %d UNet weights over the %d trajectories of %s", len(weights), len(prompts),
             run.path.name)
    with using_scheduler(pipe, make_scheduler(pipe, identity["sampler"])), _recording(weights, stats):
        sample(pipe, prompts, seeds, steps=int(identity["num_denoising_steps"]),
               guidance=float(identity["guidance_scale"]), size=int(identity["resolution"][0]),
               batch_size=batch_size, output_type="latent")
    save_statistics(file, stats, {"format": MOMENTS_FORMAT, "run_key": run.key})  # atomic
    return stats

