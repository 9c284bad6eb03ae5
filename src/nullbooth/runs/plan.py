"""The plan of a collection: which prompts, layers, features, resolution and sampler, fixed before sampling starts.

A :class:`Plan` is immutable: :func:`make_plan` builds it complete (its identity and key included),
and a resumed run that keeps the batch size and shard count it started with gets a copy
(``dataclasses.replace``). The batch size and shard count are not part of the identity: seeds are
per prompt, so they change no feature, only the order of the float64 additions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.runs.identity import identity_key, model_fingerprint, normalize_segments, prompts_identity
from nullbooth.runs.layout import RunData
from nullbooth.sampling import default_size, scheduler_class
from nullbooth.stats.capture import CrossAttentionLayer, cross_attention_layers


@dataclass(frozen=True)
class Plan:
    """Everything fixed before sampling starts; ``key`` hashes every input that affects the sums.

    ``prompts`` are the prompts this job samples, the first at global index ``offset``; the run it
    produces may hold more (``all_prompts``: an extension adds to ``base_key``'s run). Batch ``b``
    belongs to shard ``b mod n_shards``.
    """

    prompts: list[str]
    all_prompts: list[str]
    layers: list[CrossAttentionLayer]
    features: tuple[str, ...]
    height: int
    width: int
    batch_size: int
    fingerprint: dict[str, Any]
    identity: dict[str, Any]
    offset: int = 0
    base_key: str | None = None
    n_shards: int = 1

    @property
    def key(self) -> str:
        """The run's key: equal for every plan whose sums are equal."""
        return identity_key(self.identity)

    @property
    def job_key(self) -> str:
        """Identifies the partial work (a plain run: its key; an extension: its key and the run it extends)."""
        return self.key if self.base_key is None else identity_key({"key": self.key, "extends": self.base_key})

    @property
    def n_batches(self) -> int:
        return -(-len(self.prompts) // self.batch_size)

    def batch(self, index: int) -> tuple[int, list[str]]:
        """The global index of the batch's first prompt (its seeds start there) and its prompts."""
        start = index * self.batch_size
        return self.offset + start, self.prompts[start:start + self.batch_size]


def make_plan(cfg: Config, pipe, prompts: list[str], *, prompt_offset: int = 0, base: RunData | None = None) -> Plan:
    """The plan of sampling ``prompts`` (global indices from ``prompt_offset``), added to ``base`` when given."""
    nb = cfg.nullbooth
    if prompt_offset < 0:
        raise NullBoothError(f"prompt offset: expected an index ≥ 0, got {prompt_offset}")
    layers = cross_attention_layers(pipe.unet, nb.cross_attention_layers)
    size = cfg.resolution or default_size(pipe)
    features = nb.collect_features.selected()
    fingerprint = model_fingerprint(pipe)
    parts = list(base.segment_parts()) if base is not None else []
    parts.append(({"start": prompt_offset, "n": len(prompts), "seed": cfg.seed}, prompts))
    segments, all_prompts = normalize_segments(parts)
    identity = {
        "model": fingerprint,
        **prompts_identity(segments, all_prompts),
        "layers": [layer.name for layer in layers],
        "features": list(features),
        "num_denoising_steps": nb.num_denoising_steps,
        "guidance_scale": nb.guidance_scale,
        "sampler": nb.sampler,
        "resolution": [size, size],
        "dtype": str(pipe.unet.dtype),
    }
    return Plan(prompts, all_prompts, layers, features, size, size, nb.collection_batch_size, fingerprint, identity,
                offset=prompt_offset, base_key=base.key if base is not None else None)


def make_scheduler(pipe, sampler: str):
    """``uniform`` reproduces the seed's timesteps (980, 960, …, 0 for 50 steps); otherwise a diffusers class."""
    import diffusers

    if sampler == "uniform":
        return diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading", steps_offset=0)
    return scheduler_class(sampler, "nullbooth.sampler ('uniform' or a scheduler)").from_config(pipe.scheduler.config)


@contextmanager
def using_scheduler(pipe, scheduler) -> Iterator[None]:
    """``pipe`` samples with ``scheduler`` inside the block; its own scheduler is back afterwards, also on error."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


def sampler_timesteps(scheduler) -> list[int]:
    """The scheduler's timesteps as the integers ``record_timestep`` reports (rounded, each once, in order)."""
    out: list[int] = []
    for t in scheduler.timesteps:
        t = int(round(float(t)))
        if t not in out:
            out.append(t)
    return out
