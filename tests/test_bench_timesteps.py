"""``benchmarks/bench_timesteps.py``: a tiny end-to-end run writes the loss-by-timestep and guidance table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_run_writes_every_run_with_losses_and_judged_shares(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_timesteps.py"), "--steps", "2", "--prompts", "1",
           "--sample-seeds", "1", "--sample-steps", "2", "--noise-draws", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, cwd=REPO)
    result = json.loads((tmp_path / "timesteps.json").read_text())
    labels = [r["label"] for r in result["rows"]]
    assert labels[0] == "base" and {"dreambooth plain", "attn2_finetune γ5", "perfusion concept_token γ5"} <= set(labels)
    base, dreambooth = result["rows"][0], result["rows"][labels.index("dreambooth plain")]
    for r in result["rows"]:
        assert set(r["loss"]) == {str(t) for t in result["timesteps"]}
        assert all(v > 0 for v in r["loss"].values())
        assert set(r["judged"]) == {"1", "2", "4"}
        assert all(0.0 <= v <= 1.0 for shares in r["judged"].values() for v in shares.values())
    assert dreambooth["loss"] != base["loss"]  # training changed the model the losses were measured on
    for r in result["rows"][1:]:
        for split in r["guidance_split"].values():
            assert split["delta_cond"] >= 0 and split["delta_uncond"] >= 0 and -1 - 1e-6 <= split["cos"] <= 1 + 1e-6
            assert split["base_guidance"] > 0
    assert dreambooth["guidance_split"]["950"]["delta_uncond"] > 0  # the whole UNet moves the empty prompt too
    table = (tmp_path / "timesteps.md").read_text()
    assert table.count("\n| ") == 2 * len(labels) + 1 and "loss t=950" in table and "Guidance split" in table
