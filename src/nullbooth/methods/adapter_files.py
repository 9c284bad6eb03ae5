"""Adapter files and where the bases come from.

:func:`bases_from_run` turns a collection run's timestep-summed statistics into one null-space basis per
protected weight (docs/design.md §2); :func:`save_adapter` / :func:`load_adapter` write and read the trained
adapters as safetensors + JSON (``nullbooth_adapter.safetensors``, ``nullbooth_adapter_config.json``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from nullbooth import __version__
from nullbooth.config import NullspaceMode
from nullbooth.errors import NullBoothError
from nullbooth.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEGACY_ADAPTER_CONFIG
from nullbooth.io import load_tensors, read_json, save_tensors, write_json
from nullbooth.methods.adapters import inject_null_space_adapters, null_space_adapters, target_name
from nullbooth.runs.layout import TEXT_KEY, load_summed_statistics, read_manifest, stat_key, summed_spectra
from nullbooth.stats.capture import CrossAttentionLayer
from nullbooth.stats.nullspace import NullSpace, Spectrum, empty_fix, full_fix, null_space_of

ADAPTER_FORMAT = "nullbooth-adapter"
ADAPTER_FORMAT_VERSION = 1
NULLSPACE_MODES: tuple[str, ...] = get_args(NullspaceMode)


# --------------------------------------------------------------------------- bases from a collection run


def bases_from_run(run_dir: str | Path, layers: Sequence[CrossAttentionLayer | str] | None = None,
                   features: Sequence[str] | None = None, mode: str | None = None, threshold: float | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Null-space bases ``U`` (float64 ``[in, k]``) of every target from a run's timestep-summed statistics.

    One projector per weight comes from ``Σ_t Σ xxᵀ`` (docs/design.md §2). ``layers``/``features`` default to
    the run's; ``mode``/``threshold`` to the run's ``nullspace_mode``/``nullspace_threshold``. k and v
    read the same text statistic and get the same tensor. The ``eigh`` of each statistic is the one finalize stored
    (``stats/summed_eig.safetensors``); a run without it is decomposed here, batched by width.
    ``CrossAttentionLayer`` arguments are checked against the run (names, input widths): all mismatches
    are reported in one error. The second value holds per target ``dim``, ``null_dim``,
    ``lambda_max_null`` (the leakage bound: ``‖ΔW X₀‖²_F / n ≤ ‖ΔW‖²_F · lambda_max_null``), ``lambda_min``,
    ``lambda_max``, ``n_samples``, ``mode``, ``threshold``.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "complete":
        raise NullBoothError(
            f"{run_dir} is an incomplete collection run (status {manifest.get('status')!r}); "
            "finish it with `nullbooth collect` (it resumes) or point at a complete run"
        )
    settings = manifest.get("nullbooth", {})
    mode = mode if mode is not None else settings.get("nullspace_mode", "absolute")
    if mode not in NULLSPACE_MODES:
        raise NullBoothError(f"nullspace_mode: expected one of {list(NULLSPACE_MODES)}, got {mode!r}")
    threshold = float(threshold if threshold is not None else settings.get("nullspace_threshold", 2e-2))
    run_layers = {entry["name"]: entry for entry in manifest["layers"]}
    run_features = list(manifest["features"])
    features = list(features) if features is not None else run_features

    problems = []
    missing_features = [f for f in features if f not in run_features]
    if missing_features:
        problems.append(f"features {missing_features} were not collected (the run has {run_features})")
    selected: list[tuple[str, CrossAttentionLayer | None]] = []
    for layer in layers if layers is not None else list(run_layers):
        name = layer.name if isinstance(layer, CrossAttentionLayer) else str(layer)
        if name not in run_layers:
            problems.append(f"layer {name} is not in the run")
            continue
        selected.append((name, layer if isinstance(layer, CrossAttentionLayer) else None))
        if isinstance(layer, CrossAttentionLayer):
            for f in features:
                recorded = run_layers[name].get("weight_shapes", {}).get(f)
                if recorded is not None and list(recorded) != list(layer.linear(f).weight.shape):
                    problems.append(f"{target_name(name, f)}: the run recorded weight {recorded}, "
                                    f"the model has {list(layer.linear(f).weight.shape)}")
    if problems:
        raise NullBoothError(
            f"the statistics run {run_dir} does not match the requested layers ({len(problems)} problem(s)): "
            + "; ".join(problems) + "; collect statistics for this model and these layers (nullbooth collect)"
        )

    stats = load_summed_statistics(run_dir)
    summed = {(TEXT_KEY if f in ("k", "v") else stat_key(name, f)): stats[(name, f)] for name, _ in selected for f in features}
    # The eigh stored at finalize (checked against the statistic in O(d²)); only an older run decomposes here.
    eig = summed_spectra(run_dir, manifest["key"], summed)
    cache: dict[str, NullSpace] = {}  # summed key → NullSpace: k and v share the text statistic's
    bases: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, _ in selected:
        for f in features:
            stat, key = stats[(name, f)], TEXT_KEY if f in ("k", "v") else stat_key(name, f)
            if key not in cache:
                cache[key] = null_space_of(Spectrum.of_eigh(*eig[key]), mode, threshold)
            ns = cache[key]
            path = target_name(name, f)
            bases[path] = ns.basis
            info[path] = {
                "layer": name, "feature": f, "dim": ns.dim, "null_dim": ns.null_dim,
                "lambda_max_null": ns.leakage_bound(), "lambda_min": float(ns.eigenvalues[0]),
                "lambda_max": float(ns.eigenvalues[-1]), "n_samples": stat.count, "mode": mode, "threshold": threshold,
            }
    _warn_degenerate(info, mode, threshold)
    return bases, info


def _warn_degenerate(info: Mapping[str, Mapping[str, Any]], mode: str, threshold: float) -> None:
    empty = [p for p, i in info.items() if i["null_dim"] == 0]
    full = [p for p, i in info.items() if i["null_dim"] == i["dim"]]
    if empty:
        warnings.warn(
            f"{len(empty)} of {len(info)} weights have an empty null space under nullspace_mode '{mode}' "
            f"threshold {threshold:g}: nothing can be learned in "
            f"{', '.join(empty[:4])}{', …' if len(empty) > 4 else ''}; "
            f"{empty_fix(mode, [(info[p]['lambda_min'], info[p]['lambda_max']) for p in empty])}",
            stacklevel=3,
        )
    if full:
        warnings.warn(
            f"{len(full)} of {len(info)} weights have a null space equal to their whole input space under "
            f"nullspace_mode '{mode}' threshold {threshold:g}: nothing is protected in "
            f"{', '.join(full[:4])}{', …' if len(full) > 4 else ''}; {full_fix(mode)}",
            stacklevel=3,
        )

# --------------------------------------------------------------------------- save / load


def save_adapter(output_dir: str | Path, unet: nn.Module, config: Mapping[str, Any]) -> Path:
    """Write ``nullbooth_adapter.safetensors`` (``M`` per target, ``U`` per distinct basis, float32) and
    ``nullbooth_adapter_config.json`` (``config`` — method, base model, statistics run, thresholds … — plus targets,
    null dimensions and versions). Both files are written atomically. Returns ``output_dir``.

    k and v of every layer share the text basis; identical bases are stored once (``basis.<i>``).
    """
    import diffusers

    wrappers = null_space_adapters(unet)
    if not wrappers:
        raise NullBoothError("expected a UNet with null-space adapters to save, found none; inject them first")
    try:
        json.dumps(dict(config))
    except (TypeError, ValueError) as err:
        raise NullBoothError(f"save_adapter: config must be JSON-serialisable ({err})") from None
    tensors: dict[str, torch.Tensor] = {}
    unique: list[torch.Tensor] = []
    targets: dict[str, dict[str, Any]] = {}
    for path, w in wrappers.items():
        U = w.basis.detach().to("cpu", torch.float32)
        idx = next((i for i, V in enumerate(unique) if V.shape == U.shape and torch.equal(V, U)), None)
        if idx is None:
            idx = len(unique)
            unique.append(U)
            tensors[f"basis.{idx}"] = U
        M = w.M.detach().to("cpu", torch.float32) if w.M is not None else torch.zeros(w.out_features, 0)
        tensors[f"{path}.M"] = M
        targets[path] = {"in_features": w.in_features, "out_features": w.out_features, "null_dim": w.null_dim,
                         "basis": f"basis.{idx}"}
    meta = {
        **dict(config),
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "targets": targets,
        "null_dims": {p: t["null_dim"] for p, t in targets.items()},
        "versions": {"nullbooth": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    meta.setdefault("method", "nullbooth")
    output_dir = Path(output_dir)
    save_tensors(output_dir / ADAPTER_WEIGHTS, tensors, {"format": "pt", "nullbooth_format": ADAPTER_FORMAT})
    write_json(output_dir / ADAPTER_CONFIG, meta)
    return output_dir


def _adapter_files(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    folder = path.parent if path.is_file() else path
    config = folder / ADAPTER_CONFIG
    if not config.exists() and (folder / LEGACY_ADAPTER_CONFIG).exists():
        config = folder / LEGACY_ADAPTER_CONFIG
    return folder / ADAPTER_WEIGHTS, config


def load_adapter(unet: nn.Module, path: str | Path) -> dict[str, Any]:
    """Inject the adapters saved by :func:`save_adapter` into ``unet``; return the saved config.

    Refuses, listing every mismatch, a model whose target names or widths differ from the saved ones.
    """
    weights_path, config_path = _adapter_files(path)
    meta = read_json(config_path, f"a nullbooth adapter config ({ADAPTER_CONFIG})")
    if meta.get("format") != ADAPTER_FORMAT:
        raise NullBoothError(f"{config_path} is not a nullbooth adapter config (format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > ADAPTER_FORMAT_VERSION:
        raise NullBoothError(
            f"{config_path} has adapter format version {meta['format_version']}, this nullbooth reads up to "
            f"{ADAPTER_FORMAT_VERSION}; upgrade nullbooth"
        )
    tensors, _ = load_tensors(weights_path, f"nullbooth adapter weights ({ADAPTER_WEIGHTS})")
    problems: list[str] = []
    bases: dict[str, torch.Tensor] = {}
    for target, spec in meta["targets"].items():
        U, M = tensors.get(spec["basis"]), tensors.get(f"{target}.M")
        if U is None or M is None:
            problems.append(f"{target}: weights missing from {weights_path.name} (corrupt or mismatched files)")
            continue
        if tuple(U.shape) != (spec["in_features"], spec["null_dim"]) or tuple(M.shape) != (spec["out_features"], spec["null_dim"]):
            problems.append(f"{target}: stored tensors U {tuple(U.shape)}, M {tuple(M.shape)} disagree with the config")
            continue
        try:
            linear = unet.get_submodule(target)
        except AttributeError:
            problems.append(f"{target}: the model has no such module")
            continue
        if not isinstance(linear, nn.Linear):
            problems.append(f"{target}: expected nn.Linear, got {type(linear).__name__}")
            continue
        if (linear.in_features, linear.out_features) != (spec["in_features"], spec["out_features"]):
            problems.append(f"{target}: saved for [out={spec['out_features']}, in={spec['in_features']}], "
                            f"the model has [out={linear.out_features}, in={linear.in_features}]")
            continue
        bases[target] = U
    if problems:
        model = meta.get("pretrained_model_name_or_path") or meta.get("base_model") or "another model"
        raise NullBoothError(
            f"the adapter at {weights_path.parent} does not fit this UNet ({len(problems)} problem(s)): "
            + "; ".join(problems[:8]) + ("; …" if len(problems) > 8 else "")
            + f"; load it into the model it was trained on ({model})"
        )
    wrappers = inject_null_space_adapters(unet, bases)
    with torch.no_grad():
        for target, wrapper in wrappers.items():
            if wrapper.M is not None:
                wrapper.M.copy_(tensors[f"{target}.M"])
    return meta
