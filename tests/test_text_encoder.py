"""``train_text_encoder``, ``lora_dropout`` and ``use_dora`` on tiny-sd (16 px images, a few steps).

What is checked, against plain diffusers where a file is involved:
- ``trains_text_encoder`` follows the config per method (Perfusion always trains its embedding);
- dreambooth trains the whole encoder in its own optimizer group and saves it as ``text_encoder/``, which
  ``nullbooth generate`` loads; lora's encoder LoRA goes into the diffusers file (plain ``load_lora_weights``
  reproduces our encoder's output) and the kohya file (``lora_te_`` keys, the same output);
- nullbooth with a trained encoder says the encoder is unprotected, logs it, and generate loads it;
- LoRA dropout acts in train mode only; DoRA trains its magnitudes, its export reproduces our UNet in plain
  diffusers, and its reported ``ΔW`` is the weight the layer applies;
- a resumed text-encoder run (dropout on) equals an uninterrupted one, bit for bit.
Tolerances: float32 round-off, relative to the output's largest magnitude, as stated at each assertion.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import subject_images, write_prompts
from safetensors.torch import load_file

from nullbooth.config import check_training, config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.filenames import LORA_KOHYA_WEIGHTS, LORA_WEIGHTS
from nullbooth.generate import load_personalization
from nullbooth.methods.baselines import peft_delta
from nullbooth.methods.lora_export import peft_lora_layers
from nullbooth.methods.registry import make_method
from nullbooth.models import load_pipeline
from nullbooth.training.loop import train
from nullbooth.training.report import format_report

RES = 16
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text_encoder")
    return {"tmp": tmp, "instance": subject_images(tmp / "instance"),
            "prompts": write_prompts(tmp / "prior.txt", ["a red circle", "a photo of a dog", "a blue square"])}


def make_cfg(world, out: str, **top):
    return config_from_dict({
        "pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": 2, "output_dir": str(world["tmp"] / out),
        "instance_data_dir": str(world["instance"]), "instance_prompt": PROMPT, "max_train_steps": 2,
        "checkpointing_steps": 100, "learning_rate": 1e-2,
        "nullbooth": {"original_knowledge_prompts": str(world["prompts"]), "cov_matrices_output_dir": str(world["tmp"] / "cov"),
                      "num_denoising_steps": 2, "nullspace_mode": "relative", "nullspace_threshold": 1e-2},
        **top,
    })


@torch.no_grad()
def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoding of PROMPT ``[1, 77, d]`` and the UNet's prediction with it, both in eval mode."""
    pipe.text_encoder.eval()
    pipe.unet.eval()
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]
    x = torch.randn(1, pipe.unet.config.in_channels, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    return text, pipe.unet(x, torch.tensor([500]), text).sample


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    assert float((a - b).abs().max()) <= rel * float(a.abs().max()), float((a - b).abs().max())


# --------------------------------------------------------------------------- per instance, refusals


def test_trains_text_encoder_follows_the_config(world):
    for method in ("nullbooth", "dreambooth", "attn2_finetune", "lora"):
        assert make_method(make_cfg(world, "x", method=method)).trains_text_encoder is False
        assert make_method(make_cfg(world, "x", method=method, train_text_encoder=True)).trains_text_encoder is True
    perfusion = make_cfg(world, "x", method="perfusion", instance_prompt="a photo of <sks> dog",
                         perfusion={"concept_token": "<sks>", "superclass": "dog"})
    assert make_method(perfusion).trains_text_encoder is True


def test_kohya_is_refused_where_it_cannot_carry_the_result(world):
    with pytest.raises(NullBoothError, match="kohya' has no DoRA"):
        check_training(make_cfg(world, "x", method="lora", use_dora=True, lora_format="kohya"))
    with pytest.raises(NullBoothError, match="whole text encoder, which no LoRA carries"):
        check_training(make_cfg(world, "x", method="attn2_finetune", train_text_encoder=True, lora_format="kohya"))
    check_training(make_cfg(world, "x", method="attn2_finetune", lora_format="kohya"))  # its UNet change is a LoRA
    with pytest.raises(NullBoothError, match="every UNet weight and bias, which no LoRA carries"):
        check_training(make_cfg(world, "x", method="dreambooth", lora_format="kohya"))


def test_dreambooth_puts_the_whole_encoder_in_its_own_named_group(world):
    pipe = load_pipeline("tiny-sd")
    method = make_method(make_cfg(world, "x", method="dreambooth", train_text_encoder=True, text_encoder_lr=3e-4))
    groups = method.prepare(pipe, None)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-2), ("text_encoder", 3e-4)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in pipe.text_encoder.parameters()}
    assert sum(k.startswith("text_encoder.") for k in method.trainable()) == len(list(pipe.text_encoder.parameters()))
    # text_encoder_lr defaults to learning_rate
    lora = make_method(make_cfg(world, "x", method="lora", train_text_encoder=True))
    assert [g["lr"] for g in lora.prepare(load_pipeline("tiny-sd"), None)] == [1e-2, 1e-2]


# --------------------------------------------------------------------------- dreambooth


@pytest.mark.slow
def test_dreambooth_saves_the_encoder_and_generate_loads_it(world):
    pipe = load_pipeline("tiny-sd")
    base_text, _ = outputs(load_pipeline("tiny-sd"))
    train(make_cfg(world, "db", method="dreambooth", train_text_encoder=True), pipe=pipe, progress=False)
    out = world["tmp"] / "db"
    assert (out / "unet").is_dir() and (out / "text_encoder" / "model.safetensors").is_file()
    assert not (out / LORA_WEIGHTS).exists()  # a LoRA would carry the UNet's change without the encoder's
    ours_text, ours = outputs(pipe)
    assert float((ours_text - base_text).abs().max()) > 1e-4 * float(base_text.abs().max())
    loaded = load_pipeline("tiny-sd")
    assert load_personalization(loaded, out) == "dreambooth"
    text, pred = outputs(loaded)
    assert torch.equal(text, ours_text)  # the saved float32 encoder, exactly
    assert_close(ours, pred, 1e-6)  # the same UNet weights; the trained module may take another kernel path


# --------------------------------------------------------------------------- lora


@pytest.mark.slow
def test_lora_encoder_export_loads_in_plain_diffusers_and_kohya(world):
    pipe = load_pipeline("tiny-sd")
    base_text, _ = outputs(load_pipeline("tiny-sd"))
    report = train(make_cfg(world, "lora", method="lora", lora_rank=2, train_text_encoder=True, lora_format="kohya"),
                   pipe=pipe, progress=False)
    out = world["tmp"] / "lora"
    ours_text, ours = outputs(pipe)
    assert float((ours_text - base_text).abs().max()) > 1e-4 * float(base_text.abs().max())
    keys = load_file(str(out / LORA_WEIGHTS)).keys()
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
    kohya = load_file(str(out / LORA_KOHYA_WEIGHTS)).keys()
    assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in kohya
    assert str(out / LORA_KOHYA_WEIGHTS) in report["files"]
    for weight_name in (LORA_WEIGHTS, LORA_KOHYA_WEIGHTS):
        plain = load_pipeline("tiny-sd")
        plain.load_lora_weights(str(out), weight_name=weight_name)  # diffusers + peft only
        text, pred = outputs(plain)
        # the same factors evaluated by diffusers' peft layers: float32 round-off (1e-5 of the largest value)
        assert_close(ours_text, text, 1e-5)
        assert_close(ours, pred, 1e-5)


def test_lora_dropout_acts_in_train_mode_only(world):
    pipe = load_pipeline("tiny-sd")
    method = make_method(make_cfg(world, "x", method="lora", lora_rank=2, lora_dropout=0.5, train_text_encoder=True))
    method.prepare(pipe, None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for layer in peft_lora_layers(model).values():  # B starts at 0: give the branch something to drop
                layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, pipe.unet.config.in_channels, RES // 2, RES // 2, generator=g)
    text = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=g)
    for model, call in ((pipe.unet, lambda: pipe.unet(x, torch.tensor([500]), text).sample),
                        (pipe.text_encoder, lambda: pipe.text_encoder(ids)[0])):
        with torch.no_grad():
            model.train()
            assert not torch.equal(call(), call()), f"{type(model).__name__}: dropout inactive in train mode"
            model.eval()
            assert torch.equal(call(), call()), f"{type(model).__name__}: dropout active in eval mode"


@pytest.mark.slow
def test_dora_trains_magnitudes_and_its_export_reproduces_our_unet(world):
    pipe = load_pipeline("tiny-sd")
    cfg = make_cfg(world, "dora", method="lora", lora_rank=2, use_dora=True)
    train(cfg, pipe=pipe, progress=False)
    layers = peft_lora_layers(pipe.unet)
    assert layers and all(layer.use_dora["default"] for layer in layers.values())
    # The magnitude starts at the row norms ‖W‖ (peft) and was trained away from them.
    with torch.no_grad():
        moved = [float((layer.lora_magnitude_vector["default"].weight - layer.get_base_layer().weight.norm(dim=1))
                       .abs().max()) for layer in layers.values()]
    assert max(moved) > 1e-4
    out = world["tmp"] / "dora"
    keys = load_file(str(out / LORA_WEIGHTS)).keys()
    assert sum(k.endswith(".lora_magnitude_vector.weight") for k in keys) == len(layers)
    _, ours = outputs(pipe)
    plain = load_pipeline("tiny-sd")
    plain.load_lora_weights(str(out))
    _, theirs = outputs(plain)
    assert_close(ours, theirs, 1e-5)  # float32 round-off of the same DoRA layers
    # The reported ΔW is the weight DoRA applies: W + ΔW reproduces the layer (float64 ΔW, float32 layer: 1e-5).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            base = layer.get_base_layer()
            x = torch.randn(3, base.in_features, generator=g)
            bias = base.bias.double() if base.bias is not None else None
            expected = F.linear(x.double(), base.weight.double() + peft_delta(layer), bias)
            assert_close(expected, layer(x).double(), 1e-5)


# --------------------------------------------------------------------------- nullbooth


@pytest.mark.slow
def test_nullbooth_says_the_encoder_is_unprotected_and_generate_loads_it(world, caplog):
    pipe = load_pipeline("tiny-sd")
    cfg = make_cfg(world, "nb", method="nullbooth", train_text_encoder=True, lora_rank=2)
    with caplog.at_level(logging.WARNING, logger="nullbooth.methods.nullbooth"):
        report = train(cfg, pipe=pipe, progress=False)
    assert any("text encoder was trained without constraint" in r.message for r in caplog.records)
    # The report, its table and the model card say what the guarantee no longer covers.
    assert report["summary"]["unprotected"] == ["text_encoder"]
    assert "NOT protected: text_encoder" in format_report(report)
    assert "text_encoder: NOT protected" in (world["tmp"] / "nb" / "README.md").read_text(encoding="utf-8")
    assert list(make_method(cfg).unprotected()) == ["text_encoder"]
    assert make_method(make_cfg(world, "x", method="nullbooth")).unprotected() == {}
    out = world["tmp"] / "nb"
    ours_text, ours = outputs(pipe)
    loaded = load_pipeline("tiny-sd")
    assert load_personalization(loaded, out) == "nullbooth"
    text, pred = outputs(loaded)
    assert_close(ours_text, text, 1e-5)  # diffusers' peft layers for the encoder LoRA: float32 round-off
    assert_close(ours, pred, 1e-5)  # and nullbooth's exact adapter on top of that encoding
    plain = load_pipeline("tiny-sd")
    plain.load_lora_weights(str(out))  # one file holds both the UNet's factors and the encoder's LoRA
    assert_close(ours, outputs(plain)[1], 1e-5)


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resumed_text_encoder_run_equals_an_uninterrupted_one(world):
    common = dict(method="lora", lora_rank=2, train_text_encoder=True, lora_dropout=0.2, checkpointing_steps=2)
    train(make_cfg(world, "straight", max_train_steps=4, **common), pipe=load_pipeline("tiny-sd"), progress=False)
    train(make_cfg(world, "resumed", max_train_steps=2, **common), pipe=load_pipeline("tiny-sd"), progress=False)
    train(make_cfg(world, "resumed", max_train_steps=4, resume_from_checkpoint="latest", **common),
          pipe=load_pipeline("tiny-sd"), progress=False)
    a = load_file(str(world["tmp"] / "straight" / LORA_WEIGHTS))
    b = load_file(str(world["tmp"] / "resumed" / LORA_WEIGHTS))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"
