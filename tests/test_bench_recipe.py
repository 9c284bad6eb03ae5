"""``benchmarks/bench_recipe.py``: reading a recipe run's log and folder into the budget check, on a synthetic run
whose rates, stages and weights are known."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_recipe", REPO / "benchmarks" / "bench_recipe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _clock(seconds: float) -> str:
    s = 23 * 3600 + 50 * 60 + int(round(seconds))  # starts at 23:50, so the run crosses midnight
    return f"{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def synthetic_log() -> str:
    """VAE crops at 0.1 s/step for steps 1–800, full images at 0.2 s for 801–1000, UNet at 0.5 s for 1–2000."""
    lines = [f"{_clock(0)} stage 1: VAE for 1000 steps"]
    t = 0.0
    for step in range(50, 1001, 50):
        t += 50 * (0.1 if step <= 800 else 0.2)
        lines.append(f"{_clock(t)} vae step {step}  mse 0.01000  kl 1.000  {'crops' if step <= 800 else 'full'}")
    lines.append(f"{_clock(t + 60)} stage 2: encoding 2000 world images and 0 objects")
    t += 180
    lines.append(f"{_clock(t)} stage 3: UNet + text encoder until the budget ends")
    for step in range(100, 2001, 100):
        lines.append(f"{_clock(t + 0.5 * step)} unet step {step}  mse 0.0100  lr 1.00e-03  0.50s/step")
    lines.append(f"{_clock(t + 1000)} denoiser: {{'steps': 2000}}; training took 22.0 cpu-min (22.1 wall-min)")
    lines.append("\tMaximum resident set size (kbytes): 2097152")
    return "\n".join(lines) + "\n"


def test_a_run_is_read_into_rates_stages_budget_and_weight_identity(bench, tmp_path):
    run, shipped = tmp_path / "run", tmp_path / "shipped"
    for folder in (run, shipped):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "w.safetensors").write_bytes(b"weights")
    (run / "nullbooth_world_model.json").write_text(json.dumps({
        "clock": "cpu", "threads": 1, "vae": {"steps": 1000}, "denoiser": {"steps": 2000},
        "train_minutes": 22.0, "train_wall_minutes": 22.1}))
    log = tmp_path / "run.log"
    log.write_text(synthetic_log())

    result = bench.summarise(run, log, "cmd", shipped)
    rates = result["seconds_per_step"]
    assert rates["vae_crops"] == pytest.approx(0.1, abs=1e-3) and rates["vae_full"] == pytest.approx(0.2, abs=1e-3)
    assert rates["unet"] == pytest.approx(0.5, abs=1e-3)
    assert result["stage_wall_minutes"] == {"vae": 3.0, "encoding": 2.0, "unet": 16.67}
    assert result["within_budget"] and result["peak_rss_gib"] == 2.0
    assert result["same_weights"]["identical"] and "vae_gate" not in result
    table = bench.markdown(result)
    assert "| **training, CPU-minutes** | **22.0** (budget 90: within) | |" in table and "byte-identical" in table

    (run / "unet" / "w.safetensors").write_bytes(b"weightz")
    (run / "nullbooth_world_model.json").write_text(json.dumps({
        "clock": "cpu", "threads": 1, "vae": {"steps": 1000}, "denoiser": {"steps": 2000},
        "train_minutes": 90.5, "train_wall_minutes": 91.0}))
    result = bench.summarise(run, log, "cmd", shipped)
    assert not result["within_budget"]
    assert result["same_weights"] == {"model": str(shipped), "files": ["unet/w.safetensors"], "identical": False,
                                      "differ": ["unet/w.safetensors"]}
