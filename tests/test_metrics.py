"""Metrics against independent computations and known cases (float64; tolerances stated per test)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from PIL import Image

from nullbooth.errors import NullBoothError
from nullbooth.eval.metrics import (
    attribute_jsd,
    colour_kernel,
    coverage,
    distribution_metrics,
    frechet_distance,
    frechet_distance_from_moments,
    identity_similarity,
    jsd,
    mmd2,
    one_nn_accuracy,
    paired_image_distance,
    prdc,
    random_colour_hit_rate,
    subject_fidelity,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------ MMD


def _mmd2_loops(x, y, sigma):
    """Lemma 6 of Gretton et al. (2012) written as explicit double loops."""
    k = lambda a, b: math.exp(-float(np.sum((a - b) ** 2)) / (2 * sigma * sigma))
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd2_matches_loops_with_median_heuristic():
    x, y = _rng(1).normal(size=(9, 3)), _rng(2).normal(loc=0.7, size=(7, 3))
    z = np.concatenate([x, y])
    sigma = float(np.median([np.linalg.norm(a - b) for a, b in itertools.combinations(z, 2)]))
    assert mmd2(x, y) == pytest.approx(_mmd2_loops(x, y, sigma), abs=1e-12)
    assert mmd2(x, y, sigma=0.5) == pytest.approx(_mmd2_loops(x, y, 0.5), abs=1e-12)


def test_mmd2_same_distribution_near_zero_and_shift_positive():
    r = _rng(3)
    a, b = r.normal(size=(300, 4)), r.normal(size=(300, 4))
    assert abs(mmd2(a, b)) < 0.01  # unbiased: E = 0; sd at n=300 is ~1e-3
    assert mmd2(a, a + 3.0) > 0.5


def test_mmd2_needs_two_samples():
    with pytest.raises(NullBoothError, match="at least 2 samples"):
        mmd2(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(NullBoothError, match="feature dimension"):
        mmd2(np.zeros((3, 3)), np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------------ PRDC


def _prdc_loops(x, y, k):
    """Naeem et al. (2020) Eqs. 1–4 with explicit loops and sorted distance lists."""
    dist = lambda a, b: float(np.linalg.norm(a - b))
    rad = lambda s, i: sorted(dist(s[i], s[j]) for j in range(len(s)) if j != i)[k - 1]
    rx = [rad(x, i) for i in range(len(x))]
    ry = [rad(y, j) for j in range(len(y))]
    prec = np.mean([any(dist(yj, x[i]) <= rx[i] for i in range(len(x))) for yj in y])
    rec = np.mean([any(dist(xi, y[j]) <= ry[j] for j in range(len(y))) for xi in x])
    dens = sum(dist(yj, x[i]) <= rx[i] for yj in y for i in range(len(x))) / (k * len(y))
    cov = np.mean([any(dist(yj, x[i]) <= rx[i] for yj in y) for i in range(len(x))])
    return {"precision": prec, "recall": rec, "density": dens, "coverage": cov}


def test_prdc_matches_loops():
    x, y = _rng(4).normal(size=(20, 3)), _rng(5).normal(loc=0.5, size=(15, 3))
    got, want = prdc(x, y, k=3), _prdc_loops(x, y, 3)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert coverage(x, y, k=3) == got["coverage"]


def test_prdc_known_cases():
    x = _rng(6).normal(size=(50, 2))
    same = prdc(x, x.copy(), k=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = prdc(x, x + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_needs_k_plus_one():
    with pytest.raises(NullBoothError, match=r"at least 6 samples in fake"):
        prdc(np.zeros((10, 2)), np.zeros((5, 2)), k=5)


# ------------------------------------------------------------------------------------------------ 1-NN


def test_one_nn_known_cases():
    r = _rng(7)
    a, b = r.normal(size=(200, 3)), r.normal(size=(200, 3))
    same = one_nn_accuracy(a, b)["accuracy"]
    assert abs(same - 0.5) < 0.08  # binomial sd at n=400 ≈ 0.025
    assert one_nn_accuracy(a, b + 50.0)["accuracy"] == 1.0
    # Exact duplicates: every point's nearest other point is its twin in the other set.
    assert one_nn_accuracy(a, a.copy())["accuracy"] == 0.0


def test_one_nn_matches_loop():
    x, y = _rng(8).normal(size=(6, 2)), _rng(9).normal(loc=0.3, size=(5, 2))
    z = np.concatenate([x, y])
    lab = [0] * 6 + [1] * 5
    hits = 0
    for i in range(len(z)):
        j = min((j for j in range(len(z)) if j != i), key=lambda j: np.linalg.norm(z[i] - z[j]))
        hits += lab[i] == lab[j]
    assert one_nn_accuracy(x, y)["accuracy"] == pytest.approx(hits / len(z), abs=1e-15)
    with pytest.raises(NullBoothError, match="at least 2 samples"):
        one_nn_accuracy(x[:1], y)


# -------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_commuting_case_closed_form():
    # Diagonal covariances commute: Tr(Σ1Σ2)^{1/2} = Σ sqrt(a_i b_i), so d² = |Δμ|² + Σ (√a_i − √b_i)².
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 1.0 + 4.0 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance_from_moments(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, abs=1e-12)


def test_frechet_matches_scipy_free_reference():
    # Independent reference: Tr (Σ1Σ2)^{1/2} = Σ sqrt(eig(Σ1Σ2)) (eigenvalues real, non-negative for PSD inputs).
    r = _rng(10)
    x, y = r.normal(size=(40, 5)), r.normal(size=(30, 5)) @ r.normal(size=(5, 5))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2)
    want = float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())
    assert frechet_distance(x, y) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-9)


def test_frechet_rank_deficient_is_finite():
    x = _rng(11).normal(size=(4, 16))  # n < d: singular covariances
    assert math.isfinite(frechet_distance(x, x[::-1] + 0.1))
    with pytest.raises(NullBoothError, match="at least 2 samples in fake"):
        frechet_distance(x, x[:1])


# --------------------------------------------------------------------------------------------------- JSD


def test_jsd_known_values():
    assert jsd([1, 0], [0, 1]) == pytest.approx(1.0, abs=1e-15)
    assert jsd([3, 1], [3, 1]) == 0.0
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    m = (p + q) / 2
    want = 0.5 * sum(p * np.log2(p / m)) + 0.5 * sum(q * np.log2(q / m))
    assert jsd(p, q) == pytest.approx(want, abs=1e-15)
    assert attribute_jsd(["star", "star"], ["circle"]) == pytest.approx(1.0, abs=1e-15)
    assert attribute_jsd(["a", "b"], ["b", "a"]) == 0.0
    with pytest.raises(NullBoothError, match="at least 1 label"):
        attribute_jsd([], ["a"])


# -------------------------------------------------------------------------------------- images, fidelity


def test_paired_image_distance():
    a = Image.new("RGB", (4, 4), (0, 0, 0))
    b = Image.new("RGB", (4, 4), (255, 0, 0))  # one channel of three differs by 1.0
    out = paired_image_distance([a, a], [a, b])
    assert out["per_pair_rmse"] == pytest.approx([0.0, math.sqrt(1 / 3)], abs=1e-12)
    assert out["mean_abs"] == pytest.approx((0 + 1 / 3) / 2, abs=1e-12)
    with pytest.raises(NullBoothError, match="same number"):
        paired_image_distance([a], [a, b])
    with pytest.raises(NullBoothError, match="at least 1"):
        paired_image_distance([], [])


def test_subject_fidelity():
    g = np.array([[1.0, 0.0], [0.0, 2.0]])
    r = np.array([[3.0, 0.0]])
    assert subject_fidelity(g, r) == pytest.approx(0.5, abs=1e-15)  # cos = 1 and 0
    with pytest.raises(NullBoothError, match="all-zero"):
        subject_fidelity(np.zeros((1, 2)), r)
    with pytest.raises(NullBoothError, match="at least 1 samples in generated"):
        subject_fidelity(np.zeros((0, 2)), r)


def test_identity_similarity_is_the_mean_soft_match():
    # k(d) = 2^{-(d/τ)²}: 1, ½, 1/16 at 0, τ, 2τ (exact in binary floating point).
    np.testing.assert_array_equal(colour_kernel([0.0, 40.0, 80.0], 40.0), [1.0, 0.5, 0.0625])
    got = identity_similarity([1.0, 0.5], [1.0, 1.0], [0.0, 40.0], [40.0, 0.0], 40.0)
    assert got == pytest.approx((1 * 1 * 1 * 0.5 + 0.5 * 1 * 0.5 * 1) / 2, abs=1e-15)
    solid = identity_similarity([1.0], [1.0], [40.0], None, 40.0)  # no pattern-colour factor
    assert solid == pytest.approx(0.5, abs=1e-15)
    with pytest.raises(NullBoothError, match="tolerance must be > 0"):
        colour_kernel([1.0], 0.0)
    with pytest.raises(NullBoothError, match="at least 1 sample"):
        identity_similarity([], [], [], None, 40.0)


def test_random_colour_hit_rate_matches_the_ball_volume():
    # Far from the cube's faces P(‖a − b‖ ≤ t) → (4/3)πt³/256³; faces only lower it. 200 000 pairs: σ ≈ 0.0003.
    for t in (20.0, 40.0):
        ball = 4 / 3 * math.pi * t**3 / 256**3
        assert 0.6 * ball < random_colour_hit_rate(t) <= ball + 0.001
    assert random_colour_hit_rate(500.0, n=1000) == 1.0  # > the cube's diagonal (441.7)


def test_bundle_identical_and_disjoint():
    x = _rng(12).normal(size=(60, 4))
    y = _rng(13).normal(size=(60, 4))
    same = distribution_metrics(x, y)
    far = distribution_metrics(x, y + 20.0)
    assert abs(same["mmd2"]) < 0.05 and far["mmd2"] > 0.5
    assert far["frechet_distance"] == pytest.approx(4 * 20.0**2, rel=0.05)
    assert far["one_nn_accuracy"] == 1.0 and abs(same["one_nn_accuracy"] - 0.5) < 0.15
    assert math.isfinite(same["frechet_distance"]) and same["frechet_distance"] < far["frechet_distance"]
    with pytest.raises(NullBoothError, match="NaN"):
        mmd2(np.full((3, 2), np.nan), x[:, :2])
