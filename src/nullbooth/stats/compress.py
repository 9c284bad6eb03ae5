"""Compressed storage of the per-timestep matrices (docs/design.md §7, seed 000: 未来扩展 "压缩存储"), and store sizes.

The seed's ``compress_covariance_matrix`` keeps the top ``k`` singular triplets of ``C``. Dropping the
*small* eigenvalues of a second moment drops exactly the directions its null space is made of, so a
plain top-``k`` truncation changes the projector ``P`` that training depends on. The ``eigh`` mode
here therefore keeps two groups of eigenpairs of ``C = V Λ Vᵀ`` (float64 ``eigh``):

- the top ``k`` eigenpairs holding a fraction ``storage_energy`` of ``Σλ`` (the seed's idea), and
- the null-space basis ``Û`` (eigenvalues under the run's threshold), so ``P = ÛÛᵀ`` is stored exactly;

the directions in between (small but above the threshold) are dropped. Reconstruction:
``C' = Σ_kept λᵢ vᵢ vᵢᵀ``, relative error ``‖C − C'‖_F / ‖C‖_F = √(Σ_dropped λ²) / √(Σ λ²)``; the
eigenvalues of ``C'`` are the kept ``λ`` and zeros, so its null dimension under the run's threshold
is known without another ``eigh`` and is reported next to the stored one.

``float16`` keeps the seed's ``.npy`` files in half precision (per-entry relative error ≤ 2⁻¹¹); the
projector read back is purified into a true projector (its eigenvalues driven to exactly 0 or 1).

The timestep-summed float64 statistics that training uses (``stats/summed.safetensors``) are never
compressed: every mode trains on exactly the same projectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from nullbooth.errors import NullBoothError
from nullbooth.filenames import EIG_SUFFIX
from nullbooth.io import load_tensors, save_npy, save_tensors
from nullbooth.stats.nullspace import Spectrum, null_dimension, spectrum

Storage = Literal["float32", "float16", "eigh"]
STORAGE_MODES: tuple[str, ...] = ("float32", "float16", "eigh")
FLOAT16_MAX = 65504.0


def matrix_files(feature: str, storage: str) -> tuple[str, ...]:
    """The file names one matrix of ``feature`` occupies in a layer folder under ``storage``."""
    if storage == "eigh":
        return (f"{feature}_{EIG_SUFFIX}",)
    return (f"{feature}_covariance.npy", f"{feature}_projection.npy")


def all_matrix_files(feature: str) -> tuple[str, ...]:
    """Every file name one matrix of ``feature`` may occupy in a layer folder, whatever its storage mode."""
    return tuple(sorted({name for storage in STORAGE_MODES for name in matrix_files(feature, storage)}))


def energy_rank(eigenvalues: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose top-``k`` eigenvalues (of an ascending, clamped spectrum) hold ``energy`` of ``Σλ``."""
    lam = eigenvalues.to(torch.float64)
    total = float(lam.sum())
    if total <= 0:
        return 0
    top = torch.cumsum(torch.flip(lam, [0]), 0)
    # Relative slack: the cumulative sum of the whole spectrum must count as reaching energy 1.
    return min(int((top < energy * total * (1 - 1e-12)).sum()) + 1, lam.numel())


def write_matrix(folder: Path, feature: str, C: torch.Tensor, *, mode: str, threshold: float, storage: str,
                 energy: float = 0.9999, spec: Spectrum | None = None) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """Store one second moment ``C`` (float64 ``[d, d]``) and its null-space projector under ``storage``.

    ``spec``: ``C``'s spectrum when the caller decomposed it already (finalize batches them by width).
    Returns the ascending eigenvalues, the null dimension, and the ``storage`` metadata block
    (``{}`` for the seed's float32 layout, which stays byte-for-byte what it was).
    """

    spec = spec if spec is not None else spectrum(C)
    lam, V = spec.eigenvalues, spec.eigenvectors  # ascending (on C's device: a GPU decomposes there)
    d = lam.numel()
    k_null = null_dimension(lam, mode, threshold)
    U = V[:, :k_null]  # [d, k_null] null-space basis
    if storage not in STORAGE_MODES:
        raise NullBoothError(f"nullbooth.storage: expected one of {list(STORAGE_MODES)}, got {storage!r}")
    for name in all_matrix_files(feature):
        (folder / name).unlink(missing_ok=True)  # rewriting a folder in another mode leaves no stale file behind
    if storage == "float16" and float(C.abs().max()) * (1 + 2 ** -10) >= FLOAT16_MAX:
        storage_used, why = "float32", f"max |C| = {float(C.abs().max()):.4g} overflows float16"
    else:
        storage_used, why = storage, None

    if storage_used == "float32":
        save_npy(folder / f"{feature}_covariance.npy", C.to(torch.float32).cpu().numpy())
        if k_null:
            save_npy(folder / f"{feature}_projection.npy", (U @ U.T).to(torch.float32).cpu().numpy())
        if storage == "float32":
            return lam.cpu(), k_null, {}
        return lam.cpu(), k_null, {"mode": "float32", "requested": storage, "reason": why,
                             "reconstruction_rel_error": _rel(C.to(torch.float32).double(), C),
                             "null_space_dim_reconstructed": k_null}

    if storage == "float16":
        C16 = C.to(torch.float16).cpu()
        save_npy(folder / f"{feature}_covariance.npy", C16.cpu().numpy())
        if k_null:
            save_npy(folder / f"{feature}_projection.npy", (U @ U.T).to(torch.float16).cpu().numpy())
        lam16 = torch.linalg.eigvalsh(C16.double()).clamp(min=0)
        return lam.cpu(), k_null, {"mode": "float16", "reconstruction_rel_error": _rel(C16.double(), C.cpu()),
                             "null_space_dim_reconstructed": null_dimension(lam16, mode, threshold)}

    # eigh: [null basis | top-k by energy]; the middle is dropped (see the module docstring).
    k_top = min(energy_rank(lam, energy), d - k_null)
    keep = torch.cat([torch.arange(k_null), torch.arange(d - k_top, d)]).to(lam.device)
    kept_lam = torch.zeros_like(lam)
    kept_lam[keep] = lam[keep]
    save_tensors(folder / f"{feature}_{EIG_SUFFIX}", {
        "eigenvalues": lam.cpu(),  # [d] float64, all of them (the spectrum is small and useful)
        "vectors": V[:, keep].to(torch.float32).cpu(),  # [d, k_null + k_top]
    }, {"null_space_dim": str(k_null), "top_rank": str(k_top), "feature_dim": str(d)})
    norm = float(torch.sqrt((lam ** 2).sum()))
    dropped = float(torch.sqrt(((lam - kept_lam) ** 2).sum()))
    return lam.cpu(), k_null, {
        "mode": "eigh", "energy": energy, "kept_rank": int(keep.numel()), "top_rank": k_top,
        "reconstruction_rel_error": dropped / norm if norm > 0 else 0.0,
        "null_space_dim_reconstructed": null_dimension(torch.sort(kept_lam.cpu()).values, mode, threshold),
    }


def _rel(approx: torch.Tensor, exact: torch.Tensor) -> float:
    norm = float(exact.norm())
    return float((approx - exact).norm()) / norm if norm > 0 else 0.0


def read_matrix(folder: Path, feature: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(covariance, projection)`` of an ``eigh``-stored matrix, or ``None`` when it is stored as ``.npy``."""

    path = folder / f"{feature}_{EIG_SUFFIX}"
    if not path.exists():
        return None
    tensors, meta = load_tensors(path, "an eigendecomposition file")
    try:
        lam, V, k_null = tensors["eigenvalues"], tensors["vectors"].double(), int(meta["null_space_dim"])
    except (KeyError, ValueError):
        raise NullBoothError(f"{path} lacks eigenvalues/vectors/null_space_dim; it is corrupt or foreign — recollect") from None
    k_top = V.shape[1] - k_null
    kept = torch.cat([lam[:k_null], lam[lam.numel() - k_top:]])
    C = (V * kept) @ V.T  # [d, d]: Σ_kept λᵢ vᵢ vᵢᵀ
    U = V[:, :k_null]
    P = (U @ U.T).to(torch.float32).numpy() if k_null else None
    return C.to(torch.float32).numpy(), P


def clean_projector(P: np.ndarray, iterations: int = 4) -> np.ndarray:
    """The orthogonal projector a rounded one stands for (float32), by McWeeny purification ``P ← 3P² − 2P³``.

    Each step maps an eigenvalue ``1 + ε`` to ``1 − 3ε² + O(ε³)`` (and ``ε`` to ``3ε²``): from float16
    rounding (``ε ≈ 1e-3``) four float64 steps reach round-off, with matrix products only (no ``eigh``).
    """
    X = torch.from_numpy(P.astype(np.float64))
    X = (X + X.T) / 2
    for _ in range(iterations):
        X2 = X @ X
        X = 3 * X2 - 2 * X2 @ X
        X = (X + X.T) / 2
    return X.to(torch.float32).numpy()


# --------------------------------------------------------------------------- store sizes


SD15_ATTN2_WIDTHS: tuple[int, ...] = (320,) * 5 + (640,) * 5 + (1280,) * 6  # 16 attn2 layers of SD 1.5
SD15_TEXT_WIDTH = 768
NPY_HEADER = 128  # bytes of an .npy header
METADATA_BYTES_PER_VALUE = 26  # one eigenvalue in indented JSON ("      1.2345678901234567e-05,\n"), measured
METADATA_HEADER = 400  # the other metadata fields, measured


def store_size(widths: Sequence[int] = SD15_ATTN2_WIDTHS, text_width: int = SD15_TEXT_WIDTH, timesteps: int = 50, *,
               storage: str = "float32", kept_fraction: float = 1.0, with_projection: bool = True,
               keep_timestep_sums: bool = False) -> dict[str, int]:
    """Bytes of one run on disk, computed from the layer widths (q and out inputs of each ``attn2`` have the width).

    - ``float32``/``float16``: per timestep and layer a covariance and (``with_projection``: when the null
      space is non-empty) a projection ``.npy`` for q and out; the k/v text matrix once (hard links).
    - ``eigh``: per matrix ``d`` float64 eigenvalues + ``kept_fraction · d`` float32 eigenvectors
      (null basis + top-energy directions; ``kept_fraction`` is data-dependent, see the module docstring).
    - always ``stats/summed.safetensors`` (float64 ``Σ xxᵀ`` per layer/feature + the text statistic) and
      ``stats/summed_eig.safetensors`` (their float64 eigenvalues and eigenvectors, so training decomposes nothing);
      ``keep_timestep_sums`` adds the float64 per-timestep sums.
    """
    if storage not in STORAGE_MODES:
        raise NullBoothError(f"storage: expected one of {list(STORAGE_MODES)}, got {storage!r}")
    if not 0 < kept_fraction <= 1:
        raise NullBoothError(f"kept_fraction: expected a fraction in (0, 1], got {kept_fraction}")

    def matrix(d: int) -> int:
        if storage == "eigh":
            return 8 * d + 4 * d * math.ceil(kept_fraction * d) + 256  # + safetensors header
        item = 4 if storage == "float32" else 2
        return (1 + with_projection) * (item * d * d + NPY_HEADER)

    per_timestep = sum(2 * matrix(d) for d in widths)  # q and out
    text = matrix(text_width)  # k and v share one statistic: its files are stored once and hard-linked
    # Metadata JSON is written per folder (not linked): ~METADATA_BYTES_PER_VALUE per listed eigenvalue + a header.
    values = sum(2 * d + 2 * text_width for d in widths)
    metadata = timesteps * (values * METADATA_BYTES_PER_VALUE + 4 * len(widths) * METADATA_HEADER)
    summed = 8 * (sum(2 * d * d for d in widths) + text_width ** 2)
    summed_spectra = summed + 8 * (2 * sum(widths) + text_width)  # eigenvectors [d, d] + eigenvalues [d]
    sums = 8 * sum(2 * d * d for d in widths) * timesteps if keep_timestep_sums else 0
    matrices = per_timestep * timesteps + text
    return {"matrices": matrices, "metadata": metadata, "summed_stats": summed, "summed_spectra": summed_spectra,
            "timestep_sums": sums, "total": matrices + metadata + summed + summed_spectra + sums}


def seed_estimate(widths: Sequence[int] = SD15_ATTN2_WIDTHS, timesteps: int = 50) -> int:
    """The seed's formula ``16 × 4 × 50 × 1280² × 4`` bytes (every matrix at the widest width; it writes ≈ 26 GB)."""
    return len(widths) * 4 * timesteps * max(widths) ** 2 * 4


def sd15_store_sizes(timesteps: int = 50) -> list[dict[str, Any]]:
    """The README table: run size on disk for SD 1.5 shapes at 50 steps, per storage mode (computed)."""
    rows = []
    cases: list[tuple[str, Mapping[str, Any], str]] = [
        ("seed formula", {}, "16 × 4 × 50 × 1280² × 4 B: every matrix at width 1280, k/v per layer and timestep"),
        ("float32", {"storage": "float32"}, "seed layout, covariance + projection"),
        ("float32", {"storage": "float32", "with_projection": False}, "seed layout, empty null spaces (no projection)"),
        ("float16", {"storage": "float16"}, "covariance + projection in half precision"),
        ("eigh", {"storage": "eigh", "kept_fraction": 1.0}, "all eigenvectors kept (worst case)"),
        ("eigh", {"storage": "eigh", "kept_fraction": 0.5}, "half of the directions kept"),
        ("eigh", {"storage": "eigh", "kept_fraction": 0.25}, "a quarter kept"),
        ("float32", {"storage": "float32", "keep_timestep_sums": True}, "+ exact float64 per-timestep sums"),
    ]
    for name, kwargs, note in cases:
        if name == "seed formula":
            total = seed_estimate(timesteps=timesteps)
            rows.append({"storage": name, "note": note, "total_bytes": total, "total_gb": round(total / 1e9, 3)})
            continue
        size = store_size(timesteps=timesteps, **kwargs)
        rows.append({"storage": name, "note": note, **{f"{k}_bytes": v for k, v in size.items()},
                     "total_gb": round(size["total"] / 1e9, 3)})
    return rows
