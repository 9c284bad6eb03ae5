"""Streaming float64 second moments, additive and exactly mergeable.

``SecondMoment`` keeps the sufficient statistics of AlphaEdit's ``K₀K₀ᵀ``: the uncentered sum
``S = Σ x xᵀ`` and the count ``n`` (docs/design.md §2). Sums and counts add, so partial results from
timesteps, prompt batches, workers or later extensions combine exactly; the normalised matrix
``C = S / n`` is only formed when asked for.

:func:`gram` forms ``XᵀX`` in float64 or, chunk by chunk of rows, in float32 with float64 sums across chunks;
:class:`PackedSecondMoment` keeps ``S`` as its upper triangle (``d(d+1)/2`` float64, half of ``d²``) for the
many per-timestep statistics of a collection (:mod:`nullbooth.runs.accumulate`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from nullbooth.errors import NullBoothError


class SecondMoment:
    """Running ``S = Σ xxᵀ`` (float64, ``[d, d]``) and ``n`` over rows of ``[..., d]`` inputs.

    An optional ``Σ x`` (``track_mean=True``) allows the centered covariance as an opt-in; the default
    statistic is uncentered because a centered null space does not protect the mean direction.
    """

    def __init__(self, dim: int, *, device: torch.device | str = "cpu", track_mean: bool = False) -> None:
        self.dim = int(dim)
        self.sum = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.mean_sum = torch.zeros(self.dim, dtype=torch.float64, device=device) if track_mean else None
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate every row of ``x`` (``[..., d]``; any float dtype, cast to float64 before the product)."""
        if x.shape[-1] != self.dim:
            raise NullBoothError(f"expected features of width {self.dim}, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.dim).to(device=self.sum.device, dtype=torch.float64)  # [n, d]
        self.sum.addmm_(rows.T, rows)  # S += XᵀX
        if self.mean_sum is not None:
            self.mean_sum += rows.sum(0)
        self.count += rows.shape[0]

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add ``other``'s sums and count into ``self`` (exact up to float64 addition)."""
        if other.dim != self.dim:
            raise NullBoothError(f"cannot merge second moments of width {self.dim} and {other.dim}")
        self.sum += other.sum.to(self.sum.device)
        if self.mean_sum is not None:
            if other.mean_sum is None:
                raise NullBoothError("cannot merge a centered-capable statistic with one that has no mean sum")
            self.mean_sum += other.mean_sum.to(self.sum.device)
        self.count += other.count
        return self

    def moment(self) -> torch.Tensor:
        """The uncentered second moment ``C = S / n`` (float64, symmetrised against round-off)."""
        if self.count == 0:
            raise NullBoothError("no samples were accumulated; nothing to normalise")
        c = self.sum / self.count
        return (c + c.T) / 2

    def covariance(self) -> torch.Tensor:
        """The centered covariance ``S/n − μμᵀ`` (opt-in; needs ``track_mean=True``)."""
        if self.mean_sum is None:
            raise NullBoothError("centered covariance needs track_mean=True when the statistic was created")
        mu = self.mean_sum / self.count
        return self.moment() - torch.outer(mu, mu)

    def to(self, device: torch.device | str) -> "SecondMoment":
        """Move the sums to ``device`` (in place; returns ``self``)."""
        self.sum = self.sum.to(device)
        if self.mean_sum is not None:
            self.mean_sum = self.mean_sum.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"sum": self.sum, "count": torch.tensor(self.count, dtype=torch.int64)}
        if self.mean_sum is not None:
            state["mean_sum"] = self.mean_sum
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> "SecondMoment":
        """A statistic from its :meth:`state_dict`, or from a :class:`PackedSecondMoment`'s (unpacked)."""
        if "packed" in state and "sum" not in state:
            return PackedSecondMoment.from_state_dict(state, device).unpacked()
        s = state["sum"]
        if s.ndim != 2 or s.shape[0] != s.shape[1] or s.dtype != torch.float64:
            raise NullBoothError(f"expected a square float64 sum, got {s.dtype} {tuple(s.shape)}")
        out = cls(s.shape[0], device=device, track_mean="mean_sum" in state)
        out.sum.copy_(s)
        if out.mean_sum is not None:
            out.mean_sum.copy_(state["mean_sum"])
        out.count = int(state["count"])
        return out

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, count={self.count})"


def merge_all(parts: Iterable[SecondMoment]) -> SecondMoment:
    """A new statistic holding the sum of ``parts`` (none of them is modified)."""
    parts = list(parts)
    if not parts:
        raise NullBoothError("expected at least one statistic to merge, got none")
    total = SecondMoment(parts[0].dim, device=parts[0].sum.device, track_mean=parts[0].mean_sum is not None)
    for part in parts:
        total.merge(part)
    return total


@contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
    """Full float32 matmuls on CUDA even when the user allowed TF32 (10-bit mantissa) for the model's own."""
    if device.type != "cuda":
        yield
        return
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def gram_chunks(x: torch.Tensor, dtype: torch.dtype = torch.float64, chunk_rows: int | None = None) -> Iterator[torch.Tensor]:
    """``X_cᵀX_c`` for consecutive chunks ``X_c`` of at most ``chunk_rows`` rows of ``x`` (``[..., d]``), in ``dtype``.

    Their float64 sum is ``XᵀX``; with ``dtype`` float32 each chunk's products are summed in float32 (error
    ∝ rows per chunk, benchmarks/results/accumulate.md), never with TF32.
    """
    rows = x.detach().reshape(-1, x.shape[-1])  # [n, d]
    step = chunk_rows or max(rows.shape[0], 1)
    with _no_tf32(rows.device):
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step].to(dtype)  # [≤ chunk_rows, d]
            yield chunk.T @ chunk  # [d, d]


def gram(x: torch.Tensor, dtype: torch.dtype = torch.float64, chunk_rows: int | None = None) -> torch.Tensor:
    """Float64 ``XᵀX`` of the rows of ``x``: products in ``dtype`` per chunk of rows, float64 across chunks."""
    total = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
    for part in gram_chunks(x, dtype, chunk_rows):
        total += part
    return total


_TRIANGLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def triangle_index(dim: int, device: torch.device | str) -> torch.Tensor:
    """Flat indices ``i·d + j`` (``i ≤ j``) of the upper triangle of a ``[d, d]`` matrix, row by row (cached)."""
    key = (int(dim), torch.device(device))
    if key not in _TRIANGLES:
        i, j = torch.triu_indices(dim, dim, device=key[1])
        _TRIANGLES[key] = i * dim + j  # [d(d+1)/2]
    return _TRIANGLES[key]


def pack(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a square matrix as a vector ``[d(d+1)/2]`` (row-major)."""
    return matrix.reshape(-1)[triangle_index(matrix.shape[0], matrix.device)]


def unpack(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric ``[d, d]`` matrix whose upper triangle is ``packed`` (the inverse of :func:`pack`)."""
    full = torch.zeros(dim * dim, dtype=packed.dtype, device=packed.device)
    full[triangle_index(dim, packed.device)] = packed
    full = full.reshape(dim, dim)
    return full + torch.triu(full, 1).T


def packed_size(dim: int) -> int:
    return dim * (dim + 1) // 2


class PackedSecondMoment:
    """``S = Σ xxᵀ`` (float64) and ``n`` like :class:`SecondMoment`, stored as the upper triangle of ``S``.

    ``S`` is symmetric, so the triangle holds all of it in half the bytes. Products are formed where the
    features are (:func:`gram_chunks`, in ``dtype``) and each chunk's triangle is added into the float64
    sum, which may live on another device (the host): only the triangle crosses.
    """

    def __init__(self, dim: int, *, device: torch.device | str = "cpu") -> None:
        self.dim = int(dim)
        self.sum = torch.zeros(packed_size(self.dim), dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, *, dtype: torch.dtype = torch.float64, chunk_rows: int | None = None) -> None:
        """Accumulate every row of ``x`` (``[..., d]``): ``S += Σ_c triu(X_cᵀX_c)``, products in ``dtype``."""
        if x.shape[-1] != self.dim:
            raise NullBoothError(f"expected features of width {self.dim}, got shape {tuple(x.shape)}")
        for part in gram_chunks(x, dtype, chunk_rows):
            self.sum += pack(part).to(self.sum.device)  # float32 triangles are widened by the in-place float64 add
        self.count += x[..., 0].numel()

    def merge(self, other: "PackedSecondMoment") -> "PackedSecondMoment":
        if other.dim != self.dim:
            raise NullBoothError(f"cannot merge second moments of width {self.dim} and {other.dim}")
        self.sum += other.sum.to(self.sum.device)
        self.count += other.count
        return self

    def unpacked(self) -> SecondMoment:
        """The same statistic as a full :class:`SecondMoment` (a new ``[d, d]`` float64 sum on this device)."""
        out = SecondMoment(self.dim, device=self.sum.device)
        out.sum = unpack(self.sum, self.dim)
        out.count = self.count
        return out

    @classmethod
    def from_moment(cls, stat: SecondMoment, device: torch.device | str | None = None) -> "PackedSecondMoment":
        """Pack a full statistic (its upper triangle; ``S`` is symmetric by construction)."""
        if stat.mean_sum is not None:
            raise NullBoothError("a packed statistic keeps no mean sum; cannot pack a centered-capable statistic")
        out = cls(stat.dim, device=device if device is not None else stat.sum.device)
        out.sum.copy_(pack(stat.sum))
        out.count = stat.count
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"packed": self.sum, "count": torch.tensor(self.count, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> "PackedSecondMoment":
        s = state["packed"]
        dim = (math.isqrt(8 * s.numel() + 1) - 1) // 2
        if s.ndim != 1 or s.numel() != packed_size(dim) or s.dtype != torch.float64:
            raise NullBoothError(f"expected a float64 upper triangle (d(d+1)/2 values), got {s.dtype} {tuple(s.shape)}")
        out = cls(dim, device=device)
        out.sum.copy_(s)
        out.count = int(state["count"])
        return out

    def __repr__(self) -> str:
        return f"PackedSecondMoment(dim={self.dim}, count={self.count})"
