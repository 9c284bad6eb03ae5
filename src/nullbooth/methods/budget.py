"""A certified leakage budget: ``‖ΔW X₀‖_F / ‖W X₀‖_F ≤ ε`` after every optimizer step (docs/design.md §2, *Leakage*).

For a protected weight ``W`` with prior second moment ``S`` (the run's timestep-summed statistic, float64)
the leakage of an update is eq. 2 of :mod:`nullbooth.methods.leakage`,

    L(ΔW)² = tr(ΔW S ΔWᵀ) / tr(W S Wᵀ),                                                     (3)

so ``L ≤ ε`` is the ellipsoid ``tr(ΔW S ΔWᵀ) ≤ r² = ε² tr(W S Wᵀ)``. Both NullBooth updates live in the
span of a null-space basis ``U`` (``[in, k]``, orthonormal): ``ΔW = M Uᵀ``. With
``G = Uᵀ S U = Q diag(λ) Qᵀ`` and the rotated coordinates ``M̃ = M Q`` (columns ``m̃_j``) the ellipsoid is
``Σ_j λ_j ‖m̃_j‖² ≤ r²``, and its exact Euclidean (Frobenius) projection is, by the KKT conditions,

    m̃_j ← m̃_j / (1 + μ λ_j),   μ ≥ 0 the root of  Σ_j λ_j ‖m̃_j‖² / (1 + μ λ_j)² = r²,            (4)

a 1-D root search (:func:`shrink_multiplier`). ``Q`` is orthogonal, so the projection of ``M̃`` is the
projection of ``M``; and since ``M ↦ M Uᵀ`` is an isometry onto the update family, it is also the
projection of ``ΔW`` onto (family ∩ ellipsoid) — in the ``projected`` full-weight mode after ``P = U Uᵀ``
has been applied (projecting onto a subspace, then onto a convex set inside it, is the projection onto
the intersection, by Pythagoras).

The guarantee is certified on the values the model really holds: after the projection the parameter is
cast back to its dtype and ``L`` is recomputed from it in float64. The projection aims at ``r² (1 − 10⁻⁴)``
so that the float32 cast lands inside (without the margin every other projection needed a second round); a
rounding that still lands above ``ε`` is fixed by a tighter radius. When the update family is the whole input
space, ``tr(ΔW S ΔWᵀ) = Σ_j λ_j ‖(ΔW U Q)_j‖²`` for every ``ΔW``, so the check and the projection share one
product. The threshold decides where learning is cheap (``U``); the budget makes the promise, whatever the
threshold mode.
"""

from __future__ import annotations

import math

import torch

from nullbooth.errors import NullBoothError

NEWTON_ITERATIONS = 200
ROOT_RTOL = 1e-12  # stop when Σ λ c / (1 + μλ)² ≤ r² (1 + ROOT_RTOL)
CERTIFY_ATTEMPTS = 8
CAST_MARGIN = 1e-4  # the first projection aims at r² (1 − margin): a float32 cast moves tr(ΔW S ΔWᵀ) by ~1e-5 relative


def shrink_multiplier(lam: torch.Tensor, c: torch.Tensor, radius_sq: float) -> float:
    """``μ ≥ 0`` with ``f(μ) = Σ_j λ_j c_j / (1 + μ λ_j)² ≤ r²`` and ``f(μ) ≥ r²(1 − 1e-12)`` (the root of eq. 4).

    ``λ ≥ 0`` and ``c_j = ‖m̃_j‖² ≥ 0`` are float64 ``[k]``. ``f`` is convex and decreasing, so Newton's method
    started at ``μ = 0`` (where ``f > r²``) climbs to the root from below without overshooting; the last
    iterate is nudged up until ``f(μ) ≤ r²``. ``r² = 0`` returns ``inf`` (every direction with ``λ > 0`` is
    zeroed).
    """
    w = lam * c  # λ_j c_j
    if radius_sq <= 0.0:
        return math.inf
    if float(w.sum()) <= radius_sq:
        return 0.0
    mu = 0.0
    for _ in range(NEWTON_ITERATIONS):
        s = 1.0 + mu * lam
        f = float((w / s.square()).sum()) - radius_sq
        if f <= radius_sq * ROOT_RTOL:
            break
        df = -2.0 * float((w * lam / s.pow(3)).sum())
        mu -= f / df
    # Newton stays left of the root: step over it by the smallest relative amount that makes f ≤ r².
    for nudge in (1e-12, 1e-9, 1e-6, 1e-3):
        candidate = mu * (1.0 + nudge) + nudge / float(lam.max())
        if float((w / (1.0 + candidate * lam).square()).sum()) <= radius_sq:
            return candidate
    return mu * 2.0 + 1.0 / float(lam.max())


def shrink_coordinates(Mt: torch.Tensor, lam: torch.Tensor, radius_sq: float) -> torch.Tensor:
    """Eq. 4 in the rotated coordinates: ``m̃_j / (1 + μ λ_j)`` for every column of ``M̃`` (``[out, k]``, float64).

    Returns ``M̃`` itself when ``Σ_j λ_j ‖m̃_j‖² ≤ r²`` already.
    """
    mu = shrink_multiplier(lam, Mt.square().sum(0), radius_sq)  # c_j = ‖m̃_j‖²
    if mu == 0.0:
        return Mt
    if math.isinf(mu):
        return Mt * (lam <= 0).to(Mt.dtype)  # only directions the prior never uses survive a zero radius
    return Mt / (1.0 + mu * lam)


def project_onto_ellipsoid(M: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, radius_sq: float) -> torch.Tensor:
    """The exact Euclidean projection of ``M`` (``[out, k]``, float64) onto ``{M : tr(M G Mᵀ) ≤ r²}``, ``G = Q diag(λ) Qᵀ`` (eq. 4).

    Returns ``M`` itself when it is inside.
    """
    Mt = M @ Q  # M̃ [out, k]
    shrunk = shrink_coordinates(Mt, lam, radius_sq)
    return M if shrunk is Mt else shrunk @ Q.T


class LeakageBudget:
    """``L(ΔW) ≤ ε`` (eq. 3) for one protected weight, enforced in place after every optimizer step.

    ``epsilon=None`` keeps the measurement and the soft form's penalty without a wall. ``S`` is the weight's
    prior second moment, ``W`` its base weight and ``U`` the basis the update lives in,
    exactly as the model applies it (the adapter's buffer: its rounding is part of ``ΔW``). ``full_weight``
    says what :meth:`enforce_` is given: the trained full weight (``projected`` mode, ``ΔW = W − W₀``,
    certified with ``S`` itself) or the adapter's ``M`` (``ΔW = M Uᵀ``, certified with ``G = Uᵀ S U``).
    """

    def __init__(self, epsilon: float | None, S: torch.Tensor, W: torch.Tensor, U: torch.Tensor, *,
                 full_weight: bool = False) -> None:
        if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
            raise NullBoothError(f"leakage_budget: expected a finite ε > 0, got {epsilon}")
        device = W.device
        S = S.detach().to(device, torch.float64)
        W = W.detach().to(device, torch.float64)
        U = U.detach().to(device, torch.float64)  # [in, k]
        if S.shape != (W.shape[1], W.shape[1]) or U.shape[0] != W.shape[1]:
            raise NullBoothError(f"expected S [{W.shape[1]}, {W.shape[1]}] and U [{W.shape[1]}, k] for a weight "
                                 f"{list(W.shape)}, got S {list(S.shape)} and U {list(U.shape)}")
        self.epsilon = epsilon  # None: measure and penalise only, no wall
        self.full_weight = full_weight
        self.denominator = float(((W @ S) * W).sum())  # tr(W S Wᵀ)
        self.radius_sq = math.inf if epsilon is None else epsilon ** 2 * self.denominator  # r²
        G = U.T @ S @ U  # [k, k]
        self.G = (G + G.T) / 2
        lam, Q = torch.linalg.eigh(self.G)
        self.lam = lam.clamp_min(0.0)  # G is PSD; round-off may dip below 0
        # M̃ = ΔW R (full weight, R = U Q) or M̃ = M Q (adapter): eq. 4's coordinates.
        self.R = U @ Q if full_weight else Q
        # With R square (the adapter's M, or a basis of the whole input space) tr(ΔW S ΔWᵀ) = Σ_j λ_j ‖m̃_j‖²
        # holds for every ΔW, so the check and the projection share one product; on a proper subspace only S
        # sees the rounding that falls outside span(U).
        self.S = S if full_weight else None
        self._exact_coordinates = self.R.shape[0] == self.R.shape[1]
        self.active_steps = torch.zeros((), dtype=torch.int64)  # a tensor: checkpoints carry it
        self._penalty_matrix: torch.Tensor | None = None

    def numerator(self, delta: torch.Tensor) -> float:
        """``tr(ΔW S ΔWᵀ)`` in float64; ``delta`` is ``ΔW`` (full weight) or ``M`` (adapter)."""
        return self._numerator(delta.detach().to(torch.float64))[0]

    def _numerator(self, d: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """``tr(d S dᵀ)`` of a float64 ``d``, and ``M̃ = d R`` when it gave it (``None``: computed from ``S``)."""
        if self._exact_coordinates:
            Mt = d @ self.R
            return float((Mt.square().sum(0) * self.lam).sum()), Mt
        return max(float(((d @ self.S) * d).sum()), 0.0), None

    def leakage(self, delta: torch.Tensor) -> float:
        """Eq. 3, certified on ``delta`` as stored (see :meth:`numerator`)."""
        num = self.numerator(delta)
        if self.denominator == 0.0:
            return 0.0 if num == 0.0 else math.inf
        return math.sqrt(num / self.denominator)

    @torch.no_grad()
    def enforce_(self, param: torch.Tensor, W0: torch.Tensor | None = None) -> bool:
        """Project ``param`` (``M``, or the full weight with its start ``W0``) onto the budget; ``True`` if it moved.

        Inside the budget nothing is touched (not even a dtype round trip), so a large ``ε`` trains exactly
        like no budget. Raises when ``ε`` is below what ``param``'s dtype can represent around ``W0``.
        """
        W0 = None if W0 is None else W0.to(torch.float64)  # once: _delta and the write-back reuse it
        delta = self._delta(param, W0)
        num, Mt = self._numerator(delta)
        if self._within(num):
            return False
        Mt = delta @ self.R if Mt is None else Mt  # M̃ [out, k]
        target = self.radius_sq * (1.0 - CAST_MARGIN)
        for _ in range(CERTIFY_ATTEMPTS):
            value = shrink_coordinates(Mt, self.lam, target) @ self.R.T
            param.copy_((value + W0 if self.full_weight else value).to(param.dtype))
            achieved, _ = self._numerator(self._delta(param, W0))
            if self._within(achieved):
                self.active_steps += 1
                return True
            # The cast to the parameter's dtype rounded outwards: aim that much further inside.
            target *= min(self.radius_sq / achieved, 1.0 - 1e-6) ** 2
        raise NullBoothError(
            f"leakage_budget {self.epsilon:g} cannot be certified in {param.dtype}: rounding alone leaks more "
            f"({math.sqrt(achieved / self.denominator):.3g}); raise nullbooth.leakage_budget or train in float32"
        )

    def _within(self, numerator: float) -> bool:
        """``L ≤ ε`` both as the ellipsoid and as :meth:`leakage` reports it (each form alone can round past ε)."""
        if self.epsilon is None:
            return True
        return numerator <= self.radius_sq and (self.denominator == 0.0 or
                                                math.sqrt(numerator / self.denominator) <= self.epsilon)

    def _delta(self, param: torch.Tensor, W0: torch.Tensor | None) -> torch.Tensor:
        """``ΔW = W − W₀`` (full weight) or ``M`` (adapter), float64."""
        if not self.full_weight:
            return param.detach().to(torch.float64)
        if W0 is None:
            raise NullBoothError("a full-weight leakage budget needs the weight's start W₀")
        return param.detach().to(torch.float64) - W0.to(torch.float64)

    def penalty(self, delta: torch.Tensor) -> torch.Tensor:
        """The soft form's differentiable ``L(ΔW)²`` (float32 on ``delta``'s device, gradients flow to ``delta``)."""
        if self._penalty_matrix is None:
            self._penalty_matrix = (self.S if self.S is not None else self.G).to(delta.device, torch.float32)
        return ((delta @ self._penalty_matrix) * delta).sum() / max(self.denominator, 1e-300)
