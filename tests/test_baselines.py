"""The baselines as users know them from diffusers and peft, trained on tiny-sd (16 px images, 2 steps each).

What is checked against independent computations (the saved files read back with safetensors, plain diffusers and
peft, and the base model's weights):
- ``dreambooth`` fine-tunes the whole UNet: a resnet convolution and biases change, not only attention; its ``unet/``
  loads in ``generate``; no LoRA is written;
- ``attn2_finetune`` changes exactly the 28 protected ``attn2`` weights; its LoRA export, loaded by plain
  ``load_lora_weights``, equals its ``unet/``;
- ``lora`` goes on every attention (attn1 and attn2) by default and only on ``attn2`` with ``lora_targets: attn2``; its
  diffusers and kohya files load in plain diffusers and reproduce the trained UNet;
- ``oft`` trains, saves peft's adapter folder, and the pipeline reloaded by ``generate``'s loader — and by peft's own
  ``PeftModel.from_pretrained`` — reproduces the trained UNet's output; the report's ΔW is peft's merged weight
  minus the base weight;
- bad settings and foreign OFT files are one ``NullBoothError`` line.
"""

from __future__ import annotations

import copy
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subject_images
from safetensors.torch import load_file, save_file

from nullbooth.config import MethodName, check_training, config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.filenames import LORA_KOHYA_WEIGHTS, LORA_WEIGHTS
from nullbooth.generate import check_fits, find_personalization, load_personalization
from nullbooth.methods.adapters import adapter_targets, attention_targets
from nullbooth.methods.base import WeightChanges
from nullbooth.methods.lora_export import peft_lora_layers
from nullbooth.methods.oft import OFT_DIR, PEFT_CONFIG, PEFT_WEIGHTS
from nullbooth.methods.registry import METHODS, make_method
from nullbooth.training.loop import train

RES = 16
PROMPT = "a photo of sks dog"
REL = 1e-5  # float32 round-off of the same weights computed along another path, relative to max |ε̂|


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    return {"tmp": tmp, "instance": subject_images(tmp / "instance")}


def make_cfg(world, out: str, **overrides):
    return config_from_dict({
        "pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": 3,
        "instance_data_dir": str(world["instance"]), "instance_prompt": PROMPT, "output_dir": str(world["tmp"] / out),
        "max_train_steps": 2, "checkpointing_steps": 100, "learning_rate": 1e-3, **overrides})


RUNS = {  # name → config overrides
    "dreambooth": dict(method="dreambooth"),
    "attn2_finetune": dict(method="attn2_finetune"),
    "lora": dict(method="lora", lora_rank=2, learning_rate=1e-2, lora_format="kohya"),
    "oft": dict(method="oft", learning_rate=1e-2),
}


@pytest.fixture(scope="module")
def trained(world, tiny_pipe):
    """Every baseline, 2 steps on the same data; the trained pipelines stay attached (in eval mode)."""
    out = {}
    for name, overrides in RUNS.items():
        cfg = make_cfg(world, name, **overrides)
        pipe = copy.deepcopy(tiny_pipe)
        report = train(cfg, pipe=pipe, progress=False)
        pipe.unet.eval()
        out[name] = {"dir": Path(cfg.output_dir), "report": report, "pipe": pipe}
    return out


@torch.no_grad()
def unet_out(pipe) -> torch.Tensor:
    ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(2, pipe.unet.config.in_channels, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    return pipe.unet(x, torch.tensor([500, 500]), pipe.text_encoder(ids)[0]).sample


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> None:
    assert float((a - b).abs().max()) <= rel * float(a.abs().max()), float((a - b).abs().max())


def changed_tensors(folder: Path, base_state: dict[str, torch.Tensor]) -> set[str]:
    after = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert after.keys() == base_state.keys()
    return {k for k, v in after.items() if not torch.equal(v, base_state[k])}


# --------------------------------------------------------------------------- dreambooth, attn2_finetune


def test_every_method_is_registered_under_its_config_name():
    assert set(METHODS) == set(typing.get_args(MethodName))


@pytest.mark.slow
def test_dreambooth_fine_tunes_the_whole_unet_and_generate_loads_it(trained, tiny_pipe):
    run = trained["dreambooth"]
    changed = changed_tensors(run["dir"], tiny_pipe.unet.state_dict())
    assert "down_blocks.0.resnets.0.conv1.weight" in changed and "conv_in.bias" in changed
    assert any(".attn1." in k for k in changed) and any(".attn2." in k for k in changed)
    assert len(changed) > 0.9 * len(tiny_pipe.unet.state_dict()), len(changed)  # AdamW moves every parameter
    assert not (run["dir"] / LORA_WEIGHTS).exists()  # a full-UNet change is no LoRA
    # The leakage report still covers the 28 protected attn2 weights, each changed.
    rows = run["report"]["weights"]
    assert len(rows) == len(adapter_targets(tiny_pipe.unet)) == 28 and all(r["delta_rel"] > 0 for r in rows)
    loaded = copy.deepcopy(tiny_pipe)
    assert load_personalization(loaded, run["dir"]) == "dreambooth"
    assert_close(unet_out(run["pipe"]), unet_out(loaded), 1e-6)
    assert float((unet_out(loaded) - unet_out(tiny_pipe)).abs().max()) > 1e-4


@pytest.mark.slow
def test_attn2_finetune_changes_only_the_protected_weights_and_its_lora_export_agrees(trained, tiny_pipe):
    run = trained["attn2_finetune"]
    changed = changed_tensors(run["dir"], tiny_pipe.unet.state_dict())
    assert changed == {f"{p}.weight" for p in adapter_targets(tiny_pipe.unet)}  # 28 weights, no bias
    full = copy.deepcopy(tiny_pipe)
    assert load_personalization(full, run["dir"]) == "dreambooth"  # generate picks unet/
    via_lora = copy.deepcopy(tiny_pipe)
    via_lora.load_lora_weights(str(run["dir"]))  # the exact SVD export, read by diffusers + peft
    assert_close(unet_out(full), unet_out(via_lora), 1e-4)


def test_dreambooth_prepares_every_parameter_and_attn2_finetune_the_28_weights(world, tiny_pipe):
    for method, expected in (("dreambooth", dict(tiny_pipe.unet.named_parameters())),
                             ("attn2_finetune", {f"{p}.weight": None for p in adapter_targets(tiny_pipe.unet)})):
        m = make_method(make_cfg(world, "x", method=method))
        groups = m.prepare(copy.deepcopy(tiny_pipe), None)
        assert [g["name"] for g in groups] == ["unet"]
        assert {k.removeprefix("unet.") for k in m.trainable()} == set(expected), method


def test_weight_changes_are_computed_when_read_one_weight_at_a_time(world, tiny_pipe):
    # all of SDXL's float64 ΔW at once is 4.8 GB: the report must be able to read them one by one
    m = make_method(make_cfg(world, "x", method="attn2_finetune"))
    pipe = copy.deepcopy(tiny_pipe)
    m.prepare(pipe, None)
    changes = m.weight_changes()
    path = next(iter(changes))
    with torch.no_grad():
        pipe.unet.get_submodule(path).weight.add_(1.0)  # after the mapping was made: a read sees it
    dW, W0 = changes[path]
    assert torch.allclose(dW, torch.ones_like(W0), atol=1e-6)  # (W₀ + 1) − W₀ in float32
    assert set(changes) == set(adapter_targets(tiny_pipe.unet))
    with pytest.raises(KeyError):
        changes["no.such.weight"]
    calls = []
    counted = WeightChanges(["w"], lambda p: calls.append(p) or (W0, W0))
    assert "w" in counted and "v" not in counted and not calls  # membership computes nothing


# --------------------------------------------------------------------------- lora


def test_lora_goes_on_every_attention_by_default_and_on_attn2_with_lora_targets(world, tiny_pipe):
    attention = set(attention_targets(tiny_pipe.unet))
    assert {part for p in attention for part in p.split(".") if part.startswith("attn")} == {"attn1", "attn2"}
    assert len(attention) == 2 * 28  # 7 transformer blocks × (attn1, attn2) × (q, k, v, out)
    for targets, expected in (("attention", attention), ("attn2", set(adapter_targets(tiny_pipe.unet)))):
        pipe = copy.deepcopy(tiny_pipe)
        m = make_method(make_cfg(world, "x", method="lora", lora_targets=targets))
        m.prepare(pipe, None)
        assert set(peft_lora_layers(pipe.unet)) == expected, targets
        assert set(m.weight_changes()) == set(adapter_targets(tiny_pipe.unet))  # the leakage rows: attn2 only


@pytest.mark.slow
def test_lora_on_every_attention_loads_in_plain_diffusers_and_kohya(trained, tiny_pipe):
    run = trained["lora"]
    keys = load_file(str(run["dir"] / LORA_WEIGHTS)).keys()
    modules = {k.removeprefix("unet.").removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight")}
    assert modules == set(attention_targets(tiny_pipe.unet))
    kohya = load_file(str(run["dir"] / LORA_KOHYA_WEIGHTS))
    assert any("attn1_to_q" in k for k in kohya) and any("attn2_to_out_0" in k for k in kohya)
    ours = unet_out(run["pipe"])
    assert float((ours - unet_out(tiny_pipe)).abs().max()) > 1e-4  # training changed what is compared
    for weight_name in (LORA_WEIGHTS, LORA_KOHYA_WEIGHTS):
        plain = copy.deepcopy(tiny_pipe)
        plain.load_lora_weights(str(run["dir"]), weight_name=weight_name)
        assert_close(ours, unet_out(plain))


# --------------------------------------------------------------------------- oft


@pytest.mark.slow
def test_oft_trains_saves_and_reloads_to_the_same_output(trained, tiny_pipe):
    run = trained["oft"]
    folder = run["dir"] / OFT_DIR
    config = json.loads((folder / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == 32 and config["base_model_name_or_path"] == "tiny-sd"
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    assert len(tensors) == 56 and all(k.startswith("base_model.model.") and k.endswith(".oft_R.weight") for k in tensors)
    assert all(float(v.abs().max()) > 0 for v in tensors.values())  # every rotation moved from R = I
    assert find_personalization(run["dir"]) == ("oft", folder)
    ours = unet_out(run["pipe"])
    assert float((ours - unet_out(tiny_pipe)).abs().max()) > 1e-4
    loaded = copy.deepcopy(tiny_pipe)
    assert load_personalization(loaded, run["dir"]) == "oft"
    assert torch.equal(unet_out(loaded), ours)  # the same float32 tensors, unmerged: bit for bit
    # peft's own loader reads the folder as it reads any saved OFT adapter.
    from peft import PeftModel

    peft_unet = PeftModel.from_pretrained(copy.deepcopy(tiny_pipe.unet), str(folder))
    plain = copy.deepcopy(tiny_pipe)
    plain.unet = peft_unet.base_model.model
    assert torch.equal(unet_out(plain), ours)


@pytest.mark.slow
def test_oft_report_delta_is_peft_merged_weight_minus_base(trained, tiny_pipe):
    run = trained["oft"]
    rows = {r["weight"]: r for r in run["report"]["weights"]}
    assert set(rows) == set(adapter_targets(tiny_pipe.unet)) and all(r["oft_block_size"] == 32 for r in rows.values())
    merged = copy.deepcopy(run["pipe"].unet)
    for path in rows:
        layer = merged.get_submodule(path)
        with torch.no_grad():
            layer.merge()  # peft: W ← (R Wᵀ)ᵀ
        W0 = tiny_pipe.unet.get_submodule(path).weight.detach().double()
        dW = layer.get_base_layer().weight.detach().double() - W0
        assert rows[path]["delta_rel"] == pytest.approx(float(dW.norm() / W0.norm()), rel=1e-4)


def test_foreign_or_mismatched_oft_folders_are_one_line(world, tiny_pipe, tiny_pipe2, tmp_path):
    import shutil

    source = tmp_path / "oft"  # an untrained adapter (R = I): its files are what matters here
    method = make_method(make_cfg(world, "x", method="oft"))
    method.prepare(copy.deepcopy(tiny_pipe), None)
    method.save(source, {})
    bad_type, corrupt, other = tmp_path / "bad_type", tmp_path / "corrupt", tmp_path / "other"
    for folder in (bad_type, corrupt, other):
        shutil.copytree(source / OFT_DIR, folder / OFT_DIR)
    config = json.loads((bad_type / OFT_DIR / PEFT_CONFIG).read_text())
    (bad_type / OFT_DIR / PEFT_CONFIG).write_text(json.dumps({**config, "peft_type": "LORA"}))
    (corrupt / OFT_DIR / PEFT_WEIGHTS).write_bytes(b"not a safetensors file")
    cases = [(bad_type, tiny_pipe, r"expected a peft OFT adapter config .* got peft_type 'LORA'"),
             (corrupt, tiny_pipe, r"not a readable safetensors file"),
             (other, tiny_pipe2, r"does not fit .* this model (needs|has no such layer)")]
    for folder, pipe, words in cases:
        kind, where = find_personalization(folder)
        with pytest.raises(NullBoothError, match=words) as err:
            check_fits(pipe, kind, where, "the model")
        assert "\n" not in str(err.value)
    foreign = tmp_path / "foreign"
    shutil.copytree(source / OFT_DIR, foreign / OFT_DIR)
    save_file({"base_model.model.conv_in.lora_A.weight": torch.zeros(2, 4)}, str(foreign / OFT_DIR / PEFT_WEIGHTS))
    with pytest.raises(NullBoothError, match=r"expected peft OFT tensors .* the file is foreign"):
        check_fits(tiny_pipe, *find_personalization(foreign), "tiny-sd")


@pytest.mark.slow
def test_generate_draws_with_dreambooth_and_oft_outputs(world, trained, tiny_pipe):
    from PIL import Image

    from nullbooth.generate import generate

    def draw(adapter: Path | None, out: str) -> np.ndarray:
        cfg = config_from_dict({"resolution": RES, "output_dir": str(world["tmp"] / "nothing"),
                                "generate": {"prompts": [PROMPT], "seeds": [0], "num_inference_steps": 2,
                                             "out_dir": str(world["tmp"] / out),
                                             **({"adapter": str(adapter)} if adapter else {})}})
        (grid,) = generate(cfg, pipe=copy.deepcopy(tiny_pipe))
        return np.asarray(Image.open(grid), np.float64)

    base = draw(None, "gen-base")
    for name in ("dreambooth", "oft"):
        assert np.abs(draw(trained[name]["dir"], f"gen-{name}") - base).mean() > 0, name


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("overrides", "words"), [
    (dict(method="lora", lora_targets="attn1"), r"^config: 1 problem\(s\): lora_targets: Input should be 'attention' "
                                                r"or 'attn2' \(got 'attn1'\)$"),
    (dict(method="dreambooth", lora_targets="attn2"), r"lora_targets: applies to method lora only"),
    (dict(method="lora", oft_block_size=8), r"oft_block_size: applies to method oft only"),
    (dict(method="oft", oft_block_size=1), r"oft_block_size: Input should be greater than or equal to 2"),
    (dict(method="dreambooth", lora_format="kohya"), r"dreambooth fine-tunes every UNet weight and bias"),
    (dict(method="oft", lora_format="kohya"), r"OFT's learned rotations are not one"),
    (dict(method="oft", train_text_encoder=True), r"train_text_encoder: method oft trains the UNet's attention only"),
])
def test_bad_baseline_settings_are_one_line(world, overrides, words):
    with pytest.raises(NullBoothError, match=words) as err:
        check_training(make_cfg(world, "x", **overrides))
    assert "\n" not in str(err.value)
