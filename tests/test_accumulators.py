"""Accumulator memory plan, packed float64 sums, float32 products, and checkpoints by time (issue 14, items 2 and 4).

Tolerances: float64 products stored as upper triangles equal full-matrix sums to 1e-12 (relative Frobenius);
float32 products with float64 sums stay within 1e-5 of float64 on tiny-sd's features (measured ≈ 1e-7;
benchmarks/results/accumulate.md has real-size numbers); a resumed collection equals an uninterrupted one
bit for bit.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import small_config

import nullbooth.runs.collect
from nullbooth.errors import NullBoothError
from nullbooth.filenames import COLLECT_CHECKPOINT, SUMMED_STATS
from nullbooth.io import load_tensors
from nullbooth.runs.accumulate import GB, fast_float64, plan_accumulators
from nullbooth.runs.collect import collect
from nullbooth.runs.layout import load_statistics, read_manifest
from nullbooth.runs.shards import CheckpointSchedule
from nullbooth.stats.moments import PackedSecondMoment, SecondMoment, gram

SD15 = [w for w in [320] * 5 + [640] * 5 + [1280] * 6 for _ in ("q", "out")]
SDXL = [w for w in [640] * 10 + [1280] * 60 for _ in ("q", "out")]


def _config(folder, **nullbooth):
    folder.mkdir(parents=True, exist_ok=True)
    return small_config(folder, **nullbooth)


def _beside_model(card_gb: float, model_gb: float) -> float:
    return 0.7 * (card_gb - model_gb - 0.5) * GB  # the default budget: 70 % of what is free beside the model


def test_planner_meets_the_targets_in_numbers():
    sd15 = plan_accumulators(SD15, 50, text_width=768, device_budget=_beside_model(24, 2.1), host_budget=0,
                             fast_fp64=False)
    assert (sd15.placement, sd15.precision) == ("device", "float32")
    assert sd15.timestep_bytes == 8 * 50 * (5 * 320 * 321 + 5 * 640 * 641 + 6 * 1280 * 1281)  # 4.96 GB, not 9.9
    assert 4.9 < sd15.timestep_bytes / GB < 5.0
    sdxl = plan_accumulators(SDXL, 50, text_width=2048, device_budget=_beside_model(80, 6.9), host_budget=0,
                             fast_fp64=True)
    assert (sdxl.placement, sdxl.precision) == ("device", "float64")
    assert 40.9 < sdxl.timestep_bytes / GB < 41.1 and sdxl.summed_bytes / GB < 1.7
    # SDXL on a 24 GB card: the triangles go to the host when it has the RAM.
    host = plan_accumulators(SDXL, 50, text_width=2048, device_budget=_beside_model(24, 6.9), host_budget=60 * GB)
    assert host.placement == "host" and host.describe()["sums"].startswith("float64")


@pytest.mark.parametrize("placement, words", [("auto", ["accumulator_device: host", "the device allows 11.6 GB and "
                                                        "the host allows 30.0 GB"]),
                                              ("device", ["the device allows 11.6 GB"])])
def test_planner_refuses_in_one_line_saying_what_to_change(placement, words):
    with pytest.raises(NullBoothError) as err:
        plan_accumulators(SDXL, 50, text_width=2048, device_budget=_beside_model(24, 6.9), host_budget=30 * GB,
                          placement=placement)
    line = str(err.value)
    assert "\n" not in line and "42.7 GB" in line and "0.82 GB a step" in line
    for word in ["num_denoising_steps", "cross_attention_layers", "accumulator_memory_gb", *words]:
        assert word in line, (word, line)
    # Fewer steps fit: 10 × 0.82 GB + 1.7 GB summed.
    assert plan_accumulators(SDXL, 10, text_width=2048, device_budget=_beside_model(24, 6.9), host_budget=0).placement == "device"


def test_precision_follows_the_device_unless_given():
    assert fast_float64("cpu")
    auto = lambda fast: plan_accumulators([8], 1, device_budget=GB, host_budget=GB, fast_fp64=fast)  # noqa: E731
    assert auto(True).precision == "float64" and auto(False).precision == "float32"
    assert auto(False).chunk_rows and auto(True).chunk_rows is None
    forced = plan_accumulators([8], 1, device_budget=GB, host_budget=GB, precision="float64", fast_fp64=False)
    assert forced.precision == "float64" and forced.dtype == torch.float64


def test_packed_sums_equal_full_sums_and_float32_products_stay_close():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 300, 24, generator=g) * torch.linspace(0.01, 3, 24) + 1 for _ in range(3)]
    full, packed, fast = SecondMoment(24), PackedSecondMoment(24), PackedSecondMoment(24)
    for x in xs:
        full.add(x)
        packed.add(x)
        fast.add(x, dtype=torch.float32, chunk_rows=128)
    assert packed.sum.numel() == 24 * 25 // 2 and packed.count == full.count == 1800
    S = packed.unpacked().sum
    assert torch.equal(S, S.T) and float((S - full.sum).norm() / full.sum.norm()) < 1e-12
    err = float((fast.unpacked().sum - full.sum).norm() / full.sum.norm())
    assert 0 < err < 1e-5  # float32 products really happened, and their float64 sums stayed close
    assert torch.allclose(gram(xs[0], torch.float32, 100), gram(xs[0]), rtol=1e-5, atol=1e-3)
    again = SecondMoment.from_state_dict(packed.state_dict())  # checkpoints hold triangles; readers get matrices
    assert torch.equal(again.sum, S) and again.count == 1800


def test_checkpoint_schedule_by_time_and_by_batches():
    timed = CheckpointSchedule(None, minutes=10)
    assert timed.due(1, 5) and not timed.due(2, 4) and timed.due(6, 0)  # first, then not before 10 minutes, last
    timed.last = time.monotonic() - 601
    assert timed.due(3, 3)
    timed.written()
    assert not timed.due(4, 2)
    counted = CheckpointSchedule(2, minutes=10)
    assert [counted.due(c, 5 - c) for c in range(1, 6)] == [False, True, False, True, True]


def test_interrupted_collection_resumes_to_the_same_sums_with_few_packed_checkpoints(tmp_path, tiny_pipe, monkeypatch):
    settings = {"num_denoising_steps": 1, "collection_batch_size": 1}
    straight = collect(_config(tmp_path / "s", **settings), pipe=tiny_pipe, progress=False)
    written = []
    real = nullbooth.runs.collect.save_checkpoint
    monkeypatch.setattr(nullbooth.runs.collect, "save_checkpoint", lambda *a: written.append(1) or real(*a))

    def stop(acc, index):
        if index == 1:
            raise KeyboardInterrupt  # a kill after batch 2 of 3: only the first batch was checkpointed

    cfg = _config(tmp_path / "k", **settings)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg, pipe=tiny_pipe, progress=False, on_batch=stop)
    run = next((tmp_path / "k" / "cov").glob("run_*"))
    tensors, meta = load_tensors(run / COLLECT_CHECKPOINT, "a checkpoint")
    assert written == [1] and meta["batches_done"] == "1"
    assert any(k.endswith("::packed") for k in tensors) and not any(k.endswith("/q::sum") for k in tensors)
    assert collect(cfg, pipe=tiny_pipe, progress=False) == run
    assert len(written) == 3  # resumed: after its first batch (of two) and its last
    a, b = load_statistics(run / SUMMED_STATS)[0], load_statistics(straight / SUMMED_STATS)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k].sum, b[k].sum) and a[k].count == b[k].count for k in a)
    recorded = read_manifest(run)["accumulators"]
    assert recorded["placement"] == "device" and recorded["precision"] == "float64"


def test_float32_products_in_a_collection_and_a_budget_too_small(tmp_path, tiny_pipe):
    reference = collect(_config(tmp_path / "r", num_denoising_steps=1), pipe=tiny_pipe, progress=False)
    run = collect(_config(tmp_path / "f", num_denoising_steps=1, accumulation_precision="float32",
                               accumulator_device="host"), pipe=tiny_pipe, progress=False)
    assert read_manifest(run)["accumulators"]["precision"] == "float32"
    a, b = load_statistics(run / SUMMED_STATS)[0], load_statistics(reference / SUMMED_STATS)[0]
    for key in b:
        assert a[key].count == b[key].count
        assert float((a[key].sum - b[key].sum).norm() / b[key].sum.norm()) < 1e-5, key
    with pytest.raises(NullBoothError, match="accumulator_memory_gb") as err:
        collect(_config(tmp_path / "t", num_denoising_steps=1, accumulator_memory_gb=1e-6), pipe=tiny_pipe,
                progress=False)
    assert "\n" not in str(err.value)
