"""``scripts/composition_gate.py``: the base model's held-out composition gate, its interval and its record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

Z = 1.959964


@pytest.fixture(scope="module")
def gate_script(scripts_importable):
    import composition_gate

    return composition_gate


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (93, 100), (467, 500), (500, 500)])
def test_wilson_bounds_solve_the_score_equation(gate_script, k, n):
    """Wilson's interval is the set of rates p with n (k/n − p)² ≤ z² p (1 − p): both ends are roots (1e-12)."""
    lo, hi = gate_script.wilson_interval(k, n)
    p_hat = k / n
    assert 0.0 <= lo <= p_hat <= hi <= 1.0
    for p in (lo, hi):
        assert n * (p_hat - p) ** 2 == pytest.approx(Z * Z * p * (1 - p), abs=1e-12)


def test_wilson_interval_at_the_gate(gate_script):
    """93 of 100 reads 86.3–96.6 % (the textbook value, to 1e-3); 465 of 500 narrows it to about ±2.2 points."""
    assert gate_script.wilson_interval(93, 100) == pytest.approx((0.8626, 0.9657), abs=1e-3)
    lo, hi = gate_script.wilson_interval(465, 500)
    assert 0.040 < hi - lo < 0.046


def test_composition_gate_on_the_shipped_model(gate_script):
    """Five prompts, one per held-out pair, two DDIM steps: the per-pair rates average to the overall one, the
    images come back in prompt order, and ``passed`` is the rate against the bar."""
    from nullbooth.models import load_pipeline
    from nullbooth.world.judge import load_judge

    pipe = load_pipeline("tiny-sd")
    result, heldout, train = gate_script.composition_gate(pipe, load_judge(), n=5, steps=2)
    assert len(heldout) == len(train) == 5 and result["heldout"]["n"] == result["train"]["n"] == 5
    assert len(result["heldout_per_pair"]) == 5
    per_pair = result["heldout_per_pair"].values()
    assert sum(per_pair) / 5 == pytest.approx(result["heldout"]["shape_and_colour"])
    lo, hi = result["heldout"]["shape_and_colour_ci95"]
    assert lo <= result["heldout"]["shape_and_colour"] <= hi
    assert result["passed"] == (result["heldout"]["shape_and_colour"] >= gate_script.GATE)


def test_shipped_composition_gate_is_recorded():
    """The shipped model's gate on 500 prompts per split: consistent with itself (interval, per-pair mean,
    ``passed``); the held-out rate, 95.6 %, meets the 95 % issue 15 asks, and ``passed`` says so."""
    from nullbooth.models import resolve_model_path

    gate = json.loads((Path(resolve_model_path("tiny-sd")) / "composition_gate.json").read_text())
    held = gate["heldout"]
    assert held["n"] >= 500 and gate["train"]["n"] == held["n"]
    lo, hi = held["shape_and_colour_ci95"]
    assert lo <= held["shape_and_colour"] <= hi and hi - lo < 0.05
    pairs = gate["heldout_per_pair"]
    assert len(pairs) == 5 and math.isclose(sum(pairs.values()) / 5, held["shape_and_colour"], abs_tol=1e-9)
    assert held["shape_and_colour"] >= gate["gate"] == 0.95 and gate["passed"] is True
