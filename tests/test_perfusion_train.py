"""``method: perfusion`` through the real ``nullbooth train`` loop on tiny-sd, and its concept files at generation.

What is checked against independent computations:
- a 20-step run writes the concept file; every ``o*_V`` moved away from its start ``W_V e_H`` (recomputed
  here from the base model), while every base weight (``W_K``, ``W_V``, UNet, text encoder, vocabulary) is
  bit-identical to a fresh base pipeline's;
- prompts without the concept token give the base model's noise predictions and sampled latents exactly;
- save → load into a fresh pipeline reproduces the trained pipeline's UNet outputs (tolerance 1e-6, in
  practice exact); β/τ overrides act at inference; ``detach`` restores the base model exactly;
- two concepts loaded together: a prompt holding one of them gives exactly that concept's single-concept output;
- a multi-token superclass ("teddy bear") locks the keys to the encoding of its last token, recomputed here;
- stop at step 10 and resume == an uninterrupted 20-step run, bit for bit (tensors and losses);
- masks: aligned to their images by file stem, resized like them, weighting the loss as computed here in float64;
- bad inputs (existing token, prompt without the token, missing keys, wrong-width covariance, mask sizes).

Tests marked "needs the edit" exercise the one-line hooks proposed for methods.py / train.py / generate.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import subject_images
from PIL import Image
from safetensors.torch import load_file

from nullbooth import conditioning
from nullbooth.config import config_from_dict, load_config
from nullbooth.errors import NullBoothError
from nullbooth.methods.perfusion.compat import calculate_input_covariance
from nullbooth.methods.perfusion.editor import _INIT_TEMPLATES, PerfusionEditor
from nullbooth.methods.perfusion.files import concept_file_bytes
from nullbooth.methods.perfusion.method import (
    CONCEPT_FILE,
    PERFUSION_CONFIG,
    Perfusion,
    find_concept_files,
    load_masks,
    perfusion_generation,
)
from nullbooth.methods.perfusion.module import Rank1EditModule
from nullbooth.methods.perfusion.wiring import find_cross_attention_layers
from nullbooth.methods.registry import make_method
from nullbooth.models import load_pipeline
from nullbooth.training.loop import train

RES = 16  # 8×8 latents: a step well under a second on two busy CPU cores
TOKEN, SUPER = "<sks-toy>", "teddy"  # "teddy" is one CLIP token
TOKEN2, SUPER2 = "<sks-bear>", "teddy bear"  # a two-token superclass on purpose
EXACT = 1e-5  # "equal up to float32 round-off" where the same float32 ops may run in another order (measured ≤ 1.1e-6)
REPO = Path(__file__).resolve().parents[1]



def half_masks(folder: Path, images: Path, resize: dict[int, tuple[int, int]] | None = None) -> Path:
    """Image 0 and 2: left half white; image 1: top half white. ``resize``: give mask ``i`` another size."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(images.glob("*.png"))):
        w, h = Image.open(path).size
        m = np.zeros((h, w), np.uint8)
        if i == 1:
            m[: h // 2] = 255
        else:
            m[:, : w // 2] = 255
        im = Image.fromarray(m)
        if resize and i in resize:
            im = im.resize(resize[i])
        im.save(folder / f"{path.stem}.png")
    return folder


@pytest.fixture(scope="module")
def base_pipe():
    return load_pipeline("tiny-sd")


@pytest.fixture(scope="module")
def world(tmp_path_factory, base_pipe):
    tmp = tmp_path_factory.mktemp("perfusion_train")
    instance = subject_images(tmp / "instance", ((20, 24), (28, 24), (24, 32)))
    prompts = [f"a photo of a {w}" for w in ("dog", "cat", "teddy", "teddy bear", "car", "tree", "boat", "bird")]
    prompts += [f"a painting of a {w} in the snow" for w in ("horse", "chair", "river", "robot", "flower", "lamp")]
    C = calculate_input_covariance(base_pipe, prompts)  # [128, 128] float64
    np.save(tmp / "C.npy", C.numpy())
    return {"tmp": tmp, "instance": instance, "C": tmp / "C.npy", "masks": half_masks(tmp / "masks", instance)}


def make_cfg(world, out: str, perfusion: dict | None = None, **overrides):
    data = {
        "pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": 5, "method": "perfusion",
        "instance_data_dir": str(world["instance"]), "instance_prompt": f"a photo of {TOKEN}",
        "output_dir": str(world["tmp"] / out), "max_train_steps": 20, "checkpointing_steps": 10,
        # The tiny text encoder's untrained final LayerNorm makes C rank d-1: regularise explicitly (no warning).
        "perfusion": {"concept_token": TOKEN, "superclass": SUPER, "covariance_file": str(world["C"]),
                      "eigenvalue_floor": 1e-6, **(perfusion or {})},
    }
    data.update(overrides)
    return config_from_dict(data)


@pytest.fixture(scope="module")
def trained(world):
    """One 20-step Perfusion run (checkpoints at 10 and 20); the pipeline stays attached."""
    cfg = make_cfg(world, "straight")
    pipe = load_pipeline("tiny-sd")
    report = train(cfg, pipe=pipe, progress=False)
    pipe.unet.eval()
    return {"cfg": cfg, "pipe": pipe, "report": report, "out": Path(cfg.output_dir)}


@pytest.fixture(scope="module")
def trained2(world):
    """A second concept, with a two-token superclass, 3 steps."""
    cfg = make_cfg(world, "bear", {"concept_token": TOKEN2, "superclass": SUPER2},
                   instance_prompt=f"a photo of {TOKEN2}", max_train_steps=3)
    pipe = load_pipeline("tiny-sd")
    report = train(cfg, pipe=pipe, progress=False)
    pipe.unet.eval()
    return {"cfg": cfg, "pipe": pipe, "report": report, "out": Path(cfg.output_dir)}


@torch.no_grad()
def unet_eps(pipe, prompts: list[str], t: int = 500, seed: int = 0) -> torch.Tensor:
    """The UNet's noise prediction for fixed latents and timestep: ``[len(prompts), 4, 8, 8]``."""
    enc = pipe.text_encoder(conditioning.tokenize(pipe, prompts)[0])[0]  # [b, 77, d]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), pipe.unet.config.in_channels, RES // 2, RES // 2, generator=g)
    return pipe.unet(x, torch.full((len(prompts),), t), enc).sample


@torch.no_grad()
def sampled_latents(pipe, prompt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, height=RES, width=RES, num_inference_steps=2, guidance_scale=7.5, generator=g,
                output_type="latent").images


def superclass_encoding(pipe, prompt: str, word: str) -> torch.Tensor:
    """The base text encoder's encoding of ``prompt`` at the position of ``word``'s last token: ``[d]``."""
    ids = conditioning.tokenize(pipe, [prompt])[0]
    last = pipe.tokenizer(word, add_special_tokens=False).input_ids[-1]
    pos = int((ids[0] == last).nonzero()[0])
    with torch.no_grad():
        return pipe.text_encoder(ids)[0][0, pos].double()


# --------------------------------------------------------------------------- training


def test_training_writes_the_concept_file_and_trains_only_o_star_and_the_embedding(trained, base_pipe):
    out, report = trained["out"], trained["report"]
    concept = out / CONCEPT_FILE
    assert report["method"] == "perfusion" and report["steps"] == 20 and len(report["losses"]) == 20
    assert all(np.isfinite(report["losses"]))
    assert str(concept) in report["files"] and (out / PERFUSION_CONFIG).is_file()

    tensors = load_file(str(concept))  # read back without nullbooth's loader
    layers = find_cross_attention_layers(base_pipe.unet)
    assert set(tensors) == {"token_embedding"} | {f"{k}.{n}" for n in layers for k in ("i_star", "o_star")}
    # the size formula of perfusion.concept_file_bytes, here with the tiny model's widths (the header differs
    # only by the token/superclass strings)
    widths = {n: a.to_v.out_features for n, a in layers.items()}
    assert abs(concept.stat().st_size - concept_file_bytes(widths, 128)) <= 64

    # o*_V started at W_V e_H, e_H the mean superclass encoding over the initialisation prompts (recomputed here)
    e_h = torch.stack([superclass_encoding(base_pipe, t.format(SUPER), SUPER) for t in _INIT_TEMPLATES]).mean(0)
    for name, attn in layers.items():
        start = attn.to_v.weight.detach().double() @ e_h  # [o]
        moved = float((tensors[f"o_star.{name}"].double() - start).norm() / start.norm())
        assert moved > 1e-2, f"o*_V of {name} did not train (relative change {moved:.2e})"
    assert not torch.equal(tensors["token_embedding"],
                           base_pipe.text_encoder.get_input_embeddings().weight[superclass_id(base_pipe)])

    # every base tensor is bit-identical: W_K, W_V (keys are locked, values only add o*), UNet, text encoder
    pipe = trained["pipe"]
    unet_now = pipe.unet.state_dict()
    for key, value in base_pipe.unet.state_dict().items():
        assert torch.equal(unet_now[key], value), key
    te_now = pipe.text_encoder.state_dict()
    for key, value in base_pipe.text_encoder.state_dict().items():
        if key.endswith("token_embedding.weight"):
            grown = te_now[key.replace("token_embedding.weight", "token_embedding.base_layer.weight")]
            assert torch.equal(grown[: value.shape[0]], value)  # the whole old vocabulary
        else:
            assert torch.equal(te_now[key], value), key
    trainable = sorted(n for n, p in pipe.unet.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.to_v.concept_outputs" for n in layers)

    info = json.loads((out / PERFUSION_CONFIG).read_text())
    assert info["concept_token"] == TOKEN and info["superclass"] == SUPER and info["value_lr"] == 0.03
    assert info["embedding_lr"] == pytest.approx(0.006) and info["covariance"]["kind"] == "file"
    rows = {r["weight"]: r for r in report["weights"]}
    assert all(rows[f"{n}.to_v"]["trained"] and not rows[f"{n}.to_k"]["trained"] for n in layers)


def superclass_id(pipe) -> int:
    (token_id,) = pipe.tokenizer(SUPER, add_special_tokens=False).input_ids
    return token_id


def test_prompts_without_the_concept_token_give_the_base_outputs_exactly(trained, base_pipe):
    pipe = trained["pipe"]
    plain = ["a photo of a teddy", "", "a red circle on the left"]
    assert torch.equal(unet_eps(pipe, plain), unet_eps(base_pipe, plain))
    assert torch.equal(sampled_latents(pipe, "a photo of a teddy"), sampled_latents(base_pipe, "a photo of a teddy"))
    # ... while the concept prompt is edited
    assert not torch.allclose(unet_eps(pipe, [f"a photo of {TOKEN}"]), unet_eps(base_pipe, [f"a photo of {SUPER}"]))


def test_save_load_into_a_fresh_pipeline_and_generate(trained, base_pipe, world, tmp_path):
    prompt = [f"a photo of {TOKEN}", f"a {TOKEN} on the beach"]
    want = unet_eps(trained["pipe"], prompt)
    fresh = load_pipeline("tiny-sd")
    editor = perfusion_generation(fresh, find_concept_files(trained["out"]))  # C from the run's perfusion_config.json
    assert isinstance(editor, PerfusionEditor) and fresh.tokenizer.convert_tokens_to_ids(TOKEN) == 49408
    got = unet_eps(fresh, prompt)
    assert float((got - want).abs().max()) <= EXACT * float(want.abs().max())
    # the paper's dial: β/τ overridable at inference, per call or for the editor's lifetime
    with editor.context(beta=0.2, tau=0.3):
        dialled = unet_eps(fresh, prompt)
    assert not torch.allclose(dialled, got) and torch.equal(unet_eps(fresh, prompt), got)
    editor.ctx.beta = 0.2
    editor.ctx.tau = 0.3
    assert torch.equal(unet_eps(fresh, prompt), dialled)
    images = fresh(prompt[0], height=RES, width=RES, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (RES, RES)
    editor.detach()
    assert torch.equal(unet_eps(fresh, ["a photo of a teddy"]), unet_eps(base_pipe, ["a photo of a teddy"]))
    with pytest.raises(NullBoothError, match="not a Perfusion concept file"):
        perfusion_generation(fresh, [trained["out"] / PERFUSION_CONFIG])
    # another C than training's is flagged; 2·C is another file but the same edit (s is invariant to C → cC)
    np.save(tmp_path / "C2.npy", 2 * np.load(world["C"]))
    with pytest.warns(UserWarning, match="differs from the one the concept was trained with"):
        editor = perfusion_generation(fresh, [trained["out"] / CONCEPT_FILE], covariance_file=tmp_path / "C2.npy")
    scaled = unet_eps(fresh, prompt)
    assert float((scaled - want).abs().max()) <= 1e-5 * float(want.abs().max())
    editor.detach()


def test_resume_equals_an_uninterrupted_run(trained, world):
    """checkpoint-10 of the straight run, resumed to 20 steps in a fresh pipeline: the same tensors, bit for bit."""
    out = world["tmp"] / "resumed"
    out.mkdir()
    shutil.copytree(trained["out"] / "checkpoint-10", out / "checkpoint-10")
    cfg = make_cfg(world, "resumed", resume_from_checkpoint="latest")
    report = train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
    a, b = load_file(str(trained["out"] / CONCEPT_FILE)), load_file(str(out / CONCEPT_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed concept differs"
    assert report["losses"] == trained["report"]["losses"] and len(report["step_seconds"]) == 10
    sa, sb = (load_file(str(d / "checkpoint-20" / "state.safetensors")) for d in (trained["out"], out))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # EMA, flags, Adam moments
    assert any(k.endswith("to_k.ema_concept_text_encs") for k in sa)


def test_multi_token_superclass_locks_keys_to_its_last_token(trained2, base_pipe):
    """Keys at the concept position use e_H = encoding of "bear" in "a photo of teddy bear" (recomputed here)."""
    pipe = trained2["pipe"]
    info = json.loads((trained2["out"] / PERFUSION_CONFIG).read_text())
    assert info["superclass"] == SUPER2 and len(info["superclass_ids"]) == 2
    ids = conditioning.tokenize(pipe, [f"a photo of {TOKEN2}"])[0]
    pos = int((ids[0] == info["token_id"]).nonzero()[0])
    e_h = superclass_encoding(base_pipe, f"a photo of {SUPER2}", SUPER2).float()  # [d]
    with torch.no_grad():
        enc = pipe.text_encoder(ids)[0]  # [1, 77, d], recorded by the editor's hook
        sup = torch.zeros_like(enc)
        sup[0, pos] = e_h
        for name, attn in find_cross_attention_layers(pipe.unet).items():
            assert isinstance(attn.to_k, Rank1EditModule)
            auto = attn.to_k(enc)  # the pipeline path: context finds the superclass encoding itself
            explicit = attn.to_k(enc, concept_indices=torch.tensor([pos]), text_enc_with_superclass=sup)
            assert float((auto - explicit).abs().max()) <= EXACT * float(explicit.abs().max()), name


def test_two_concepts_generate_together(trained, trained2, base_pipe):
    files = [trained["out"] / CONCEPT_FILE, trained2["out"] / CONCEPT_FILE]
    single = load_pipeline("tiny-sd")
    perfusion_generation(single, files[:1])
    want = unet_eps(single, [f"a photo of {TOKEN}"])
    both = load_pipeline("tiny-sd")
    editor = perfusion_generation(both, files)
    assert [c.token for c in editor.concepts] == [TOKEN, TOKEN2]
    # a prompt holding one concept is edited for that concept only
    got = unet_eps(both, [f"a photo of {TOKEN}"])
    assert float((got - want).abs().max()) <= EXACT * float(want.abs().max())
    pair = unet_eps(both, [f"a {TOKEN} next to a {TOKEN2}"])
    assert torch.isfinite(pair).all()
    assert torch.equal(unet_eps(both, ["a photo of a teddy"]), unet_eps(base_pipe, ["a photo of a teddy"]))


@pytest.mark.slow
def test_validation_sampling_does_not_change_what_is_trained(world):
    """Needs the train.py edit (validate() samples in eval mode): i*'s EMA must not follow validation prompts."""
    runs = []
    for name, extra in (("noval", {}), ("val", {"validation_prompt": f"a {TOKEN} in the snow", "validation_steps": 1,
                                                  "num_validation_images": 1})):
        cfg = make_cfg(world, f"validation_{name}", max_train_steps=3, **extra)
        cfg.generate.num_inference_steps = 2
        train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
        runs.append(load_file(str(Path(cfg.output_dir) / CONCEPT_FILE)))
    assert (world["tmp"] / "validation_val" / "validation" / "step-000003.png").is_file()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]), "validation sampling changed the concept"


# --------------------------------------------------------------------------- generate (needs the generate.py edit)


def test_nullbooth_generate_with_concept_files_and_beta_tau_flags(trained, trained2, world, capsys):
    from nullbooth.cli.generate import register_cli as register_generate

    parser = argparse.ArgumentParser()
    register_generate(parser.add_subparsers(dest="verb"))
    out = world["tmp"] / "samples"
    args = parser.parse_args(["generate", "--adapter", str(trained["out"]), "--concept",
                              str(trained2["out"] / CONCEPT_FILE), "--prompt", f"a {TOKEN} next to a {TOKEN2}",
                              "--seeds", "0", "--steps", "2", "--beta", "0.6", "--tau", "0.2", "--out", str(out),
                              "--set", f"resolution={RES}"])
    assert args.func(args) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(written) == 1 and written[0].is_file() and Image.open(written[0]).size == (RES, RES)


# --------------------------------------------------------------------------- masks


def test_masks_follow_their_images_and_weight_the_loss(world, base_pipe):
    masks = load_masks(world["instance"], world["masks"], RES, RES // 2)  # [3, 8, 8]
    assert masks.shape == (3, 8, 8)
    for i in (0, 2):  # left half white: center-cropping keeps the split in the middle
        assert float(masks[i][:, :3].min()) > 0.99 and float(masks[i][:, 5:].max()) < 0.01
    assert float(masks[1][:3].min()) > 0.99 and float(masks[1][5:].max()) < 0.01  # top half

    block = {"mask_dir": str(world["masks"]), "normalized_mask_min_value": 0.25}
    method = make_method(make_cfg(world, "unused", block))
    assert isinstance(method, Perfusion)
    method.masks = masks
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    idx = [1, 0]
    got = method.loss(pred, target, idx)
    per_pixel = ((pred.double() - target.double()) ** 2).mean(1)  # [2, 8, 8]
    weight = torch.stack([masks[i].double() / masks[i].double().max() for i in idx]).clamp(min=0.25)
    assert float(got) == pytest.approx(float((per_pixel * weight).mean()), rel=1e-6)


@pytest.mark.slow
def test_masked_training_changes_what_is_learned(world):
    """Needs the train.py edit (the loop calls ``method.loss``): masks change o*; a floor of 1 equals no mask."""
    runs = {}
    for name, block in (("plain", {}), ("masked", {"mask_dir": str(world["masks"])}),
                        ("floor1", {"mask_dir": str(world["masks"]), "normalized_mask_min_value": 1.0})):
        cfg = make_cfg(world, f"mask_{name}", block, max_train_steps=3)
        train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
        runs[name] = load_file(str(Path(cfg.output_dir) / CONCEPT_FILE))
    o = [k for k in runs["plain"] if k.startswith("o_star.")]
    assert any(not torch.allclose(runs["plain"][k], runs["masked"][k], atol=1e-4) for k in o)
    assert all(torch.allclose(runs["plain"][k], runs["floor1"][k], rtol=1e-4, atol=1e-5) for k in o)


def test_mask_problems(world, tmp_path):
    wrong = half_masks(tmp_path / "wrong", world["instance"], resize={1: (30, 30)})
    cfg = make_cfg(world, "bad_mask", {"mask_dir": str(wrong)}, max_train_steps=1)
    pipe = load_pipeline("tiny-sd")
    with pytest.raises(NullBoothError, match=r"mask subject_1.png is 30×30 but its image subject_1.png is 28×24"):
        train(cfg, pipe=pipe, progress=False)
    assert pipe.tokenizer.convert_tokens_to_ids(TOKEN) == pipe.tokenizer.unk_token_id  # nothing was attached
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(wrong / "subject_0.png", partial / "subject_0.png")
    with pytest.raises(NullBoothError, match="no mask for 2 instance image"):
        train(make_cfg(world, "bad_mask", {"mask_dir": str(partial)}, max_train_steps=1), pipe=pipe, progress=False)


# --------------------------------------------------------------------------- bad inputs


def test_a_concept_token_that_exists_fails_cleanly(world):
    pipe = load_pipeline("tiny-sd")
    cfg = make_cfg(world, "dog", {"concept_token": "dog"}, instance_prompt="a photo of dog", max_train_steps=1)
    with pytest.raises(NullBoothError, match="already exists in the tokenizer's vocabulary"):
        train(cfg, pipe=pipe, progress=False)
    assert not any(isinstance(m, Rank1EditModule) for m in pipe.unet.modules())


def test_config_problems_are_reported_together(world):
    cfg = make_cfg(world, "x", {"concept_token": None, "superclass": None})
    with pytest.raises(NullBoothError, match=r"2 problem\(s\).*concept_token.*superclass"):
        make_method(cfg)
    cfg = make_cfg(world, "x", instance_prompt="a photo of a toy")
    with pytest.raises(NullBoothError, match="does not contain perfusion.concept_token"):
        make_method(cfg)
    with pytest.raises(NullBoothError, match="eigenvalue_floor"):
        make_cfg(world, "x", {"eigenvalue_floor": 2.0})


def test_a_covariance_of_the_wrong_width_is_refused(world, tmp_path):
    np.save(tmp_path / "C64.npy", np.eye(64))
    cfg = make_cfg(world, "wide", {"covariance_file": str(tmp_path / "C64.npy")}, max_train_steps=1)
    with pytest.raises(NullBoothError, match="expected a covariance C of width 128"):
        train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)


# --------------------------------------------------------------------------- config file, registration


def test_shipped_config_loads_as_a_perfusion_run():
    cfg = load_config(REPO / "configs" / "train_perfusion.yaml")
    assert cfg.method == "perfusion" and cfg.perfusion.concept_token in cfg.instance_prompt
    assert cfg.perfusion.value_lr is None and cfg.perfusion.embedding_lr is None  # the paper's rates by default
    data = yaml.safe_load((REPO / "configs" / "train_perfusion.yaml").read_text())
    assert set(data["perfusion"]) <= set(type(cfg.perfusion).model_fields)


@pytest.mark.slow
def test_make_method_finds_perfusion_without_a_prior_import():
    """``make_method`` knows every strategy without the caller importing its module first."""
    code = ("from nullbooth.config import config_from_dict\nfrom nullbooth.methods.registry import make_method\n"
            "cfg = config_from_dict({'method': 'perfusion', 'instance_prompt': 'a <t>',"
            " 'perfusion': {'concept_token': '<t>', 'superclass': 'dog'}})\nprint(type(make_method(cfg)).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "Perfusion"
