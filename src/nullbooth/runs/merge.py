"""Incremental updates and merges of collection runs (docs/design.md §7, seed 000: 未来扩展 "增量更新").

The seed updates a covariance by a weighted average ``(n₁C₁ + n₂C₂)/(n₁ + n₂)``; we keep the sums and
counts themselves (``Σ xxᵀ``, ``n``, float64), so adding runs is exact addition:

- :func:`extend` samples new prompts and adds them to a complete run. New prompt ``j`` gets the global
  index ``n + j`` (``n``: the run's prompts) and therefore the generator seed ``seed + n + j`` — the one a
  fresh run on the concatenated prompt file gives it — so the extended run *is* that run: same
  sums up to the order of float64 additions, same key (``collect`` on the union file reuses it).
- :func:`merge_runs` adds complete runs of the same model, layers, features, sampler, steps, guidance,
  resolution and dtype; anything else is refused with the fields that differ. Runs whose prompt indices
  continue each other (the second collected with ``--prompt-offset``) merge into exactly the run of
  the union; runs numbered independently merge into a valid run with their own seeds (recorded in
  ``prompt_segments``); the same prompt with the same seed in two runs is refused (double counting).

Exactness: the timestep-summed statistics (training's projectors) and the text statistic always add
exactly. The per-timestep matrices add exactly when every input kept float64 per-timestep sums
(``nullbooth.keep_timestep_sums``); otherwise they are rebuilt as ``C_t · n_t`` from the stored matrices
— float32 rounding, 2⁻²⁴ relative per entry, the precision the files are stored at anyway — or
within the recorded error of a compressed store. Both runs stay untouched: the result is a new run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nullbooth.config import Config, NullBoothBlock, config_from_dict, set_dotted
from nullbooth.errors import NullBoothError
from nullbooth.io import read_json, write_json
from nullbooth.models import load_pipeline
from nullbooth.prompts import read_prompt_file, warn_truncated
from nullbooth.runs.collect import check_writable, on_main, run_plan
from nullbooth.runs.distributed import setup
from nullbooth.runs.identity import PROMPT_FIELDS, identity_key, normalize_segments, prompts_identity
from nullbooth.runs.layout import (
    MANIFEST,
    TEXT_KEY,
    RunData,
    layer_dirname,
    new_run_dir,
    stat_key,
    timestep_dirname,
    write_run_prompts,
)
from nullbooth.runs.plan import make_plan
from nullbooth.runs.write import StoreSettings, write_run
from nullbooth.stats.moments import SecondMoment

log = logging.getLogger(__name__)
# What two runs must share to be added (identity fields; prompts and seeds may differ).
COMPATIBLE = ("model", "layers", "features", "num_denoising_steps", "guidance_scale", "sampler", "resolution", "dtype")


def incompatibilities(a: RunData, b: RunData | Mapping[str, Any], *, b_timesteps: Sequence[int] | None = None) -> list[str]:
    """Why ``b`` (a run, or a plan's identity) cannot be added to ``a``: one line per differing field."""
    ident_b = b.identity if isinstance(b, RunData) else b
    problems = []
    for name in COMPATIBLE:
        x, y = a.identity.get(name), ident_b.get(name)
        if x == y:
            continue
        if name == "model":
            x_sha, y_sha = (v.get("weights_sha256", "?")[:12] if isinstance(v, dict) else v for v in (x, y))
            problems.append(f"model differs (weights {x_sha} vs {y_sha})")
        elif name == "layers":
            only_a = [l for l in x or [] if l not in (y or [])]
            only_b = [l for l in y or [] if l not in (x or [])]
            problems.append(f"layers differ ({len(x or [])} vs {len(y or [])}; only in the first: {only_a[:2]}, "
                            f"only in the second: {only_b[:2]})")
        else:
            problems.append(f"{name} differs ({x!r} vs {y!r})")
    timesteps_b = b.timesteps if isinstance(b, RunData) else b_timesteps
    if timesteps_b is not None and not problems and sorted(a.timesteps) != sorted(timesteps_b):
        problems.append(f"timesteps differ ({a.timesteps[:3]}… vs {list(timesteps_b)[:3]}…)")
    return problems


def config_of_run(run: RunData, *, prompts: str | Path | None = None, output_dir: str | Path | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Config:
    """The config that reproduces ``run``'s sampling (model, seed, resolution and its ``nullbooth:`` block).

    ``overrides`` are dotted keys (``nullbooth.storage``); identity-relevant ones (steps, sampler, …)
    are allowed here and refused later by :func:`incompatibilities` with the reason.
    """
    m = run.manifest
    block = {k: v for k, v in m.get("nullbooth", {}).items() if k in NullBoothBlock.model_fields}
    if prompts is not None:
        block["original_knowledge_prompts"] = str(prompts)
    block["cov_matrices_output_dir"] = str(output_dir if output_dir is not None else run.path.parent)
    batch = m.get("collection", {}).get("batch_size")
    if batch:
        block["collection_batch_size"] = int(batch)
    data: dict[str, Any] = {"pretrained_model_name_or_path": m["pretrained_model_name_or_path"],
                            "seed": int(run.identity["seed"]), "resolution": int(run.identity["resolution"][0]),
                            "nullbooth": block}
    return config_from_dict(set_dotted(data, overrides or {}), f"the settings of {run.path}")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise NullBoothError(f"unknown dtype {name!r} in the run's identity; the manifest is corrupt")
    return dtype


def extend(run_dir: str | Path, prompts: str | Path, *, pipe=None, output_dir: str | Path | None = None,
           overrides: Mapping[str, Any] | None = None, fresh: bool = False, progress: bool = True,
           distributed: bool | None = None, observers: Sequence[Any] = (), on_batch=None) -> Path:
    """Add the prompts of ``prompts`` (a text file, one per line) to the complete run ``run_dir``.

    Samples only the new prompts (resumable, and distributed under ``torchrun`` like ``collect``), then
    writes a new run under ``output_dir`` (default: next to ``run_dir``) holding the sums of both; it
    equals a fresh run on the old prompts followed by the new ones. Returns the new run directory (or
    the existing complete run of that union).
    """
    dist = setup(distributed)
    try:
        base = RunData(run_dir)
        cfg = config_of_run(base, prompts=prompts, output_dir=output_dir, overrides=overrides)
        new = read_prompt_file(prompts, "--prompts")
        check_writable(Path(cfg.nullbooth.cov_matrices_output_dir))
        if pipe is None:
            pipe = load_pipeline(cfg.pretrained_model_name_or_path, dtype=_dtype(base.identity["dtype"]),
                                 device=dist.model_device())
        if dist.is_main:
            warn_truncated(new, pipe.tokenizer)
        plan = make_plan(cfg, pipe, new, prompt_offset=base.next_index(), base=base)
        problems = incompatibilities(base, plan.identity)
        if problems:
            raise NullBoothError(
                f"cannot extend {base.path}: " + "; ".join(problems) + " — an extension samples with the run's own "
                f"model ({cfg.pretrained_model_name_or_path}) and settings; drop the overrides or collect a new run"
            )
        if dist.is_main:
            log.info("extending %s (%d prompts) by %d prompt(s) from %s, prompt indices %d…%d", base.path,
                     base.identity["n_prompts"], len(new), prompts, plan.offset, plan.offset + len(new) - 1)
        return run_plan(cfg, pipe, plan, dist=dist, fresh=fresh, progress=progress, observers=observers,
                        on_batch=on_batch, base=base)
    finally:
        dist.close()


def merge_runs(runs: Sequence[str | Path], output_dir: str | Path | None = None, *,
               overrides: Mapping[str, Any] | None = None, progress: bool = True) -> Path:
    """Add complete runs into a new one under ``output_dir`` (default: the first run's folder).

    ``overrides`` may change how the result is stored (``nullspace_mode``, ``nullspace_threshold``,
    ``storage``, ``storage_energy``, ``keep_timestep_sums``); with one run this re-stores it.
    Under ``torchrun`` only rank 0 works; every rank returns the new run.
    """
    dist = setup(None)
    try:
        return Path(on_main(dist, lambda: str(_merge(runs, output_dir, overrides or {}, progress))))
    finally:
        dist.close()


STORE_KEYS = ("nullspace_mode", "nullspace_threshold", "storage", "storage_energy", "keep_timestep_sums")


def _merge(runs: Sequence[str | Path], output_dir: str | Path | None, overrides: Mapping[str, Any], progress: bool) -> Path:
    if not runs:
        raise NullBoothError("merge: expected at least one run directory, got none")
    datas = [RunData(r) for r in runs]
    first = datas[0]
    problems = []
    for other in datas[1:]:
        why = incompatibilities(first, other)
        if why:
            problems.append(f"{other.path.name} vs {first.path.name}: " + "; ".join(why))
    if problems:
        raise NullBoothError("cannot merge runs collected differently: " + " | ".join(problems) +
                             " — merge only runs of the same model, layers, features, sampler, steps, guidance and resolution")
    unknown = sorted({k.removeprefix("nullbooth.") for k in overrides} - set(STORE_KEYS))
    if unknown:
        raise NullBoothError(f"merge: only how the result is stored can be set ({', '.join(STORE_KEYS)}), got {unknown}")
    segments, prompts = normalize_segments([part for run in datas for part in run.segment_parts()])
    identity = {k: v for k, v in first.identity.items() if k not in PROMPT_FIELDS}
    identity.update(prompts_identity(segments, prompts))
    key = identity_key(identity)

    block = dict(first.manifest.get("nullbooth", {}))
    block.update({k.removeprefix("nullbooth."): v for k, v in overrides.items()})
    # Validate the (possibly overridden) storage settings with the config's own rules, all problems at once.
    config_from_dict({"nullbooth": {k: v for k, v in block.items() if k in NullBoothBlock.model_fields}}, "merge settings")
    settings = StoreSettings.from_block(block)
    exact = all(run.exact_timesteps for run in datas)
    if not exact:
        worst = max(run.reconstruction_error() for run in datas)
        log.warning("%s kept no float64 per-timestep sums: the merged per-timestep matrices are rebuilt from the stored "
                    "ones (relative error ≤ %.1e); the summed statistics training uses are exact",
                    ", ".join(run.path.name for run in datas if not run.exact_timesteps), worst)
        if settings.keep_timestep_sums:
            settings = replace(settings, keep_timestep_sums=False)

    out = Path(output_dir) if output_dir is not None else first.path.parent
    check_writable(out)
    run_dir = new_run_dir(out, time.strftime("%Y%m%d_%H%M%S"))
    block.update({"original_knowledge_prompts": str(run_dir / "prompts.txt"), "cov_matrices_output_dir": str(out)})
    manifest = {k: v for k, v in first.manifest.items() if k not in ("storage_report", "derived_from", "collection")}
    manifest.update({
        "status": "writing", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "key": key, "job_key": key,
        "identity": identity, "prompts_file": str(run_dir / "prompts.txt"), "nullbooth": block,
        "derived_from": [{"run": str(run.path), "key": run.key, "how": "merged",
                          "exact_timestep_sums": run.exact_timesteps} for run in datas],
    })
    write_json(run_dir / MANIFEST, manifest)
    write_run_prompts(run_dir, prompts)

    summed: dict[str, SecondMoment] = {}
    for run in datas:
        for name, stat in sorted(run.summed.items()):
            summed.setdefault(name, SecondMoment(stat.dim)).merge(stat)

    def timestep_stats(t: int) -> dict[str, SecondMoment]:
        out_t: dict[str, SecondMoment] = {}
        for run in datas:
            for name, stat in sorted(run.timestep(t).items()):
                out_t.setdefault(name, SecondMoment(stat.dim)).merge(stat)
        return out_t

    shapes = dict(first.shapes) or _shapes_from_metadata(first)
    write_run(run_dir, layers=first.layers, features=first.features, timesteps=first.timesteps,
              timestep_stats=timestep_stats, summed=summed, shapes=shapes, settings=settings,
              manifest=manifest, progress=progress)
    if "prompt_segments" in identity:
        log.info("merged %d runs into %s; their prompt indices overlap or leave gaps (%s), so it is not the run of one "
                 "prompt file — collect later parts with --prompt-offset to get exactly that", len(datas), run_dir,
                 identity["prompt_segments"])
    else:
        log.info("merged %d runs into %s: equal to one run on their %d prompts in order", len(datas), run_dir, len(prompts))
    return run_dir


def _shapes_from_metadata(run: RunData) -> dict[str, list[int]]:
    """``original_shape`` per statistic from a run's metadata files (runs written before the manifest kept them)."""
    t = run.timesteps[0]
    shapes = {}
    for layer in run.layers:
        for feature in run.features:
            meta = read_json(run.path / timestep_dirname(t) / layer_dirname(layer) / f"{feature}_metadata.json",
                             "a metadata file")
            shapes[TEXT_KEY if feature in ("k", "v") else stat_key(layer, feature)] = meta["original_shape"]
    return shapes
