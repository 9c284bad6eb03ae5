"""Compressed storage: the loader reads eigh/float16 runs transparently; reported errors and null dimensions are true.

The reference is the same run stored as float32 (seed layout). ``eigh`` keeps the null basis, so its
projector equals the float32 one to float32 rounding (1e-5); its covariance error and the null
dimension of the reconstruction are recomputed here independently (``eigvalsh`` of what the loader
returns) and must match the metadata. ``float16`` projectors come back as true projectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_prompts

from nullbooth.config import config_from_dict
from nullbooth.runs.collect import collect
from nullbooth.runs.layout import (
    layer_dirname,
    load_covariance_data,
    read_manifest,
    timestep_dirname,
)
from nullbooth.runs.merge import merge_runs
from nullbooth.stats.compress import (
    SD15_ATTN2_WIDTHS,
    sd15_store_sizes,
    seed_estimate,
    store_size,
    write_matrix,
)
from nullbooth.stats.nullspace import null_dimension

MODE, THRESHOLD = "relative", 1e-3


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_pipe):
    tmp = tmp_path_factory.mktemp("compress")
    cfg = config_from_dict({"pretrained_model_name_or_path": "tiny-sd", "nullbooth": {
        "original_knowledge_prompts": str(write_prompts(tmp / "p.txt", ["a red circle", "a blue square"])),
        "cov_matrices_output_dir": str(tmp / "cov"), "num_denoising_steps": 2, "collection_batch_size": 2,
        "nullspace_mode": MODE, "nullspace_threshold": THRESHOLD, "keep_timestep_sums": True,
        "cross_attention_layers": [0, 3]}})
    return collect(cfg, pipe=tiny_pipe, progress=False), tmp


def _matrices(run):
    m = read_manifest(run)
    return [(t, layer["name"], f) for t in m["timesteps"] for layer in m["layers"] for f in m["features"]]


def _bytes(run, pattern: str) -> int:
    seen = {}
    for path in run.glob(f"timestep_*/*/{pattern}"):
        seen[path.stat().st_ino] = path.stat().st_size
    return sum(seen.values())


def test_eigh_storage_is_read_transparently_with_true_reports(base):
    run, tmp = base
    eig = merge_runs([run], tmp / "eigh", overrides={"storage": "eigh", "storage_energy": 0.9}, progress=False)
    report = read_manifest(eig)["storage_report"]
    assert read_manifest(eig)["key"] == read_manifest(run)["key"]  # storage does not change the statistics
    changed = 0
    for t, layer, f in _matrices(run):
        folder = eig / timestep_dirname(t) / layer_dirname(layer)
        assert (folder / f"{f}_eig.safetensors").exists() and not list(folder.glob(f"{f}_*.npy"))
        x, y = load_covariance_data(t, layer, f, run), load_covariance_data(t, layer, f, eig)
        info = y["metadata"]["storage"]
        C, C_eig = x["covariance"].astype(np.float64), y["covariance"].astype(np.float64)
        assert abs(np.linalg.norm(C_eig - C) / np.linalg.norm(C) - info["reconstruction_rel_error"]) < 1e-5
        assert y["metadata"]["null_space_dim"] == x["metadata"]["null_space_dim"]
        if x["projection"] is None:
            assert y["projection"] is None
        else:
            assert np.abs(y["projection"] - x["projection"]).max() < 1e-5  # the stored projector is exact
        lam = torch.linalg.eigvalsh(torch.from_numpy(C_eig)).clamp(min=0)
        assert null_dimension(lam, MODE, THRESHOLD) == info["null_space_dim_reconstructed"]
        if f in ("q", "out") or (t, layer, f) == _matrices(run)[1]:  # the text matrix is written (and counted) once
            changed += info["null_space_dim_reconstructed"] != x["metadata"]["null_space_dim"]
    m = read_manifest(run)
    assert report["matrices"] == 2 * len(m["timesteps"]) * len(m["layers"]) + 1
    assert report["max_reconstruction_rel_error"] > 0 and report["null_dim_changed"] == changed > 0
    assert _bytes(eig, "*_eig.safetensors") < _bytes(run, "*.npy")
    inodes = {(eig / timestep_dirname(t) / layer_dirname(l) / f"{f}_eig.safetensors").stat().st_ino
              for t, l, f in _matrices(run) if f in ("k", "v")}
    assert len(inodes) == 1  # the text matrix is still stored once


def test_float16_storage(base):
    run, tmp = base
    half = merge_runs([run], tmp / "half", overrides={"storage": "float16"}, progress=False)
    for t, layer, f in _matrices(run):
        x, y = load_covariance_data(t, layer, f, run), load_covariance_data(t, layer, f, half)
        assert y["covariance"].dtype == np.float16
        C, C16 = x["covariance"].astype(np.float64), y["covariance"].astype(np.float64)
        info = y["metadata"]["storage"]
        assert abs(np.linalg.norm(C16 - C) / np.linalg.norm(C) - info["reconstruction_rel_error"]) < 1e-6
        assert info["reconstruction_rel_error"] < 2 ** -10
        lam = torch.linalg.eigvalsh(torch.from_numpy(C16)).clamp(min=0)
        assert null_dimension(lam, MODE, THRESHOLD) == info["null_space_dim_reconstructed"]
        P, P_ref = y["projection"], x["projection"]
        assert (P is None) == (P_ref is None)
        if P is not None:
            P64 = P.astype(np.float64)
            assert P.dtype == np.float32 and np.abs(P64 @ P64 - P64).max() < 1e-5 and np.allclose(P64, P64.T, atol=1e-6)
            assert round(np.trace(P64)) == y["metadata"]["null_space_dim"]
            assert np.abs(P64 - P_ref).max() < 5e-3
    assert _bytes(half, "*.npy") < 0.51 * _bytes(run, "*.npy")


def test_float16_overflow_falls_back_to_float32(tmp_path):
    C = torch.diag(torch.tensor([1e5, 1.0, 1e-9], dtype=torch.float64))
    lam, k, info = write_matrix(tmp_path, "q", C, mode="absolute", threshold=1e-3, storage="float16")
    assert k == 1 and info["mode"] == "float32" and "overflows float16" in info["reason"]
    assert np.load(tmp_path / "q_covariance.npy").dtype == np.float32


def test_store_size_matches_files_and_sd15_table(base):
    run, _ = base
    m = read_manifest(run)
    widths = [layer["weight_shapes"]["q"][1] for layer in m["layers"]]
    assert widths == [layer["weight_shapes"]["out"][1] for layer in m["layers"]]
    text = m["layers"][0]["weight_shapes"]["k"][1]
    assert all(load_covariance_data(t, l, f, run)["projection"] is not None for t, l, f in _matrices(run))
    predicted = store_size(widths, text, len(m["timesteps"]), storage="float32")
    assert predicted["matrices"] == _bytes(run, "*.npy")  # exact: float32 payload + the 128-byte .npy header
    rows = {(r["storage"], r["note"]): r for r in sd15_store_sizes()}
    f32 = rows[("float32", "seed layout, covariance + projection")]["matrices_bytes"]
    assert f32 == 50 * 2 * 2 * sum((4 * d * d + 128) for d in SD15_ATTN2_WIDTHS) + 2 * (4 * 768 ** 2 + 128)
    assert seed_estimate() == 16 * 4 * 50 * 1280 ** 2 * 4
