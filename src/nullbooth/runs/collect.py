"""Collection: prompts × the base model's own sampling trajectories → per-timestep float64 statistics.

The base pipeline samples every prompt with classifier-free guidance on, so both branches (the
prompt and the unconditional empty prompt) pass through the hooked layers. Per timestep and
``attn2`` layer the inputs of ``to_q`` and ``to_out.0`` stream into float64 accumulators; the
inputs of ``to_k``/``to_v`` are the text encodings, identical for every layer and timestep, so
they are accumulated once per batch (DESIGN §2). Progress is checkpointed atomically after each
batch; a run restarted with the same configuration resumes from its checkpoint and ends with the
same sums, bit for bit, as an uninterrupted run.

Several processes (``torchrun``/``accelerate launch``) split the prompt batches into shards, checkpoint
their own shards and add their float64 sums on rank 0, which alone writes the run (:mod:`nullbooth.runs.distributed`).
Prompt ``i`` of a run is always sampled with the generator seed ``seed + i`` (``i`` its global index),
so its trajectory does not depend on batching, on how the prompts are split over processes
(:mod:`nullbooth.runs.distributed`) or on whether it was added later by ``collect --extend``
(:mod:`nullbooth.runs.merge`): all of these add the same sums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm.auto import tqdm

from nullbooth import __version__
from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.filenames import COLLECT_CHECKPOINT, SUMMED_STATS
from nullbooth.io import link_or_copy, write_json
from nullbooth.models import load_pipeline
from nullbooth.prompts import read_prompt_file, warn_truncated
from nullbooth.runs.distributed import Dist, setup
from nullbooth.runs.layout import (
    MANIFEST,
    RUN_FORMAT,
    TEXT_KEY,
    iter_runs,
    layer_dirname,
    load_statistics,
    new_run_dir,
    read_manifest,
    save_statistics,
    save_timestep_sums,
    stat_key,
    timestep_dirname,
    write_run_prompts,
)
from nullbooth.stats.capture import (
    CrossAttentionLayer,
    cross_attention_layers,
    record_inputs,
    record_timestep,
)
from nullbooth.stats.compress import matrix_files, write_matrix
from nullbooth.stats.moments import SecondMoment

if TYPE_CHECKING:
    from nullbooth.runs.layout import RunData

log = logging.getLogger(__name__)
CHECKPOINT = COLLECT_CHECKPOINT
PROMPT_FIELDS = ("prompts_sha256", "n_prompts", "seed", "prompt_segments")


# --------------------------------------------------------------------------- identity of inputs


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def model_fingerprint(pipe) -> dict[str, Any]:
    """Identify the weights that determine the features: UNet and text encoder (shapes + strided samples).

    Every element enters through an integer checksum of its bits: integer addition is associative, so
    the digest does not depend on the thread count or device (a float sum's rounding does, and a
    one-thread ``torchrun`` worker must find the run a two-thread process collected).
    """
    digest = hashlib.sha256()
    for part in ("unet", "text_encoder"):
        for name, tensor in sorted(getattr(pipe, part).state_dict().items()):
            flat = tensor.detach().contiguous().flatten()
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].to("cpu", torch.float64)
            bits = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.is_floating_point() else flat
            checksum = int(bits.to(torch.int64).sum())  # wraps on overflow, deterministically
            digest.update(f"{part}.{name}:{tuple(tensor.shape)}:{tensor.dtype}:{checksum}".encode())
            digest.update(sample.numpy().tobytes())
    return {"unet_class": type(pipe.unet).__name__, "text_width": int(pipe.text_encoder.config.hidden_size),
            "weights_sha256": digest.hexdigest()}


def make_scheduler(pipe, sampler: str):
    """``uniform`` reproduces the seed's timesteps (980, 960, …, 0 for 50 steps); otherwise a diffusers class."""
    import diffusers

    if sampler == "uniform":
        return diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading", steps_offset=0)
    cls = getattr(diffusers, sampler, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise NullBoothError(
            f"nullbooth.sampler: expected 'uniform' or a diffusers scheduler class name "
            f"(e.g. DDIMScheduler, EulerDiscreteScheduler), got {sampler!r}"
        )
    return cls.from_config(pipe.scheduler.config)


def sampler_timesteps(scheduler) -> list[int]:
    """The scheduler's timesteps as the integers :func:`record_timestep` reports (rounded, each once, in order)."""
    out: list[int] = []
    for t in scheduler.timesteps:
        t = int(round(float(t)))
        if t not in out:
            out.append(t)
    return out


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
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class Plan:
    """Everything fixed before sampling starts; ``key`` hashes every input that affects the sums.

    ``prompts`` are the prompts this job samples, the first at global index ``offset``; the run it
    produces may hold more (``all_prompts``: an extension adds to ``base_key``'s run).
    """

    prompts: list[str]
    layers: list[CrossAttentionLayer]
    features: tuple[str, ...]
    height: int
    width: int
    batch_size: int
    fingerprint: dict[str, Any]
    key: str = ""
    identity: dict[str, Any] = field(default_factory=dict)
    offset: int = 0
    all_prompts: list[str] = field(default_factory=list)
    base_key: str | None = None
    n_shards: int = 1

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


def make_plan(cfg: Config, pipe, prompts: list[str], *, prompt_offset: int = 0, base: "RunData | None" = None) -> Plan:
    """The plan of sampling ``prompts`` (global indices from ``prompt_offset``), added to ``base`` when given."""
    nb = cfg.nullbooth
    if prompt_offset < 0:
        raise NullBoothError(f"prompt offset: expected an index ≥ 0, got {prompt_offset}")
    layers = cross_attention_layers(pipe.unet, nb.cross_attention_layers)
    size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    plan = Plan(prompts, layers, nb.collect_features.selected(), size, size, nb.collection_batch_size,
                model_fingerprint(pipe), offset=prompt_offset, base_key=base.key if base is not None else None)
    parts = list(base.segment_parts()) if base is not None else []
    parts.append(({"start": prompt_offset, "n": len(prompts), "seed": cfg.seed}, prompts))
    segments, plan.all_prompts = normalize_segments(parts)
    # The batch size is not part of the identity: it changes no feature (seeds are per prompt), only the
    # order of float additions; a resumed run keeps the batch size it started with (its checkpoints say).
    plan.identity = {
        "model": plan.fingerprint,
        **prompts_identity(segments, plan.all_prompts),
        "layers": [layer.name for layer in layers],
        "features": list(plan.features),
        "num_denoising_steps": nb.num_denoising_steps,
        "guidance_scale": nb.guidance_scale,
        "sampler": nb.sampler,
        "resolution": [plan.height, plan.width],
        "dtype": str(pipe.unet.dtype),
    }
    plan.key = identity_key(plan.identity)
    return plan


class CollectionObserver(Protocol):
    """Something that watches the collection's sampling (attention maps, say) without touching the statistics."""

    needs_images: bool

    def batch(self, pipe, plan: "Plan", start: int, prompts: list[str], timestep: list[int]) -> AbstractContextManager:
        """A context entered around the batch's pipeline call; ``timestep[0]`` is the step in progress."""

    def images(self, start: int, images: list) -> None:
        """The batch's decoded images (only called when ``needs_images``)."""

    def finish(self, run_dir: Path) -> None:
        """Write what was observed into the complete run directory."""


# --------------------------------------------------------------------------- accumulation


class Accumulators:
    """Per-(timestep, layer, feature) statistics for q/out and one shared text statistic for k/v.

    ``shard_done[s]`` counts the batches of shard ``s`` (batches ``s, s + S, …``) already in the sums.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.by_timestep: dict[int, dict[str, SecondMoment]] = {}
        self.text: SecondMoment | None = None
        self.shapes: dict[str, list[int]] = {}
        self.batches_done = 0
        self.shard_done: dict[int, int] = {0: 0}
        self._timestep = [-1]
        self._text_seen = False

    def timestep_stats(self, t: int) -> dict[str, SecondMoment]:
        if t not in self.by_timestep:
            self.by_timestep[t] = {}
        return self.by_timestep[t]

    def sink(self, layer: CrossAttentionLayer, feature: str, x: torch.Tensor) -> None:
        if feature == "k":
            self._add_text(layer, x)
            return
        key = stat_key(layer.name, feature)
        stats = self.timestep_stats(self._timestep[0])
        if key not in stats:
            stats[key] = SecondMoment(x.shape[-1], device=x.device)
        stats[key].add(x)
        self.shapes[key] = list(x.shape)

    def _add_text(self, layer: CrossAttentionLayer, x: torch.Tensor) -> None:
        # The text encodings are the same at every step and layer: take them from the first layer at the
        # batch's first step, and check on that call that every other layer really receives the same tensor.
        first = self.plan.layers[0].name
        if self._text_seen:
            return
        if layer.name == first:
            self._text_reference = x
            if self.text is None:
                self.text = SecondMoment(x.shape[-1], device=x.device)
            self.text.add(x)
            self.shapes[TEXT_KEY] = list(x.shape)
        elif not torch.equal(x, self._text_reference):
            raise NullBoothError(
                f"{layer.name} receives different encoder_hidden_states than {first}; this UNet does not feed one "
                "text encoding to every cross-attention layer, which k/v statistics rely on"
            )
        if layer.name == self.plan.layers[-1].name:
            self._text_seen = True

    def run_batch(self, pipe, cfg: Config, prompts: list[str], start: int, save_images: Path | None,
                  observers: Sequence[CollectionObserver] = ()) -> None:
        """Sample ``prompts`` (global indices from ``start``: seeds ``seed + start + i``) with the hooks on."""
        nb = cfg.nullbooth
        device = pipe.unet.device
        generators = [torch.Generator(device=device).manual_seed(cfg.seed + start + i) for i in range(len(prompts))]
        hooked = sorted({"k" if f in ("k", "v") else f for f in self.plan.features})
        self._text_seen = "k" not in hooked
        decode = save_images is not None or any(o.needs_images for o in observers)
        with ExitStack() as stack:
            self._timestep = stack.enter_context(record_timestep(pipe.unet))
            stack.enter_context(record_inputs(self.plan.layers, hooked, self.sink))
            for observer in observers:
                stack.enter_context(observer.batch(pipe, self.plan, start, prompts, self._timestep))
            out = pipe(
                prompt=prompts, height=self.plan.height, width=self.plan.width,
                num_inference_steps=nb.num_denoising_steps, guidance_scale=nb.guidance_scale,
                generator=generators, output_type="pil" if decode else "latent",
            )
        self._timestep = [-1]
        if save_images:
            for i, image in enumerate(out.images):
                image.save(save_images / f"{start + i:06d}.png")
        for observer in observers:
            if observer.needs_images:
                observer.images(start, out.images)
        self.batches_done += 1

    # -- checkpoints

    def state(self) -> dict[str, SecondMoment]:
        flat = {f"{timestep_dirname(t)}/{k}": s for t, stats in self.by_timestep.items() for k, s in stats.items()}
        if self.text is not None:
            flat[TEXT_KEY] = self.text
        return flat

    def put(self, name: str, stat: SecondMoment) -> None:
        """Add ``stat`` under a :meth:`state` name (merging into what is already there)."""
        if name == TEXT_KEY:
            self.text = stat if self.text is None else self.text.merge(stat)
            return
        tdir, _, key = name.partition("/")
        stats = self.timestep_stats(int(tdir.removeprefix("timestep_")))
        stats[key] = stat if key not in stats else stats[key].merge(stat)

    def checkpoint_name(self) -> Path:
        mine = [s for s in self.shard_done]
        return CHECKPOINT if self.plan.n_shards == 1 else CHECKPOINT.parent / f"checkpoint.rank{min(mine)}.safetensors"

    def save_checkpoint(self, run_dir: Path) -> Path:
        name = self.checkpoint_name()
        save_statistics(run_dir / name, self.state(), {
            "key": self.plan.job_key, "batches_done": str(sum(self.shard_done.values())), "shapes": json.dumps(self.shapes),
            "n_shards": str(self.plan.n_shards), "batch_size": str(self.plan.batch_size),
            "shards": json.dumps({str(s): d for s, d in sorted(self.shard_done.items())}),
        })
        return name

    def load_checkpoint(self, run_dir: Path, name: Path = CHECKPOINT) -> None:
        """Add a checkpoint's sums into these accumulators (one file per call; shards of several files add up)."""
        stats, meta = load_statistics(run_dir / name)
        if meta.get("key") != self.plan.job_key:
            raise NullBoothError(f"{run_dir / name} belongs to a different configuration; refusing to reuse it")
        for key, stat in stats.items():
            self.put(key, stat.to(self._device()))
        shards = checkpoint_shards(meta)
        self.shard_done.update(shards)
        self.batches_done = sum(self.shard_done.values())
        self.shapes.update(json.loads(meta["shapes"]))

    def _device(self) -> torch.device:
        return self.plan.layers[0].linear("q").weight.device if self.plan.layers else torch.device("cpu")


def checkpoint_shards(meta: Mapping[str, str]) -> dict[int, int]:
    """``{shard: batches done}`` of a checkpoint (files from before sharding hold shard 0 only)."""
    if "shards" in meta:
        return {int(s): int(d) for s, d in json.loads(meta["shards"]).items()}
    return {0: int(meta["batches_done"])}


def read_checkpoints(run_dir: Path) -> dict[str, dict[str, str]]:
    """Metadata of every checkpoint file of a run (names relative to the run directory)."""
    from safetensors import safe_open

    out = {}
    for path in sorted((run_dir / CHECKPOINT.parent).glob("checkpoint*.safetensors")):
        try:
            with safe_open(str(path), "pt") as fh:
                out[str(path.relative_to(run_dir))] = fh.metadata() or {}
        except Exception as err:  # a torn file cannot exist (atomic writes); anything unreadable is foreign
            raise NullBoothError(f"{path} is not a readable checkpoint ({err}); delete it to start those shards over") from None
    return out


def assign_shards(files: Mapping[str, Mapping[str, str]], n_shards: int, world_size: int, job_key: str,
                  batch_size: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Which checkpoint files and shards each of ``world_size`` processes continues; and the stale files.

    A process that took over several shards writes them into one file and then deletes the files it
    read; a crash in between leaves a file whose shards are a proper subset of a newer one: stale,
    ignored. The live files hold disjoint shards; a file goes to rank ``min(shards) % world_size`` and a
    shard in no file to rank ``shard % world_size`` — with an unchanged world size, rank ``r`` gets
    exactly its own shard ``r`` back.
    """
    shards = {}
    for name, meta in files.items():
        if meta.get("key") != job_key:
            raise NullBoothError(f"{name} belongs to a different configuration; refusing to reuse it (delete it, or "
                                 "start over with --fresh)")
        if int(meta.get("batch_size", batch_size)) != batch_size or int(meta.get("n_shards", 1)) != n_shards:
            raise NullBoothError(f"{name} was written with batch size {meta.get('batch_size')} and "
                                 f"{meta.get('n_shards', 1)} shard(s), the run says {batch_size} and {n_shards}; "
                                 "the run directory is inconsistent — start over with --fresh")
        shards[name] = checkpoint_shards(meta)
    total = {name: sum(s.values()) for name, s in shards.items()}

    def subsumed(name: str, other: str) -> bool:
        mine, theirs = set(shards[name]), set(shards[other])
        return other != name and (mine < theirs or (mine == theirs and (total[name], name) < (total[other], other)))

    stale = sorted(name for name in shards if any(subsumed(name, other) for other in shards))
    owner: dict[int, str] = {}
    out: list[dict[str, Any]] = [{"files": [], "shards": {}} for _ in range(world_size)]
    for name in sorted(set(shards) - set(stale)):
        for s in shards[name]:
            if not 0 <= s < n_shards or s in owner:
                raise NullBoothError(f"checkpoints {owner.get(s)} and {name} both hold shard {s} (or it is out of "
                                     f"range 0..{n_shards - 1}); the run directory is inconsistent — start over with --fresh")
            owner[s] = name
        rank = min(shards[name]) % world_size
        out[rank]["files"].append(name)
        out[rank]["shards"].update({str(s): d for s, d in shards[name].items()})
    for s in range(n_shards):
        if s not in owner:
            out[s % world_size]["shards"][str(s)] = 0
    return out, stale


def reduce_accumulators(acc: Accumulators, dist: Dist) -> None:
    """Sum every rank's statistics into rank 0's ``acc`` (float64 sums and int64 counts, ``reduce`` to rank 0)."""
    state = acc.state()
    gathered = dist.all_gather({"dims": {name: stat.dim for name, stat in state.items()}, "shapes": acc.shapes})
    dims: dict[str, int] = {}
    for part in gathered:
        for name, dim in part["dims"].items():
            if dims.setdefault(name, dim) != dim:
                raise NullBoothError(f"processes disagree on the width of {name} ({dims[name]} vs {dim}); "
                                     "every process must load the same model")
        for name, shape in part["shapes"].items():
            acc.shapes.setdefault(name, shape)
    names = sorted(dims)
    device = acc._device()
    counts = dist.reduce_sum_(torch.tensor([state[n].count if n in state else 0 for n in names], dtype=torch.int64))
    for i, name in enumerate(names):
        stat = state.get(name)
        if stat is None:  # this rank saw no batch with this statistic: contribute zeros
            stat = SecondMoment(dims[name], device=device)
            acc.put(name, stat)
        stat.sum = dist.reduce_sum_(stat.sum)
        stat.count = int(counts[i])


# --------------------------------------------------------------------------- the run directory


def find_run(output_dir: Path, key: str, *, complete: bool, job_key: str | None = None) -> Path | None:
    """The newest run under ``output_dir`` with this key (complete, or resumable when ``complete`` is False).

    A resumable run must also match ``job_key`` (default ``key``): an unfinished extension is resumed by
    the same extension only, never by a plain collection of the union.
    """
    for run in iter_runs(output_dir):
        try:
            manifest = read_manifest(run)
        except NullBoothError:
            continue
        if complete and manifest.get("key") == key and manifest.get("status") == "complete":
            return run
        if not complete and manifest.get("status") == "collecting" and \
                manifest.get("job_key", manifest.get("key")) == (job_key or key):
            return run
    return None


def _manifest(plan: Plan, cfg: Config, timesteps: Sequence[int], status: str, *, run_dir: Path | None = None,
              base: "RunData | None" = None) -> dict[str, Any]:
    nb = cfg.nullbooth.model_dump()
    prompts_file = str(cfg.nullbooth.original_knowledge_prompts)
    if base is not None and run_dir is not None:  # an extension: the run's own prompts.txt lists all its prompts
        prompts_file = nb["original_knowledge_prompts"] = str(run_dir / "prompts.txt")
    manifest = {
        "format": RUN_FORMAT,
        "nullbooth_version": __version__,
        "status": status,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "key": plan.key,
        "job_key": plan.job_key,
        "identity": plan.identity,
        "pretrained_model_name_or_path": cfg.pretrained_model_name_or_path,
        "prompts_file": prompts_file,
        "nullbooth": nb,
        "layers": [{"name": l.name, "dir": layer_dirname(l.name), "weight_shapes": l.weight_shapes()} for l in plan.layers],
        "features": list(plan.features),
        "timesteps": [int(t) for t in timesteps],
        "collection": {"shards": plan.n_shards, "batch_size": plan.batch_size, "prompt_offset": plan.offset,
                       "prompts_sampled": len(plan.prompts)},
    }
    if base is not None:
        manifest["derived_from"] = [{"run": str(base.path), "key": base.key, "how": "extended",
                                     "exact_timestep_sums": base.exact_timesteps}]
    return manifest


@dataclass(frozen=True)
class StoreSettings:
    """How a run's matrices are written (none of it changes the statistics, so none of it is in the key)."""

    nullspace_mode: str = "absolute"
    nullspace_threshold: float = 2e-2
    storage: str = "float32"
    storage_energy: float = 0.9999
    keep_timestep_sums: bool = False

    @classmethod
    def from_block(cls, nb: Any) -> "StoreSettings":
        get = (lambda k, d: nb.get(k, d)) if isinstance(nb, Mapping) else (lambda k, d: getattr(nb, k, d))
        return cls(get("nullspace_mode", "absolute"), float(get("nullspace_threshold", 2e-2)),
                   get("storage", "float32"), float(get("storage_energy", 0.9999)), bool(get("keep_timestep_sums", False)))


def _metadata(shape: list[int], stat: SecondMoment, lam: torch.Tensor, null_dim: int, settings: StoreSettings,
              storage: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "original_shape": shape,
        "n_samples": stat.count,
        "feature_dim": stat.dim,
        "null_space_dim": null_dim,
        "singular_values": [float(x) for x in torch.flip(lam, [0])],
        "nullspace_threshold": settings.nullspace_threshold,
        "nullspace_mode": settings.nullspace_mode,
        **extra,
    }
    if storage:
        meta["storage"] = storage
    return meta


def _write_matrix(folder: Path, feature: str, stat: SecondMoment, shape: list[int], settings: StoreSettings,
                  extra: dict[str, Any]) -> dict[str, Any]:
    lam, null_dim, storage = write_matrix(folder, feature, stat.moment(), mode=settings.nullspace_mode,
                                          threshold=settings.nullspace_threshold, storage=settings.storage,
                                          energy=settings.storage_energy)
    metadata = _metadata(shape, stat, lam, null_dim, settings, storage, extra)
    write_json(folder / f"{feature}_metadata.json", {**metadata, "feature": feature})
    return metadata


def write_run(run_dir: Path, *, layers: Sequence[str], features: Sequence[str], timesteps: Sequence[int],
              timestep_stats: Callable[[int], Mapping[str, SecondMoment]], summed: Mapping[str, SecondMoment],
              shapes: Mapping[str, list[int]], settings: StoreSettings, manifest: dict[str, Any],
              progress: bool = True) -> dict[str, Any]:
    """Write a complete run: the seed layout (one timestep at a time), the summed statistics, the manifest.

    ``timestep_stats(t)`` gives ``{layer/feature: statistic}`` of q/out at ``t`` (called once per
    timestep, so a merge streams instead of holding every timestep); ``summed`` holds the timestep-summed
    statistics and the text statistic under ``TEXT_KEY``. The manifest is written last with status
    ``complete`` and a ``storage_report``; the checkpoint folder is removed. Returns the storage report.
    """
    text_source: tuple[Path, str] | None = None
    text_meta: dict[str, Any] = {}
    report = {"storage": settings.storage, "matrices": 0, "max_reconstruction_rel_error": 0.0,
              "null_dim_changed": 0, "max_null_dim_change": 0, "fallbacks": 0}

    def note(meta: dict[str, Any]) -> None:
        info = meta.get("storage")
        report["matrices"] += 1
        if not info:
            return
        report["max_reconstruction_rel_error"] = max(report["max_reconstruction_rel_error"], info["reconstruction_rel_error"])
        change = info["null_space_dim_reconstructed"] - meta["null_space_dim"]
        report["null_dim_changed"] += change != 0
        report["max_null_dim_change"] = max(report["max_null_dim_change"], abs(change))
        report["fallbacks"] += info["mode"] != settings.storage

    sums_meta = {"key": manifest["key"]}
    for t in tqdm(sorted(timesteps, reverse=True), desc="null spaces", unit="timestep", leave=False,
                  disable=not progress):
        stats_t = timestep_stats(t) if any(f in ("q", "out") for f in features) else {}
        for layer in layers:
            folder = run_dir / timestep_dirname(t) / layer_dirname(layer)
            extra = {"timestep": t, "layer_name": layer}
            for feature in features:
                if feature in ("q", "out"):
                    key = stat_key(layer, feature)
                    if key not in stats_t:
                        raise NullBoothError(f"no statistics for {key} at timestep {t}; the run's sums are incomplete")
                    note(_write_matrix(folder, feature, stats_t[key], shapes[key], settings, extra))
                    continue
                # k and v: one text statistic for every layer and timestep — write it once, hard-link the rest.
                if text_source is None:
                    text_meta = _write_matrix(folder, feature, summed[TEXT_KEY], shapes[TEXT_KEY], settings, extra)
                    note(text_meta)
                    text_source = (folder, feature)
                elif (folder, feature) != text_source:
                    source_folder, source_feature = text_source
                    for name in {*matrix_files(feature, "float32"), *matrix_files(feature, "eigh")}:
                        (folder / name).unlink(missing_ok=True)
                    for name in matrix_files(source_feature, text_meta.get("storage", {}).get("mode", settings.storage)):
                        if (source_folder / name).exists():
                            link_or_copy(source_folder / name, folder / (feature + name[len(source_feature):]))
                write_json(folder / f"{feature}_metadata.json", {**text_meta, **extra, "feature": feature})
        if settings.keep_timestep_sums and stats_t:
            save_timestep_sums(run_dir, t, stats_t, sums_meta)

    meta = {"key": manifest["key"], "timesteps": json.dumps(sorted(timesteps)), "shapes": json.dumps(dict(shapes))}
    save_statistics(run_dir / SUMMED_STATS, summed, meta)
    if report["null_dim_changed"]:
        log.warning("storage %s: %d of %d matrices read back with another null dimension (max change %d); "
                    "projectors are stored exactly, the covariances approximately (max relative error %.2g)",
                    settings.storage, report["null_dim_changed"], report["matrices"], report["max_null_dim_change"],
                    report["max_reconstruction_rel_error"])
    write_json(run_dir / MANIFEST, {**manifest, "status": "complete", "storage_report": report})
    shutil.rmtree(run_dir / CHECKPOINT.parent, ignore_errors=True)
    return report


def _summed(by_timestep: Mapping[int, Mapping[str, SecondMoment]], text: SecondMoment | None) -> dict[str, SecondMoment]:
    summed: dict[str, SecondMoment] = {}
    for t in sorted(by_timestep):  # a fixed order, so a resumed run adds in the same order as a straight one
        for key, stat in sorted(by_timestep[t].items()):
            summed.setdefault(key, SecondMoment(stat.dim, device=stat.sum.device)).merge(stat)
    if text is not None:
        summed[TEXT_KEY] = text
    return summed


def finalize(run_dir: Path, acc: Accumulators, cfg: Config, timesteps: Sequence[int], progress: bool = True, *,
             base: "RunData | None" = None) -> None:
    """Write the seed layout, the summed statistics, prompts and manifest (adding ``base``'s sums); drop the checkpoint."""
    plan = acc.plan
    recorded = sorted(acc.by_timestep, reverse=True)
    if any(f in ("q", "out") for f in plan.features):
        if set(recorded) != set(timesteps):
            log.debug("recorded timesteps %s differ from the scheduler's %s; using the recorded ones", recorded, timesteps)
        timesteps = recorded
    summed = _summed(acc.by_timestep, acc.text)
    by_timestep: Callable[[int], Mapping[str, SecondMoment]] = lambda t: acc.by_timestep[t]  # noqa: E731
    settings = StoreSettings.from_block(cfg.nullbooth)
    if base is not None:
        if sorted(base.timesteps) != sorted(timesteps):
            raise NullBoothError(f"{base.path} has timesteps {base.timesteps[:3]}…, the extension {list(timesteps)[:3]}…; "
                                 "extend only with the run's own sampler and step count")
        for key, stat in base.summed.items():
            summed.setdefault(key, SecondMoment(stat.dim, device=stat.sum.device)).merge(stat)
        if settings.keep_timestep_sums and not base.exact_timesteps:
            log.warning("%s kept no float64 per-timestep sums: the extension's per-timestep matrices are rebuilt from "
                        "its stored ones (relative error ≤ %.1e) and no exact sums are kept", base.path,
                        base.reconstruction_error())
            settings = replace(settings, keep_timestep_sums=False)

        def by_timestep(t: int) -> dict[str, SecondMoment]:
            ours, theirs = acc.by_timestep[t], base.timestep(t)
            if set(ours) != set(theirs):
                raise NullBoothError(f"{base.path} and the extension hold different statistics at timestep {t}")
            return {key: SecondMoment(stat.dim, device=stat.sum.device).merge(stat).merge(theirs[key])
                    for key, stat in sorted(ours.items())}

    write_run_prompts(run_dir, plan.all_prompts)
    write_run(run_dir, layers=[l.name for l in plan.layers], features=plan.features, timesteps=timesteps,
              timestep_stats=by_timestep, summed=summed, shapes=acc.shapes, settings=settings,
              manifest=_manifest(plan, cfg, timesteps, "complete", run_dir=run_dir, base=base), progress=progress)


# --------------------------------------------------------------------------- entry point


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise NullBoothError(
            f"cov_matrices_output_dir: cannot write to {folder} ({err.strerror or err}); choose a writable folder"
        ) from None


def on_main(dist: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and hand its result (or its one-line error) to every rank."""
    if not dist.enabled:
        return fn()
    result: Any = None
    failure: BaseException | None = None
    if dist.is_main:
        try:
            result = {"ok": fn()}
        except Exception as err:  # the other ranks must hear of it, or they wait in the broadcast forever
            failure = err
            result = {"error": str(err) if isinstance(err, NullBoothError) else f"rank 0 failed: {type(err).__name__}: {err}"}
    result = dist.broadcast(result)
    if failure is not None:
        raise failure
    if "error" in result:
        raise NullBoothError(result["error"])
    return result["ok"]


def collect(cfg: Config, *, pipe=None, fresh: bool = False, progress: bool = True,
            observers: Sequence[CollectionObserver] = (),
            on_batch: Callable[[Accumulators, int], None] | None = None,
            distributed: bool | None = None, prompt_offset: int = 0) -> Path:
    """Run (or resume, or reuse) the collection described by ``cfg``; return the complete run directory.

    Under ``torchrun``/``accelerate launch`` (``distributed=None`` detects the launch from ``WORLD_SIZE`` and
    starts the process group) every process calls this, samples its shard of the prompt batches, and gets
    the same run directory back; inside a process group that already exists (an ``Accelerator``'s) pass
    ``distributed=True`` when every rank calls this (see :mod:`nullbooth.runs.distributed`).
    ``prompt_offset`` numbers the prompts from that global index (their seeds are ``seed + index``), so a
    run of the next prompts of a list can later be merged into one equal to a run of the whole list.
    """
    dist = setup(distributed)
    try:
        nb = cfg.nullbooth
        prompts = read_prompt_file(nb.original_knowledge_prompts)
        check_writable(Path(nb.cov_matrices_output_dir))
        if pipe is None:
            pipe = load_pipeline(cfg.pretrained_model_name_or_path, device=dist.model_device())
        if dist.is_main:
            warn_truncated(prompts, pipe.tokenizer)
        plan = make_plan(cfg, pipe, prompts, prompt_offset=prompt_offset)
        return run_plan(cfg, pipe, plan, dist=dist, fresh=fresh, progress=progress, observers=observers,
                        on_batch=on_batch)
    finally:
        dist.close()


def run_plan(cfg: Config, pipe, plan: Plan, *, dist: Dist | None = None, fresh: bool = False, progress: bool = True,
             observers: Sequence[CollectionObserver] = (), on_batch: Callable[[Accumulators, int], None] | None = None,
             base: "RunData | None" = None) -> Path:
    """Sample ``plan`` (this process's shards of it), reduce over processes, and write the run on rank 0."""
    dist = dist or Dist()
    nb = cfg.nullbooth
    output_dir = Path(nb.cov_matrices_output_dir)
    scheduler = make_scheduler(pipe, nb.sampler)
    scheduler.set_timesteps(nb.num_denoising_steps)
    timesteps = sampler_timesteps(scheduler)

    def decide() -> dict[str, Any]:
        if not fresh and (done := find_run(output_dir, plan.key, complete=True)):
            return {"action": "reuse", "run": str(done)}
        run_dir = None if fresh else find_run(output_dir, plan.key, complete=False, job_key=plan.job_key)
        if run_dir is not None:
            collection = read_manifest(run_dir).get("collection", {})
            n_shards, batch_size = int(collection.get("shards", 1)), int(collection.get("batch_size", plan.batch_size))
            assignment, stale = assign_shards(read_checkpoints(run_dir), n_shards, dist.world_size, plan.job_key, batch_size)
            for name in stale:
                (run_dir / name).unlink(missing_ok=True)
        else:
            run_dir = new_run_dir(output_dir, time.strftime("%Y%m%d_%H%M%S"))
            n_shards, batch_size = dist.world_size, plan.batch_size
            plan.n_shards = n_shards
            write_json(run_dir / MANIFEST, _manifest(plan, cfg, timesteps, "collecting", run_dir=run_dir, base=base))
            assignment, _ = assign_shards({}, n_shards, dist.world_size, plan.job_key, batch_size)
        (run_dir / CHECKPOINT.parent).mkdir(exist_ok=True)
        return {"action": "run", "run": str(run_dir), "n_shards": n_shards, "batch_size": batch_size,
                "assignment": assignment}

    decision = on_main(dist, decide)
    if decision["action"] == "reuse":
        if dist.is_main:
            log.info("reusing the complete run %s (same model, prompts and settings)", decision["run"])
        return Path(decision["run"])
    run_dir = Path(decision["run"])
    if decision["batch_size"] != plan.batch_size and dist.is_main:
        log.warning("resuming %s with its batch size %d (the config says %d)", run_dir, decision["batch_size"],
                    plan.batch_size)
    plan.batch_size, plan.n_shards = decision["batch_size"], decision["n_shards"]
    mine = decision["assignment"][dist.rank]

    acc = Accumulators(plan)
    acc.shard_done = {}
    for name in mine["files"]:
        acc.load_checkpoint(run_dir, Path(name))
    acc.shard_done = {int(s): int(d) for s, d in mine["shards"].items()}
    acc.batches_done = sum(acc.shard_done.values())
    S = plan.n_shards
    todo = sorted(b for s, d in acc.shard_done.items() for b in range(s + d * S, plan.n_batches, S))
    if acc.batches_done and dist.is_main:
        log.info("resuming %s after %d of %d batches%s", run_dir, acc.batches_done, plan.n_batches,
                 f" (this process's shards {sorted(acc.shard_done)})" if dist.enabled else "")
    images_dir = run_dir / "generations" if nb.save_generations else None
    if images_dir:
        images_dir.mkdir(exist_ok=True)
    # Observers write into the run at the end, which rank 0 alone does: they see rank 0's batches.
    watching = observers if dist.is_main else ()

    original_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        bar = tqdm(total=acc.batches_done + len(todo), initial=acc.batches_done, desc="collect", unit="batch",
                   disable=not (progress and dist.is_main))
        written: Path | None = None
        for count, index in enumerate(todo, 1):
            start, prompts_b = plan.batch(index)
            acc.run_batch(pipe, cfg, prompts_b, start, images_dir, watching)
            acc.shard_done[index % S] += 1
            if on_batch is not None:
                on_batch(acc, index)
            if count % nb.checkpoint_every == 0 or count == len(todo):
                written = acc.save_checkpoint(run_dir)
                for name in mine["files"]:  # what this process took over is now in its own file
                    if Path(name) != written:
                        (run_dir / name).unlink(missing_ok=True)
                mine["files"] = [str(written)]
            bar.update(1)
        bar.close()
    finally:
        pipe.scheduler = original_scheduler

    if dist.enabled:
        reduce_accumulators(acc, dist)
    if dist.is_main:
        finalize(run_dir, acc, cfg, timesteps, progress, base=base)
        for observer in observers:
            observer.finish(run_dir)
    dist.barrier()  # nobody returns (or deletes its checkpoint) before rank 0 has written the complete run
    shutil.rmtree(run_dir / CHECKPOINT.parent, ignore_errors=True)
    return run_dir
