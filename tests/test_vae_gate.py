"""``scripts/vae_gate.py``: the general VAE's gate, checked with codecs whose answer is known."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def gate_script(scripts_importable):
    import vae_gate

    return vae_gate


class Codec:
    """``decode(mode(encode(x)))`` = ``recolour(x)``: the identity, or a channel permutation."""

    dtype = torch.float32

    def __init__(self, channels=(0, 1, 2)) -> None:
        self.channels = list(channels)

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        return SimpleNamespace(sample=z[:, self.channels])


def test_a_lossless_codec_keeps_everything(gate_script):
    from nullbooth.world.judge import load_judge

    result, grid = gate_script.vae_gate(Codec(), load_judge(), n_subjects=6)
    assert result["images"] == 30 and result["passed"]
    assert all(v == 1.0 for v in result["kept"].values())
    assert all(ci == [1.0, 1.0] for ci in result["kept_ci95"].values())
    assert grid.size == (12 * 64, 2 * 64)  # originals over reconstructions, two views of each subject


def test_a_codec_that_swaps_red_and_blue_loses_the_colour(gate_script):
    """Random subjects' colours move by far more than the tolerance when R and B swap; shape and kind stay."""
    from nullbooth.world.judge import load_judge

    result, _ = gate_script.vae_gate(Codec((2, 1, 0)), load_judge(), n_subjects=6)
    assert result["kept"]["colour"] < 0.5 and not result["passed"]
    assert result["kept"]["shape"] >= 0.9
    lo, hi = result["kept_ci95"]["colour"]
    assert lo <= result["kept"]["colour"] <= hi


def test_the_interval_resamples_subjects_not_views(gate_script):
    """Half the subjects keep every view, half none: per view that is 0.5 ± 0.07 at 200 views, but there are only
    40 independent subjects, so the interval is about twice as wide; NaN (solid: no pattern colour) is skipped."""
    flags = np.repeat(np.array([1.0, 0.0] * 20), 5)
    lo, hi = gate_script.subject_interval(flags, 5)
    assert lo < 0.4 and hi > 0.6
    assert gate_script.subject_interval(np.ones(200), 5) == (1.0, 1.0)
    with_nan = np.where(np.arange(200) % 5 == 0, np.nan, 1.0)
    assert gate_script.subject_interval(with_nan, 5) == (1.0, 1.0)


def test_a_family_of_solid_subjects_has_no_pattern_colour_to_keep(gate_script, monkeypatch):
    """Where every original reads solid the pattern-colour rate is None, not NaN (which JSON cannot hold) nor 1."""
    from dataclasses import replace

    import nullbooth.world.subjects as subjects
    from nullbooth.world.judge import load_judge

    draw = subjects.random_subject
    monkeypatch.setattr(subjects, "random_subject",
                        lambda seed, i: replace(draw(seed, i), pattern="solid", pattern_colour=None))
    result, _ = gate_script.vae_gate(Codec(), load_judge(), n_subjects=4)
    if result["against_truth"]["original"]["pattern_match"] < 1.0:
        pytest.skip("the judge reads a pattern into a solid view")
    assert result["kept"]["pattern_colour"] is None and result["kept_ci95"]["pattern_colour"] is None
    assert result["against_truth"]["original"]["pattern_colour_match"] is None
    assert result["passed"]
