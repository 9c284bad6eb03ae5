"""Collection end to end: capture correctness, k/v statistics, store layout, resume, CLI and bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PROMPTS, small_config, write_prompts

from nullbooth.cli import main as cli_main
from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.runs.collect import collect
from nullbooth.runs.layout import (
    load_covariance_data,
    load_statistics,
    load_summed_statistics,
    read_manifest,
)
from nullbooth.runs.plan import make_scheduler
from nullbooth.stats.capture import cross_attention_layers, record_inputs

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- capture


@pytest.mark.parametrize("which", ["tiny_pipe", "tiny_pipe2"])
def test_captured_inputs_equal_what_the_layers_receive(which, request):
    """q: the attn2 input; out: softmax(QKᵀ/√d)V recomputed independently from the attn2 call's own arguments."""
    pipe = request.getfixturevalue(which)
    layers = cross_attention_layers(pipe.unet)
    calls: dict[str, tuple] = {}
    captured: dict[tuple[str, str], torch.Tensor] = {}

    def attn_hook(module, args, kwargs):
        name = next(l.name for l in layers if l.module is module)
        calls.setdefault(name, (args[0] if args else kwargs["hidden_states"], kwargs.get("encoder_hidden_states")))

    handles = [l.module.register_forward_pre_hook(attn_hook, with_kwargs=True) for l in layers]
    sink = lambda layer, feature, x: captured.setdefault((layer.name, feature), x.clone())  # noqa: E731
    try:
        with record_inputs(layers, ["q", "k", "v", "out"], sink):
            pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=7.5, output_type="latent")
    finally:
        for h in handles:
            h.remove()
    for layer in layers:
        hidden, text = calls[layer.name]
        attn = layer.module
        assert torch.equal(captured[(layer.name, "q")], hidden)
        assert torch.equal(captured[(layer.name, "k")], text) and torch.equal(captured[(layer.name, "v")], text)
        heads = attn.heads
        with torch.no_grad():
            q, k, v = attn.to_q(hidden), attn.to_k(text), attn.to_v(text)
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).double()  # noqa: E731
        probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) / split(q).shape[-1] ** 0.5, dim=-1)
        expected = (probs @ split(v)).transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        got = captured[(layer.name, "out")].double()
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5  # fp32 attention vs float64 recomputation
    assert not any(m._forward_pre_hooks for l in layers for m in l.module.modules())


def test_hooks_removed_even_on_error(tiny_pipe):
    layers = cross_attention_layers(tiny_pipe.unet)

    def boom(*_):
        raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"):
        with record_inputs(layers, ["q"], boom):
            tiny_pipe("x", num_inference_steps=1, output_type="latent")
    assert not any(m._forward_pre_hooks for l in layers for m in l.module.modules())


def test_uniform_sampler_reproduces_seed_timesteps(tiny_pipe):
    s = make_scheduler(tiny_pipe, "uniform")
    s.set_timesteps(50)
    assert [int(t) for t in s.timesteps] == list(range(980, -1, -20))
    with pytest.raises(NullBoothError, match="scheduler class name"):
        make_scheduler(tiny_pipe, "NoSuchScheduler")


# --------------------------------------------------------------------------- statistics of a run


def _text_encodings(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0].double()


def test_kv_statistic_is_second_moment_of_text_encodings(tiny_run, tiny_pipe):
    run_dir, _ = tiny_run
    # CFG feeds each prompt once and the empty prompt once per prompt.
    E = torch.cat([_text_encodings(tiny_pipe, PROMPTS), _text_encodings(tiny_pipe, [""] * len(PROMPTS))]).reshape(-1, 128)
    expected = E.T @ E / E.shape[0]
    summed = load_summed_statistics(run_dir)
    layer = read_manifest(run_dir)["layers"][0]["name"]
    got = summed[(layer, "k")]
    assert got.count == E.shape[0] == 2 * 3 * 77
    assert float((got.moment() - expected).norm() / expected.norm()) < 1e-6  # fp32 encoder, batch composition
    assert summed[(layer, "v")] is got  # one statistic for k and v of every layer


def test_timestep_summed_equals_sum_of_per_timestep_files(tiny_run):
    run_dir, cfg = tiny_run
    manifest = read_manifest(run_dir)
    assert manifest["timesteps"] == [666, 333, 0]
    layer = manifest["layers"][1]["name"]
    total, n = 0, 0
    for t in manifest["timesteps"]:
        d = load_covariance_data(t, layer, "q", run_dir)
        m = d["metadata"]
        total = total + d["covariance"].astype(np.float64) * m["n_samples"]
        n += m["n_samples"]
    summed = load_summed_statistics(run_dir)[(layer, "q")]
    assert summed.count == n
    assert np.allclose(summed.sum.numpy(), total, rtol=1e-6, atol=1e-6 * np.abs(total).max())  # float32 files


def test_store_layout_matches_the_seed(tiny_run):
    run_dir, cfg = tiny_run
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "complete" and not (run_dir / ".partial").exists()
    for t in manifest["timesteps"]:
        for layer in manifest["layers"]:
            folder = run_dir / f"timestep_{t:04d}" / layer["name"].replace(".", "_")
            for f in ("q", "k", "v", "out"):
                meta = json.loads((folder / f"{f}_metadata.json").read_text())
                assert {"original_shape", "n_samples", "feature_dim", "null_space_dim", "singular_values",
                        "nullspace_threshold"} <= set(meta)
                cov = np.load(folder / f"{f}_covariance.npy", allow_pickle=False)
                assert cov.dtype == np.float32 and cov.shape == (meta["feature_dim"],) * 2
                assert (folder / f"{f}_projection.npy").exists() == (meta["null_space_dim"] > 0)
                assert meta["singular_values"] == sorted(meta["singular_values"], reverse=True)
    # Text files are stored once: every k/v covariance is a hard link of the same inode.
    inodes = {(run_dir / f"timestep_{t:04d}" / l["dir"] / f"{f}_covariance.npy").stat().st_ino
              for t in manifest["timesteps"] for l in manifest["layers"] for f in ("k", "v")}
    assert len(inodes) == 1


def test_seed_loader_reads_every_run(tiny_run, tiny_pipe):
    """The seed's own loader, verbatim in behaviour: string paths, np.load, optional projection."""
    run_dir, _ = tiny_run

    def seed_load_covariance_data(timestep, layer_name, feature_type, base_dir):
        layer_dir = f"{base_dir}/timestep_{timestep:04d}/{layer_name.replace('.', '_')}"
        cov = np.load(f"{layer_dir}/{feature_type}_covariance.npy")
        proj_path = f"{layer_dir}/{feature_type}_projection.npy"
        proj = np.load(proj_path) if os.path.exists(proj_path) else None
        with open(f"{layer_dir}/{feature_type}_metadata.json") as f:
            meta = json.load(f)
        return {"covariance": cov, "projection": proj, "metadata": meta}

    layer = cross_attention_layers(tiny_pipe.unet)[0].name
    ours = load_covariance_data(333, layer, "out", str(run_dir))
    seeds = seed_load_covariance_data(333, layer, "out", str(run_dir))
    assert np.array_equal(ours["covariance"], seeds["covariance"]) and ours["metadata"] == seeds["metadata"]
    P = ours["projection"]
    assert P is not None and np.allclose(P @ P, P, atol=1e-5)


def test_reuse_and_fresh(tiny_run, tiny_pipe):
    run_dir, cfg = tiny_run
    assert collect(cfg, pipe=tiny_pipe, progress=False) == run_dir  # same config → the complete run is reused
    cfg2 = cfg.model_copy(deep=True)
    cfg2.nullbooth.num_denoising_steps = 2
    other = collect(cfg2, pipe=tiny_pipe, progress=False)
    assert other != run_dir and read_manifest(other)["timesteps"] == [500, 0]


def test_empty_null_space_omits_projection(tmp_path, tiny_pipe):
    cfg = small_config(tmp_path, nullspace_mode="absolute", nullspace_threshold=0.0, num_denoising_steps=1,
                       collect_features={"q_features": False, "k_features": True, "v_features": False, "out_features": False})
    run = collect(cfg, pipe=tiny_pipe, progress=False)
    layer = read_manifest(run)["layers"][0]["name"]
    data = load_covariance_data(0, layer, "k", run)
    assert data["projection"] is None and data["metadata"]["null_space_dim"] == 0
    assert not list(run.glob("timestep_0000/*/v_*"))  # v was not asked for


# --------------------------------------------------------------------------- resume


def _run_cli(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "nullbooth", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kw)


def _write_config(tmp_path: Path, out: str, n_prompts: int) -> Path:
    prompts = write_prompts(tmp_path / "p.txt", [f"a shape number {i}" for i in range(n_prompts)])
    cfg = {"pretrained_model_name_or_path": "tiny-sd", "nullbooth": {
        "original_knowledge_prompts": str(prompts), "cov_matrices_output_dir": str(tmp_path / out),
        "num_denoising_steps": 4, "collection_batch_size": 1, "nullspace_mode": "relative", "nullspace_threshold": 1e-3}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    n = 10
    straight = _write_config(tmp_path, "straight", n)
    killed = _write_config(tmp_path, "killed", n)
    proc = subprocess.Popen([sys.executable, "-m", "nullbooth", "collect", "--config", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    checkpoint = None
    while time.time() < deadline and checkpoint is None:
        found = list((tmp_path / "killed").glob("run_*/.partial/checkpoint.safetensors"))
        if found and load_statistics(found[0])[1]["batches_done"] not in ("0",):
            checkpoint = found[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint is not None, "collection never wrote a checkpoint"
    done_before = int(load_statistics(checkpoint)[1]["batches_done"])
    assert 0 < done_before < n, "the kill should land mid-run"

    resumed = _run_cli(["collect", "--config", str(killed)], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    clean = _run_cli(["collect", "--config", str(straight)], timeout=300)
    assert clean.returncode == 0, clean.stderr
    a, b = Path(resumed.stdout.strip()), Path(clean.stdout.strip())
    assert a == checkpoint.parents[1]
    sa, _ = load_statistics(a / "stats" / "summed.safetensors")
    sb, _ = load_statistics(b / "stats" / "summed.safetensors")
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].sum, sb[key].sum) and sa[key].count == sb[key].count
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.npy"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.npy"))
    for rel in files_a:
        assert np.array_equal(np.load(a / rel), np.load(b / rel)), rel


def test_different_config_never_reuses_partial_sums(tmp_path, tiny_pipe):
    cfg = small_config(tmp_path, num_denoising_steps=1)
    run = collect(cfg, pipe=tiny_pipe, progress=False)
    # Turn the run back into a partial one, then change the prompts: the old checkpoint must not be used.
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "collecting"}))
    write_prompts(tmp_path / "prompts.txt", ["something else entirely"])
    cfg2 = small_config(tmp_path, num_denoising_steps=1)
    write_prompts(tmp_path / "prompts.txt", ["something else entirely"])
    other = collect(cfg2, pipe=tiny_pipe, progress=False)
    assert other != run
    assert load_summed_statistics(other)[(read_manifest(other)["layers"][0]["name"], "k")].count == 2 * 77


# --------------------------------------------------------------------------- CLI and bad input


def test_cli_inspect_clip_covariance_modes(capsys, caplog):
    npy = ROOT / "src" / "nullbooth" / "data" / "clip_vit_l14_text_covariance.npy"
    assert cli_main(["inspect", str(npy), "--json"]) == 0
    rows = {(r["mode"], r["threshold"]): r["null_dim"] for r in json.loads(capsys.readouterr().out)}
    assert rows[("absolute", 0.02)] == 0
    assert 0 < rows[("relative", 0.001)] < 768
    assert "null space is empty" in caplog.text


def test_cli_inspect_and_validate_run(tiny_run, tiny_pipe, capsys):
    run_dir, _ = tiny_run
    assert cli_main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "null_dim" in out and cross_attention_layers(tiny_pipe.unet)[0].name in out
    assert cli_main(["validate", str(run_dir)]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_cli_refuses_run_of_another_model(tiny_run, capsys):
    run_dir, _ = tiny_run
    assert cli_main(["inspect", str(run_dir), "--model", "tiny-sd2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different model" in err or "lacks" in err


def test_validate_reports_truncated_and_foreign_files(tmp_path, tiny_pipe, caplog):
    import shutil

    run = collect(small_config(tmp_path, num_denoising_steps=1), pipe=tiny_pipe, progress=False)
    folder = next(run.glob("timestep_0000/*"))
    q = folder / "q_covariance.npy"
    q.write_bytes(q.read_bytes()[:200])  # truncated
    np.save(folder / "out_covariance.npy", np.arange(4))  # foreign: integers, wrong shape
    assert cli_main(["validate", str(run)]) == 1
    assert "truncated" in caplog.text and "expected a float matrix" in caplog.text
    with pytest.raises(NullBoothError, match="truncated or not written by nullbooth"):
        load_covariance_data(0, folder.name, "q", run)
    shutil.rmtree(folder)


def test_config_reports_every_problem_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"resolution": 30, "nullbooth": {
        "num_denoising_steps": 0, "nullspace_mode": "relative", "nullspace_threshold": 5,
        "cross_attention_layers": [], "typo_key": 1}}))
    with pytest.raises(NullBoothError) as err:
        load_config(bad)
    msg = str(err.value)
    for field in ("resolution", "nullbooth.num_denoising_steps", "nullbooth.cross_attention_layers", "nullbooth.typo_key"):
        assert field in msg, field
    no_features = tmp_path / "nf.yaml"
    no_features.write_text(yaml.safe_dump({"nullbooth": {"collect_features": {
        "q_features": False, "k_features": False, "v_features": False, "out_features": False}}}))
    with pytest.raises(NullBoothError, match="all four features are disabled"):
        load_config(no_features)
    with pytest.raises(NullBoothError, match="relative.*got 5"):
        load_config(None, {"nullbooth.nullspace_mode": "relative", "nullbooth.nullspace_threshold": 5})


def test_prompt_file_problems(tmp_path, tiny_pipe, caplog):
    missing = small_config(tmp_path, original_knowledge_prompts=str(tmp_path / "nope.txt"))
    with pytest.raises(NullBoothError, match="expected a text file"):
        collect(missing, pipe=tiny_pipe, progress=False)
    (tmp_path / "empty.txt").write_text("\n   \n")
    with pytest.raises(NullBoothError, match="holds no prompt"):
        collect(small_config(tmp_path, original_knowledge_prompts=str(tmp_path / "empty.txt")), pipe=tiny_pipe, progress=False)
    (tmp_path / "messy.txt").write_text("a cat\n\n" + "a very long prompt " * 30 + "\n")
    cfg = small_config(tmp_path, original_knowledge_prompts=str(tmp_path / "messy.txt"), num_denoising_steps=1)
    run = collect(cfg, pipe=tiny_pipe, progress=False)
    assert "skipped 1 blank line" in caplog.text and "truncated" in caplog.text
    assert read_manifest(run)["identity"]["n_prompts"] == 2


def test_unknown_layer_indices_and_unwritable_output(tmp_path, tiny_pipe):
    with pytest.raises(NullBoothError, match=r"indices \[70, 90\] do not exist; this UNet has \d+ attn2 layers"):
        collect(small_config(tmp_path, cross_attention_layers=[0, 70, 90]), pipe=tiny_pipe, progress=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(NullBoothError, match="cannot write"):
        collect(small_config(tmp_path, cov_matrices_output_dir=str(blocker / "cov")), pipe=tiny_pipe, progress=False)


@pytest.mark.slow
def test_model_without_cross_attention_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from nullbooth.models import TinyArch, build_tiny_pipeline

    pipe = build_tiny_pipeline(TinyArch(text_layers=1))
    pipe.unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, cross_attention_dim=128,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None)
    pipe.save_pretrained(tmp_path / "no_xattn")
    cfg = small_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**cfg.model_dump(), "pretrained_model_name_or_path": str(tmp_path / "no_xattn")}))
    result = _run_cli(["collect", "--config", str(path)], timeout=120)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("nullbooth collect: error: the UNet of") and "has no cross-attention (attn2) layers" in line


@pytest.mark.slow
def test_missing_model_folder_is_one_line(tmp_path):
    (tmp_path / "empty_model").mkdir()
    cfg = small_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**cfg.model_dump(), "pretrained_model_name_or_path": str(tmp_path / "empty_model")}))
    result = _run_cli(["collect", "--config", str(path)], timeout=120)
    assert result.returncode == 2 and "model_index.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_attention_levels_place_cross_attention_and_bad_levels_are_refused():
    from nullbooth.models import TinyArch, build_tiny_pipeline

    arch = TinyArch(text_layers=1, unet_channels=(8, 16, 16), norm_groups=8, attention_levels=(1, 2))
    unet = build_tiny_pipeline(arch).unet
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert unet.config.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    attn2 = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    assert attn2 and not any(n.startswith(("down_blocks.0.", "up_blocks.2.")) for n in attn2)
    with pytest.raises(NullBoothError, match=r"attention_levels: expected levels in 0..2, got \(3,\)"):
        build_tiny_pipeline(TinyArch(unet_channels=(8, 16, 16), norm_groups=8, attention_levels=(3,)))
