"""Checkpoints: ``checkpoint-<step>/`` folders a run resumes from, bit for bit.

Safetensors + JSON only (accelerate's ``save_state`` pickles the optimizer and RNG states, which
docs/design.md §4 rules out): the method's state and the optimizer moments in ``state.safetensors``, every
process's RNG state (its loop generator and torch's global ones) in ``rng-<rank>.safetensors``, and the
step, losses, scalar optimizer and scheduler state and the settings that must not change in
``trainer_state.json``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from nullbooth import __version__
from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.filenames import CHECKPOINT_PREFIX, CHECKPOINT_STATE, CHECKPOINT_TENSORS
from nullbooth.io import load_tensors, read_json, save_tensors, write_json
from nullbooth.methods.base import Method

# Settings a checkpoint can only be resumed under (the rest, e.g. max_train_steps, may change).
RESUME_KEYS = ("method", "nullbooth_update", "lora_rank", "seed", "train_batch_size", "gradient_accumulation_steps",
               "instance_prompt", "class_prompt", "with_prior_preservation", "resolution")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders (complete ones only), oldest first."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            suffix = p.name.removeprefix(CHECKPOINT_PREFIX)
            if p.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and (p / CHECKPOINT_STATE).is_file():
                found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def find_checkpoint(output_dir: Path, spec: str | None) -> Path | None:
    """``resume_from_checkpoint``: ``None``, ``"latest"`` or a checkpoint folder (absolute or in ``output_dir``)."""
    if spec is None:
        return None
    if spec == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise NullBoothError(f"resume_from_checkpoint: 'latest' but {output_dir} holds no checkpoint-<step> folder; "
                                 "train without resume_from_checkpoint, or point output_dir at the earlier run")
        return found
    for candidate in (Path(spec), output_dir / spec):
        if (candidate / CHECKPOINT_STATE).is_file():
            return candidate
    have = [p.name for p in checkpoint_dirs(output_dir)]
    raise NullBoothError(
        f"resume_from_checkpoint: expected a checkpoint folder (with trainer_state.json) at {spec}, found nothing; "
        f"use 'latest' or one of {have}" if have else
        f"resume_from_checkpoint: expected a checkpoint folder (with trainer_state.json) at {spec}, found nothing, "
        f"and {output_dir} has no checkpoints; remove resume_from_checkpoint to start fresh"
    )


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(output_dir: Path, step: int, losses: list[float], cfg: Config, method: Method, optimizer,
                    lr_scheduler, generator: torch.Generator, accelerator) -> Path:
    """``checkpoint-<step>/``: method state and optimizer moments (safetensors), one RNG file per process,
    ``trainer_state.json``. Written into a temporary folder and renamed, so a crash leaves the previous one."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_tensors(tmp / f"rng-{accelerator.process_index}.safetensors", _rng_tensors(generator))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        opt = optimizer.state_dict()
        tensors = {f"method.{k}": v for k, v in method.checkpoint_state().items()}
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in opt["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        save_tensors(tmp / CHECKPOINT_TENSORS, tensors, {"format": "pt"})
        scaler = getattr(accelerator, "scaler", None)
        write_json(tmp / CHECKPOINT_STATE, {
            "format": "nullbooth-checkpoint", "nullbooth_version": __version__, "step": step, "losses": losses,
            "num_processes": accelerator.num_processes, "settings": {k: getattr(cfg, k) for k in RESUME_KEYS},
            "optimizer_param_groups": opt["param_groups"], "optimizer_scalars": scalars,
            "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler.state_dict() if scaler else None,
        })
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if cfg.checkpoints_total_limit is not None:
            for old in checkpoint_dirs(output_dir)[:-cfg.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, cfg: Config, method: Method, optimizer, lr_scheduler, generator: torch.Generator,
                    accelerator) -> tuple[int, list[float]]:
    """Restore everything :func:`save_checkpoint` wrote; returns ``(step, losses)``."""
    state = read_json(folder / CHECKPOINT_STATE, "a checkpoint state (trainer_state.json)")
    if state.get("format") != "nullbooth-checkpoint":
        raise NullBoothError(f"{folder} is not a nullbooth checkpoint (format={state.get('format')!r})")
    changed = [f"{k}: {state['settings'].get(k)!r} → {getattr(cfg, k)!r}" for k in RESUME_KEYS
               if state["settings"].get(k) != getattr(cfg, k)]
    if changed:
        raise NullBoothError(f"{folder} was written with other settings ({'; '.join(changed)}); resume with the "
                             "original values or start a fresh run")
    if state["num_processes"] != accelerator.num_processes:
        raise NullBoothError(f"{folder} was written by {state['num_processes']} process(es), this run has "
                             f"{accelerator.num_processes}; resume with the same number of processes")
    tensors, _ = load_tensors(folder / CHECKPOINT_TENSORS, "checkpoint tensors (state.safetensors)")
    method.load_checkpoint_state({k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            opt_state.setdefault(int(index), {})[key] = value
    for index, values in state["optimizer_scalars"].items():
        opt_state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["optimizer_param_groups"]]
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise NullBoothError(f"{folder}: the optimizer state does not fit this run ({err}); resume with the original "
                             "configuration") from None
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("grad_scaler") and getattr(accelerator, "scaler", None):
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    rng, _ = load_tensors(folder / f"rng-{accelerator.process_index}.safetensors", "checkpoint RNG state")
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return int(state["step"]), list(state["losses"])
