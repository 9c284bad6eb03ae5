"""Streaming float64 second moments, additive and exactly mergeable.

``SecondMoment`` keeps the sufficient statistics of AlphaEdit's ``K₀K₀ᵀ``: the uncentered sum
``S = Σ x xᵀ`` and the count ``n`` (docs/design.md §2). Sums and counts add, so partial results from
timesteps, prompt batches, workers or later extensions combine exactly; the normalised matrix
``C = S / n`` is only formed when asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
        state = {"sum": self.sum.cpu(), "count": torch.tensor(self.count, dtype=torch.int64)}
        if self.mean_sum is not None:
            state["mean_sum"] = self.mean_sum.cpu()
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> "SecondMoment":
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
