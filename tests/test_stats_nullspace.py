"""Statistics and null spaces: exactness of streaming/merging, projector algebra, threshold modes on real CLIP data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nullbooth.errors import NullBoothError
from nullbooth.stats.moments import SecondMoment, merge_all
from nullbooth.stats.nullspace import (
    empty_fix,
    null_dimension,
    null_space,
    spectrum,
    validate_covariance,
)

CLIP_COV = Path(__file__).resolve().parents[1] / "src" / "nullbooth" / "data" / "clip_vit_l14_text_covariance.npy"
REL = 1e-10  # float64 streaming vs one-shot


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_streamed_equals_one_shot_in_float64():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5000, 48, generator=g, dtype=torch.float64) * torch.logspace(-4, 2, 48, dtype=torch.float64)
    stat = SecondMoment(48)
    for chunk in X.split(333):
        stat.add(chunk)  # chunks of odd size on purpose
    assert stat.count == 5000
    assert _rel(stat.moment(), X.T @ X / 5000) < REL


def test_float32_inputs_are_accumulated_in_float64():
    X = torch.randn(4000, 16, dtype=torch.float32)
    stat = SecondMoment(16)
    for chunk in X.split(100):
        stat.add(chunk)
    exact = X.double().T @ X.double() / 4000
    assert stat.sum.dtype == torch.float64
    assert _rel(stat.moment(), exact) < REL


def test_merge_of_parts_equals_whole_and_state_round_trip():
    X = torch.randn(3000, 20, dtype=torch.float64)
    whole = SecondMoment(20, track_mean=True)
    whole.add(X)
    parts = []
    for chunk in X.split(700):
        s = SecondMoment(20, track_mean=True)
        s.add(chunk)
        parts.append(SecondMoment.from_state_dict(s.state_dict()))
    merged = merge_all(parts)
    assert merged.count == whole.count
    assert _rel(merged.moment(), whole.moment()) < REL
    centered = X - X.mean(0)
    assert _rel(merged.covariance(), centered.T @ centered / 3000) < 1e-9


def test_merge_refuses_other_width():
    with pytest.raises(NullBoothError, match="width"):
        SecondMoment(4).merge(SecondMoment(5))
    with pytest.raises(NullBoothError, match="width 4"):
        SecondMoment(4).add(torch.zeros(3, 5))


def test_projector_symmetric_idempotent_and_annihilates_preserved_inputs():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(30, 12, generator=g, dtype=torch.float64)  # inputs span 12 of 30 dims
    X = torch.randn(400, 12, generator=g, dtype=torch.float64) @ A.T
    stat = SecondMoment(30)
    stat.add(X)
    ns = null_space(stat.moment(), "relative", 1e-10)
    assert ns.null_dim == 18
    P = ns.projector()
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ P, P, atol=1e-12)
    delta = torch.randn(7, 30, generator=g, dtype=torch.float64)
    assert float((delta @ P @ X.T).norm() / (delta @ X.T).norm()) < 1e-10


def test_threshold_modes_on_real_clip_covariance():
    C = np.load(CLIP_COV, allow_pickle=False)
    lam = spectrum(C).eigenvalues
    assert 1.0 < float(lam[0]) < 1.3 and 4000 < float(lam[-1]) < 5000
    assert null_dimension(lam, "absolute", 2e-2) == 0  # the seed default keeps nothing on real text features
    k_rel = null_dimension(lam, "relative", 1e-3)
    assert k_rel == int((lam < 1e-3 * lam[-1]).sum()) and 0 < k_rel < 768
    assert null_dimension(lam, "rank", 700) == 68
    assert null_dimension(lam, "rank", 1000) == 0
    k_energy = null_dimension(lam, "energy", 1e-3)
    assert float(lam[:k_energy].sum()) <= 1e-3 * float(lam.sum()) < float(lam[: k_energy + 1].sum())
    assert null_dimension(lam, "percentile", 10) == int((lam <= torch.quantile(lam, 0.10)).sum())
    assert null_dimension(lam, "percentile", 0) == 0
    ns = null_space(C, "relative", 1e-3)
    P = ns.projector()
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T, atol=1e-12)
    assert ns.leakage_bound() < 1e-3 * float(lam[-1])


def test_empty_null_space_warns_with_a_fix():
    C = np.load(CLIP_COV, allow_pickle=False)
    with pytest.warns(UserWarning, match="null space is empty.*relative"):
        ns = null_space(C, "absolute", 2e-2, name="clip/k")
    assert ns.null_dim == 0 and ns.projector().abs().max() == 0


def test_degenerate_null_space_fix_fits_the_mode():
    """The fix a warning suggests must move the threshold the right way for the mode in use (and not suggest the
    mode the user already has)."""
    C = np.load(CLIP_COV, allow_pickle=False)
    with pytest.warns(UserWarning, match=r"empty.*raise nullbooth.nullspace_threshold above λ_min / λ_max.*'energy'") as rec:
        null_space(C, "relative", 1e-5, name="clip/k")
    assert "nullspace_mode 'relative'" not in str(rec[0].message)
    with pytest.warns(UserWarning, match="whole 768-dim.*raise nullbooth.nullspace_threshold, the rank kept"):
        null_space(C, "rank", 0, name="clip/k")
    with pytest.warns(UserWarning, match="empty.*lower nullbooth.nullspace_threshold, the rank kept"):
        null_space(C, "rank", 768, name="clip/k")

    # The threshold a message names opens every weight it lists: just above it, none is empty.
    spectra = [torch.tensor([1.0, 3.0, 10.0]), torch.tensor([2.0, 2.5, 4.0])]
    for mode in ("absolute", "relative"):
        message = empty_fix(mode, [(float(lam[0]), float(lam[-1])) for lam in spectra])
        named = float(re.search(r"\(([\d.e+-]+) opens all 2\)", message)[1])
        assert named == (2.0 if mode == "absolute" else 0.5)
        assert all(null_dimension(lam, mode, named * 1.001) >= 1 for lam in spectra)
        assert any(null_dimension(lam, mode, named) == 0 for lam in spectra)


@pytest.mark.parametrize("mode,value", [("relative", 1.5), ("energy", -0.1), ("rank", 2.5), ("percentile", 101), ("absolute", -1)])
def test_threshold_out_of_range(mode, value):
    with pytest.raises(NullBoothError, match=mode):
        null_dimension(torch.ones(4, dtype=torch.float64), mode, value)


def test_validate_covariance_flags_problems():
    good = validate_covariance(np.load(CLIP_COV, allow_pickle=False))
    assert good["symmetric"] and good["positive_semidefinite"] and good["rank"] == 768
    bad = np.diag([1.0, -1.0, 2.0])
    assert not validate_covariance(bad)["positive_semidefinite"]
    asym = np.array([[1.0, 0.5], [0.0, 1.0]])
    assert not validate_covariance(asym)["symmetric"]
    assert not validate_covariance(np.full((2, 2), np.nan))["finite"]
