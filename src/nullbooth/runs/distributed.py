"""Several processes, one collection: detect ``torchrun``/``accelerate launch``, talk over ``torch.distributed``.

A collection is split into ``S`` shards fixed when the run starts (``S`` = the world size then):
shard ``s`` owns the prompt batches ``s, s + S, s + 2S, …``. Each process streams its shards into its
own float64 sums and checkpoints them (``.partial/checkpoint.rank{s}.safetensors``), so a killed
process loses at most one batch and a restart continues every shard where it stopped — also with
a different number of processes (then the run directory must be on a filesystem all of them see).
At the end the sums and counts are added on rank 0 with a float64 ``reduce`` (gloo on CPU, NCCL on
GPU) — exact sufficient statistics, so the result equals a single-process run up to the order of
the float64 additions (≤ 1e-12 relative, see tests/test_distributed.py) — and rank 0 alone writes
the run. Nothing here runs when ``WORLD_SIZE`` is unset or 1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from nullbooth.errors import NullBoothError

log = logging.getLogger(__name__)
# Rank 0 computes every null space while the others wait at the final barrier: far longer than
# torch's default collective timeout on a full-size model.
TIMEOUT = timedelta(hours=3)


@dataclass
class Dist:
    """This process's place in the job (``world_size`` 1: no communication at all)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def model_device(self) -> torch.device:
        """Where this process runs the model: its own GPU (``cuda:LOCAL_RANK``) when there are GPUs."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable Python values; ours are plain JSON-like data)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks into rank 0's copy (float64 stays float64: the reduction is exact up to
        the order of the additions). Returns the summed tensor on rank 0, this rank's input elsewhere."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        buf = tensor.to(self.comm_device())
        dist.reduce(buf, dst=0, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device) if self.is_main else tensor

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, env: Mapping[str, str]) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise NullBoothError(f"environment variable {name}: expected an integer, got {value!r}") from None


def setup(enable: bool | None = None, env: Mapping[str, str] | None = None) -> Dist:
    """This process's :class:`Dist`, initialising ``torch.distributed`` when launched as one of several processes.

    ``enable``: ``None`` detects a launch (``WORLD_SIZE`` > 1, as ``torchrun`` and ``accelerate launch`` set it)
    and starts the process group; a process group that already exists (an ``Accelerator``'s) is used only
    with ``True``, because its other ranks may not be calling this; ``False`` forces a single process;
    ``True`` requires a launcher or an existing group.
    The backend is NCCL when CUDA is available, gloo otherwise; ``MASTER_ADDR``/``MASTER_PORT``/``RANK``
    come from the launcher.
    """
    env = os.environ if env is None else env
    if enable is False:
        return Dist()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world == 1:
            return Dist()
        if enable is None:
            # Someone else's process group (an Accelerator, say) whose ranks may be doing something else right
            # now (waiting in main_process_first): joining collectives uninvited would deadlock them.
            log.info("collect() runs in this process alone; pass distributed=True to share it across the %d "
                     "processes of the existing process group", world)
            return Dist()
        rank = dist.get_rank()
        local = _env_int("LOCAL_RANK", env)
        return Dist(rank, world, rank if local is None else local, dist.get_backend(), owns_group=False)
    world = _env_int("WORLD_SIZE", env) or 1
    if world <= 1:
        if enable:
            raise NullBoothError("distributed collection: expected WORLD_SIZE > 1 from a launcher, got "
                                 f"{env.get('WORLD_SIZE')!r}; start with `torchrun --nproc_per_node N -m nullbooth collect …` "
                                 "or `accelerate launch --num_processes N -m nullbooth collect …`")
        return Dist()
    rank = _env_int("RANK", env)
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing or rank is None:
        raise NullBoothError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch every process with torchrun or accelerate "
            "launch (they set RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or unset WORLD_SIZE for one process"
        )
    if not 0 <= rank < world:
        raise NullBoothError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); check the launcher settings")
    local = _env_int("LOCAL_RANK", env)
    local = rank if local is None else local
    if not dist.is_available():
        raise NullBoothError("this torch build has no torch.distributed; install a standard torch wheel")
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "nccl"
        if local >= torch.cuda.device_count():
            raise NullBoothError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s); start at most "
                                 "one process per GPU (torchrun --nproc_per_node = the number of GPUs)")
        torch.cuda.set_device(local)  # object collectives and NCCL use the current device
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT, rank=rank, world_size=world)
    log.debug("process %d of %d (local rank %d) joined a %s process group", rank, world, local, backend)
    return Dist(rank, world, local, backend, owns_group=True)
