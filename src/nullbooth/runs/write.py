"""Writing a run: the seed's per-timestep layout, the summed statistics, the prompts and the manifest.

Per timestep ``t``, layer and feature the stored matrix is the second moment ``C_t = S_t / n_t`` with
``S_t = Σ x xᵀ`` (float64) and its null-space projector ``P = Û Ûᵀ`` (:func:`~nullbooth.stats.compress.write_matrix`);
the text statistic of k/v is one matrix for every layer and timestep, written once and hard-linked.
``stats/summed.safetensors`` keeps ``Σ_t S_t`` and ``Σ_t n_t`` exactly — what training projects with — and
``stats/summed_eig.safetensors`` their eigendecompositions. The manifest is written last, with status
``complete``: a run without it is not a run.

Every ``eigh`` of a run happens here, once: a timestep's matrices are decomposed in batches of one width
(:func:`~nullbooth.stats.nullspace.eigh_batched`, at most ``BATCH_BYTES`` of float64 per batch, on the
statistics' device); each matrix's metadata records its eigenvalues and the CRC-32 of its files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from nullbooth import __version__
from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.filenames import COLLECT_CHECKPOINT, SUMMED_STATS
from nullbooth.io import link_or_copy, synced_at_exit, write_json
from nullbooth.runs.accumulate import Accumulators
from nullbooth.runs.layout import (
    MANIFEST,
    RUN_FORMAT,
    TEXT_KEY,
    RunData,
    file_crc32,
    layer_dirname,
    save_statistics,
    save_summed_spectra,
    save_timestep_sums,
    stat_key,
    timestep_dirname,
    write_run_prompts,
)
from nullbooth.runs.plan import Plan
from nullbooth.stats.compress import all_matrix_files, matrix_files, write_matrix
from nullbooth.stats.moments import SecondMoment
from nullbooth.stats.nullspace import BATCH_BYTES, Spectrum, eigh_batched, spectra

log = logging.getLogger(__name__)


@contextmanager
def disk_errors(doing: str, kept: str) -> Iterator[None]:
    """Turn a failed write (a full disk, a read-only or vanished folder) while ``doing`` into one ``NullBoothError``
    line saying what was kept and how to go on (``kept``). Every writer is atomic, so nothing half-written stays;
    a writer's own ``NullBoothError`` gets the same context."""
    try:
        yield
    except (OSError, SafetensorError, NullBoothError) as err:  # safetensors reports write errors as SafetensorError
        why = getattr(err, "strerror", None) or str(err).splitlines()[0]
        where = f" at {err.filename}" if getattr(err, "filename", None) else ""
        raise NullBoothError(f"{doing} failed ({why}{where}); {kept}") from None


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


def run_manifest(plan: Plan, cfg: Config, timesteps: Sequence[int], status: str, *, run_dir: Path | None = None,
                 base: RunData | None = None, accumulators: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of ``plan``'s run: identity and key, config, layers, timesteps and how it was collected
    (``accumulators``: where the sums were held and in what precision)."""
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
    if accumulators is not None:
        manifest["accumulators"] = accumulators
    if base is not None:
        manifest["derived_from"] = [{"run": str(base.path), "key": base.key, "how": "extended",
                                     "exact_timestep_sums": base.exact_timesteps}]
    return manifest


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
                  extra: dict[str, Any], C: torch.Tensor | None = None, spec: Spectrum | None = None) -> dict[str, Any]:
    lam, null_dim, storage = write_matrix(folder, feature, stat.moment() if C is None else C,
                                          mode=settings.nullspace_mode, threshold=settings.nullspace_threshold,
                                          storage=settings.storage, energy=settings.storage_energy, spec=spec)
    metadata = _metadata(shape, stat, lam, null_dim, settings, storage, extra)
    # Keyed by the name after the feature, so the k files' CRCs also describe their hard links under v.
    metadata["file_crc32"] = {name[len(feature) + 1:]: file_crc32(folder / name)
                              for name in all_matrix_files(feature)
                              if (folder / name).exists()}
    write_json(folder / f"{feature}_metadata.json", {**metadata, "feature": feature})
    return metadata


def _write_decomposed(jobs: list[tuple[Path, str, SecondMoment, list[int], dict[str, Any]]], settings: StoreSettings,
                      written: Callable[[dict[str, Any]], None]) -> None:
    """Write ``(folder, feature, statistic, shape, extra)`` matrices, decomposed in batches of one width of at most
    ``BATCH_BYTES`` of float64 (so a timestep's batch memory stays bounded whatever the model)."""
    jobs = sorted(jobs, key=lambda job: job[2].dim)
    start = 0
    while start < len(jobs):
        end, size = start, 0
        while end < len(jobs) and jobs[end][2].dim == jobs[start][2].dim and (end == start or size < BATCH_BYTES):
            size += 8 * jobs[end][2].dim ** 2
            end += 1
        moments = [job[2].moment() for job in jobs[start:end]]  # [d, d] float64 each, on the statistics' device
        for (folder, feature, stat, shape, extra), C, spec in zip(jobs[start:end], moments, spectra(moments)):
            written(_write_matrix(folder, feature, stat, shape, settings, extra, C, spec))
        start = end


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

    with synced_at_exit(run_dir):  # durable together, before the manifest declares the run complete
        sums_meta = {"key": manifest["key"]}
        # The text statistic is summed already: its one decomposition serves its files and stats/summed_eig.
        text_eigh = {TEXT_KEY: eigh_batched([summed[TEXT_KEY].moment()])[0]} if {"k", "v"} & set(features) else {}
        for t in tqdm(sorted(timesteps, reverse=True), desc="null spaces", unit="timestep", leave=False,
                      disable=not progress):
            stats_t = timestep_stats(t) if any(f in ("q", "out") for f in features) else {}
            jobs = []
            for layer in layers:
                for feature in (f for f in features if f in ("q", "out")):
                    key = stat_key(layer, feature)
                    if key not in stats_t:
                        raise NullBoothError(f"no statistics for {key} at timestep {t}; the run's sums are incomplete")
                    jobs.append((run_dir / timestep_dirname(t) / layer_dirname(layer), feature, stats_t[key], shapes[key],
                                 {"timestep": t, "layer_name": layer}))
            _write_decomposed(jobs, settings, note)
            for layer in layers:
                folder = run_dir / timestep_dirname(t) / layer_dirname(layer)
                extra = {"timestep": t, "layer_name": layer}
                for feature in (f for f in features if f in ("k", "v")):
                    # k and v: one text statistic for every layer and timestep — write it once, hard-link the rest.
                    if text_source is None:
                        text_meta = _write_matrix(folder, feature, summed[TEXT_KEY], shapes[TEXT_KEY], settings, extra,
                                                  spec=Spectrum.of_eigh(*text_eigh[TEXT_KEY]))
                        note(text_meta)
                        text_source = (folder, feature)
                    elif (folder, feature) != text_source:
                        source_folder, source_feature = text_source
                        for name in all_matrix_files(feature):
                            (folder / name).unlink(missing_ok=True)
                        for name in matrix_files(source_feature, text_meta.get("storage", {}).get("mode", settings.storage)):
                            if (source_folder / name).exists():
                                link_or_copy(source_folder / name, folder / (feature + name[len(source_feature):]))
                    write_json(folder / f"{feature}_metadata.json", {**text_meta, **extra, "feature": feature})
            if settings.keep_timestep_sums and stats_t:
                save_timestep_sums(run_dir, t, stats_t, sums_meta)

        meta = {"key": manifest["key"], "timesteps": json.dumps(sorted(timesteps)), "shapes": json.dumps(dict(shapes))}
        save_statistics(run_dir / SUMMED_STATS, summed, meta)
        save_summed_spectra(run_dir, summed, manifest["key"], known=text_eigh)
        if report["null_dim_changed"]:
            log.warning("storage %s: %d of %d matrices read back with another null dimension (max change %d); "
                        "projectors are stored exactly, the covariances approximately (max relative error %.2g)",
                        settings.storage, report["null_dim_changed"], report["matrices"], report["max_null_dim_change"],
                        report["max_reconstruction_rel_error"])
    write_json(run_dir / MANIFEST, {**manifest, "status": "complete", "storage_report": report})
    shutil.rmtree(run_dir / COLLECT_CHECKPOINT.parent, ignore_errors=True)
    return report


def summed_statistics(by_timestep: Mapping[int, Mapping[str, SecondMoment]],
                      text: SecondMoment | None) -> dict[str, SecondMoment]:
    """``Σ_t S_t`` and ``Σ_t n_t`` of every q/out statistic, and the text statistic under ``TEXT_KEY``."""
    summed: dict[str, SecondMoment] = {}
    for t in sorted(by_timestep):  # a fixed order, so a resumed run adds in the same order as a straight one
        for key, stat in sorted(by_timestep[t].items()):
            summed.setdefault(key, SecondMoment(stat.dim, device=stat.sum.device)).merge(stat)
    if text is not None:
        summed[TEXT_KEY] = text
    return summed


def finalize(run_dir: Path, plan: Plan, acc: Accumulators, cfg: Config, timesteps: Sequence[int],
             progress: bool = True, *, base: RunData | None = None) -> None:
    """Write the seed layout, the summed statistics, prompts and manifest (adding ``base``'s sums); drop the checkpoint."""
    recorded = sorted(acc.by_timestep, reverse=True)
    if any(f in ("q", "out") for f in plan.features):
        if set(recorded) != set(timesteps):
            log.debug("recorded timesteps %s differ from the scheduler's %s; using the recorded ones", recorded, timesteps)
        timesteps = recorded
    summed = summed_statistics(acc.by_timestep, acc.text)
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
              manifest=run_manifest(plan, cfg, timesteps, "complete", run_dir=run_dir, base=base,
                                    accumulators=acc.plan.describe() if acc.plan is not None else None),
              progress=progress)
