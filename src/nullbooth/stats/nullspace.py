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
from collections.abc import Iterable, Sequence
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


    @classmethod
    def of_eigh(cls, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> "Spectrum":
        """From ``eigh``'s raw output: tiny negative round-off eigenvalues are clamped to 0."""
        return cls(eigenvalues.clamp(min=0), eigenvectors)


def _checked(C: torch.Tensor | np.ndarray) -> torch.Tensor:
    C = torch.as_tensor(C).to(torch.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise NullBoothError(f"expected a square matrix, got shape {tuple(C.shape)}")
    if not torch.isfinite(C).all():
        raise NullBoothError("the second-moment matrix contains NaN or Inf; recollect the statistics")
    return C


def spectrum(C: torch.Tensor | np.ndarray) -> Spectrum:
    """``eigh`` of the symmetrised matrix in float64; tiny negative round-off eigenvalues are clamped to 0."""
    C = _checked(C)
    return Spectrum.of_eigh(*torch.linalg.eigh((C + C.T) / 2))


def eigenvalues(C: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The eigenvalues of :func:`spectrum` (ascending, clamped at 0) without eigenvectors (``eigvalsh``)."""
    C = _checked(C)
    return torch.linalg.eigvalsh((C + C.T) / 2).clamp(min=0)


BATCH_BYTES = 1 << 28  # float64 bytes of one stacked eigh batch (input; eigh needs about 4× that in all)


# On the CPU torch runs the same LAPACK routine once per matrix either way, and stacking measured slower
# (benchmarks/results/inspect.md: 67 vs 51 CPU s for one SD 1.5 step): batches pay off on an accelerator only.
STACK_ON_CPU = False


def eigh_batched(matrices: Sequence[torch.Tensor | np.ndarray], *,
                 max_batch_bytes: int = BATCH_BYTES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Raw ``eigh`` (ascending eigenvalues ``[d]``, eigenvectors ``[d, d]``, float64) of many symmetrised matrices.

    Matrices of one width and device are stacked into ``[B, d, d]`` batches of at most ``max_batch_bytes``
    and decomposed on their own device (a GPU run decomposes where it accumulated); on the CPU one at a time. Each matrix goes
    through the same LAPACK/cuSOLVER routine as :func:`spectrum`; eigenvalues agree with it to round-off
    (bit for bit on the CPU), so null dimensions and projectors ``P = ÛÛᵀ`` are the same.
    """
    mats = [_checked(C) for C in matrices]
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(mats)
    groups: dict[tuple[int, torch.device], list[int]] = {}
    for i, C in enumerate(mats):
        groups.setdefault((C.shape[0], C.device), []).append(i)
    for (d, device), idx in groups.items():
        stack = device.type != "cpu" or STACK_ON_CPU
        per_batch = max(1, max_batch_bytes // max(8 * d * d, 1)) if stack else 1
        for start in range(0, len(idx), per_batch):
            chunk = idx[start:start + per_batch]
            S = torch.stack([mats[i] for i in chunk])  # [B, d, d]
            lam, V = torch.linalg.eigh((S + S.mT) / 2)  # [B, d], [B, d, d]
            for j, i in enumerate(chunk):
                out[i] = (lam[j], V[j])
    return [pair for pair in out if pair is not None]


def spectra(matrices: Sequence[torch.Tensor | np.ndarray], *, max_batch_bytes: int = BATCH_BYTES) -> list[Spectrum]:
    """:func:`spectrum` of many matrices, batched by width (:func:`eigh_batched`)."""
    return [Spectrum.of_eigh(lam, V) for lam, V in eigh_batched(matrices, max_batch_bytes=max_batch_bytes)]


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
    return null_space_of(spectrum(C), mode, threshold, name=name)


def null_space_of(spec: Spectrum, mode: NullspaceMode = "absolute", threshold: float = 2e-2, *,
                  name: str = "") -> NullSpace:
    """:func:`null_space` of an already decomposed matrix (a stored or batched :class:`Spectrum`)."""
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


def validate_covariance(C: np.ndarray | torch.Tensor, *, rtol: float = 1e-5,
                        eigenvalues: np.ndarray | None = None) -> dict[str, object]:
    """The seed's quality checks (symmetric, PSD, condition number, rank), computed in float64.

    ``eigenvalues``: the float64 spectrum of the statistic ``C`` rounds, known from when it was written
    (ascending); ``eigvalsh`` is then skipped. Rounding to the stored dtype moves each eigenvalue by at most
    ``‖C − C_stored‖₂`` (Weyl), within the PSD tolerance below, so the verdicts are those of the stored matrix.
    """
    stored = torch.as_tensor(C)
    eps = torch.finfo(stored.dtype).eps if stored.is_floating_point() else np.finfo(np.float64).eps
    A = stored.numpy() if stored.is_floating_point() else stored.to(torch.float64).numpy()  # no float64 copy
    finite = bool(np.isfinite(A).all())
    if not finite:
        return {"finite": False, "symmetric": False, "positive_semidefinite": False,
                "well_conditioned": False, "condition_number": float("inf"), "rank": 0}
    scale = max(float(np.abs(A).max()), 1e-300)
    if eigenvalues is None:
        C64 = A.astype(np.float64)
        lam = np.linalg.eigvalsh((C64 + C64.T) / 2)
    else:
        lam = np.asarray(eigenvalues, np.float64)
    lam_max = max(float(lam[-1]), 0.0)
    cond = float(lam_max / lam[0]) if lam[0] > 0 else float("inf")
    return {
        "finite": True,
        "symmetric": is_symmetric(A, rtol=rtol, atol=rtol * scale),
        # Rounding a PSD matrix to its storage dtype moves eigenvalues by up to about d·ε·λ_max.
        "positive_semidefinite": bool(lam[0] >= -A.shape[0] * eps * max(lam_max, 1e-300)),
        "well_conditioned": bool(cond < 1e12),
        "condition_number": cond,
        "rank": int(np.sum(lam > lam_max * A.shape[0] * np.finfo(np.float64).eps)),
    }


def is_symmetric(A: np.ndarray, *, rtol: float, atol: float, tile: int = 256) -> bool:
    """``np.allclose(A, Aᵀ, rtol, atol)``, tile by tile: a tile and its transposed partner stay in cache and no
    ``[d, d]`` temporary is made (the whole-matrix form strides through memory, ~5× slower).

    Compared in the matrix's own precision (float16 in float32): the test's own rounding, ≤ 2⁻²⁴ of ``|b|`` in
    float32, is far below any ``rtol`` used here (1e-5), and a float64 copy of every tile cost validate a third of
    its time on a 50-step SD 1.5 run.
    """
    d = A.shape[0]
    if A.dtype.kind != "f" or A.dtype.itemsize < 4:
        A = A.astype(np.float32 if A.dtype.kind == "f" else np.float64)
    for i in range(0, d, tile):
        for j in range(i, d, tile):
            a, b = A[i:i + tile, j:j + tile], A[j:j + tile, i:i + tile].T
            if not (np.abs(a - b) <= atol + rtol * np.abs(b)).all():  # NaN compares False, as allclose's
                return False
            if i != j and not (np.abs(b - a) <= atol + rtol * np.abs(a)).all():  # the lower tile against the upper
                return False
    return True
