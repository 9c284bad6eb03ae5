"""``nullbooth.scope: unet``: the null-space update and the certified budget on every UNet weight.

- a convolution is its patch matrix: ``W̃ x̃`` over the unfolded patches reproduces ``conv(x) − b`` (zeros and
  reflect padding, stride 2; tolerance 1e-5 absolute in float32);
- end to end on tiny-sd: every trained weight — attn2, attn1, feed-forward, resnet convolutions, time embedding —
  keeps ``‖ΔW X₀‖ / ‖W X₀‖ ≤ ε (1 + 1e-9)`` (recomputed here in float64 from the saved ``unet/`` and the run's UNet
  statistics), biases and norms are untouched, ``nullbooth generate`` loads the result and labels it nullbooth;
- the time embedding's statistic equals the one computed here from the sampler's timesteps alone (it does not
  depend on the prompts): the recording is right, not only self-consistent (relative 1e-10);
- the UNet statistics are written once into the run and reused — by ``nullbooth collect`` already, when the config
  says scope unet (loading the model once for both), so training samples nothing more; a foreign file is refused in
  one line;
- config: the adapter update and train_text_encoder are refused with scope unet, each in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import budget_world, budgeted_config
from torch import nn

from nullbooth import models as models_module
from nullbooth.cli.main import main
from nullbooth.config import config_from_dict
from nullbooth.config.schema import training_problems
from nullbooth.errors import NullBoothError
from nullbooth.filenames import ADAPTER_WEIGHTS, FULL_UNET_DIR, UNET_MOMENTS
from nullbooth.generate import load_personalization, trained_method
from nullbooth.models import load_pipeline
from nullbooth.runs import collect as collect_module
from nullbooth.runs import unet_moments as moments_module
from nullbooth.runs.layout import load_statistics, read_manifest
from nullbooth.runs.plan import make_scheduler
from nullbooth.runs.unet_moments import check_memory, moments_bytes
from nullbooth.stats.weights import input_rows, unet_weights, weight_matrix
from nullbooth.training.loop import train

EPSILON = 0.05
EPS_CERT = 1e-9
PRIOR = ["a red circle on the left", "a small blue square", "a green triangle at the top"]


@pytest.mark.parametrize("padding_mode,stride", [("zeros", 1), ("reflect", 1), ("zeros", 2)])
def test_a_convolution_is_its_patch_matrix(padding_mode, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=stride, padding_mode=padding_mode)
    x = torch.randn(2, 3, 9, 9)
    y = conv(x) - conv.bias[None, :, None, None]  # [2, 5, H', W']
    rows = input_rows(conv, x)  # [2·H'·W', 27]
    got = (rows @ weight_matrix(conv).T).reshape(2, -1, 5).transpose(1, 2).reshape(y.shape)
    assert torch.allclose(got, y, atol=1e-5)


def test_a_grouped_convolution_is_refused_in_one_line():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NullBoothError, match="groups=2") as err:
        unet_weights(model)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return budget_world(tmp_path_factory.mktemp("unet_scope"), PRIOR)


def scope_config(world, out: str, nullbooth: dict | None = None, **top) -> dict:
    block = {"scope": "unet", **(nullbooth or {})}
    return budgeted_config(world, out, epsilon=EPSILON, learning_rate=1e-2, nullbooth=block, **top)


@pytest.fixture(scope="module")
def trained(world):
    report = train(config_from_dict(scope_config(world, "run")), pipe=load_pipeline("tiny-sd"), progress=False)
    return report, world["tmp"] / "run"


def leakage(dW: torch.Tensor, W: torch.Tensor, C: torch.Tensor) -> float:
    return float(((dW @ C) * dW).sum() / ((W @ C) * W).sum()).__pow__(0.5)


def test_every_weight_of_the_unet_stays_within_the_budget(trained, tiny_pipe):
    report, out = trained
    assert report["summary"]["budget_certified"]
    assert (out / FULL_UNET_DIR / "config.json").is_file() and not (out / ADAPTER_WEIGHTS).exists()
    run = Path(report["stats_run"])
    stats, _ = load_statistics(run / UNET_MOMENTS)
    tuned = load_pipeline("tiny-sd")
    assert load_personalization(tuned, out) == "dreambooth" and trained_method(out) == "nullbooth"
    base = dict(tiny_pipe.unet.named_modules())
    leaks = {}
    for path, module in unet_weights(tuned.unet).items():
        W0 = weight_matrix(base[path]).detach().double()
        dW = weight_matrix(module).detach().double() - W0
        if path.endswith(("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")):
            assert path not in stats  # attn2 is protected by the run's own (seed-layout) statistics
            continue
        leaks[path] = leakage(dW, W0, stats[path].moment())
    kinds = {"conv": "resnets.0.conv1", "attn1": "attn1.to_v", "ff": "ff.net.2", "time": "time_embedding.linear_1"}
    for kind, suffix in kinds.items():
        assert any(p.endswith(suffix) and leak > 0 for p, leak in leaks.items()), f"no {kind} weight was trained"
    assert max(leaks.values()) <= EPSILON * (1 + EPS_CERT), max(leaks.values())
    assert max(leaks.values()) > 0.99 * EPSILON  # the wall was reached
    base_state, state = tiny_pipe.unet.state_dict(), tuned.unet.state_dict()
    for name, value in state.items():
        if not name.endswith(".weight") or "norm" in name:  # biases and normalisation layers stay frozen
            assert torch.equal(value, base_state[name]), name


def test_the_time_embedding_statistic_is_the_samplers_timesteps(trained, tiny_pipe):
    report, _ = trained
    run = Path(report["stats_run"])
    stats, _ = load_statistics(run / UNET_MOMENTS)
    identity = read_manifest(run)["identity"]
    scheduler = make_scheduler(tiny_pipe, identity["sampler"])
    scheduler.set_timesteps(identity["num_denoising_steps"])
    emb = tiny_pipe.unet.time_proj(scheduler.timesteps).double()  # [T, d]: the same for every prompt and branch
    expected = emb.T @ emb / emb.shape[0]
    got = stats["time_embedding.linear_1"].moment()
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


def test_the_unet_statistics_are_written_once_and_reused(trained, world, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("the UNet statistics were recomputed")

    monkeypatch.setattr(moments_module, "sample", no_sampling)
    report = train(config_from_dict(scope_config(world, "again", max_train_steps=1)), pipe=load_pipeline("tiny-sd"),
                   progress=False)
    assert report["stats_run"] == trained[0]["stats_run"]


def test_collect_writes_the_unet_statistics_that_training_reads(world, tmp_path, monkeypatch, capsys):
    cfg = scope_config(world, "after_collect", max_train_steps=1,
                       nullbooth={"cov_matrices_output_dir": str(tmp_path / "cov")})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    loads = []

    def counted(*args, **kwargs):
        loads.append(args)
        return load_pipeline(*args, **kwargs)

    monkeypatch.setattr(models_module, "load_pipeline", counted)
    monkeypatch.setattr(collect_module, "load_pipeline", counted)
    assert main(["collect", "--config", str(path)]) == 0
    assert len(loads) == 1, "collect loaded the model again for the UNet statistics"
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    stats, meta = load_statistics(run / UNET_MOMENTS)
    assert meta["run_key"] == read_manifest(run)["key"] and "time_embedding.linear_1" in stats

    def no_sampling(*args, **kwargs):
        raise AssertionError("training sampled the UNet statistics again")

    monkeypatch.setattr(moments_module, "sample", no_sampling)
    report = train(config_from_dict(cfg), pipe=load_pipeline("tiny-sd"), progress=False)
    assert Path(report["stats_run"]) == run


def test_collect_refuses_a_missing_prompt_file_before_loading_the_model(world, tmp_path, monkeypatch, capsys):
    cfg = scope_config(world, "no_prompts", nullbooth={"cov_matrices_output_dir": str(tmp_path / "cov"),
                                                       "original_knowledge_prompts": str(tmp_path / "missing.txt")})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    loads = []
    monkeypatch.setattr(models_module, "load_pipeline", lambda *args, **kwargs: loads.append(args))
    assert main(["collect", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and err.count("\n") == 1, err
    assert loads == [], "collect loaded the model before checking its prompt file"


def test_a_foreign_statistics_file_is_refused(trained, tmp_path, tiny_pipe):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0]["stats_run"], run)
    from nullbooth.runs.layout import save_statistics
    from nullbooth.stats.moments import SecondMoment

    save_statistics(run / UNET_MOMENTS, {"conv_in": SecondMoment(36)}, {"format": "something-else"})
    with pytest.raises(NullBoothError, match="is not a nullbooth UNet statistics file") as err:
        moments_module.unet_moments(run, tiny_pipe, unet_weights(tiny_pipe.unet))
    assert "\n" not in str(err.value)


def test_scope_unet_refuses_the_adapter_update_and_a_trained_text_encoder(world):
    adapter = training_problems(config_from_dict(scope_config(world, "x", nullbooth_update="adapter")))
    assert any(p.startswith("nullbooth_update:") and "scope unet" in p for p in adapter)
    encoder = training_problems(config_from_dict(scope_config(world, "x", train_text_encoder=True)))
    assert any(p.startswith("train_text_encoder:") and "scope unet" in p for p in encoder)
    assert not training_problems(config_from_dict(scope_config(world, "x")))
    with pytest.raises(NullBoothError, match="scope"):
        config_from_dict(scope_config(world, "x", nullbooth={"scope": "vae"}))


def test_a_stale_statistics_file_is_recomputed(trained, tmp_path, tiny_pipe, monkeypatch):
    import shutil

    from nullbooth.runs.layout import save_statistics

    run = tmp_path / "run"
    shutil.copytree(trained[0]["stats_run"], run)
    original, meta = load_statistics(run / UNET_MOMENTS)
    save_statistics(run / UNET_MOMENTS, original, {**meta, "run_key": "an-earlier-run"})
    calls = []
    real = moments_module.sample
    monkeypatch.setattr(moments_module, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    weights = unet_weights(tiny_pipe.unet, exclude=[p for p in dict(tiny_pipe.unet.named_modules()) if ".attn2.to_" in p])
    got = moments_module.unet_moments(run, tiny_pipe, weights)
    assert calls and load_statistics(run / UNET_MOMENTS)[1]["run_key"] == read_manifest(run)["key"]
    for path, stat in got.items():  # the same trajectories: the same sums (float64, summation order aside)
        assert torch.allclose(stat.sum, original[path].sum, rtol=1e-9, atol=1e-9 * float(stat.sum.abs().max()))


def test_an_sd15_size_unet_is_refused_before_anything_is_computed():
    from diffusers import UNet2DConditionModel

    from nullbooth.methods.adapters import adapter_targets

    with torch.device("meta"):  # SD 1.5's UNet config, no memory
        unet = UNet2DConditionModel(cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280),
                                    layers_per_block=2, attention_head_dim=8, sample_size=64)
    weights = unet_weights(unet, exclude=adapter_targets(unet))
    assert len(weights) == 218 and moments_bytes(weights) > 200 * 2**30
    with pytest.raises(NullBoothError, match="nullbooth.scope unet: .* GiB .* use nullbooth.scope: attn2") as err:
        check_memory(weights)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_resumed_scope_unet_run_equals_an_uninterrupted_one(world):
    from safetensors.torch import load_file

    straight = train(config_from_dict(scope_config(world, "straight", checkpointing_steps=2)),
                     pipe=load_pipeline("tiny-sd"), progress=False)
    train(config_from_dict(scope_config(world, "resumed", checkpointing_steps=2, max_train_steps=2)),
          pipe=load_pipeline("tiny-sd"), progress=False)
    report = train(config_from_dict(scope_config(world, "resumed", checkpointing_steps=2,
                                                 resume_from_checkpoint="latest")),
                   pipe=load_pipeline("tiny-sd"), progress=False)
    assert report["summary"]["budget_certified"]
    files = [world["tmp"] / run / FULL_UNET_DIR / "diffusion_pytorch_model.safetensors" for run in ("straight", "resumed")]
    a, b = (load_file(str(f)) for f in files)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = {r["weight"]: r.get("budget_active_steps") for r in straight["weights"]}
    assert steps == {r["weight"]: r.get("budget_active_steps") for r in report["weights"]}
    assert any(steps[p] for p in steps if ".attn2." not in p)  # the other weights' counts survive the resume too
