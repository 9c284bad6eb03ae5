"""Collection: prompts × the base model's own sampling trajectories → per-timestep float64 statistics.

The base pipeline samples every prompt with classifier-free guidance on, so both branches (the
prompt and the unconditional empty prompt) pass through the hooked layers. Per timestep and
``attn2`` layer the inputs of ``to_q`` and ``to_out.0`` stream into float64 accumulators; the
inputs of ``to_k``/``to_v`` are the text encodings, identical for every layer and timestep, so
they are accumulated once per batch (DESIGN §2). Progress is checkpointed atomically after each
batch; a run restarted with the same configuration resumes from its checkpoint and ends with the
same sums, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .capture import CrossAttentionLayer, cross_attention_layers, record_inputs, record_timestep
from .config import Config
from .errors import NullBoothError
from .models import load_pipeline
from .nullspace import null_space
from .prompts import read_prompt_file, warn_truncated
from .stats import SecondMoment
from .store import (
    MANIFEST, RUN_FORMAT, TEXT_KEY, iter_runs, layer_dirname, link_or_copy, load_statistics, new_run_dir,
    read_manifest, save_npy, save_statistics, stat_key, timestep_dirname, write_json,
)

log = logging.getLogger(__name__)
CHECKPOINT = Path(".partial") / "checkpoint.safetensors"


# --------------------------------------------------------------------------- identity of inputs


def model_fingerprint(pipe) -> dict[str, Any]:
    """Identify the weights that determine the features: UNet and text encoder (shapes + strided samples)."""
    digest = hashlib.sha256()
    for part in ("unet", "text_encoder"):
        for name, tensor in sorted(getattr(pipe, part).state_dict().items()):
            flat = tensor.detach().flatten()
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].to("cpu", torch.float64)
            digest.update(f"{part}.{name}:{tuple(tensor.shape)}:{flat.double().sum().item():.17g}".encode())
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


@dataclass
class Plan:
    """Everything fixed before sampling starts; ``key`` hashes every input that affects the sums."""

    prompts: list[str]
    layers: list[CrossAttentionLayer]
    features: tuple[str, ...]
    height: int
    width: int
    batch_size: int
    fingerprint: dict[str, Any]
    key: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def n_batches(self) -> int:
        return -(-len(self.prompts) // self.batch_size)

    def batch(self, index: int) -> tuple[int, list[str]]:
        start = index * self.batch_size
        return start, self.prompts[start:start + self.batch_size]


def make_plan(cfg: Config, pipe, prompts: list[str]) -> Plan:
    nb = cfg.nullbooth
    layers = cross_attention_layers(pipe.unet, nb.cross_attention_layers)
    size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    plan = Plan(prompts, layers, nb.collect_features.selected(), size, size, nb.collection_batch_size,
                model_fingerprint(pipe))
    plan.identity = {
        "model": plan.fingerprint,
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "n_prompts": len(prompts),
        "layers": [layer.name for layer in layers],
        "features": list(plan.features),
        "num_denoising_steps": nb.num_denoising_steps,
        "guidance_scale": nb.guidance_scale,
        "sampler": nb.sampler,
        "resolution": [plan.height, plan.width],
        "batch_size": plan.batch_size,
        "seed": cfg.seed,
        "dtype": str(pipe.unet.dtype),
    }
    plan.key = hashlib.sha256(json.dumps(plan.identity, sort_keys=True).encode()).hexdigest()
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
    """Per-(timestep, layer, feature) statistics for q/out and one shared text statistic for k/v."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.by_timestep: dict[int, dict[str, SecondMoment]] = {}
        self.text: SecondMoment | None = None
        self.shapes: dict[str, list[int]] = {}
        self.batches_done = 0
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

    def save_checkpoint(self, run_dir: Path) -> None:
        save_statistics(run_dir / CHECKPOINT, self.state(), {
            "key": self.plan.key, "batches_done": str(self.batches_done), "shapes": json.dumps(self.shapes),
        })

    def load_checkpoint(self, run_dir: Path) -> None:
        stats, meta = load_statistics(run_dir / CHECKPOINT)
        if meta.get("key") != self.plan.key:
            raise NullBoothError(f"{run_dir / CHECKPOINT} belongs to a different configuration; refusing to reuse it")
        for name, stat in stats.items():
            if name == TEXT_KEY:
                self.text = stat
            else:
                tdir, _, key = name.partition("/")
                self.timestep_stats(int(tdir.removeprefix("timestep_")))[key] = stat
        self.batches_done = int(meta["batches_done"])
        self.shapes = json.loads(meta["shapes"])


# --------------------------------------------------------------------------- the run directory


def find_run(output_dir: Path, key: str, *, complete: bool) -> Path | None:
    """The newest run under ``output_dir`` with this key (complete, or resumable when ``complete`` is False)."""
    for run in iter_runs(output_dir):
        try:
            manifest = read_manifest(run)
        except NullBoothError:
            continue
        if manifest.get("key") != key:
            continue
        if complete and manifest.get("status") == "complete":
            return run
        if not complete and manifest.get("status") == "collecting":
            return run
    return None


def _manifest(plan: Plan, cfg: Config, timesteps: Sequence[int], status: str) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "nullbooth_version": __version__,
        "status": status,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "key": plan.key,
        "identity": plan.identity,
        "pretrained_model_name_or_path": cfg.pretrained_model_name_or_path,
        "prompts_file": str(cfg.nullbooth.original_knowledge_prompts),
        "nullbooth": cfg.nullbooth.model_dump(),
        "layers": [{"name": l.name, "dir": layer_dirname(l.name), "weight_shapes": l.weight_shapes()} for l in plan.layers],
        "features": list(plan.features),
        "timesteps": [int(t) for t in timesteps],
    }


def _metadata(shape: list[int], stat: SecondMoment, ns, cfg: Config, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "original_shape": shape,
        "n_samples": stat.count,
        "feature_dim": stat.dim,
        "null_space_dim": ns.null_dim,
        "singular_values": [float(x) for x in torch.flip(ns.eigenvalues, [0])],
        "nullspace_threshold": cfg.nullbooth.nullspace_threshold,
        "nullspace_mode": cfg.nullbooth.nullspace_mode,
        **extra,
    }


def _write_matrix(folder: Path, feature: str, stat: SecondMoment, shape: list[int], cfg: Config,
                  extra: dict[str, Any]) -> dict[str, Any]:
    C = stat.moment()
    ns = null_space(C, cfg.nullbooth.nullspace_mode, cfg.nullbooth.nullspace_threshold)
    save_npy(folder / f"{feature}_covariance.npy", C.to(torch.float32).cpu().numpy())
    projection = folder / f"{feature}_projection.npy"
    if ns.null_dim:
        save_npy(projection, ns.projector().to(torch.float32).cpu().numpy())
    else:
        projection.unlink(missing_ok=True)
    metadata = _metadata(shape, stat, ns, cfg, extra)
    write_json(folder / f"{feature}_metadata.json", {**metadata, "feature": feature})
    return metadata


def finalize(run_dir: Path, acc: Accumulators, cfg: Config, timesteps: Sequence[int], progress: bool = True) -> None:
    """Write the seed layout, the summed statistics and the manifest; then drop the checkpoint."""
    plan = acc.plan
    text_source: Path | None = None
    text_meta: dict[str, Any] = {}
    for t in tqdm(sorted(timesteps, reverse=True), desc="null spaces", unit="timestep", leave=False,
                  disable=not progress):
        for layer in plan.layers:
            folder = run_dir / timestep_dirname(t) / layer_dirname(layer.name)
            extra = {"timestep": t, "layer_name": layer.name}
            for feature in plan.features:
                if feature in ("q", "out"):
                    key = stat_key(layer.name, feature)
                    _write_matrix(folder, feature, acc.by_timestep[t][key], acc.shapes[key], cfg, extra)
                    continue
                # k and v: one text statistic for every layer and timestep — write it once, hard-link the rest.
                if text_source is None:
                    text_meta = _write_matrix(folder, feature, acc.text, acc.shapes[TEXT_KEY], cfg, extra)
                    text_source = folder / feature
                for suffix in ("covariance.npy", "projection.npy"):
                    source = text_source.with_name(f"{text_source.name}_{suffix}")
                    target = folder / f"{feature}_{suffix}"
                    if source.exists() and target != source:
                        link_or_copy(source, target)
                write_json(folder / f"{feature}_metadata.json", {**text_meta, **extra, "feature": feature})

    summed: dict[str, SecondMoment] = {}
    for t in sorted(acc.by_timestep):  # a fixed order, so a resumed run adds in the same order as a straight one
        for key, stat in sorted(acc.by_timestep[t].items()):
            summed.setdefault(key, SecondMoment(stat.dim, device=stat.sum.device)).merge(stat)
    if acc.text is not None:
        summed[TEXT_KEY] = acc.text
    meta = {"key": plan.key, "timesteps": json.dumps(sorted(timesteps))}
    save_statistics(run_dir / "stats" / "summed.safetensors", summed, meta)
    if cfg.nullbooth.keep_timestep_sums:
        save_statistics(run_dir / "stats" / "timestep_sums.safetensors", acc.state(), meta)
    write_json(run_dir / MANIFEST, _manifest(plan, cfg, timesteps, "complete"))
    shutil.rmtree(run_dir / CHECKPOINT.parent, ignore_errors=True)


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


def collect(cfg: Config, *, pipe=None, fresh: bool = False, progress: bool = True,
            observers: Sequence[CollectionObserver] = (),
            on_batch: Callable[[Accumulators, int], None] | None = None) -> Path:
    """Run (or resume, or reuse) the collection described by ``cfg``; return the complete run directory."""
    nb = cfg.nullbooth
    output_dir = Path(nb.cov_matrices_output_dir)
    prompts = read_prompt_file(nb.original_knowledge_prompts)
    check_writable(output_dir)
    if pipe is None:
        pipe = load_pipeline(cfg.pretrained_model_name_or_path, device="cuda" if torch.cuda.is_available() else "cpu")
    warn_truncated(prompts, pipe.tokenizer)
    plan = make_plan(cfg, pipe, prompts)

    if not fresh and (done := find_run(output_dir, plan.key, complete=True)):
        log.info("reusing the complete run %s (same model, prompts and settings)", done)
        return done
    scheduler = make_scheduler(pipe, nb.sampler)
    scheduler.set_timesteps(nb.num_denoising_steps)
    timesteps = [int(t) for t in scheduler.timesteps]

    acc = Accumulators(plan)
    run_dir = None if fresh else find_run(output_dir, plan.key, complete=False)
    if run_dir is not None and (run_dir / CHECKPOINT).exists():
        acc.load_checkpoint(run_dir)
        log.info("resuming %s after %d of %d batches", run_dir, acc.batches_done, plan.n_batches)
    else:
        run_dir = run_dir or new_run_dir(output_dir, time.strftime("%Y%m%d_%H%M%S"))
        write_json(run_dir / MANIFEST, _manifest(plan, cfg, timesteps, "collecting"))
    images_dir = run_dir / "generations" if nb.save_generations else None
    if images_dir:
        images_dir.mkdir(exist_ok=True)

    original_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        bar = tqdm(total=plan.n_batches, initial=acc.batches_done, desc="collect", unit="batch", disable=not progress)
        for index in range(acc.batches_done, plan.n_batches):
            start, prompts_b = plan.batch(index)
            acc.run_batch(pipe, cfg, prompts_b, start, images_dir, observers)
            if on_batch is not None:
                on_batch(acc, index)
            if acc.batches_done % nb.checkpoint_every == 0 or acc.batches_done == plan.n_batches:
                acc.save_checkpoint(run_dir)
            bar.update(1)
        bar.close()
    finally:
        pipe.scheduler = original_scheduler
    finalize(run_dir, acc, cfg, timesteps, progress)
    for observer in observers:
        observer.finish(run_dir)
    return run_dir
