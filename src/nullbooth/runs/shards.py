"""Shards and their checkpoint files: who continues which prompt batches, and the float64 sums saved between.

A run's prompt batches are split into ``S`` shards fixed when it starts: shard ``s`` owns batches
``s, s + S, s + 2S, …``. A process checkpoints the sums of its shards atomically
(``.partial/checkpoint.safetensors`` for one shard, ``checkpoint.rank{s}.safetensors`` per shard otherwise):
after its first batch (an unwritable folder shows at once), then every ``checkpoint_minutes`` (or every
``checkpoint_every`` batches when that is set) and after its last batch (:class:`CheckpointSchedule`). The
file holds the whole state — per-timestep sums as float64 upper triangles — never a delta (why:
:mod:`nullbooth.runs.accumulate`). A restart, with any number of processes, reads the files back, hands every
shard to one process (:func:`assign_shards`) and continues it where it stopped. At the end the
sums of every process add up on rank 0 (:func:`reduce_accumulators`): sums and counts are exact
sufficient statistics, ``Σ_r S_r = S``, up to the order of the float64 additions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nullbooth.errors import NullBoothError
from nullbooth.filenames import COLLECT_CHECKPOINT
from nullbooth.runs.accumulate import AccumulatorPlan, Accumulators
from nullbooth.runs.distributed import Dist
from nullbooth.runs.layout import load_statistics, save_statistics
from nullbooth.runs.plan import Plan
from nullbooth.stats.capture import CrossAttentionLayer


@dataclass
class ShardProgress:
    """``done[s]`` batches of shard ``s`` (batches ``s, s + S, …``) are already in this process's sums."""

    n_shards: int
    done: dict[int, int]

    @property
    def batches_done(self) -> int:
        return sum(self.done.values())

    def todo(self, n_batches: int) -> list[int]:
        """The batches of these shards still to sample, in increasing order."""
        S = self.n_shards
        return sorted(b for s, d in self.done.items() for b in range(s + d * S, n_batches, S))

    def record(self, index: int) -> None:
        """Batch ``index`` is now in the sums."""
        self.done[index % self.n_shards] += 1

    def checkpoint_name(self) -> Path:
        """This process's checkpoint file, relative to the run directory (named after its lowest shard)."""
        return COLLECT_CHECKPOINT if self.n_shards == 1 else COLLECT_CHECKPOINT.parent / f"checkpoint.rank{min(self.done)}.safetensors"


def statistics_device(layers: Sequence[CrossAttentionLayer]) -> torch.device:
    """Where the statistics live: the device of the hooked layers (the CPU without any)."""
    return layers[0].linear("q").weight.device if layers else torch.device("cpu")


@dataclass
class CheckpointSchedule:
    """When to checkpoint: after the first and the last batch, and every ``every`` batches or else ``minutes``."""

    every: int | None
    minutes: float
    last: float = field(default_factory=time.monotonic)

    def due(self, count: int, remaining: int) -> bool:
        """Whether to checkpoint after this process's ``count``-th batch, with ``remaining`` batches still to do."""
        if self.every is not None:
            return count % self.every == 0 or remaining == 0
        return count == 1 or remaining == 0 or time.monotonic() - self.last >= 60 * self.minutes

    def written(self) -> None:
        self.last = time.monotonic()


def save_checkpoint(run_dir: Path, acc: Accumulators, progress: ShardProgress, plan: Plan) -> Path:
    """Write ``acc``'s sums with the shards they cover (atomically); returns the file name relative to ``run_dir``.

    Per-timestep sums are stored as their float64 upper triangles (``name::packed``), the text statistic whole
    (``text::sum``): half the bytes of full matrices; :meth:`SecondMoment.from_state_dict` reads either.
    """
    name = progress.checkpoint_name()
    save_statistics(run_dir / name, acc.state(), {
        "key": plan.job_key, "batches_done": str(progress.batches_done), "shapes": json.dumps(acc.shapes),
        "n_shards": str(plan.n_shards), "batch_size": str(plan.batch_size),
        "shards": json.dumps({str(s): d for s, d in sorted(progress.done.items())}),
    })
    return name


def load_checkpoint(path: Path, acc: Accumulators, job_key: str) -> None:
    """Add a checkpoint's sums into ``acc`` (one file per call; shards of several files add up)."""
    stats, meta = load_statistics(path, keep_packed=True)
    if meta.get("key") != job_key:
        raise NullBoothError(f"{path} belongs to a different configuration; refusing to reuse it")
    for key, stat in stats.items():
        acc.put(key, stat)
    acc.shapes.update(json.loads(meta["shapes"]))


def resume_shards(run_dir: Path, plan: Plan, assigned: Mapping[str, Any], device: torch.device,
                  placement: AccumulatorPlan | None = None) -> tuple[Accumulators, ShardProgress]:
    """This process's sums, read from the checkpoint files it was assigned, and the progress of its shards.

    ``assigned`` is this rank's entry of :func:`assign_shards`: ``{"files": [...], "shards": {shard: batches done}}``;
    ``placement`` where the sums live (:func:`~nullbooth.runs.accumulate.plan_accumulators`).
    """
    acc = Accumulators(plan.layers, placement, device)
    for name in assigned["files"]:
        load_checkpoint(run_dir / name, acc, plan.job_key)
    return acc, ShardProgress(plan.n_shards, {int(s): int(d) for s, d in assigned["shards"].items()})


def checkpoint_shards(meta: Mapping[str, str]) -> dict[int, int]:
    """``{shard: batches done}`` of a checkpoint (files from before sharding hold shard 0 only)."""
    if "shards" in meta:
        return {int(s): int(d) for s, d in json.loads(meta["shards"]).items()}
    return {0: int(meta["batches_done"])}


def read_checkpoints(run_dir: Path) -> dict[str, dict[str, str]]:
    """Metadata of every checkpoint file of a run (names relative to the run directory)."""
    from safetensors import safe_open

    out = {}
    for path in sorted((run_dir / COLLECT_CHECKPOINT.parent).glob("checkpoint*.safetensors")):
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
    """Sum every rank's statistics into rank 0's ``acc`` (float64 sums — triangles — and int64 counts, to rank 0)."""
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
    counts = dist.reduce_sum_(torch.tensor([state[n].count if n in state else 0 for n in names], dtype=torch.int64))
    for i, name in enumerate(names):
        stat = state.get(name)
        if stat is None:  # this rank saw no batch with this statistic: contribute zeros
            acc.put(name, acc.empty(name, dims[name]))
            stat = acc.state()[name]
        stat.sum = dist.reduce_sum_(stat.sum)
        stat.count = int(counts[i])
