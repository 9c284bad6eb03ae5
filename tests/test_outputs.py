"""What a training output holds for the tools people use next: the model card and the kohya-format LoRA.

- ``README.md`` (diffusers' model-card shape): front matter, hyper-parameters, the method's guarantees,
  validation samples and a loading snippet that plain diffusers runs;
- ``lora_format: kohya``: key names ``lora_unet_<path>.lora_down/.lora_up/.alpha``, tensors equal to the
  diffusers file's, and the file loaded by diffusers' own kohya converter gives the same UNet outputs as the
  diffusers-format file (float32, 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from conftest import subject_images, write_prompts
from safetensors.torch import load_file

from nullbooth.cli.main import main
from nullbooth.config import check_training, config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.filenames import LORA_KOHYA_WEIGHTS, LORA_WEIGHTS, MODEL_CARD
from nullbooth.methods.lora_export import kohya_name
from nullbooth.models import load_pipeline
from nullbooth.training.loop import train

RES = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    return {"tmp": tmp, "instance": subject_images(tmp / "instance"),
            "prompts": write_prompts(tmp / "prior.txt", ["a red circle", "a photo of a dog", "a blue square"])}


def run(world, out: str, **top):
    cfg = config_from_dict({
        "pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": 1, "output_dir": str(world["tmp"] / out),
        "instance_data_dir": str(world["instance"]), "instance_prompt": "a photo of sks dog",
        "max_train_steps": 2, "learning_rate": 1e-2, "lora_format": "kohya",
        "nullbooth": {"original_knowledge_prompts": str(world["prompts"]), "cov_matrices_output_dir": str(world["tmp"] / "cov"),
                      "num_denoising_steps": 2, "nullspace_mode": "relative", "nullspace_threshold": 1e-2},
        **top,
    })
    report = train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
    return world["tmp"] / out, report


@torch.no_grad()
def unet_out(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, pipe.unet.config.in_channels, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    return pipe.unet(x, torch.tensor([500]), pipe.text_encoder(ids)[0]).sample


@pytest.mark.parametrize("method", ["nullbooth", "lora"])
def test_kohya_file_equals_the_diffusers_file_and_loads_the_same(world, method):
    folder, report = run(world, f"kohya-{method}", method=method, lora_rank=2)
    assert str(folder / LORA_KOHYA_WEIGHTS) in report["files"]
    kohya = load_file(str(folder / LORA_KOHYA_WEIGHTS))
    targets = [r["weight"] for r in report["weights"] if r.get("trained", True)]
    name = kohya_name(targets[0])
    assert name.startswith("lora_unet_") and "." not in name and name.endswith(("attn2_to_q", "attn2_to_k",
                                                                                 "attn2_to_v", "attn2_to_out_0"))
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= kohya.keys()
    if method == "nullbooth":  # the exact factors (zero-padded to one rank), scale alpha / rank = 1
        ours = load_file(str(folder / LORA_WEIGHTS))
        for path in targets:
            n = kohya_name(path)
            A, B = ours[f"unet.{path}.lora_A.weight"], ours[f"unet.{path}.lora_B.weight"]
            k = A.shape[0]
            assert torch.equal(kohya[f"{n}.lora_down.weight"][:k], A)
            assert torch.equal(kohya[f"{n}.lora_up.weight"][:, :k], B)
            assert not kohya[f"{n}.lora_down.weight"][k:].any() and not kohya[f"{n}.lora_up.weight"][:, k:].any()
            assert float(kohya[f"{n}.alpha"]) == kohya[f"{n}.lora_down.weight"].shape[0]
    outputs = []
    for weight_name in (LORA_WEIGHTS, LORA_KOHYA_WEIGHTS):
        pipe = load_pipeline("tiny-sd")
        before = unet_out(pipe)
        pipe.load_lora_weights(str(folder), weight_name=weight_name)  # diffusers' own kohya → peft conversion
        outputs.append(unet_out(pipe))
    assert float((outputs[0] - before).abs().max()) > 1e-6, "the LoRA should change the UNet"
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)


def test_model_card_has_the_front_matter_settings_guarantees_and_samples(world):
    folder, _ = run(world, "card", lora_format="diffusers", validation_prompt="a photo of sks dog",
                    validation_steps=2, num_validation_images=1,
                    nullbooth={"original_knowledge_prompts": str(world["prompts"]),
                               "cov_matrices_output_dir": str(world["tmp"] / "cov"), "num_denoising_steps": 2,
                               "nullspace_mode": "rank", "nullspace_threshold": 0, "leakage_budget": 0.05})
    card = (folder / MODEL_CARD).read_text(encoding="utf-8")
    front = card.split("---")[1]
    assert 'base_model: "tiny-sd"' in front and 'instance_prompt: "a photo of sks dog"' in front
    assert "- nullbooth" in front and "- lora" in front and "library_name: diffusers" in front
    assert "| max_train_steps | 2 |" in card and "| learning_rate | 0.01 |" in card
    assert "Leakage budget ε = 0.05" in card and "certified" in card
    assert "![validation](validation/step-000002.png)" in card and (folder / "validation/step-000002.png").is_file()
    assert "pipe.load_lora_weights(" in card and "use_safetensors=True" in card
    assert not (folder / LORA_KOHYA_WEIGHTS).exists() and "## Evaluation" not in card
    # `nullbooth evaluate` of the output refreshes its card with the numbers it measured.
    assert main(["evaluate", str(folder), "--prompt", "a red circle", "--prompt", "a blue square", "--seeds", "0,1",
                 "--steps", "2", "--resolution", str(RES), "--k", "1"]) == 0
    card = (folder / MODEL_CARD).read_text(encoding="utf-8")
    assert "## Evaluation" in card and "| paired same-seed RMSE (0 = unchanged) |" in card
    assert "Leakage budget ε = 0.05" in card  # the rest of the card is still there


def test_kohya_is_refused_for_perfusion(world):
    cfg = config_from_dict({"method": "perfusion", "lora_format": "kohya", "instance_data_dir": str(world["instance"]),
                            "instance_prompt": "a photo of sks dog"})
    with pytest.raises(NullBoothError, match="lora_format: 'kohya' exports a LoRA"):
        check_training(cfg)
