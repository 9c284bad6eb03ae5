"""What ``nullbooth inspect`` and ``nullbooth validate`` compute: tables over a run's matrices, and its problems.

Neither decomposes what finalize decomposed already: spectra come from ``stats/summed_eig.safetensors`` (checked
against the statistics in ``O(d²)``) and from each matrix's metadata (trusted while the files' CRC-32 match);
``eigvalsh`` runs only where a stored value is missing (older runs: same answers, slower). A file hard-linked into
many folders (the k/v text matrix) is read and checked once; projectors are checked on random probes, ``O(d²)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nullbooth.config import NullspaceMode
from nullbooth.errors import NullBoothError
from nullbooth.io import load_npy, read_json
from nullbooth.runs.identity import model_fingerprint
from nullbooth.runs.layout import (
    TEXT_KEY,
    file_crc32,
    layer_dirname,
    load_covariance_data,
    load_summed_statistics,
    manifest_problems,
    read_manifest,
    read_run_prompts,
    stat_key,
    stored_summed_spectra,
    summed_problems,
    timestep_dirname,
)
from nullbooth.runs.shards import checkpoint_shards, read_checkpoints
from nullbooth.stats.capture import cross_attention_layers
from nullbooth.stats.compress import all_matrix_files
from nullbooth.stats.nullspace import (
    eigenvalues,
    empty_fix,
    full_fix,
    is_symmetric,
    null_dimension,
    validate_covariance,
)

MODES: tuple[NullspaceMode, ...] = ("absolute", "relative", "energy", "rank", "percentile")


def check_model(run_dir: Path, pipe, *, statistics: bool = True) -> None:
    """Refuse a run collected on another model (different attn2 layers, widths or weights) and, with
    ``statistics``, a run whose summed statistics training could not use."""
    manifest = read_manifest(run_dir)
    damaged = manifest_problems(manifest)
    if damaged:
        raise NullBoothError(f"{run_dir}: {damaged[0]}; the manifest is damaged or foreign — collect the run again")
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
    want = manifest["identity"].get("model", {}).get("weights_sha256", "?")
    if want != got:
        raise NullBoothError(
            f"{run_dir} was collected on different weights (fingerprint {want[:12]} vs this model's {got[:12]}); "
            "use a run of this model or recollect"
        )
    if statistics:
        broken = summed_problems(run_dir, manifest, spectral=False)
        if broken:
            raise NullBoothError(f"{run_dir}: {broken[0]}{_more(broken)}; training cannot use this run — "
                                 f"`nullbooth validate {run_dir}` lists its problems; collect a new run "
                                 "(`nullbooth collect --fresh` with its config)")


def _more(problems: Sequence[str]) -> str:
    return f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""


def inspect_run(run_dir: Path, mode: NullspaceMode | None = None, threshold: float | None = None) -> list[dict[str, Any]]:
    """Per layer and feature, from the timestep-summed statistics: dims, null dims, spectrum ends, counts."""
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "complete":
        raise NullBoothError(f"{run_dir} is not complete (status {manifest.get('status')!r}); rerun `nullbooth collect` to finish it")
    mode = mode or manifest["nullbooth"]["nullspace_mode"]
    threshold = manifest["nullbooth"]["nullspace_threshold"] if threshold is None else threshold
    stats = load_summed_statistics(run_dir)
    keys = {pair: TEXT_KEY if pair[1] in ("k", "v") else stat_key(*pair) for pair in stats}
    summed = {keys[pair]: stat for pair, stat in stats.items()}
    spectra = {k: lam.clamp(min=0) for k, (lam, _) in
               stored_summed_spectra(run_dir, manifest["key"], summed, vectors=False).items()}
    rows = []
    for (layer, feature), stat in stats.items():
        key = keys[(layer, feature)]
        if key not in spectra:  # a run finalized before summed_eig existed (or changed since)
            spectra[key] = eigenvalues(stat.moment())
        lam = spectra[key]
        rows.append({
            "layer": layer, "feature": feature, "dim": stat.dim, "mode": mode, "threshold": threshold,
            "null_dim": null_dimension(lam, mode, threshold),
            "lambda_min": float(lam[0]), "lambda_max": float(lam[-1]), "n_samples": stat.count,
        })
    return rows


def inspect_matrix(path: Path, settings: Sequence[tuple[NullspaceMode, float]]) -> list[dict[str, Any]]:
    """Null dimension of one ``.npy`` second moment under several (mode, threshold) settings."""
    C = load_npy(path)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise NullBoothError(f"expected a square matrix in {path}, got shape {C.shape}")
    lam = eigenvalues(torch.from_numpy(C.astype(np.float64)))
    return [{"matrix": Path(path).name, "mode": m, "threshold": t, "dim": C.shape[0],
             "null_dim": null_dimension(lam, m, t), "lambda_min": float(lam[0]), "lambda_max": float(lam[-1])}
            for m, t in settings]


def null_space_advice(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One warning per :func:`inspect_run`/:func:`inspect_matrix` row whose null space is empty or everything,
    with the fix its mode needs (the same words ``train`` uses)."""
    out = []
    for row in rows:
        name = f"{row.get('layer', row.get('matrix'))}/{row.get('feature', row['mode'])}"
        setting = f"{row['mode']} threshold {row['threshold']:g}"
        if row["null_dim"] == 0:
            out.append(f"{name}: the null space is empty ({setting}, λ_min = {row['lambda_min']:.4g}) — nothing can be "
                       f"learned there; {empty_fix(row['mode'], [(row['lambda_min'], row['lambda_max'])])}")
        elif row["null_dim"] == row["dim"]:
            out.append(f"{name}: the null space is the whole space ({setting}) — nothing is protected; "
                       f"{full_fix(row['mode'])}")
    return out


def validate_run(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Everything training and the seed's loader read from a run, checked: the manifest, the summed statistics
    (present, readable, expected keys and widths, finite, symmetric, PSD), the prompts, every stored matrix
    (the seed's checks) with its projector and metadata; of an unfinished run, its checkpoints.

    Returns ``(rows, problems)``: one row per stored matrix, one line per problem.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    problems = manifest_problems(manifest)
    if problems:
        return [], problems
    if manifest["status"] != "complete":
        return [], _unfinished(run_dir, manifest)
    problems = summed_problems(run_dir, manifest)
    if manifest["identity"].get("prompts_sha256"):
        try:
            read_run_prompts(run_dir, manifest)
        except NullBoothError as err:
            problems.append(str(err))
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[tuple[int, int], ...], dict[str, Any]] = {}  # the files' inodes → what they were found to be
    for t in manifest["timesteps"]:
        for layer in manifest["layers"]:
            for feature in manifest["features"]:
                row, found = _check_matrix(run_dir, int(t), layer, feature, seen)
                problems += found
                if row is not None:
                    rows.append(row)
    return rows, problems


def _unfinished(run_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The one problem of a run still collecting: how far its checkpoints got (or that they are unreadable)."""
    try:
        files = read_checkpoints(run_dir)
    except NullBoothError as err:
        return [f"{run_dir} is unfinished (status {manifest['status']!r}) and {err}"]
    done = sum(sum(checkpoint_shards(meta).values()) for meta in files.values())
    collection = manifest.get("collection", {})
    total = -(-int(collection.get("prompts_sampled", 0)) // max(int(collection.get("batch_size", 1)), 1))
    return [f"{run_dir} is unfinished (status {manifest['status']!r}, {done} of {total or '?'} prompt batches in its "
            "checkpoints): training cannot use it yet; rerun `nullbooth collect` with its config to finish it"]


def _check_matrix(run_dir: Path, t: int, layer: dict[str, Any], feature: str,
                  seen: dict[tuple[tuple[int, int], ...], dict[str, Any]]) -> tuple[dict[str, Any] | None, list[str]]:
    """The seed's checks of one stored matrix, its projector and its metadata: ``(row, problems)``.

    The files are read and checked once per set of inodes (``seen``); the metadata, one per folder, always.
    """
    where = f"{timestep_dirname(t)}/{layer_dirname(layer['name'])}/{feature}"
    folder = run_dir / timestep_dirname(t) / layer_dirname(layer["name"])
    names = all_matrix_files(feature)
    inodes = tuple((st.st_dev, st.st_ino) for st in (_stat(folder / n) for n in names) if st is not None)
    facts = seen.get(inodes) if inodes else None
    try:
        if facts is None:
            data = load_covariance_data(t, layer["name"], feature, run_dir)
            meta = data["metadata"]
        else:
            meta = read_json(folder / f"{feature}_metadata.json", "a metadata file")
    except NullBoothError as err:
        return None, [str(err)]
    if facts is None:
        facts = _file_facts(folder, feature, data["covariance"], data["projection"], meta)
        if inodes:
            seen[inodes] = facts
    width = int(layer["weight_shapes"][feature][1])
    if facts["shape"] != (width, width):
        return None, [f"{where}: covariance shape {facts['shape']}, expected ({width}, {width}) from the manifest"]
    checks = facts["checks"]
    row = {"where": where, **checks, "null_dim": meta.get("null_space_dim")}
    problems = []
    if meta.get("feature_dim") != facts["shape"][0]:
        problems.append(f"{where}: metadata feature_dim {meta.get('feature_dim')} != matrix width {facts['shape'][0]}")
    if facts["projection_shape"] is not None and facts["projection_shape"] != facts["shape"]:
        problems.append(f"{where}: projection shape {facts['projection_shape']}, expected {facts['shape']} like its covariance")
    elif facts["projection_shape"] is not None:
        idem = row["projector_idempotence_error"] = facts["idempotence"]
        if idem > 1e-4 or not facts["projection_symmetric"]:
            problems.append(f"{where}: projection is not a symmetric idempotent matrix (max ‖P(Px) − Px‖ over "
                            f"{PROBES} unit probes x = {idem:.2e})")
        elif facts["projection_rank"] != meta.get("null_space_dim"):
            problems.append(f"{where}: projection rank {facts['projection_rank']} != metadata null_space_dim "
                            f"{meta.get('null_space_dim')}")
    elif meta.get("null_space_dim", 0):
        problems.append(f"{where}: metadata says null_space_dim {meta['null_space_dim']} but the projection file is missing")
    for check in ("finite", "symmetric", "positive_semidefinite"):
        if not checks[check]:
            problems.append(f"{where}: covariance fails the {check.replace('_', ' ')} check")
    return row, problems


PROBES = 4  # random unit vectors a projector's idempotence is tested on


def _stat(path: Path):
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _file_facts(folder: Path, feature: str, C: np.ndarray, P: np.ndarray | None, meta: dict[str, Any]) -> dict[str, Any]:
    """What one matrix's files are: shape, the seed's covariance checks, and its projector's probe checks."""
    facts: dict[str, Any] = {"shape": tuple(C.shape), "checks": None, "projection_shape": None}
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        return facts
    facts["checks"] = validate_covariance(C, eigenvalues=_stored_eigenvalues(folder, feature, meta, C.shape[0]))
    if P is None:
        return facts
    facts["projection_shape"] = tuple(P.shape)
    if P.shape != C.shape:
        return facts
    finite = bool(np.isfinite(P).all())
    facts["projection_symmetric"] = finite and is_symmetric(P, rtol=1e-5, atol=1e-5)
    if not finite:
        facts.update(idempotence=float("inf"), projection_rank=-1)
        return facts
    P64 = P.astype(np.float64)  # the probes in float64: a float32 product's rounding would blur the 1e-4 test
    x = np.random.default_rng(0).standard_normal((P.shape[0], PROBES))
    x /= np.linalg.norm(x, axis=0)
    Px = P64 @ x  # [d, PROBES]: O(d²) per probe where P @ P would be O(d³)
    facts["idempotence"] = float(np.linalg.norm(P64 @ Px - Px, axis=0).max())
    facts["projection_rank"] = int(round(np.trace(P64)))
    return facts


def _stored_eigenvalues(folder: Path, feature: str, meta: dict[str, Any], d: int) -> np.ndarray | None:
    """The ascending float64 eigenvalues finalize recorded for this matrix, when its files still have the recorded
    CRC-32 (else ``None``: the caller decomposes). Not for ``eigh`` storage, whose matrix is a reconstruction."""
    crcs, values = meta.get("file_crc32"), meta.get("singular_values")
    if not isinstance(crcs, dict) or not isinstance(values, list) or len(values) != d \
            or (meta.get("storage") or {}).get("mode") == "eigh":
        return None
    present = {name[len(feature) + 1:]: folder / name
               for name in all_matrix_files(feature) if (folder / name).exists()}
    if set(present) != set(crcs) or any(file_crc32(path) != crcs[n] for n, path in present.items()):
        return None
    try:
        lam = np.asarray(values, dtype=np.float64)[::-1]
    except (TypeError, ValueError):
        return None
    return lam if np.isfinite(lam).all() else None


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
