"""Training, export, generation and evaluation on SDXL pipelines — the built-in ``tiny-sdxl`` and a second,
differently shaped SDXL-like pipeline built here (text encoders 32 + 48 wide, attn2 reading 80-wide encodings).

What is checked against independent computations:
- each variant's size micro-conditioning (original size, crop top-left in the resized — and, for a mirror image,
  mirrored — image, target size) against crops cut here, and that the UNet receives exactly those time ids;
- nullbooth | dreambooth | lora | oft train on both pipelines through the one loop (attn2 k/v inputs D₁ + D₂ wide);
- the diffusers LoRA export (UNet and both text encoders) loaded by plain ``StableDiffusionXLPipeline
  .load_lora_weights`` in a subprocess without nullbooth reproduces our trained model's UNet output
  (|Δ| ≤ 1e-5 + 1e-4·|ε|, float32; the base model's output is far outside that);
- generate (base alone, LoRA, nullbooth adapter, full UNet, peft OFT folder) and evaluate's sampling path run on SDXL;
- what SDXL refuses (dreambooth + train_text_encoder, kohya export) is one line, before anything is computed;
- a nullbooth set-up (tiny-sd) without held-out prompts or validation never samples before its first step.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import other_sdxl_pipeline, subject_images, write_prompts
from PIL import Image
from safetensors import safe_open

from nullbooth.conditioning import text_encoders
from nullbooth.config import config_from_dict
from nullbooth.dataset import Augmentation, image_variants, make_examples
from nullbooth.errors import NullBoothError
from nullbooth.models import load_pipeline
from nullbooth.training import loop as loop_module
from nullbooth.training.loop import train
from nullbooth.training.prior import variant_time_ids
from nullbooth.training.setup import setup

RES = 16
PRIOR = ["a red circle on the left", "a small blue square", "a photo of a dog", "a green triangle at the top"]
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    other = tmp / "other-sdxl"
    other_sdxl_pipeline().save_pretrained(other, safe_serialization=True)
    tiny = tmp / "tiny-sdxl"
    base = load_pipeline("tiny-sdxl")
    base.save_pretrained(tiny, safe_serialization=True)  # the same weights, as a folder plain diffusers reads
    return {"tmp": tmp, "instance": subject_images(tmp / "instance"), "prompts": write_prompts(tmp / "prior.txt", PRIOR),
            "models": {"tiny-sdxl": tiny, "other": other}, "pipes": {"tiny-sdxl": base, "other": load_pipeline(str(other))}}


def make_cfg(world, model: str, out: str, **overrides):
    data = {"pretrained_model_name_or_path": str(world["models"][model]), "resolution": RES, "seed": 3,
            "instance_data_dir": str(world["instance"]), "instance_prompt": PROMPT, "class_prompt": "a photo of dog",
            "output_dir": str(world["tmp"] / model / out), "max_train_steps": 2, "checkpointing_steps": 100,
            "learning_rate": 1e-3,
            "nullbooth": {"original_knowledge_prompts": str(world["prompts"]),
                          "cov_matrices_output_dir": str(world["tmp"] / model / "cov"), "num_denoising_steps": 2,
                          "collection_batch_size": 4, "nullspace_mode": "relative", "nullspace_threshold": 1e-2}}
    data.update(overrides)
    return config_from_dict(data)


RUNS = {  # name → config overrides: every method, the text encoders, crops, flips and prior preservation between them
    "nullbooth": dict(method="nullbooth", train_text_encoder=True),
    "lora": dict(method="lora", train_text_encoder=True, center_crop=False, random_flip=True),
    "dreambooth": dict(method="dreambooth", with_prior_preservation=True, num_class_images=2, class_generation_steps=1),
    "oft": dict(method="oft", learning_rate=1e-2),
}


@pytest.fixture(scope="module")
def trained(world):
    """Every method on both pipelines, 2 steps; the time ids the UNet got; the trained pipelines stay attached."""
    out = {}
    real = loop_module.unet_conditioning
    for model in world["pipes"]:
        for name, overrides in RUNS.items():
            seen = []

            def spy(pipe, encoded, sizes, resolution, seen=seen):
                kwargs = real(pipe, encoded, sizes, resolution)
                seen.append(kwargs)
                return kwargs

            loop_module.unet_conditioning = spy
            try:
                cfg = make_cfg(world, model, name, **overrides)
                pipe = copy.deepcopy(world["pipes"][model])
                report = train(cfg, pipe=pipe, progress=False)
            finally:
                loop_module.unet_conditioning = real
            out[(model, name)] = {"dir": Path(cfg.output_dir), "report": report, "pipe": pipe, "seen": seen}
    return out


# --------------------------------------------------------------------------- micro-conditioning


def test_each_variant_carries_its_original_size_and_crop_offset():
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), np.uint8))  # w 40, h 24
    aug = Augmentation(center_crop=False, random_flip=True, seed=1, crops=3)
    (example,) = make_examples([(Path("wide.png"), wide)], [PROMPT], RES, aug)
    assert example.original_size == (24, 40)
    resized = wide.resize((27, 16), Image.Resampling.BILINEAR)  # shorter side to 16: 40·16/24 = 26.7 → 27
    mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert len(example.crops_top_left) == len(example.variants) == 6
    for v, ((top, left), x) in enumerate(zip(example.crops_top_left, example.variants)):
        source = mirrored if v % 2 else resized  # diffusers flips, then crops: a mirror's offset is in the mirror
        crop = np.asarray(source.crop((left, top, left + RES, top + RES)), np.float32) / 127.5 - 1
        assert np.array_equal(x.permute(1, 2, 0).numpy(), crop), v
    ids = variant_time_ids([example], RES)  # [6, 6]
    expected = [[24, 40, t, lft, RES, RES] for t, lft in example.crops_top_left]
    assert ids.tolist() == expected and len({lft for _, lft in example.crops_top_left}) > 1
    # a centre crop of a square image: whole image, no offset
    square = make_examples([(Path("s.png"), wide.crop((0, 0, 24, 24)))], [PROMPT], RES)[0]
    assert variant_time_ids([square], RES).tolist() == [[24, 24, 0, 0, RES, RES]]
    assert torch.equal(image_variants(wide.crop((0, 0, 24, 24)), RES, [(0, 0)]), square.variants)


@pytest.mark.slow
def test_every_method_trains_on_both_sdxl_pipelines_with_its_time_ids(world, trained):
    for (model, name), run in trained.items():
        pipe, seen = world["pipes"][model], run["seen"]
        assert len(run["report"]["losses"]) == 2 and all(np.isfinite(run["report"]["losses"])), (model, name)
        width = sum(e.config.hidden_size for e in text_encoders(pipe))  # D₁ + D₂
        assert width == pipe.unet.config.cross_attention_dim
        for kwargs in seen:
            hidden, added = kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]
            assert hidden.shape[1:] == (77, width)
            assert added["text_embeds"].shape == (hidden.shape[0], pipe.text_encoder_2.config.projection_dim)
            ids = added["time_ids"]  # [bsz, 6]: target size always the resolution, crops inside the resized image
            assert (ids[:, 4:] == RES).all() and (ids[:, 2:4] >= 0).all()
        sizes = {tuple(r) for k in seen for r in k["added_cond_kwargs"]["time_ids"][:, :2].tolist()}
        # the instance images' own sizes (h, w): (24, 20), (24, 24), (24, 28); generated class images are RES²
        assert sizes & {(24.0, 20.0), (24.0, 24.0), (24.0, 28.0)}, sizes
        assert sizes <= {(24.0, 20.0), (24.0, 24.0), (24.0, 28.0), (RES, RES)}, sizes
        if name == "lora":  # random crops of the 20- and 28-wide images: some non-zero left offset is drawn
            assert any(float(k["added_cond_kwargs"]["time_ids"][:, 3].max()) > 0 for k in seen)
        if name == "dreambooth":  # prior preservation: the class half is (RES, RES, 0, 0, RES, RES)
            for k in seen:
                ids = k["added_cond_kwargs"]["time_ids"]
                assert ids[ids.shape[0] // 2:].tolist() == [[RES, RES, 0, 0, RES, RES]] * (ids.shape[0] // 2)


# --------------------------------------------------------------------------- plain diffusers loads the export

PLAIN = textwrap.dedent('''
    import sys, torch
    assert "nullbooth" not in sys.modules
    from diffusers import StableDiffusionXLPipeline
    base, res, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    for lora, out in zip(jobs[::2], jobs[1::2]):  # (LoRA folder or "-" for the base alone, output file)
        pipe = StableDiffusionXLPipeline.from_pretrained(base)
        if lora != "-":
            pipe.load_lora_weights(lora)
        with torch.no_grad():
            pe, _, pooled, _ = pipe.encode_prompt("a photo of sks dog", device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
            x = torch.randn(1, 4, res // 8, res // 8, generator=torch.Generator().manual_seed(0))
            ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)
            eps = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=pe,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        torch.save(eps, out)
    assert "nullbooth" not in sys.modules
''')


@torch.no_grad()
def our_eps(pipe) -> torch.Tensor:
    """The same UNet output as the script's, computed with the model as nullbooth trained it."""
    pipe.unet.eval()
    for e in text_encoders(pipe):
        e.eval()
    pe, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    x = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[RES, RES, 0, 0, RES, RES]], dtype=torch.float32)
    return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=pe,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


@pytest.mark.slow
def test_lora_export_loads_in_plain_diffusers_without_nullbooth(world, trained, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(PLAIN, encoding="utf-8")
    for model in world["models"]:
        jobs = [str(a) for name in ("lora", "nullbooth", "-")
                for a in (trained[(model, name)]["dir"] if name != "-" else "-", tmp_path / f"{model}-{name}.pt")]
        done = subprocess.run([sys.executable, str(script), str(world["models"][model]), str(RES), *jobs],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        base = torch.load(tmp_path / f"{model}--.pt")
        for name in ("lora", "nullbooth"):
            run = trained[(model, name)]
            with safe_open(str(run["dir"] / "pytorch_lora_weights.safetensors"), "pt") as fh:
                keys = list(fh.keys())
            prefixes = {k.split(".")[0] for k in keys}
            assert prefixes == {"unet", "text_encoder", "text_encoder_2"}, prefixes  # both encoders trained
            if name == "lora":  # diffusers' default targets: self- and cross-attention
                assert any(".attn1." in k for k in keys) and any(".attn2." in k for k in keys)
            plain, ours = torch.load(tmp_path / f"{model}-{name}.pt"), our_eps(run["pipe"])
            assert torch.allclose(plain, ours, atol=1e-5, rtol=1e-4), (model, name, (plain - ours).abs().max())
            assert (base - ours).abs().max() > 1e-3, (model, name)  # training changed what the test compares


# --------------------------------------------------------------------------- generate and evaluate


@pytest.mark.slow
def test_generate_base_and_every_trained_output_on_sdxl(world, trained, tmp_path):
    from nullbooth.generate import generate

    def draw(adapter: str | None, out: str) -> np.ndarray:
        cfg = config_from_dict({"pretrained_model_name_or_path": str(world["models"]["tiny-sdxl"]), "resolution": RES,
                                "output_dir": str(tmp_path / "nothing"),
                                "generate": {"prompts": [PROMPT], "seeds": [0], "num_inference_steps": 2,
                                             "out_dir": str(tmp_path / out), **({"adapter": adapter} if adapter else {})}})
        (grid,) = generate(cfg, pipe=copy.deepcopy(world["pipes"]["tiny-sdxl"]))
        return np.asarray(Image.open(grid), np.float64)

    base = draw(None, "base")
    assert base.shape == (RES, RES, 3)
    for name in ("lora", "nullbooth", "dreambooth", "oft"):
        image = draw(str(trained[("tiny-sdxl", name)]["dir"]), name)
        assert image.shape == base.shape and np.abs(image - base).mean() > 0, name


@pytest.mark.slow
def test_evaluate_samples_base_and_personalised_sdxl(world, trained, tmp_path):
    from nullbooth.eval.evaluate import EvalRequest, Sampling, evaluate

    report = evaluate(EvalRequest(base=str(world["models"]["other"]), personalized=str(trained[("other", "lora")]["dir"]),
                                  prompts=["a red circle", "a photo of sks dog"],
                                  sampling=Sampling(seeds=(0, 1, 2), steps=2, guidance=5.0, resolution=RES, batch=6),
                                  k=2, output=str(tmp_path / "eval")))
    assert report["method"] == "lora" and "attributes" not in report  # not a shapes-world model: no judged attributes
    assert report["paired"]["rmse"] > 0  # the personalised images differ from the base ones, seed for seed
    assert (tmp_path / "eval" / "evaluation.json").is_file()


# --------------------------------------------------------------------------- refused on SDXL


@pytest.mark.parametrize(("overrides", "words"), [
    (dict(method="dreambooth", train_text_encoder=True), r"^train_text_encoder: dreambooth trains the whole text "
                                                        r"encoder on SD 1\.x/2\.x only[^\n]*$"),
    (dict(method="lora", lora_format="kohya"), r"^lora_format: 'kohya' is written for SD 1\.x/2\.x[^\n]*$"),
])
def test_what_sdxl_refuses_is_one_line_before_anything_is_computed(world, overrides, words):
    cfg = make_cfg(world, "other", f"refused-{overrides['method']}", with_prior_preservation=True, num_class_images=1,
                   **overrides)
    with pytest.raises(NullBoothError, match=words):
        train(cfg, pipe=copy.deepcopy(world["pipes"]["other"]), progress=False)
    assert not (Path(cfg.output_dir) / "class_images").exists()  # refused before a class image was drawn


# --------------------------------------------------------------------------- no work before the first step


def test_nullbooth_setup_samples_nothing_without_heldout_prompts_or_validation(tmp_path, monkeypatch, tiny_run):
    run, collected = tiny_run
    instance = subject_images(tmp_path / "instance")
    # The collection's seed and size: the set-up finds the run instead of collecting one.
    data = {"pretrained_model_name_or_path": "tiny-sd", "resolution": collected.resolution, "seed": collected.seed,
            "method": "nullbooth",
            "instance_data_dir": str(instance), "instance_prompt": PROMPT, "class_prompt": "a photo of dog",
            "output_dir": str(tmp_path / "out"), "max_train_steps": 1, "with_prior_preservation": True,
            "num_class_images": 2, "class_data_dir": str(subject_images(tmp_path / "class")),
            "nullbooth": {**collected.nullbooth.model_dump(), "nullspace_threshold": 1e-2}}
    cfg = config_from_dict(data)
    pipe = load_pipeline("tiny-sd")
    calls = []
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("the pipeline sampled before the first step")))
    ts = setup(cfg, pipe=pipe, progress=False)
    ts.lock.release()
    assert calls == [] and ts.heldout is None and ts.stats_run == run
    # the control: asked for held-out statistics, the set-up does sample (so the spy above can see it)
    heldout = config_from_dict({**data, "output_dir": str(tmp_path / "heldout"),
                                "heldout_prompts": str(write_prompts(tmp_path / "heldout.txt", ["a yellow star"]))})
    with pytest.raises(AssertionError, match="sampled before the first step"):
        setup(heldout, pipe=load_pipeline("tiny-sd"), progress=False)
    assert len(calls) == 1
