"""Null spaces of prior-knowledge second moments (AlphaEdit, ICLR 2025, eq. 5–7).

For a weight ``W`` (torch ``[out, in]``) whose inputs on prior knowledge are the columns of ``K₀``,
an update ``Δ`` leaves those outputs unchanged iff ``Δ K₀ = 0``. With ``C = K₀K₀ᵀ/n = V Λ Vᵀ``
(``eigh``, float64, ``λ`` clamped at 0), the eigenvectors ``Û`` whose eigenvalues fall under the
threshold span the (approximate) null space, and ``P = ÛÛᵀ`` projects any update into it:
``Δ' = Δ P`` (the seed's ``constrained_delta = original_delta @ P``). The leakage of a projected
update on the preserved inputs is bounded by ``‖Δ' K₀‖²_F / n ≤ ‖Δ‖²_F · λ_max(null)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from nullbooth.config import NullspaceMode, check_threshold
from nullbooth.errors import NullBoothError


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors (columns) of a second moment, float64."""

    eigenvalues: torch.Tensor  # [d]
    eigenvectors: torch.Tensor  # [d, d]

    @property
    def dim(self) -> int:
        return self.eigenvalues.numel()


def spectrum(C: torch.Tensor | np.ndarray) -> Spectrum:
    """``eigh`` of the symmetrised matrix in float64; tiny negative round-off eigenvalues are clamped to 0."""
    C = torch.as_tensor(C).to(torch.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise NullBoothError(f"expected a square matrix, got shape {tuple(C.shape)}")
    if not torch.isfinite(C).all():
        raise NullBoothError("the second-moment matrix contains NaN or Inf; recollect the statistics")
    lam, V = torch.linalg.eigh((C + C.T) / 2)
    return Spectrum(lam.clamp(min=0), V)


def null_dimension(eigenvalues: torch.Tensor, mode: NullspaceMode, threshold: float) -> int:
    """How many of the (ascending) eigenvalues belong to the null space under ``mode``.

    - ``absolute``: ``λ < τ`` (AlphaEdit/seed default ``τ = 2e-2``).
    - ``relative``: ``λ < τ · λ_max``.
    - ``energy``: the largest set of smallest eigenvalues holding at most a fraction ``τ`` of ``Σλ``.
    - ``rank``: ``τ`` is the rank kept as knowledge; the ``d − τ`` smallest directions are null.
    - ``percentile``: ``λ`` at or below the ``τ``-th percentile of the spectrum.
    """
    problem = check_threshold(mode, threshold)
    if problem:
        raise NullBoothError(problem)
    lam = eigenvalues.to(torch.float64)
    d = lam.numel()
    if mode == "absolute":
        return int((lam < threshold).sum())
    if mode == "relative":
        return int((lam < threshold * lam.max()).sum())
    if mode == "energy":
        total = lam.sum()
        if total <= 0:
            return d
        return int((torch.cumsum(lam, 0) <= threshold * total).sum())
    if mode == "rank":
        return max(d - int(threshold), 0)
    cut = torch.quantile(lam, threshold / 100.0)
    return int((lam <= cut).sum()) if threshold > 0 else 0


@dataclass(frozen=True)
class NullSpace:
    """Orthonormal basis ``U`` (``[d, k]``) of the null space of one weight's input statistic."""

    basis: torch.Tensor  # [d, k]
    eigenvalues: torch.Tensor  # [d] ascending
    mode: str
    threshold: float

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def null_dim(self) -> int:
        return self.basis.shape[1]

    def projector(self) -> torch.Tensor:
        """``P = U Uᵀ`` (``[d, d]``, float64): symmetric and idempotent."""
        return self.basis @ self.basis.T

    def leakage_bound(self) -> float:
        """``max λ`` inside the null space: ``‖Δ P K₀‖² / n ≤ ‖Δ‖² · bound``."""
        k = self.null_dim
        return float(self.eigenvalues[k - 1]) if k else 0.0


def null_space(C: torch.Tensor | np.ndarray, mode: NullspaceMode = "absolute", threshold: float = 2e-2,
               *, name: str = "") -> NullSpace:
    """The null space of ``C`` under a threshold mode; warns when it is empty or the whole space."""
    spec = spectrum(C)
    k = null_dimension(spec.eigenvalues, mode, threshold)
    if name:
        warn_if_degenerate(name, k, spec.dim, spec.eigenvalues, mode, threshold)
    return NullSpace(spec.eigenvectors[:, :k].contiguous(), spec.eigenvalues, mode, threshold)


_WIDEN = {
    "absolute": "raise nullbooth.nullspace_threshold above λ_min{needed}, or use nullspace_mode 'relative' (e.g. 1e-3) "
                "or 'energy' (e.g. 1e-3)",
    "relative": "raise nullbooth.nullspace_threshold above λ_min / λ_max{needed}, or use nullspace_mode 'energy' "
                "(e.g. 1e-3)",
    "energy": "raise nullbooth.nullspace_threshold, the share of Σλ the null space may hold (e.g. 1e-3)",
    "rank": "lower nullbooth.nullspace_threshold, the rank kept as knowledge, below the input dimension",
    "percentile": "raise nullbooth.nullspace_threshold, a percentile of the spectrum (e.g. 5)",
}
_NARROW = {
    "absolute": "lower nullbooth.nullspace_threshold below λ_max or collect more prompts",
    "relative": "lower nullbooth.nullspace_threshold below 1 or collect more prompts",
    "energy": "lower nullbooth.nullspace_threshold below 1 or collect more prompts",
    "rank": "raise nullbooth.nullspace_threshold, the rank kept as knowledge, above 0",
    "percentile": "lower nullbooth.nullspace_threshold below 100 or collect more prompts",
}


def empty_fix(mode: str, spectra: Iterable[tuple[float, float]] = ()) -> str:
    """How to get a non-empty null space under ``mode`` (the end of every empty-null-space message).

    ``spectra``: ``(λ_min, λ_max)`` of the weights whose null space is empty; for the absolute and relative modes the
    fix then names the threshold that opens all of them.
    """
    spectra = list(spectra)
    needed = ""
    if spectra and mode in ("absolute", "relative"):
        value = max(lo if mode == "absolute" else lo / hi for lo, hi in spectra)
        needed = f" ({value:.3g} opens all {len(spectra)})" if len(spectra) > 1 else f" ({value:.3g} here)"
    return _WIDEN.get(mode, _WIDEN["absolute"]).format(needed=needed)


def full_fix(mode: str) -> str:
    """How to keep some directions protected under ``mode`` (the end of every whole-space message)."""
    return _NARROW.get(mode, _NARROW["absolute"])


def warn_if_degenerate(name: str, k: int, d: int, eigenvalues: torch.Tensor, mode: str, threshold: float) -> None:
    if k == 0:
        warnings.warn(
            f"{name}: the null space is empty ({mode} threshold {threshold:g}, λ_min = {float(eigenvalues[0]):.4g}): "
            f"nothing can be learned in this weight; "
            f"{empty_fix(mode, [(float(eigenvalues[0]), float(eigenvalues[-1]))])}",
            stacklevel=3,
        )
    elif k == d:
        warnings.warn(
            f"{name}: the null space is the whole {d}-dim input space ({mode} threshold {threshold:g}, "
            f"λ_max = {float(eigenvalues[-1]):.4g}): nothing is protected; {full_fix(mode)}",
            stacklevel=3,
        )


def validate_covariance(C: np.ndarray | torch.Tensor, *, rtol: float = 1e-5) -> dict[str, object]:
    """The seed's quality checks (symmetric, PSD, condition number, rank), computed in float64."""
    stored = torch.as_tensor(C)
    eps = torch.finfo(stored.dtype).eps if stored.is_floating_point() else np.finfo(np.float64).eps
    C64 = np.asarray(stored.to(torch.float64).numpy())
    finite = bool(np.isfinite(C64).all())
    if not finite:
        return {"finite": False, "symmetric": False, "positive_semidefinite": False,
                "well_conditioned": False, "condition_number": float("inf"), "rank": 0}
    scale = max(float(np.abs(C64).max()), 1e-300)
    lam = np.linalg.eigvalsh((C64 + C64.T) / 2)
    lam_max = max(float(lam[-1]), 0.0)
    cond = float(lam_max / lam[0]) if lam[0] > 0 else float("inf")
    return {
        "finite": True,
        "symmetric": bool(np.allclose(C64, C64.T, rtol=rtol, atol=rtol * scale)),
        # Rounding a PSD matrix to its storage dtype moves eigenvalues by up to about d·ε·λ_max.
        "positive_semidefinite": bool(lam[0] >= -C64.shape[0] * eps * max(lam_max, 1e-300)),
        "well_conditioned": bool(cond < 1e12),
        "condition_number": cond,
        "rank": int(np.sum(lam > lam_max * C64.shape[0] * np.finfo(np.float64).eps)),
    }
