"""Preservation and fidelity metrics on feature vectors and images — pure numpy, float64 throughout.

Every metric takes feature matrices ``[n, d]`` (rows are samples; any :class:`nullbooth.world.judge.FeatureExtractor`
output) and raises :class:`NullBoothError` naming the number of samples it needs instead of returning NaN.

Conventions: ``real`` / ``X`` is the reference set (e.g. base-model generations or instance images),
``fake`` / ``Y`` the set under test (e.g. personalised-model generations).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
from PIL import Image

from nullbooth.errors import NullBoothError

# ------------------------------------------------------------------------------------------------ helpers


def _features(a, name: str, min_n: int, metric: str) -> np.ndarray:
    """``a`` as a finite float64 matrix ``[n, d]`` with ``n ≥ min_n``."""
    x = np.asarray(a, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :] if x.size else x.reshape(0, 0)
    if x.ndim != 2:
        raise NullBoothError(f"{metric}: expected {name} as a [n, d] feature matrix, got shape {x.shape}")
    if x.shape[0] < min_n:
        raise NullBoothError(
            f"{metric} needs at least {min_n} samples in {name}, got {x.shape[0]}; generate more images"
        )
    if not np.all(np.isfinite(x)):
        raise NullBoothError(f"{metric}: {name} contains NaN or infinite features")
    return x


def _same_dim(x: np.ndarray, y: np.ndarray, metric: str) -> None:
    if x.shape[1] != y.shape[1]:
        raise NullBoothError(
            f"{metric}: both sets need the same feature dimension, got {x.shape[1]} and {y.shape[1]}; "
            "extract both with the same feature extractor"
        )


def pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[n, m]`` in float64, ``‖a_i‖² + ‖b_j‖² − 2 a_i·b_j`` clamped at 0."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


# ---------------------------------------------------------------------------------------------------- MMD


def median_heuristic(x: np.ndarray, y: np.ndarray) -> float:
    """RBF bandwidth σ = median pairwise distance of the pooled sample (Gretton et al. 2012, JMLR 13, §8)."""
    z = np.concatenate([x, y])
    d = np.sqrt(pairwise_sq_dists(z, z)[np.triu_indices(z.shape[0], k=1)])
    med = float(np.median(d))
    if med <= 0.0:
        # All points coincide: any bandwidth gives the same kernel values; 1 avoids division by zero.
        return 1.0
    return med


def mmd2(real, fake, sigma: float | None = None) -> float:
    """Unbiased squared Maximum Mean Discrepancy with an RBF kernel (Gretton et al. 2012, JMLR 13, Lemma 6).

    ``MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j) − 2/(mn) Σ_{i,j} k(x_i, y_j)``
    with ``k(a, b) = exp(−‖a − b‖² / (2σ²))`` and σ from :func:`median_heuristic` unless given.
    Zero in expectation when the distributions agree; being unbiased, it can be slightly negative.
    Needs ≥ 2 samples per set (the i ≠ j sums are empty otherwise).
    """
    x = _features(real, "real", 2, "MMD")
    y = _features(fake, "fake", 2, "MMD")
    _same_dim(x, y, "MMD")
    s = median_heuristic(x, y) if sigma is None else float(sigma)
    if not s > 0:
        raise NullBoothError(f"MMD: the kernel bandwidth σ must be positive, got {sigma}")
    g = 1.0 / (2.0 * s * s)
    kxx = np.exp(-g * pairwise_sq_dists(x, x))
    kyy = np.exp(-g * pairwise_sq_dists(y, y))
    kxy = np.exp(-g * pairwise_sq_dists(x, y))
    m, n = x.shape[0], y.shape[0]
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


# --------------------------------------------------------------------------- precision/recall/density/coverage


def _kth_nn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest *other* row (NND_k in Naeem et al. 2020)."""
    d = np.sqrt(pairwise_sq_dists(x, x))
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc(real, fake, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage with k-NN balls (Naeem et al. 2020, ICML, Eqs. 1–4).

    With ``B(x, NND_k(x))`` the ball around a real sample reaching its k-th nearest real neighbour:

    - precision = (1/M) Σ_j 1[∃ i: Y_j ∈ B(X_i, NND_k(X_i))]          (Kynkäänniemi et al. 2019)
    - recall    = (1/N) Σ_i 1[∃ j: X_i ∈ B(Y_j, NND_k(Y_j))]          (balls around fake samples)
    - density   = (1/(kM)) Σ_j Σ_i 1[Y_j ∈ B(X_i, NND_k(X_i))]
    - coverage  = (1/N) Σ_i 1[∃ j: Y_j ∈ B(X_i, NND_k(X_i))]

    Needs ≥ k + 1 samples in each set (the k-th neighbour must exist besides the point itself).
    """
    if k < 1:
        raise NullBoothError(f"PRDC: k must be ≥ 1, got {k}")
    x = _features(real, "real", k + 1, f"PRDC (k={k})")
    y = _features(fake, "fake", k + 1, f"PRDC (k={k})")
    _same_dim(x, y, "PRDC")
    r_real = _kth_nn_radii(x, k)  # [N]
    r_fake = _kth_nn_radii(y, k)  # [M]
    d = np.sqrt(pairwise_sq_dists(x, y))  # [N, M]
    inside_real = d <= r_real[:, None]  # Y_j in ball of X_i
    inside_fake = d <= r_fake[None, :]  # X_i in ball of Y_j
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float(inside_fake.any(axis=1).mean()),
        "density": float(inside_real.sum() / (k * y.shape[0])),
        "coverage": float(inside_real.any(axis=1).mean()),
    }


def coverage(real, fake, k: int = 5) -> float:
    """Coverage of Naeem et al. (2020), Eq. 4: the fraction of real samples whose k-NN ball holds a fake one."""
    return prdc(real, fake, k)["coverage"]


# ----------------------------------------------------------------------------------------------- 1-NN


def one_nn_accuracy(real, fake) -> dict[str, float]:
    """Leave-one-out 1-nearest-neighbour two-sample test accuracy (Lopez-Paz & Oquab 2017; Xu et al. 2018).

    Pool both sets, label them, classify every sample by its nearest *other* sample (Euclidean), and report
    the accuracy overall and per set. ≈ 0.5 when the two samples come from one distribution, 1.0 when they
    are separated. Exact duplicates across the sets make it 0 (each point's neighbour is its twin).
    Ties are broken towards the lower index of the pooled ``[real; fake]`` order. Needs ≥ 2 samples per set.
    """
    x = _features(real, "real", 2, "1-NN accuracy")
    y = _features(fake, "fake", 2, "1-NN accuracy")
    _same_dim(x, y, "1-NN accuracy")
    z = np.concatenate([x, y])
    labels = np.r_[np.zeros(x.shape[0], bool), np.ones(y.shape[0], bool)]
    d = pairwise_sq_dists(z, z)
    np.fill_diagonal(d, np.inf)
    nearest = d.argmin(axis=1)
    correct = labels[nearest] == labels
    return {
        "accuracy": float(correct.mean()),
        "real_accuracy": float(correct[: x.shape[0]].mean()),
        "fake_accuracy": float(correct[x.shape[0]:].mean()),
    }


# -------------------------------------------------------------------------------------- Fréchet distance


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via ``eigh`` (eigenvalues clamped at 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_moments(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between Gaussians (Dowson & Landau 1982; Heusel et al. 2017, FID):

    ``d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})``.

    ``Tr (Σ₁Σ₂)^{1/2}`` is computed as ``Tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}`` — the same eigenvalues, but the
    matrix is symmetric PSD, so ``eigh`` applies and no complex parts or ``sqrtm`` instabilities arise.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise NullBoothError(
            f"Fréchet distance: expected means [d] and covariances [d, d] of one d, got "
            f"{mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}"
        )
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_sqrt = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt, 0.0))


def frechet_distance(real, fake) -> float:
    """Fréchet distance between Gaussian fits (mean, unbiased covariance) of two feature sets — FID's formula
    on whatever features are given. Needs ≥ 2 samples per set; with fewer samples than dimensions the
    covariances are rank-deficient and the value is biased upward (compare runs of equal size only).
    """
    x = _features(real, "real", 2, "Fréchet distance")
    y = _features(fake, "fake", 2, "Fréchet distance")
    _same_dim(x, y, "Fréchet distance")
    return frechet_distance_from_moments(x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]),
                                         y.mean(0), np.cov(y, rowvar=False).reshape(y.shape[1], y.shape[1]))


# --------------------------------------------------------------------------------------------------- JSD


def histogram(labels: Sequence[str], categories: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Normalised histogram of categorical ``labels`` over ``categories`` (default: the sorted labels seen)."""
    counts = Counter(labels)
    cats = list(categories) if categories is not None else sorted(counts)
    unknown = set(counts) - set(cats)
    if unknown:
        raise NullBoothError(f"histogram: labels {sorted(unknown)} are not among the categories {cats}")
    h = np.array([counts[c] for c in cats], np.float64)
    return cats, h / h.sum()


def jsd(p, q, base: float = 2.0) -> float:
    """Jensen–Shannon divergence (Lin 1991, Eq. 4.1): ``½ KL(P‖M) + ½ KL(Q‖M)``, ``M = (P + Q)/2``.

    ``p``, ``q`` are non-negative weights over the same categories (normalised here). In ``[0, 1]`` for base 2.
    """
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim != 1 or p.size == 0:
        raise NullBoothError(f"JSD: expected two histograms over the same categories, got shapes {p.shape}, {q.shape}")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise NullBoothError("JSD: histograms must be non-negative with a positive total")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2.0

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0  # 0 log 0 = 0; b > 0 wherever a > 0 since b = (a + ·)/2
        return float((a[nz] * np.log(a[nz] / b[nz])).sum())

    return max((kl(p, m) + kl(q, m)) / 2.0 / np.log(base), 0.0)


def attribute_jsd(labels_a: Sequence[str], labels_b: Sequence[str],
                  categories: Sequence[str] | None = None) -> float:
    """JSD (base 2) between the histograms of one attribute (e.g. judged shapes) in two image sets.

    Needs ≥ 1 label per set.
    """
    if len(labels_a) < 1 or len(labels_b) < 1:
        raise NullBoothError(
            f"attribute JSD needs at least 1 label per set, got {len(labels_a)} and {len(labels_b)}"
        )
    cats = list(categories) if categories is not None else sorted(set(labels_a) | set(labels_b))
    return jsd(histogram(labels_a, cats)[1], histogram(labels_b, cats)[1])


# ---------------------------------------------------------------------------------------- paired images


def _pixels(im) -> np.ndarray:
    if isinstance(im, Image.Image):
        return np.asarray(im.convert("RGB"), np.float64) / 255.0
    a = np.asarray(im, np.float64)
    return a / 255.0 if a.max(initial=0.0) > 1.0 else a


def paired_image_distance(images_a: Sequence, images_b: Sequence) -> dict[str, float | list[float]]:
    """Distance between images generated from the same prompt and seed by two models.

    Per pair: root-mean-square pixel difference (RMSE) and mean absolute difference, pixels in [0, 1]
    (PIL images are divided by 255). 0 for an unchanged model; it measures how far personalisation moved
    outputs the user did not ask to change. Needs ≥ 1 pair, equal counts and equal image sizes.
    """
    if len(images_a) != len(images_b):
        raise NullBoothError(
            f"paired image distance needs the same number of images from both models, got {len(images_a)} "
            f"and {len(images_b)}"
        )
    if len(images_a) < 1:
        raise NullBoothError("paired image distance needs at least 1 image pair, got 0")
    rmse, mad = [], []
    for k, (a, b) in enumerate(zip(images_a, images_b)):
        pa, pb = _pixels(a), _pixels(b)
        if pa.shape != pb.shape:
            raise NullBoothError(f"paired image distance: pair {k} has sizes {pa.shape} and {pb.shape}")
        diff = pa - pb
        rmse.append(float(np.sqrt((diff ** 2).mean())))
        mad.append(float(np.abs(diff).mean()))
    return {"rmse": float(np.mean(rmse)), "mean_abs": float(np.mean(mad)), "per_pair_rmse": rmse}


# ------------------------------------------------------------------------------------------ subject fidelity


def cosine_similarity_matrix(a, b) -> np.ndarray:
    """``[n, m]`` cosine similarities of the rows of ``a`` and ``b`` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if (na == 0).any() or (nb == 0).any():
        raise NullBoothError("cosine similarity is undefined for an all-zero embedding")
    return (a / na[:, None]) @ (b / nb[:, None]).T


def subject_fidelity(generated, instances) -> float:
    """Mean pairwise cosine similarity of generated-image and instance-image embeddings.

    The DINO/CLIP-I score of DreamBooth (Ruiz et al. 2023, §4.1): ``(1/(nm)) Σ_i Σ_j cos(g_i, r_j)``.
    Needs ≥ 1 embedding per set.
    """
    g = _features(generated, "generated", 1, "subject fidelity")
    r = _features(instances, "instances", 1, "subject fidelity")
    _same_dim(g, r, "subject fidelity")
    return float(cosine_similarity_matrix(g, r).mean())


def colour_kernel(error, tolerance: float) -> np.ndarray:
    """``k(d) = 2^{−(d/τ)²}`` of sRGB errors ``d`` with tolerance ``τ``: 1 at 0, ½ at the tolerance, 1/16 at 2τ."""
    if not tolerance > 0:
        raise NullBoothError(f"colour tolerance must be > 0 (sRGB units, 0–255), got {tolerance}")
    return np.exp2(-(np.asarray(error, np.float64) / float(tolerance)) ** 2)


def identity_similarity(p_shape, p_kind, colour_error, pattern_error, tolerance: float) -> float:
    """Soft subject match, the mean over samples of

    ``s_i = P_i(shape*) · P_i(kind*) · k(‖ĉ_i − c*‖) · k(‖p̂_i − p*‖)``

    with the judge's probabilities of the reference shape and pattern kind, :func:`colour_kernel` ``k`` of the
    main- and pattern-colour errors (``pattern_error`` None for a solid subject: no factor). In [0, 1]; 1 only
    for certain readings of exactly the reference. Needs ≥ 1 sample.
    """
    s = np.asarray(p_shape, np.float64) * np.asarray(p_kind, np.float64) * colour_kernel(colour_error, tolerance)
    if pattern_error is not None:
        s = s * colour_kernel(pattern_error, tolerance)
    if s.size == 0:
        raise NullBoothError("identity similarity needs at least 1 sample, got 0")
    return float(s.mean())


def random_colour_hit_rate(tolerance: float, n: int = 200_000, seed: int = 0) -> float:
    """Probability that two independent uniform sRGB colours (0–255 per channel) lie within ``tolerance``
    (Euclidean) of each other — the chance level of a colour match, by Monte Carlo over ``n`` pairs."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 256, (n, 3)), rng.integers(0, 256, (n, 3))
    return float((np.linalg.norm((a - b).astype(np.float64), axis=1) <= tolerance).mean())


# ------------------------------------------------------------------------------------------------ bundle


def distribution_metrics(real, fake, k: int = 5) -> dict[str, float]:
    """All set-to-set metrics at once: MMD², PRDC, 1-NN accuracy and Fréchet distance."""
    out = {"mmd2": mmd2(real, fake), "frechet_distance": frechet_distance(real, fake)}
    out.update(prdc(real, fake, k))
    out.update({f"one_nn_{key}": v for key, v in one_nn_accuracy(real, fake).items()})
    return out
