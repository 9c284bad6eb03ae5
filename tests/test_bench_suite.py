"""The suite benchmark: its statistics recomputed by hand, and a CI-sized slice run end to end.

- ``mean_ci``: the 95 % Student-t half-width against t₀.₉₇₅ from a table (n = 4: 3.182), 1e-3 relative;
- ``sweep_choice`` picks, per method, the rate with the largest mean of fidelity and preservation;
- ``aggregate`` groups rows by (method, step) over subjects × seeds;
- ``--quick`` (a slice: one random subject plus the star, four methods, 4 steps, two checkpoints) writes
  ``suite.json``/``.md``/``.png`` with a base row and a curve per method, and a resumed run recomputes nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_suite.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_mean_ci_is_the_student_t_interval():
    b = _bench()
    values = [0.2, 0.4, 0.5, 0.9]
    mean, half = b.mean_ci(values)
    sd = math.sqrt(sum((v - 0.5) ** 2 for v in values) / 3)
    assert mean == pytest.approx(0.5, abs=1e-12)
    assert half == pytest.approx(3.182 * sd / 2, rel=1e-3)
    assert b.mean_ci([0.3]) == (0.3, 0.0)
    assert b.mean_ci([None, 0.7, 0.7])[0] == pytest.approx(0.7)  # solid subjects: no pattern-colour value


def test_sweep_picks_the_best_mean_of_fidelity_and_preservation():
    b = _bench()
    rows = [{"label": "lora", "method": "lora", "lr": lr, "subject_match": f, "prior_agreement": p}
            for lr, f, p in ((1e-3, 0.1, 0.99), (3e-3, 0.5, 0.9), (1e-2, 0.9, 0.3))]
    rows.append({"label": "base", "method": "base", "lr": 0.0, "subject_match": 0.0, "prior_agreement": 1.0})
    choice = b.sweep_choice(rows)
    assert list(choice["methods"]) == ["lora"]
    assert choice["methods"]["lora"]["chosen"] == 3e-3  # (0.5 + 0.9)/2 = 0.7 beats 0.545 and 0.6


def test_aggregate_groups_by_method_and_step():
    b = _bench()
    rows = []
    for subject, match in (("a", 0.2), ("b", 0.6)):
        for step in (2, 4):
            rows.append({"subject": subject, "label": "lora", "method": "lora", "lr": 1e-3, "seed": 0, "step": step,
                         "train_seconds": 1.0, **{m: match * step / 4 for m in b.METRICS}})
    curves = {(c["label"], c["step"]): c for c in b.aggregate(rows)["curves"]}
    assert set(curves) == {("lora", 2), ("lora", 4)}
    assert curves[("lora", 4)]["subject_match"] == pytest.approx(0.4) and curves[("lora", 4)]["n"] == 2
    assert curves[("lora", 2)]["subject_match"] == pytest.approx(0.2)


@pytest.mark.slow
def test_quick_slice_runs_end_to_end(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--quick", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900, cwd=REPO)
    result = json.loads((tmp_path / "out" / "suite.json").read_text())
    labels = {(c["label"], c["step"]) for c in result["curves"]}
    for method in ("dreambooth", "lora", "nullbooth ε 0.1", "nullbooth unet ε 0.03"):
        assert {(method, 2), (method, 4)} <= labels
    assert ("base", 0) in labels and len(result["subjects"]) == 2
    base = next(c for c in result["curves"] if c["label"] == "base")
    assert base["prior_agreement"] == pytest.approx(1.0) and base["n"] == 2  # the base against itself
    for c in result["curves"]:
        assert 0.0 <= c["subject_match"] <= 1.0 and c["subject_match_ci95"] >= 0.0
    table = (tmp_path / "out" / "suite.md").read_text()
    assert "| dreambooth |" in table and "±" in table
    assert result["settings"]["snr_gamma"] == 0.0 and "plain ε-MSE;" in table and "| colour ↑ | pattern ↑ |" in table
    assert (tmp_path / "out" / "suite.png").stat().st_size > 0
    for label, eps in (("nullbooth ε 0.1", 0.1), ("nullbooth unet ε 0.03", 0.03)):
        budgeted = [r for r in result["rows"] if r["label"] == label]
        assert budgeted and all(r["max_leak_preserved"] <= eps * (1 + 1e-9) for r in budgeted)  # certified
    rows = sorted((tmp_path / "w" / "rows").glob("main__*.json"))
    assert len(rows) == 8  # 2 subjects × 4 methods
    stamp = [r.stat().st_mtime_ns for r in rows]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert [r.stat().st_mtime_ns for r in rows] == stamp  # resumed: nothing recomputed
