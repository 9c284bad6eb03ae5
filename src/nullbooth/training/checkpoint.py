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
from pydantic import BaseModel

from nullbooth import __version__
from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.filenames import CHECKPOINT_PREFIX, CHECKPOINT_RNG, CHECKPOINT_STATE, CHECKPOINT_TENSORS
from nullbooth.io import load_tensors, read_json, save_tensors, write_json
from nullbooth.methods.base import Method
from nullbooth.runs.write import disk_errors
from nullbooth.training.optim import steps_from_epochs

# Settings a checkpoint can only be resumed under: what defines the trained parameters, the data and the
# optimizer (a resumed optimizer keeps its checkpoint's learning rate, so a changed one would be silently ignored).
# max_train_steps may grow; checkpoints written before a key was added here are not compared on it.
RESUME_KEYS = ("method", "nullbooth_update", "lora_rank", "lora_targets", "oft_block_size", "seed", "train_batch_size", "gradient_accumulation_steps",
               "instance_prompt", "class_prompt", "with_prior_preservation", "resolution",
               "pretrained_model_name_or_path", "revision", "learning_rate", "lr_scheduler", "lr_warmup_steps",
               "prior_loss_weight", "nullbooth.cross_attention_layers", "nullbooth.nullspace_mode",
               "nullbooth.nullspace_threshold", "nullbooth.stats_run", "nullbooth.leakage_budget",
               "perfusion.concept_token", "perfusion.superclass",
               # diffusers' options: each changes the loss, the data, the optimizer or its rates
               "snr_gamma", "noise_offset", "optimizer", "use_8bit_adam", "prodigy_beta3", "prodigy_decouple",
               "prodigy_use_bias_correction", "prodigy_safeguard_warmup", "scale_lr", "lr_num_cycles", "lr_power",
               "num_train_epochs", "random_flip", "center_crop", "train_text_encoder", "text_encoder_lr", "subjects",
               "lora_dropout", "use_dora")
STATE_FIELDS = {"step": int, "losses": list, "num_processes": int, "settings": dict, "optimizer_param_groups": list,
                "optimizer_scalars": dict, "lr_scheduler": dict}


def setting(cfg: Config, key: str) -> Any:
    """A config value by dotted key (``None`` where this version's config has no such key)."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


def checkpoint_step(folder: Path) -> int | None:
    suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders (complete ones only), oldest first."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            step = checkpoint_step(p)
            if step is not None and (p / CHECKPOINT_STATE).is_file():
                found.append((step, p))
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


def _instead(folder: Path) -> str:
    """What to do when ``folder`` cannot be resumed: the checkpoints before it, or starting over."""
    earlier = [p.name for p in checkpoint_dirs(folder.parent) if (checkpoint_step(p) or 0) < (checkpoint_step(folder) or 0)]
    before = f"resume an earlier checkpoint (resume_from_checkpoint: {earlier[-1]}) or " if earlier else ""
    return f"{before}start over (train --overwrite, which deletes the old checkpoints and result)"


def read_state(folder: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, with every field resuming needs (else one line naming the checkpoint)."""
    state = read_json(folder / CHECKPOINT_STATE, "a checkpoint state (trainer_state.json)")
    if state.get("format") != "nullbooth-checkpoint":
        raise NullBoothError(f"{folder} is not a nullbooth checkpoint (format={state.get('format')!r}); {_instead(folder)}")
    wrong = [f"{name} (expected a {kind.__name__}, got {type(state.get(name)).__name__})"
             for name, kind in STATE_FIELDS.items() if not isinstance(state.get(name), kind)]
    if wrong:
        raise NullBoothError(f"{folder / CHECKPOINT_STATE} lacks {', '.join(wrong)}; the checkpoint is damaged or from "
                             f"another version — {_instead(folder)}")
    return state


def check_resume(folder: Path, cfg: Config, num_processes: int, device: torch.device) -> dict[str, Any]:
    """Refuse, before anything is loaded, a checkpoint this config cannot continue: other settings, a step past
    ``max_train_steps``, another process count, or unreadable files. Returns its state."""
    state = read_state(folder)
    changed = [f"{k}: {state['settings'][k]!r} → {setting(cfg, k)!r}" for k in RESUME_KEYS
               if k in state["settings"] and _json(state["settings"][k]) != _json(setting(cfg, k))]
    if changed:
        raise NullBoothError(f"{folder} was written with other settings ({'; '.join(changed)}); resume with the "
                             "original values, or start over with these (train --overwrite)")
    # Before set-up has turned num_train_epochs into max_train_steps the step cannot be checked; the loop's
    # load_checkpoint checks it again with the resolved config.
    if not steps_from_epochs(cfg) and state["step"] > cfg.max_train_steps:
        raise NullBoothError(
            f"{folder} is at step {state['step']}, beyond max_train_steps {cfg.max_train_steps}: resuming it would "
            f"write a {state['step']}-step result; raise max_train_steps to at least {state['step']}, or "
            f"{_instead(folder)}")
    if state["num_processes"] != num_processes:
        raise NullBoothError(f"{folder} was written by {state['num_processes']} process(es), this run has "
                             f"{num_processes}; resume with the same number of processes")
    for rank in range(num_processes):
        rng = _rng(folder, rank)
        _restorable(folder, rng, torch.Generator(device=device), {"generator"})
        _restorable(folder, rng, torch.Generator(), {"torch_cpu"})
    return state


def _json(value: Any) -> Any:
    """Compare as the JSON file stores it (tuples are lists there, config blocks such as subjects are dicts)."""
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _rng(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    try:
        rng, _ = load_tensors(folder / CHECKPOINT_RNG.format(rank=rank), "the checkpoint's RNG state")
    except NullBoothError as err:
        raise NullBoothError(f"{err} — {_instead(folder)}") from None
    return rng


def _restorable(folder: Path, rng: dict[str, torch.Tensor], scratch: torch.Generator, keys: set[str]) -> None:
    """Check RNG states by loading them into a scratch generator (the real ones are untouched)."""
    for key in sorted(keys):
        try:
            scratch.set_state(rng[key])
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            why = "missing" if isinstance(err, KeyError) else str(err).splitlines()[0]
            raise NullBoothError(f"{folder}: the RNG state {key!r} cannot be restored ({why}); the checkpoint is "
                                 f"damaged — {_instead(folder)}") from None


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(output_dir: Path, step: int, losses: list[float], cfg: Config, method: Method, optimizer,
                    lr_scheduler, generator: torch.Generator, accelerator) -> Path:
    """``checkpoint-<step>/``: method state and optimizer moments (safetensors), one RNG file per process,
    ``trainer_state.json``. Written into a temporary folder and renamed, so a crash or a full disk leaves the
    previous checkpoints as they were."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    last = latest_checkpoint(output_dir)
    kept = (f"{last.name} is intact — free space or fix permissions and resume with resume_from_checkpoint: latest"
            if last else "no earlier checkpoint exists — free space or fix permissions and run train again")
    try:
        with disk_errors(f"writing {final.name} in {output_dir}", kept):
            _write_checkpoint(tmp, step, losses, cfg, method, optimizer, lr_scheduler, generator, accelerator)
            if accelerator.is_main_process:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process and cfg.checkpoints_total_limit is not None:
        for old in checkpoint_dirs(output_dir)[:-cfg.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(tmp: Path, step: int, losses: list[float], cfg: Config, method: Method, optimizer,
                      lr_scheduler, generator: torch.Generator, accelerator) -> None:
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_tensors(tmp / CHECKPOINT_RNG.format(rank=accelerator.process_index), _rng_tensors(generator))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
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
        "num_processes": accelerator.num_processes, "settings": {k: _json(setting(cfg, k)) for k in RESUME_KEYS},
        "optimizer_param_groups": opt["param_groups"], "optimizer_scalars": scalars,
        "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler.state_dict() if scaler else None,
    })


def load_checkpoint(folder: Path, cfg: Config, method: Method, optimizer, lr_scheduler, generator: torch.Generator,
                    accelerator) -> tuple[int, list[float]]:
    """Restore everything :func:`save_checkpoint` wrote; returns ``(step, losses)``."""
    state = check_resume(folder, cfg, accelerator.num_processes, generator.device)
    try:
        tensors, _ = load_tensors(folder / CHECKPOINT_TENSORS, "checkpoint tensors (state.safetensors)")
    except NullBoothError as err:
        raise NullBoothError(f"{err} — {_instead(folder)}") from None
    try:
        method.load_checkpoint_state({k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")})
    except (NullBoothError, RuntimeError) as err:
        raise NullBoothError(f"{folder}: {str(err).splitlines()[0]}") from None
    opt_state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            opt_state.setdefault(int(index), {})[key] = value
    try:
        for index, values in state["optimizer_scalars"].items():
            opt_state.setdefault(int(index), {}).update(values)
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["optimizer_param_groups"]]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("grad_scaler") and getattr(accelerator, "scaler", None):
            accelerator.scaler.load_state_dict(state["grad_scaler"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise NullBoothError(f"{folder}: the optimizer or scheduler state does not fit this run ({err}); resume with the "
                             f"original configuration, or {_instead(folder)}") from None
    rng = _rng(folder, accelerator.process_index)
    _restorable(folder, rng, generator, {"generator"})
    torch.set_rng_state(rng["torch_cpu"])  # check_resume loaded it into a scratch generator already
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return int(state["step"]), list(state["losses"])
