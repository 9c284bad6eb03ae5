"""What ``nullbooth inspect`` and ``nullbooth validate`` compute: tables over a run's matrices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nullbooth.config import NullspaceMode
from nullbooth.errors import NullBoothError
from nullbooth.io import load_npy
from nullbooth.runs.identity import model_fingerprint
from nullbooth.runs.layout import (
    layer_dirname,
    load_covariance_data,
    load_summed_statistics,
    matrix_file,
    read_manifest,
    timestep_dirname,
)
from nullbooth.stats.capture import cross_attention_layers
from nullbooth.stats.nullspace import null_dimension, spectrum, validate_covariance

MODES: tuple[NullspaceMode, ...] = ("absolute", "relative", "energy", "rank", "percentile")


def check_model(run_dir: Path, pipe) -> None:
    """Refuse a run collected on another model (different attn2 layers, widths or weights)."""
    manifest = read_manifest(run_dir)
    layers = {l.name: l.weight_shapes() for l in cross_attention_layers(pipe.unet)}
    for layer in manifest["layers"]:
        if layer["name"] not in layers:
            raise NullBoothError(
                f"{run_dir} was collected on a model with layer {layer['name']}, which this model lacks; "
                "use a run collected on this model or recollect"
            )
        if layers[layer["name"]] != layer["weight_shapes"]:
            raise NullBoothError(
                f"{run_dir}: layer {layer['name']} has weight shapes {layer['weight_shapes']} in the run but "
                f"{layers[layer['name']]} in this model; the run is from a different model — recollect"
            )
    got = model_fingerprint(pipe)["weights_sha256"]
    if manifest["identity"]["model"]["weights_sha256"] != got:
        raise NullBoothError(
            f"{run_dir} was collected on different weights (fingerprint {manifest['identity']['model']['weights_sha256'][:12]} "
            f"vs this model's {got[:12]}); use a run of this model or recollect"
        )


def inspect_run(run_dir: Path, mode: NullspaceMode | None = None, threshold: float | None = None) -> list[dict[str, Any]]:
    """Per layer and feature, from the timestep-summed statistics: dims, null dims, spectrum ends, counts."""
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "complete":
        raise NullBoothError(f"{run_dir} is not complete (status {manifest.get('status')!r}); rerun `nullbooth collect` to finish it")
    mode = mode or manifest["nullbooth"]["nullspace_mode"]
    threshold = manifest["nullbooth"]["nullspace_threshold"] if threshold is None else threshold
    rows = []
    cache: dict[int, Any] = {}
    for (layer, feature), stat in load_summed_statistics(run_dir).items():
        lam = cache.get(id(stat))
        if lam is None:
            lam = cache[id(stat)] = spectrum(stat.moment()).eigenvalues
        rows.append({
            "layer": layer, "feature": feature, "dim": stat.dim,
            "null_dim": null_dimension(lam, mode, threshold),
            "lambda_min": float(lam[0]), "lambda_max": float(lam[-1]), "n_samples": stat.count,
        })
    return rows


def inspect_matrix(path: Path, settings: Sequence[tuple[NullspaceMode, float]]) -> list[dict[str, Any]]:
    """Null dimension of one ``.npy`` second moment under several (mode, threshold) settings."""
    C = load_npy(path)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise NullBoothError(f"expected a square matrix in {path}, got shape {C.shape}")
    lam = spectrum(torch.from_numpy(C.astype(np.float64))).eigenvalues
    return [{"matrix": Path(path).name, "mode": m, "threshold": t, "dim": C.shape[0],
             "null_dim": null_dimension(lam, m, t), "lambda_min": float(lam[0]), "lambda_max": float(lam[-1])}
            for m, t in settings]


def validate_run(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The seed's checks on every stored matrix plus projector and metadata consistency; returns (rows, problems)."""
    manifest = read_manifest(run_dir)
    rows, problems = [], []
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    for t in manifest["timesteps"]:
        for layer in manifest["layers"]:
            for feature in manifest["features"]:
                where = f"{timestep_dirname(t)}/{layer_dirname(layer['name'])}/{feature}"
                try:
                    data = load_covariance_data(t, layer["name"], feature, run_dir)
                except NullBoothError as err:
                    problems.append(str(err))
                    continue
                path = matrix_file(run_dir, t, layer["name"], feature)
                inode = (path.stat().st_dev, path.stat().st_ino)
                checks = seen.get(inode) or validate_covariance(data["covariance"])
                seen[inode] = checks
                meta, C, P = data["metadata"], data["covariance"], data["projection"]
                expected_width = layer["weight_shapes"][feature][1]
                row = {"where": where, **checks, "null_dim": meta.get("null_space_dim")}
                if C.shape != (expected_width, expected_width):
                    problems.append(f"{where}: covariance shape {C.shape}, expected ({expected_width}, {expected_width}) from the manifest")
                if meta.get("feature_dim") != C.shape[0]:
                    problems.append(f"{where}: metadata feature_dim {meta.get('feature_dim')} != matrix width {C.shape[0]}")
                if P is not None:
                    P64 = P.astype(np.float64)
                    idem = float(np.abs(P64 @ P64 - P64).max())
                    row["projector_idempotence_error"] = idem
                    if idem > 1e-4 or not np.allclose(P64, P64.T, atol=1e-5):
                        problems.append(f"{where}: projection is not a symmetric idempotent matrix (‖P²−P‖∞ = {idem:.2e})")
                    rank = int(round(np.trace(P64)))
                    if rank != meta.get("null_space_dim"):
                        problems.append(f"{where}: projection rank {rank} != metadata null_space_dim {meta.get('null_space_dim')}")
                elif meta.get("null_space_dim", 0):
                    problems.append(f"{where}: metadata says null_space_dim {meta['null_space_dim']} but the projection file is missing")
                for check in ("finite", "symmetric", "positive_semidefinite"):
                    if not checks[check]:
                        problems.append(f"{where}: covariance fails the {check.replace('_', ' ')} check")
                rows.append(row)
    return rows, problems


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain aligned text table (floats in 4 significant digits)."""
    if not rows:
        return "(empty)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, body)])
