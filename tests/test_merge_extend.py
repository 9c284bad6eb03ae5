"""Incremental updates and merges: extend(A, B) and merge(A, B) equal a fresh run on A ∪ B; incompatible runs refused.

Tolerances: float64 sums added in another order, ≤ 1e-12 relative (Frobenius). Per-timestep matrices of
a run that kept no float64 per-timestep sums are rebuilt from its float32 files: ≤ 3e-7 relative
(float32 rounding, 2⁻²⁴ per entry, a few entries' worth).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from conftest import write_prompts

from nullbooth.cli.collect import register_cli
from nullbooth.config import config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.runs.collect import collect
from nullbooth.runs.layout import (
    RunData,
    load_covariance_data,
    read_manifest,
    read_run_prompts,
)
from nullbooth.runs.merge import extend, merge_runs

REL = 1e-12
F32 = 3e-7
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def _cfg(tmp, name, prompts, **block):
    return config_from_dict({"pretrained_model_name_or_path": block.pop("model", "tiny-sd"), "nullbooth": {
        "original_knowledge_prompts": str(write_prompts(tmp / f"{name}.txt", prompts)),
        "cov_matrices_output_dir": str(tmp / name), "num_denoising_steps": 2, "collection_batch_size": 1,
        "nullspace_mode": "relative", "nullspace_threshold": 1e-3, **block}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipe):
    """U: all four prompts; A: the first two (float64 per-timestep sums kept); B: the last two numbered from 2
    (no per-timestep sums); C: the last two numbered from 0 (an independent run)."""
    tmp = tmp_path_factory.mktemp("runs")
    run = lambda name, prompts, offset=0, **kw: collect(_cfg(tmp, name, prompts, **kw), pipe=tiny_pipe,  # noqa: E731
                                                      progress=False, prompt_offset=offset)
    return {"tmp": tmp,
            "U": run("U", PROMPTS, keep_timestep_sums=True),
            "A": run("A", PROMPTS[:2], keep_timestep_sums=True),
            "B": run("B", PROMPTS[2:], offset=2),
            "C": run("C", PROMPTS[2:])}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_equal_statistics(got, want, per_timestep_tol: float) -> None:
    a, b = RunData(got), RunData(want)
    assert a.summed.keys() == b.summed.keys()
    for key in b.summed:  # what training uses: always exact
        assert a.summed[key].count == b.summed[key].count
        assert _rel(a.summed[key].sum, b.summed[key].sum) <= REL, key
    assert a.timesteps == b.timesteps
    for t in b.timesteps:
        ta, tb = a.timestep(t), b.timestep(t)
        for key in tb:
            assert ta[key].count == tb[key].count
            assert _rel(ta[key].sum, tb[key].sum) <= per_timestep_tol, (t, key)
    layer = a.layers[0]
    for t in b.timesteps:  # the seed-layout files agree to float32 precision either way
        for f in ("q", "k", "out"):
            x, y = load_covariance_data(t, layer, f, got), load_covariance_data(t, layer, f, want)
            assert np.linalg.norm(x["covariance"] - y["covariance"]) <= F32 * np.linalg.norm(y["covariance"])
            assert x["metadata"]["null_space_dim"] == y["metadata"]["null_space_dim"]


def test_extend_equals_union_and_is_reused(runs, tiny_pipe):
    tmp = runs["tmp"]
    new = write_prompts(tmp / "new.txt", PROMPTS[2:])
    extended = extend(runs["A"], new, pipe=tiny_pipe, progress=False)
    assert extended.parent == runs["A"].parent and extended != runs["A"]
    manifest = read_manifest(extended)
    assert manifest["key"] == read_manifest(runs["U"])["key"]  # the same run, so it is found as such
    assert "prompt_segments" not in manifest["identity"] and manifest["derived_from"][0]["run"] == str(runs["A"])
    assert read_run_prompts(extended) == PROMPTS
    assert RunData(extended).exact_timesteps  # A kept float64 per-timestep sums, so the extension does too
    assert_equal_statistics(extended, runs["U"], REL)
    # A plain collection of the union prompts into A's folder finds the extension instead of sampling again.
    union = _cfg(tmp, "A", PROMPTS)
    assert collect(union, pipe=tiny_pipe, progress=False) == extended
    assert read_manifest(runs["A"])["identity"]["n_prompts"] == 2  # the original run is untouched


def test_extend_refuses_other_settings(runs, tiny_pipe):
    new = write_prompts(runs["tmp"] / "more.txt", ["a white cross"])
    with pytest.raises(NullBoothError, match=r"cannot extend .*num_denoising_steps differs \(2 vs 3\)"):
        extend(runs["A"], new, pipe=tiny_pipe, progress=False, overrides={"nullbooth.num_denoising_steps": 3})
    with pytest.raises(NullBoothError, match="counted twice"):  # prompt 2 of B again, with the seed it had there
        extend(runs["B"], write_prompts(runs["tmp"] / "dup.txt", ["a green triangle"]), pipe=tiny_pipe,
               progress=False, overrides={"seed": -2})


def test_merge_of_consecutive_runs_equals_union(runs):
    merged = merge_runs([runs["A"], runs["B"]], runs["tmp"] / "merged", progress=False)
    manifest = read_manifest(merged)
    assert manifest["key"] == read_manifest(runs["U"])["key"] and manifest["status"] == "complete"
    assert [d["exact_timestep_sums"] for d in manifest["derived_from"]] == [True, False]
    assert read_run_prompts(merged) == PROMPTS
    # B kept no float64 per-timestep sums: its per-timestep part is rebuilt from float32 files.
    assert_equal_statistics(merged, runs["U"], F32)
    assert merge_runs([runs["B"], runs["A"]], runs["tmp"] / "merged2", progress=False).exists()  # order is free


def test_merge_of_independent_runs_keeps_their_seeds(runs):
    merged = merge_runs([runs["A"], runs["C"]], runs["tmp"] / "independent", progress=False)
    identity = read_manifest(merged)["identity"]
    assert identity["prompt_segments"] == [{"start": 0, "n": 2, "seed": 0}, {"start": 0, "n": 2, "seed": 0}]
    assert read_manifest(merged)["key"] != read_manifest(runs["U"])["key"]  # C's prompts had other seeds
    a, c, m = RunData(runs["A"]), RunData(runs["C"]), RunData(merged)
    for key in m.summed:
        assert _rel(m.summed[key].sum, a.summed[key].sum + c.summed[key].sum) <= REL


def test_merge_refuses_incompatible_runs_with_the_reason(runs, tiny_pipe):
    tmp = runs["tmp"]
    one = ["a white cross"]
    other = {
        "num_denoising_steps differs": collect(_cfg(tmp, "steps", one, num_denoising_steps=1), pipe=tiny_pipe,
                                               progress=False),
        "layers differ": collect(_cfg(tmp, "layers", one, cross_attention_layers=[0, 1]), pipe=tiny_pipe, progress=False),
        "features differs": collect(_cfg(tmp, "feat", one, collect_features={
            "q_features": True, "k_features": True, "v_features": True, "out_features": False}), pipe=tiny_pipe,
            progress=False),
        "guidance_scale differs": collect(_cfg(tmp, "cfg", one, guidance_scale=3.0), pipe=tiny_pipe, progress=False),
        "model differs": collect(_cfg(tmp, "model", one, model="tiny-sd2"), progress=False),
    }
    for reason, run in other.items():
        with pytest.raises(NullBoothError, match=f"cannot merge runs collected differently: .*{reason}"):
            merge_runs([runs["A"], run], tmp / "refused", progress=False)
    with pytest.raises(NullBoothError, match="counted twice"):
        merge_runs([runs["A"], runs["A"]], tmp / "refused", progress=False)
    assert not list((tmp / "refused").glob("run_*"))  # refused before anything is written


def test_merge_cli(runs, capsys):
    parser = argparse.ArgumentParser(prog="nullbooth")
    register_cli(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["merge", str(runs["A"]), str(runs["B"]), "-o", str(runs["tmp"] / "cli"),
                              "--storage", "float16", "--mode", "relative", "--threshold", "1e-2"])
    assert args.func(args) == 0
    run = read_manifest(capsys.readouterr().out.strip())
    assert run["nullbooth"]["storage"] == "float16" and run["nullbooth"]["nullspace_threshold"] == 1e-2
    bad = parser.parse_args(["merge", str(runs["A"]), "--set", "nullbooth.num_denoising_steps=5"])
    with pytest.raises(NullBoothError, match="only how the result is stored can be set"):
        bad.func(bad)
