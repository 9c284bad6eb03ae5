"""Collection: prompts × the base model's own sampling trajectories → per-timestep float64 statistics.

The base pipeline samples every prompt with classifier-free guidance on, so both branches (the
prompt and the unconditional empty prompt) pass through the hooked layers. Per timestep ``t`` and
``attn2`` layer the inputs ``x`` of ``to_q`` and ``to_out.0`` add to ``S_t = Σ x xᵀ`` and ``n_t`` in
float64, where a memory budget allows (:mod:`nullbooth.runs.accumulate`); the inputs of ``to_k``/``to_v``
are the text encodings, identical for every layer and timestep, so they are accumulated once per batch
(docs/design.md §2). Progress is checkpointed atomically by time (:mod:`nullbooth.runs.shards`); a run
restarted with the same configuration resumes from its checkpoint and ends with the same sums, bit for
bit, as an uninterrupted run.

Several processes (``torchrun``/``accelerate launch``) split the prompt batches into shards, checkpoint
their own shards and add their float64 sums on rank 0, which alone writes the run (:mod:`nullbooth.runs.distributed`).
Prompt ``i`` of a run is always sampled by :func:`nullbooth.sampling.sample` with the generator seed
``seed + i`` (``i`` its global index), so its trajectory does not depend on batching, on how the prompts
are split over processes or on whether it was added later by ``collect --extend``
(:mod:`nullbooth.runs.merge`): all of these add the same sums.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.filenames import COLLECT_CHECKPOINT
from nullbooth.io import remove_stale_temporaries, write_json
from nullbooth.locks import lock_folder
from nullbooth.models import load_pipeline
from nullbooth.prompts import read_prompt_file, warn_truncated
from nullbooth.runs.accumulate import Accumulators, plan_for_collection
from nullbooth.runs.distributed import Dist, setup
from nullbooth.runs.layout import MANIFEST, RunData, iter_runs, new_run_dir, read_manifest, summed_problems
from nullbooth.runs.plan import Plan, make_plan, make_scheduler, sampler_timesteps, using_scheduler
from nullbooth.runs.shards import (
    CheckpointSchedule,
    ShardProgress,
    assign_shards,
    read_checkpoints,
    reduce_accumulators,
    resume_shards,
    save_checkpoint,
    statistics_device,
)
from nullbooth.runs.write import disk_errors, finalize, run_manifest
from nullbooth.sampling import sample
from nullbooth.stats.capture import record_inputs, record_timestep

log = logging.getLogger(__name__)


class CollectionObserver(Protocol):
    """Something that watches the collection's sampling (attention maps, say) without touching the statistics."""

    needs_images: bool

    def batch(self, pipe, plan: Plan, start: int, prompts: list[str], timestep: list[int]) -> AbstractContextManager:
        """A context entered around the batch's pipeline call; ``timestep[0]`` is the step in progress."""

    def images(self, start: int, images: list) -> None:
        """The batch's decoded images (only called when ``needs_images``)."""

    def finish(self, run_dir: Path) -> None:
        """Write what was observed into the complete run directory."""


OnBatch = Callable[[Accumulators, int], None]
CHOOSING_WAIT = 120.0  # seconds to wait for another process choosing its run in the same folder (it takes moments)


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


def collection_inputs(cfg: Config) -> list[str]:
    """The prompts of ``cfg``'s prompt file, after checking that its output folder is writable: the checks that need
    no model, so that bad input fails before a model is loaded."""
    nb = cfg.nullbooth
    prompts = read_prompt_file(nb.original_knowledge_prompts)
    check_writable(Path(nb.cov_matrices_output_dir))
    return prompts


def collect(cfg: Config, *, pipe=None, prompts: list[str] | None = None, fresh: bool = False, progress: bool = True,
            observers: Sequence[CollectionObserver] = (), on_batch: OnBatch | None = None,
            distributed: bool | None = None, prompt_offset: int = 0) -> Path:
    """Run (or resume, or reuse) the collection described by ``cfg``; return the complete run directory.

    Under ``torchrun``/``accelerate launch`` (``distributed=None`` detects the launch from ``WORLD_SIZE`` and
    starts the process group) every process calls this, samples its shard of the prompt batches, and gets
    the same run directory back; inside a process group that already exists (an ``Accelerator``'s) pass
    ``distributed=True`` when every rank calls this (see :mod:`nullbooth.runs.distributed`).
    ``prompt_offset`` numbers the prompts from that global index (their seeds are ``seed + index``), so a
    run of the next prompts of a list can later be merged into one equal to a run of the whole list.
    ``prompts``: what :func:`collection_inputs` returned for ``cfg``, when the caller checked the inputs before
    loading ``pipe``.
    """
    dist = setup(distributed)
    try:
        if prompts is None:
            prompts = collection_inputs(cfg)
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
             observers: Sequence[CollectionObserver] = (), on_batch: OnBatch | None = None,
             base: RunData | None = None) -> Path:
    """Sample ``plan`` (this process's shards of it), reduce over processes, and write the run on rank 0.

    Rank 0 decides (reuse a complete run, resume a partial one, or start one); every rank loads the
    checkpoints of the shards it was given, samples their remaining batches, and adds its sums into
    rank 0's, which writes the run.
    """
    dist = dist or Dist()
    nb = cfg.nullbooth
    scheduler = make_scheduler(pipe, nb.sampler)
    scheduler.set_timesteps(nb.num_denoising_steps)
    timesteps = sampler_timesteps(scheduler)

    with ExitStack() as held:  # rank 0 holds the run's lock until the run is written
        decision = on_main(dist, lambda: _decide(cfg, plan, timesteps, dist.world_size, fresh=fresh, base=base,
                                                 held=held))
        if decision["action"] == "reuse":
            if dist.is_main:
                log.info("reusing the complete run %s (same model, prompts and settings)", decision["run"])
            return Path(decision["run"])
        return _collect_run(cfg, pipe, plan, decision, timesteps, scheduler, dist=dist, progress=progress,
                            observers=observers, on_batch=on_batch, base=base)


def _collect_run(cfg: Config, pipe, plan: Plan, decision: dict[str, Any], timesteps: Sequence[int], scheduler, *,
                 dist: Dist, progress: bool, observers: Sequence[CollectionObserver], on_batch: OnBatch | None,
                 base: RunData | None) -> Path:
    """Sample this process's shards of the run ``_decide`` chose, reduce, write it on rank 0 (see :func:`run_plan`)."""
    nb = cfg.nullbooth
    run_dir = Path(decision["run"])
    if decision["batch_size"] != plan.batch_size and dist.is_main:
        log.warning("resuming %s with its batch size %d (the config says %d)", run_dir, decision["batch_size"],
                    plan.batch_size)
    plan = replace(plan, batch_size=decision["batch_size"], n_shards=decision["n_shards"])

    device = statistics_device(plan.layers)
    placement = plan_for_collection(nb, plan.layers, plan.features, len(timesteps), device)
    if dist.is_main:
        log.info("collection sums: %s", placement.reason)
    mine = decision["assignment"][dist.rank]
    acc, shards = resume_shards(run_dir, plan, mine, device, placement)
    if shards.batches_done and dist.is_main:
        log.info("resuming %s after %d of %d batches%s", run_dir, shards.batches_done, plan.n_batches,
                 f" (this process's shards {sorted(shards.done)})" if dist.enabled else "")
    images_dir = run_dir / "generations" if nb.save_generations else None
    if images_dir:
        images_dir.mkdir(exist_ok=True)
    # Observers write into the run at the end, which rank 0 alone does: they see rank 0's batches.
    watching = observers if dist.is_main else ()
    with using_scheduler(pipe, scheduler):
        _sample_shards(cfg, pipe, plan, acc, shards, run_dir, mine["files"], images_dir=images_dir,
                       observers=watching, on_batch=on_batch, progress=progress and dist.is_main)

    if dist.enabled:
        reduce_accumulators(acc, dist)
    on_main(dist, lambda: _write(run_dir, plan, acc, cfg, timesteps, progress, base, observers))
    dist.barrier()  # nobody returns (or deletes its checkpoint) before rank 0 has written the complete run
    shutil.rmtree(run_dir / COLLECT_CHECKPOINT.parent, ignore_errors=True)
    return run_dir


def _write(run_dir: Path, plan: Plan, acc: Accumulators, cfg: Config, timesteps: Sequence[int], progress: bool,
           base: RunData | None, observers: Sequence[CollectionObserver]) -> None:
    """Rank 0: write the complete run, then what the observers saw."""
    with disk_errors(f"writing the run {run_dir}", "the collected sums are safe in its checkpoint (.partial/) — "
                     "once the cause is fixed (disk space, permissions), rerun the same command to finish the run"):
        finalize(run_dir, plan, acc, cfg, timesteps, progress, base=base)
    for observer in observers:
        observer.finish(run_dir)


def _decide(cfg: Config, plan: Plan, timesteps: Sequence[int], world_size: int, *, fresh: bool,
            base: RunData | None, held: ExitStack) -> dict[str, Any]:
    """Rank 0's choice: reuse a complete run of ``plan``, resume its partial run, or start a new one.

    The choice is made holding the lock of the runs' folder (briefly), so two processes never start or
    resume the same run; the run to collect is locked into ``held`` (a second process resuming it stops,
    naming this one). A resumed run keeps the shard count and batch size it started with (its manifest
    says); its stale checkpoint files are deleted here, before any rank reads them. A complete run that
    training could not use is not reused: the error names ``--fresh``.
    """
    output_dir = Path(cfg.nullbooth.cov_matrices_output_dir)
    with lock_folder(output_dir, "choosing its collection run", wait=CHOOSING_WAIT):
        if not fresh and (done := find_run(output_dir, plan.key, complete=True)):
            _check_reusable(done)
            return {"action": "reuse", "run": str(done)}
        run_dir = None if fresh else find_run(output_dir, plan.key, complete=False, job_key=plan.job_key)
        if run_dir is not None:
            held.enter_context(lock_folder(run_dir, "collecting this run"))
            remove_stale_temporaries(run_dir)  # a killed collection's half-written files
            collection = read_manifest(run_dir).get("collection", {})
            n_shards, batch_size = int(collection.get("shards", 1)), int(collection.get("batch_size", plan.batch_size))
            assignment, stale = assign_shards(read_checkpoints(run_dir), n_shards, world_size, plan.job_key, batch_size)
            for name in stale:
                (run_dir / name).unlink(missing_ok=True)
        else:
            run_dir = new_run_dir(output_dir, time.strftime("%Y%m%d_%H%M%S"))
            held.enter_context(lock_folder(run_dir, "collecting this run"))
            n_shards, batch_size = world_size, plan.batch_size
            with disk_errors(f"starting the run {run_dir}", "nothing was collected yet — free space and rerun"):
                write_json(run_dir / MANIFEST, run_manifest(replace(plan, n_shards=n_shards), cfg, timesteps,
                                                            "collecting", run_dir=run_dir, base=base))
            assignment, _ = assign_shards({}, n_shards, world_size, plan.job_key, batch_size)
        (run_dir / COLLECT_CHECKPOINT.parent).mkdir(exist_ok=True)
    return {"action": "run", "run": str(run_dir), "n_shards": n_shards, "batch_size": batch_size,
            "assignment": assignment}


def _check_reusable(run_dir: Path) -> None:
    """Refuse to hand out a complete run whose summed statistics training could not read."""
    problems = summed_problems(run_dir, read_manifest(run_dir), spectral=False)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise NullBoothError(
            f"{run_dir} is the complete run of this configuration, but {problems[0]}{more}, so it cannot be reused; "
            "`nullbooth collect --fresh` with the same config collects a new run beside it (this one is left as it "
            f"is — delete it when done; `nullbooth validate {run_dir}` lists every problem)")


def _sample_shards(cfg: Config, pipe, plan: Plan, acc: Accumulators, shards: ShardProgress, run_dir: Path,
                   files: Sequence[str], *, images_dir: Path | None, observers: Sequence[CollectionObserver],
                   on_batch: OnBatch | None, progress: bool) -> None:
    """Sample the remaining batches of this process's shards into ``acc``, checkpointing as configured.

    ``files`` are the checkpoints this process took over; once its own checkpoint holds their sums they go.
    """
    todo = shards.todo(plan.n_batches)
    saved = shards.batches_done
    schedule = CheckpointSchedule(cfg.nullbooth.checkpoint_every, cfg.nullbooth.checkpoint_minutes)
    # closed (its line ended) before an error propagates, so the error's one line stands on its own
    with tqdm(total=shards.batches_done + len(todo), initial=shards.batches_done, desc="collect", unit="batch",
              disable=not progress) as bar:
        for count, index in enumerate(todo, 1):
            start, prompts = plan.batch(index)
            sample_batch(pipe, cfg, plan, acc, start, prompts, images_dir, observers)
            shards.record(index)
            if on_batch is not None:
                on_batch(acc, index)
            if schedule.due(count, len(todo) - count):
                kept = f"its previous checkpoint ({saved} batch(es)) is intact" if saved else "nothing was checkpointed yet"
                with disk_errors(f"checkpointing {run_dir}", f"{kept} — free space or fix permissions and rerun the "
                                 "same command to resume"):
                    written = save_checkpoint(run_dir, acc, shards, plan)
                schedule.written()
                saved = shards.batches_done
                for name in files:  # what this process took over is now in its own file
                    if Path(name) != written:
                        (run_dir / name).unlink(missing_ok=True)
                files = [str(written)]
            bar.update(1)


def sample_batch(pipe, cfg: Config, plan: Plan, acc: Accumulators, start: int, prompts: list[str],
                 images_dir: Path | None = None, observers: Sequence[CollectionObserver] = ()) -> None:
    """Sample ``prompts`` (global indices from ``start``: seeds ``seed + start + i``) with the hooks on, into ``acc``.

    One pipeline call of the whole batch through the seeded sampler (each prompt its own generator, so
    the sums do not depend on the batching); images are decoded only when saved or observed.
    """
    nb = cfg.nullbooth
    hooked = sorted({"k" if f in ("k", "v") else f for f in plan.features})  # k and v read one text input: one hook
    decode = images_dir is not None or any(o.needs_images for o in observers)
    seeds = [cfg.seed + start + i for i in range(len(prompts))]
    with ExitStack() as stack:
        timestep = stack.enter_context(record_timestep(pipe.unet))
        stack.enter_context(acc.batch(timestep, text="k" in hooked))
        stack.enter_context(record_inputs(plan.layers, hooked, acc.sink))
        for observer in observers:
            stack.enter_context(observer.batch(pipe, plan, start, prompts, timestep))
        images = sample(pipe, prompts, seeds, steps=nb.num_denoising_steps, guidance=nb.guidance_scale,
                        size=plan.height, batch_size=None, output_type="pil" if decode else "latent")
    if images_dir:
        for i, image in enumerate(images):
            image.save(images_dir / f"{start + i:06d}.png")
    for observer in observers:
        if observer.needs_images:
            observer.images(start, images)
