"""The on-disk run layout (docs/design.md §4; §7, seed 000: "文件组织结构") and the run's readers.

::

    <cov_matrices_output_dir>/run_YYYYMMDD_HHMMSS/
        manifest.json                         what produced the run (model fingerprint, config, prompts hash, status)
        prompts.txt                           the run's prompts, one per line, in sample order
        timestep_XXXX/<layer with . → _>/     the seed's files, float32 .npy + JSON
            {q,k,v,out}_covariance.npy        C = Σxxᵀ / n at that timestep
            {q,k,v,out}_projection.npy        P = ÛÛᵀ (omitted when the null space is empty)
            {q,k,v,out}_metadata.json         original_shape, n_samples, feature_dim, null_space_dim,
                                              singular_values, nullspace_threshold (+ additions: file_crc32 of the
                                              matrix files, so validate can trust singular_values for them)
            {q,k,v,out}_eig.safetensors       instead of the two .npy files under storage "eigh" (compress.py)
        stats/summed.safetensors              float64 Σxxᵀ and n summed over timesteps: what training uses
        stats/summed_eig.safetensors          eigh of each Σxxᵀ/n (raw float64 eigenvalues + eigenvectors), written at
                                              finalize: training, inspect and validate decompose nothing again
        stats/timestep_sums/timestep_XXXX.safetensors   (optional) exact float64 per-timestep sums
        visualizations/                       pictures, when enabled
        .partial/checkpoint.safetensors       resumable collection state (one shard; checkpoint.rank{r}.safetensors
                                              per shard of a distributed run); gone once the run is complete
        .nullbooth.lock                       the collecting process's PID; locked while it runs (nullbooth.locks)

The text features (inputs of ``to_k``/``to_v``) are identical for every layer and timestep, so their
files are written once and hard-linked everywhere else: the layout is unchanged for readers, the
bytes are stored once.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nullbooth.errors import NullBoothError
from nullbooth.filenames import (
    MANIFEST,
    OLD_TIMESTEP_SUMS,
    PROMPTS_FILE,
    SUMMED_SPECTRA,
    SUMMED_STATS,
    TIMESTEP_SUMS_DIR,
)
from nullbooth.io import load_npy, load_tensors, read_json, save_tensors, write_text
from nullbooth.stats.compress import clean_projector, read_matrix
from nullbooth.stats.moments import PackedSecondMoment, SecondMoment
from nullbooth.stats.nullspace import eigh_batched

RUN_FORMAT = "nullbooth-run"
RUN_PATTERN = re.compile(r"^run_\d{8}_\d{6}(_\d+)?$")
TEXT_KEY = "text"  # the shared statistic of to_k/to_v inputs


def layer_dirname(layer_name: str) -> str:
    return layer_name.replace(".", "_")


def timestep_dirname(timestep: int) -> str:
    return f"timestep_{int(timestep):04d}"


def load_covariance_data(timestep: int, layer_name: str, feature_type: str, base_dir: str | os.PathLike) -> dict[str, Any]:
    """The seed's loader: ``{'covariance', 'projection' (or None), 'metadata'}`` of one matrix of a run.

    ``layer_name`` may be dotted (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``) or already
    underscored; ``timestep`` is the real denoising timestep (0–999).
    """
    if feature_type not in ("q", "k", "v", "out"):
        raise NullBoothError(f"feature_type must be one of q, k, v, out; got {feature_type!r}")
    layer_dir = Path(base_dir) / timestep_dirname(timestep) / layer_dirname(layer_name)
    if not layer_dir.is_dir():
        available = sorted(p.name for p in Path(base_dir).glob("timestep_*"))
        raise NullBoothError(
            f"no matrices for timestep {timestep}, layer {layer_name} under {base_dir}; "
            f"the run has {len(available)} timestep folders ({', '.join(available[:3])}{', …' if len(available) > 3 else ''})"
        )
    metadata = read_json(layer_dir / f"{feature_type}_metadata.json", "a metadata file")
    decoded = read_matrix(layer_dir, feature_type)  # storage "eigh"
    if decoded is not None:
        covariance, projection = decoded
    else:
        projection_path = layer_dir / f"{feature_type}_projection.npy"
        covariance = load_npy(layer_dir / f"{feature_type}_covariance.npy")
        projection = load_npy(projection_path) if projection_path.exists() else None
        if projection is not None and projection.dtype == np.float16:
            projection = clean_projector(projection)  # a rounded projector is not idempotent; return the nearest one
    return {"covariance": covariance, "projection": projection, "metadata": metadata}


def matrix_file(run_dir: str | os.PathLike, timestep: int, layer_name: str, feature: str) -> Path:
    """The file holding one stored matrix (its ``.npy`` covariance, or the ``eigh`` file of a compressed run)."""
    folder = Path(run_dir) / timestep_dirname(timestep) / layer_dirname(layer_name)
    eig = folder / f"{feature}_eig.safetensors"
    return eig if eig.exists() else folder / f"{feature}_covariance.npy"


# --------------------------------------------------------------------------- runs


def new_run_dir(output_dir: Path, stamp: str) -> Path:
    """``run_YYYYMMDD_HHMMSS`` (suffixed when two runs start in the same second)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    candidate, i = output_dir / f"run_{stamp}", 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate, i = output_dir / f"run_{stamp}_{i}", i + 1


def iter_runs(output_dir: Path) -> Iterator[Path]:
    if output_dir.is_dir():
        for p in sorted(output_dir.iterdir(), reverse=True):  # newest first
            if p.is_dir() and RUN_PATTERN.match(p.name):
                yield p


def read_manifest(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NullBoothError(f"expected a run directory at {run_dir}, found nothing; give a run_YYYYMMDD_HHMMSS folder")
    manifest = read_json(run_dir / MANIFEST, "a run manifest (manifest.json); is this a nullbooth run directory?")
    if manifest.get("format") != RUN_FORMAT:
        raise NullBoothError(f"{run_dir / MANIFEST} is not a nullbooth run manifest (format={manifest.get('format')!r})")
    return manifest


def stat_key(layer: str, feature: str) -> str:
    return f"{layer}/{feature}"


def save_statistics(path: Path, stats: Mapping[str, SecondMoment | PackedSecondMoment],
                    metadata: Mapping[str, str] | None = None) -> None:
    """Float64 sums and counts of named statistics in one safetensors file (exact merges); a packed statistic is
    stored as its upper triangle (``name::packed``)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, stat in stats.items():
        for part, value in stat.state_dict().items():
            tensors[f"{key}::{part}"] = value
    save_tensors(path, tensors, metadata)


def load_statistics(path: Path, *, keep_packed: bool = False,
                    ) -> tuple[dict[str, SecondMoment | PackedSecondMoment], dict[str, str]]:
    """The named statistics of a :func:`save_statistics` file; triangles are unpacked unless ``keep_packed``."""
    tensors, metadata = load_tensors(path, "a statistics file")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        key, _, part = name.rpartition("::")
        if not key:
            raise NullBoothError(f"{path} holds tensor {name!r}, which is not a nullbooth statistic; foreign file?")
        grouped.setdefault(key, {})[part] = value
    try:
        return {key: PackedSecondMoment.from_state_dict(parts) if keep_packed and "packed" in parts
                else SecondMoment.from_state_dict(parts) for key, parts in grouped.items()}, metadata
    except (KeyError, NullBoothError) as err:
        raise NullBoothError(f"{path} holds a statistic that is not a float64 sum and count ({err}); the file is "
                             "corrupt or foreign") from None


MANIFEST_FIELDS = {"status": str, "key": str, "identity": dict, "layers": list, "features": list, "timesteps": list}


def manifest_problems(manifest: Mapping[str, Any]) -> list[str]:
    """What a run's manifest lacks for training, inspection or validation to read it (empty when nothing)."""
    problems = [f"{MANIFEST} field {name!r}: expected a {kind.__name__}, got {type(manifest.get(name)).__name__}"
                for name, kind in MANIFEST_FIELDS.items() if not isinstance(manifest.get(name), kind)]
    for i, layer in enumerate(manifest.get("layers") or []):
        shapes = layer.get("weight_shapes") if isinstance(layer, dict) else None
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str) or not isinstance(shapes, dict) \
                or not all(isinstance(v, list) and len(v) == 2 for v in shapes.values()):
            problems.append(f"{MANIFEST} layers[{i}]: expected {{name, weight_shapes: {{feature: [out, in]}}}}")
    return problems


def expected_statistics(manifest: Mapping[str, Any]) -> dict[str, int]:
    """``{summed key: width}`` a complete run's ``stats/summed.safetensors`` must hold (k and v share ``TEXT_KEY``)."""
    out: dict[str, int] = {}
    for layer in manifest["layers"]:
        for feature in manifest["features"]:
            key = TEXT_KEY if feature in ("k", "v") else stat_key(layer["name"], feature)
            out[key] = int(layer["weight_shapes"][feature][1])
    return out


def summed_problems(run_dir: Path, manifest: Mapping[str, Any], *, spectral: bool = True) -> list[str]:
    """Why training could not use this run's ``stats/summed.safetensors`` (empty when it can).

    Present and readable; one statistic per expected key, square of the layer's input width, with samples;
    finite; symmetric; and (``spectral``) positive semi-definite up to float64 rounding.
    """
    problems = manifest_problems(manifest)
    if problems:
        return problems
    path = Path(run_dir) / SUMMED_STATS
    if not path.is_file():
        return [f"{SUMMED_STATS} is missing"]
    try:
        stats, meta = load_statistics(path)
    except NullBoothError as err:
        return [str(err)]
    if meta.get("key") not in (None, manifest["key"]):
        problems.append(f"{SUMMED_STATS} belongs to another run (key {str(meta.get('key'))[:12]}…)")
    stored = stored_summed_spectra(run_dir, manifest["key"], stats, vectors=False) if spectral else {}
    for key, width in expected_statistics(manifest).items():
        stat = stats.get(key)
        if stat is None:
            problems.append(f"{SUMMED_STATS} lacks the statistic {key}")
        elif stat.dim != width:
            problems.append(f"{SUMMED_STATS} {key}: expected a {width}×{width} sum, got {stat.dim}×{stat.dim}")
        elif stat.count <= 0:
            problems.append(f"{SUMMED_STATS} {key}: expected a positive sample count, got {stat.count}")
        else:
            known = stored.get(key)
            problems += [f"{SUMMED_STATS} {key}: {why}"
                         for why in _sum_problems(stat.sum, spectral, None if known is None else known[0])]
    return problems


def _sum_problems(S: torch.Tensor, spectral: bool, lam: torch.Tensor | None = None) -> list[str]:
    """``lam``: the stored (verified) raw eigenvalues of ``S / n``; the PSD test is scale-free, so they stand in for S's."""
    if not bool(torch.isfinite(S).all()):
        return ["holds NaN or Inf"]
    scale = float(S.abs().max())
    asym = float((S - S.T).abs().max())
    if asym > 1e-9 * scale:
        return [f"is not symmetric (max |S − Sᵀ| = {asym:.3g} of max |S| = {scale:.3g})"]
    if spectral:
        lam = torch.linalg.eigvalsh((S + S.T) / 2) if lam is None else lam  # ascending
        if float(lam[0]) < -1e-9 * max(float(lam[-1]), 0.0):
            return [f"is not positive semi-definite (λ_min = {float(lam[0]):.3g}, λ_max = {float(lam[-1]):.3g})"]
    return []


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes: finalize records it beside what it knows of the file (its spectrum), so a reader can
    tell that the file is still the one those facts describe (an accidental change, not a forgery, is what it catches)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def save_summed_spectra(run_dir: Path, summed: Mapping[str, SecondMoment], key: str, *,
                        known: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """``eigh`` of every timestep-summed moment ``C = Σxxᵀ / n`` (batched by width, on the statistics' device),
    stored once per run as raw ascending eigenvalues and eigenvectors (float64), under the run's ``key``.
    ``known``: raw ``eigh`` pairs the caller computed already (not decomposed again)."""
    known = dict(known or {})
    names = sorted(n for n in summed if n not in known)
    pairs = {**known, **dict(zip(names, eigh_batched([summed[n].moment() for n in names])))}
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(summed):
        lam, V = pairs[name]
        tensors[f"{name}::eigenvalues"], tensors[f"{name}::eigenvectors"] = lam.cpu(), V.cpu()
    save_tensors(Path(run_dir) / SUMMED_SPECTRA, tensors, {"key": key, "of": "eigh of each sum / count"})


PROBES = 4  # random vectors per stored decomposition check
PROBE_TOL = 1e-9  # relative residual a float64 eigh leaves is ~d·ε ≈ 3e-13 at d = 1280; a stale file is O(1) off


def decomposition_holds(C: torch.Tensor, lam: torch.Tensor, V: torch.Tensor, seed: int = 0) -> bool:
    """Whether ``C = V diag(λ) Vᵀ`` with orthonormal ``V``, tested on random probes in ``O(d²)`` (Freivalds' idea):
    ``‖Cx − V(λ ⊙ Vᵀx)‖ ≤ tol·max|λ|·‖x‖`` and ``‖Vᵀ(Vx) − x‖ ≤ tol·‖x‖``; a different matrix fails
    with probability 1 (the difference would have to annihilate every Gaussian probe)."""
    d = C.shape[0]
    if lam.shape != (d,) or V.shape != (d, d) or not (torch.isfinite(lam).all() and torch.isfinite(V).all()):
        return False
    x = torch.randn(d, PROBES, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(C.device)
    x /= x.norm(dim=0)
    scale = max(float(lam.abs().max()), 1e-300)
    fit = float((C @ x - V @ (lam[:, None] * (V.T @ x))).norm(dim=0).max())  # [d, PROBES] → worst column
    orth = float((V.T @ (V @ x) - x).norm(dim=0).max())
    return fit <= PROBE_TOL * scale and orth <= PROBE_TOL


def stored_summed_spectra(run_dir: Path, key: str, stats: Mapping[str, SecondMoment], *,
                          vectors: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{key: (raw ascending eigenvalues, eigenvectors or None)}`` of the summed statistics whose stored ``eigh``
    (``stats/summed_eig.safetensors``, written at finalize) is of this run and still decomposes the statistic
    (:func:`decomposition_holds`); statistics without one (an older run, a changed sum) are left out."""
    from safetensors import SafetensorError, safe_open

    path = Path(run_dir) / SUMMED_SPECTRA
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if not path.is_file():
        return out
    try:
        with safe_open(str(path), "pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return out
            names = set(fh.keys())
            for name, stat in stats.items():
                if f"{name}::eigenvalues" not in names or f"{name}::eigenvectors" not in names or stat.count <= 0:
                    continue
                lam, V = fh.get_tensor(f"{name}::eigenvalues"), fh.get_tensor(f"{name}::eigenvectors")
                if lam.dtype == V.dtype == torch.float64 and bool(torch.isfinite(stat.sum).all()) \
                        and decomposition_holds(stat.moment().cpu(), lam, V):
                    out[name] = (lam, V if vectors else None)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return {}  # unreadable: every statistic is decomposed again, as for an older run
    return out


def summed_spectra(run_dir: Path, key: str, stats: Mapping[str, SecondMoment]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Raw ``eigh`` of every summed moment: the stored one where it holds, else computed (batched) — the only
    decompositions training does, and none on a run finalized by this version."""
    out = {k: (lam, V) for k, (lam, V) in stored_summed_spectra(run_dir, key, stats).items() if V is not None}
    missing = [k for k in stats if k not in out]
    for k, pair in zip(missing, eigh_batched([stats[k].moment() for k in missing])):
        out[k] = pair
    return out


def load_summed_statistics(run_dir: Path) -> dict[tuple[str, str], SecondMoment]:
    """The timestep-summed statistic of every (layer, feature) of a complete run; k/v share the text statistic."""
    manifest = read_manifest(run_dir)
    problems = manifest_problems(manifest)
    if problems:
        raise NullBoothError(f"{run_dir}: {problems[0]}; the manifest is damaged or foreign — collect the run again "
                             "(`nullbooth collect --fresh`)")
    stats, _ = load_statistics(Path(run_dir) / SUMMED_STATS)
    out: dict[tuple[str, str], SecondMoment] = {}
    for layer in manifest["layers"]:
        for feature in manifest["features"]:
            key = TEXT_KEY if feature in ("k", "v") else stat_key(layer["name"], feature)
            if key not in stats:
                raise NullBoothError(f"{run_dir}: summed statistics lack {key}; the run is incomplete or corrupt")
            out[(layer["name"], feature)] = stats[key]
    return out


# --------------------------------------------------------------------------- whole runs (extend / merge)


def write_run_prompts(run_dir: Path, prompts: list[str]) -> None:
    write_text(Path(run_dir) / PROMPTS_FILE, "\n".join(prompts) + "\n")


def read_run_prompts(run_dir: Path, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """The prompts a run sampled, in order: its ``prompts.txt``, else its ``prompts_file`` when the hash still matches."""
    import hashlib

    manifest = manifest or read_manifest(run_dir)
    expected = manifest.get("identity", {}).get("prompts_sha256")
    candidates = [Path(run_dir) / PROMPTS_FILE]
    if manifest.get("prompts_file"):
        candidates.append(Path(manifest["prompts_file"]))
    for path in candidates:
        if not path.is_file():
            continue
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if hashlib.sha256("\n".join(prompts).encode()).hexdigest() == expected:
            return prompts
    raise NullBoothError(
        f"{run_dir}: cannot find the prompts this run was collected on (no {PROMPTS_FILE} in the run and "
        f"{manifest.get('prompts_file')!r} is missing or changed); restore that prompt file to extend or merge the run"
    )


def save_timestep_sums(run_dir: Path, timestep: int, stats: Mapping[str, SecondMoment], metadata: Mapping[str, str]) -> None:
    """Exact float64 sums of one timestep (``layer/feature`` keys): one file per timestep, so writers can stream."""
    save_statistics(Path(run_dir) / TIMESTEP_SUMS_DIR / f"{timestep_dirname(timestep)}.safetensors", stats, metadata)


def load_timestep_sums(run_dir: Path, timestep: int) -> dict[str, SecondMoment] | None:
    """The exact float64 sums of one timestep when the run kept them (either file layout), else ``None``."""
    path = Path(run_dir) / TIMESTEP_SUMS_DIR / f"{timestep_dirname(timestep)}.safetensors"
    if path.is_file():
        return load_statistics(path)[0]
    old = Path(run_dir) / OLD_TIMESTEP_SUMS
    if old.is_file():  # one file for all timesteps, keys "timestep_XXXX/<layer>/<feature>::part": read lazily
        from safetensors import safe_open

        prefix = f"{timestep_dirname(timestep)}/"
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(old), "pt") as fh:
            for name in fh.keys():
                if name.startswith(prefix):
                    key, _, part = name[len(prefix):].rpartition("::")
                    grouped.setdefault(key, {})[part] = fh.get_tensor(name)
        return {key: SecondMoment.from_state_dict(parts) for key, parts in grouped.items()} if grouped else None
    return None


def has_timestep_sums(run_dir: Path, timesteps: list[int]) -> bool:
    return all((Path(run_dir) / TIMESTEP_SUMS_DIR / f"{timestep_dirname(t)}.safetensors").is_file() for t in timesteps) \
        or (Path(run_dir) / OLD_TIMESTEP_SUMS).is_file()


class RunData:
    """A complete run opened for extension or merging: exact summed statistics, prompts, per-timestep sums.

    Per-timestep sums are exact (float64) when the run kept them (``nullbooth.keep_timestep_sums``);
    otherwise they are rebuilt as ``C_t · n_t`` from the stored matrices: per entry within float32
    rounding (2⁻²⁴ relative) for the default storage, within the recorded ``reconstruction_rel_error``
    for compressed storage. The timestep-summed statistics (what training uses) are always exact.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("status") != "complete":
            raise NullBoothError(
                f"{self.path} is not a complete run (status {self.manifest.get('status')!r}); finish it with "
                "`nullbooth collect` (it resumes) before extending or merging it"
            )
        self.identity: dict[str, Any] = self.manifest["identity"]
        self.key: str = self.manifest["key"]
        self.layers: list[str] = [layer["name"] for layer in self.manifest["layers"]]
        self.features: list[str] = list(self.manifest["features"])
        self.timesteps: list[int] = [int(t) for t in self.manifest["timesteps"]]
        self.summed, meta = load_statistics(self.path / SUMMED_STATS)
        self.shapes: dict[str, list[int]] = json.loads(meta["shapes"]) if "shapes" in meta else {}
        self.exact_timesteps = has_timestep_sums(self.path, self.timesteps)

    @property
    def text(self) -> SecondMoment | None:
        return self.summed.get(TEXT_KEY)

    def prompts(self) -> list[str]:
        return read_run_prompts(self.path, self.manifest)

    def segments(self) -> list[dict[str, int]]:
        """``[{start, n, seed}]``: sample ``i`` of a segment used prompt index ``start + i`` and seed ``seed + start + i``."""
        return self.identity.get("prompt_segments") or [
            {"start": 0, "n": int(self.identity["n_prompts"]), "seed": int(self.identity["seed"])}]

    def segment_parts(self) -> list[tuple[dict[str, int], list[str]]]:
        prompts, parts, at = self.prompts(), [], 0
        for seg in self.segments():
            parts.append((dict(seg), prompts[at:at + seg["n"]]))
            at += seg["n"]
        return parts

    def next_index(self) -> int:
        """The first prompt index no segment uses: where an extension's prompts start."""
        return max(seg["start"] + seg["n"] for seg in self.segments())

    def timestep(self, t: int) -> dict[str, SecondMoment]:
        """``{layer/feature: Σ xxᵀ, n}`` of q/out at timestep ``t`` (exact, or rebuilt from the stored matrices)."""
        exact = load_timestep_sums(self.path, t) if self.exact_timesteps else None
        if exact is not None:
            return exact
        out: dict[str, SecondMoment] = {}
        for layer in self.layers:
            for feature in self.features:
                if feature in ("k", "v"):
                    continue
                data = load_covariance_data(t, layer, feature, self.path)
                n = int(data["metadata"]["n_samples"])
                C = torch.from_numpy(np.asarray(data["covariance"], dtype=np.float64))
                stat = SecondMoment(C.shape[0])
                stat.sum.copy_(C * n)
                stat.count = n
                out[stat_key(layer, feature)] = stat
        return out

    def reconstruction_error(self) -> float:
        """The largest relative error of the per-timestep sums :meth:`timestep` returns (0 when exact)."""
        if self.exact_timesteps:
            return 0.0
        report = self.manifest.get("storage_report", {})
        return max(2.0 ** -24, float(report.get("max_reconstruction_rel_error", 0.0)))  # float32 rounding at least
