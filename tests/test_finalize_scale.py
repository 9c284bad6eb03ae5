"""Finalize decomposes every matrix once, batched by width; train, inspect and validate reuse what it stored.

Tolerances: eigenvalues of the batched path agree with the per-matrix ``eigh`` to 1e-12 relative to ``λ_max``
(float64); stored float32 projectors agree to 1e-6 absolute (their float32 rounding) with equal null dimensions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subject_images

from nullbooth.config import config_from_dict
from nullbooth.filenames import SUMMED_SPECTRA, SUMMED_STATS
from nullbooth.methods.adapter_files import bases_from_run
from nullbooth.runs import diagnostics
from nullbooth.runs.diagnostics import inspect_run, validate_run
from nullbooth.runs.layout import (
    RUN_FORMAT,
    TEXT_KEY,
    decomposition_holds,
    load_covariance_data,
    load_statistics,
    save_statistics,
)
from nullbooth.runs.write import StoreSettings, write_run
from nullbooth.stats import nullspace as nullspace_module
from nullbooth.stats.moments import SecondMoment
from nullbooth.stats.nullspace import eigh_batched, null_space, null_space_of, spectra, spectrum

MODES = [("absolute", 2e-2), ("relative", 1e-3), ("energy", 1e-3), ("rank", 5), ("percentile", 20.0)]


def moment_of(d: int, n: int, seed: int) -> SecondMoment:
    """``Σxxᵀ`` of ``n`` random features with a spectrum spread over four decades (non-trivial null spaces)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=torch.float64, generator=g) * torch.logspace(-2, 0, d, dtype=torch.float64)
    stat = SecondMoment(d)
    stat.sum.copy_(X.T @ X)
    stat.count = n
    return stat


@pytest.fixture
def eigh_calls(monkeypatch):
    """Counts every dense symmetric eigensolver call (torch and numpy, with or without vectors)."""
    calls = {"n": 0}
    for module, name in [(torch.linalg, "eigh"), (torch.linalg, "eigvalsh"), (np.linalg, "eigh"), (np.linalg, "eigvalsh")]:
        real = getattr(module, name)

        def counted(*args, _real=real, **kwargs):
            calls["n"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def test_batched_eigh_equals_the_per_matrix_path(eigh_calls, monkeypatch):
    widths = [24, 40, 24, 17, 40, 24]
    mats = [moment_of(d, 3 * d, i).moment() for i, d in enumerate(widths)]
    spectra(mats, max_batch_bytes=2 * 8 * 24 * 24)
    assert eigh_calls["n"] == 6  # on the CPU: one matrix at a time
    monkeypatch.setattr(nullspace_module, "STACK_ON_CPU", True)  # the accelerator path, on CPU tensors
    # a budget of two 24-wide matrices: batches {24, 24}, {24}, {40}, {40} (one 40 fills it), {17}
    batched = spectra(mats, max_batch_bytes=2 * 8 * 24 * 24)
    assert eigh_calls["n"] == 6 + 5
    for C, spec in zip(mats, batched):
        one = spectrum(C)
        scale = float(one.eigenvalues[-1])
        assert float((spec.eigenvalues - one.eigenvalues).abs().max()) <= 1e-12 * scale
        for mode, threshold in MODES:
            ns_one, ns_batch = null_space(C, mode, threshold), null_space_of(spec, mode, threshold)
            assert ns_one.null_dim == ns_batch.null_dim
            assert float((ns_one.projector() - ns_batch.projector()).abs().max()) <= 1e-12
    raw = eigh_batched([mats[0]])[0][0]  # raw: what stats/summed_eig keeps, so validate sees a negative λ_min
    assert torch.equal(raw.clamp(min=0), spectra([mats[0]])[0].eigenvalues)


def test_decomposition_check_accepts_its_own_and_rejects_another():
    C = moment_of(30, 90, 0).moment()
    lam, V = eigh_batched([C])[0]
    assert decomposition_holds(C, lam, V)
    D = C.clone()
    D[0, 1] = D[1, 0] = D[0, 1] + 1e-6 * float(lam[-1])  # one symmetric entry pair moved by 1e-6 · λ_max
    assert not decomposition_holds(D, lam, V)
    assert not decomposition_holds(C, lam, V[:, torch.randperm(30)])


# --------------------------------------------------------------------------- a run written by write_run

LAYERS = {"down.attn2": 24, "mid.attn2": 40, "up.attn2": 24}  # q/out widths; k/v are TEXT wide
TEXT, STEPS = 16, (999, 500, 1)


def write_random_run(run_dir: Path) -> dict[tuple[int, str], SecondMoment]:
    """A 3-layer, 3-timestep run of random features through the project's writer."""
    by_t = {t: {f"{l}/{f}": moment_of(d, 4 * d, hash((t, l, f)) % 10_000) for l, d in LAYERS.items() for f in ("q", "out")}
            for t in STEPS}
    summed = {key: SecondMoment(stat.dim) for key, stat in by_t[STEPS[0]].items()}
    for stats in by_t.values():
        for key, stat in stats.items():
            summed[key].merge(stat)
    summed[TEXT_KEY] = moment_of(TEXT, 50, 1)
    shapes = {key: [stat.dim, stat.dim] for key, stat in summed.items()}
    manifest = {
        "format": RUN_FORMAT, "status": "complete", "key": "random", "identity": {"model": {}},
        "nullbooth": {"nullspace_mode": "relative", "nullspace_threshold": 1e-3},
        "layers": [{"name": l, "dir": l.replace(".", "_"), "weight_shapes": {"q": [d, d], "k": [d, TEXT], "v": [d, TEXT],
                                                                               "out": [d, d]}} for l, d in LAYERS.items()],
        "features": ["q", "k", "v", "out"], "timesteps": list(STEPS),
    }
    write_run(run_dir, layers=list(LAYERS), features=["q", "k", "v", "out"], timesteps=list(STEPS),
              timestep_stats=lambda t: by_t[t], summed=summed, shapes=shapes,
              settings=StoreSettings("relative", 1e-3), manifest=manifest, progress=False)
    return {(t, key): stat for t, stats in by_t.items() for key, stat in stats.items()}


@pytest.mark.parametrize("stacked", [False, True])
def test_finalize_stores_what_the_per_matrix_path_would(stacked, tmp_path, eigh_calls, monkeypatch):
    monkeypatch.setattr(nullspace_module, "STACK_ON_CPU", stacked)
    stats = write_random_run(tmp_path)
    # each matrix once: per timestep 4 of width 24 and 2 of 40, the text once, the 6 summed q/out — stacked by
    # width into one batch of 24s and one of 40s per timestep (and for the summed ones)
    assert eigh_calls["n"] == (len(STEPS) * 2 + 1 + 2 if stacked else len(STEPS) * 6 + 1 + 6)
    for (t, key), stat in stats.items():
        layer, feature = key.rsplit("/", 1)
        data = load_covariance_data(t, layer, feature, tmp_path)
        ns = null_space(stat.moment(), "relative", 1e-3)
        meta = data["metadata"]
        assert meta["null_space_dim"] == ns.null_dim > 0
        lam = torch.tensor(meta["singular_values"][::-1], dtype=torch.float64)
        assert float((lam - ns.eigenvalues).abs().max()) <= 1e-12 * float(ns.eigenvalues[-1])
        assert np.abs(data["projection"] - ns.projector().numpy()).max() <= 1e-6
        assert set(meta["file_crc32"]) == {"covariance.npy", "projection.npy"}


def test_inspect_and_validate_decompose_nothing_and_read_each_link_once(tmp_path, eigh_calls, monkeypatch):
    write_random_run(tmp_path)
    eigh_calls["n"] = 0
    loads = []
    real = diagnostics.load_covariance_data
    monkeypatch.setattr(diagnostics, "load_covariance_data", lambda *a: loads.append(a) or real(*a))
    rows, problems = validate_run(tmp_path)
    inspected = inspect_run(tmp_path)
    assert problems == [] and len(rows) == len(STEPS) * len(LAYERS) * 4
    assert eigh_calls["n"] == 0
    assert len(loads) == len(STEPS) * len(LAYERS) * 2 + 1  # q/out files, and the text file linked everywhere once

    # An older run (no stored spectra, no CRCs): same answers, decomposed again.
    (tmp_path / SUMMED_SPECTRA).unlink()
    for path in tmp_path.rglob("*_metadata.json"):
        meta = json.loads(path.read_text())
        del meta["file_crc32"]
        path.write_text(json.dumps(meta))
    old_rows, old_problems = validate_run(tmp_path)
    assert old_problems == [] and eigh_calls["n"] > 0
    assert [r["null_dim"] for r in old_rows] == [r["null_dim"] for r in rows]
    assert [r["rank"] for r in old_rows] == [r["rank"] for r in rows]
    again = inspect_run(tmp_path)
    assert [r["null_dim"] for r in again] == [r["null_dim"] for r in inspected]
    assert all(abs(a["lambda_max"] - b["lambda_max"]) <= 1e-12 * b["lambda_max"] for a, b in zip(again, inspected))


def test_validate_still_catches_a_changed_matrix_and_a_bad_projector(tmp_path):
    write_random_run(tmp_path)
    folder = tmp_path / "timestep_0500" / "mid_attn2"
    C = np.load(folder / "q_covariance.npy")
    C[0, 0] = -10 * np.abs(C).max()  # no longer PSD; its recorded spectrum no longer describes it (CRC)
    np.save(folder / "q_covariance.npy", C)
    P = np.load(folder / "out_projection.npy")
    noise = np.random.default_rng(1).standard_normal(P.shape).astype(np.float32) * 1e-2
    np.save(folder / "out_projection.npy", P + noise + noise.T)  # symmetric, not idempotent
    _, problems = validate_run(tmp_path)
    assert any("timestep_0500/mid_attn2/q: covariance fails the positive semidefinite check" in p for p in problems)
    assert any("timestep_0500/mid_attn2/out: projection is not a symmetric idempotent" in p for p in problems)
    assert len(problems) == 2


def test_training_reads_the_stored_spectra(tmp_path, eigh_calls):
    write_random_run(tmp_path)
    eigh_calls["n"] = 0
    bases, info = bases_from_run(tmp_path)
    assert eigh_calls["n"] == 0 and len(bases) == len(LAYERS) * 4
    # A changed sum is noticed (the stored eigh no longer decomposes it): decomposed again, from the new sum.
    stats, meta = load_statistics(tmp_path / "stats" / "summed.safetensors")
    stats["mid.attn2/q"] = moment_of(40, 200, 77)
    save_statistics(tmp_path / "stats" / "summed.safetensors", stats, meta)
    bases2, info2 = bases_from_run(tmp_path)
    assert eigh_calls["n"] == 1
    fresh = null_space(stats["mid.attn2/q"].moment(), "relative", 1e-3)
    assert info2["mid.attn2.to_q"]["null_dim"] == fresh.null_dim
    assert float((bases2["mid.attn2.to_q"] @ bases2["mid.attn2.to_q"].T - fresh.projector()).abs().max()) <= 1e-12
    assert torch.equal(bases2["down.attn2.to_q"], bases["down.attn2.to_q"])


def test_train_setup_on_a_finished_run_decomposes_nothing(tiny_run, tmp_path, eigh_calls):
    from nullbooth.models import load_pipeline
    from nullbooth.training.setup import setup

    run_dir, cfg = tiny_run
    nb = {**cfg.nullbooth.model_dump(mode="json"), "stats_run": str(run_dir)}
    train = config_from_dict({
        "pretrained_model_name_or_path": "tiny-sd", "method": "nullbooth", "seed": 0,
        "instance_data_dir": str(subject_images(tmp_path / "instance")), "instance_prompt": "a photo of sks dog",
        "output_dir": str(tmp_path / "out"), "max_train_steps": 1, "nullbooth": nb})
    eigh_calls["n"] = 0
    ts = setup(train, pipe=load_pipeline("tiny-sd"), progress=False)  # its own: set-up injects adapters
    if ts.lock is not None:
        ts.lock.release()
    assert eigh_calls["n"] == 0 and ts.method.wrappers
    # once injected, the adapters' own bases are the only ones kept: no float64 [in, k] copy beside the optimiser
    held = [v for v in vars(ts.method).values() if isinstance(v, dict)]
    assert not [t.shape for d in held for t in d.values() if torch.is_tensor(t) and t.dtype == torch.float64]
    # the same set-up on a copy without the stored spectra decomposes each distinct summed statistic once
    old = tmp_path / run_dir.name
    shutil.copytree(run_dir, old)
    (old / SUMMED_SPECTRA).unlink()
    bases, _ = bases_from_run(old)
    distinct = len(load_statistics(old / SUMMED_STATS)[0])  # k and v share the text statistic
    assert 0 < eigh_calls["n"] <= distinct  # each distinct summed statistic once (on the CPU: one at a time)
    for path, U in bases_from_run(run_dir)[0].items():
        assert U.shape == bases[path].shape and float((U @ U.T - bases[path] @ bases[path].T).abs().max()) <= 1e-12
