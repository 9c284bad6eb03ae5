"""The shapes world (determinism, ground truth vs pixels, held-out split) and the judge / feature extractors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nullbooth.errors import NullBoothError
from nullbooth.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    World,
    WorldConfig,
    heldout_prompts,
    parse_prompt,
    prior_prompts,
)
from nullbooth.world.subjects import (
    SUBJECT,
    class_prompts,
    subject_instances,
    subject_prompts,
    subject_suite,
    with_concept_token,
    write_prompt_lists,
)

WORLD = World()


def _shape_mask(img: Image.Image, colour: str, tol: float = 60.0) -> np.ndarray:
    a = np.asarray(img, np.float64)
    return np.linalg.norm(a - np.array(COLOURS[colour], np.float64), axis=-1) < tol


# ----------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_sample_different_seed_differs():
    a, b = WORLD.sample(7, 3), WORLD.sample(7, 3)
    assert a.caption == b.caption and a.attributes == b.attributes
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    imgs, caps, _ = WORLD.arrays(8, seed=7)
    imgs2, caps2, _ = World().arrays(8, seed=7)
    assert np.array_equal(imgs, imgs2) and caps == caps2
    other, caps3, _ = WORLD.arrays(8, seed=8)
    assert caps3 != caps and not np.array_equal(other, imgs)
    # Index-addressable: sample 3 of a batch equals sample(seed, 3) alone.
    assert np.array_equal(imgs[3], np.asarray(WORLD.sample(7, 3).image))
    assert prior_prompts(20, seed=1) == prior_prompts(20, seed=1)


# ---------------------------------------------------------------------------------------- ground truth


def test_attributes_match_pixels():
    n_checked = 0
    for s in WORLD.samples(60, seed=11):
        a = s.attributes
        img = np.asarray(s.image)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        # Background: the corner pixel is the stated background colour (shapes never reach the corners).
        assert np.abs(img[0, 0].astype(int) - BACKGROUNDS[a.background]).max() <= 2
        mask = _shape_mask(s.image, a.colour)
        assert mask.sum() > 30
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
        # The drawn centroid is the stated centre (shapes are centred on their centroid) within 1.5 px.
        assert abs(cx - a.cx) < 1.5 and abs(cy - a.cy) < 1.5, (a, cx, cy)
        # ... and the nearest position anchor is the stated position.
        nearest = min(POSITIONS, key=lambda p: (POSITIONS[p][0] * 64 - cx) ** 2 + (POSITIONS[p][1] * 64 - cy) ** 2)
        assert nearest == a.position
        # Size: area ratio to the circumscribed circle is shape-dependent but a large shape is ≥ 2× a small one.
        area_frac = mask.sum() / (np.pi * a.radius**2)
        assert 0.25 < area_frac < 1.1, (a.shape, area_frac)
        n_checked += 1
    assert n_checked == 60


def test_sizes_and_resolution_parameter():
    small = WORLD.sample(0, 0, shape="square", colour="red", size="small", position="center")
    large = WORLD.sample(0, 0, shape="square", colour="red", size="large", position="center")
    assert _shape_mask(large.image, "red").sum() > 2 * _shape_mask(small.image, "red").sum()
    w32 = World(WorldConfig(resolution=32))
    s = w32.sample(0, 0, shape="circle", colour="blue", position="right")
    assert s.image.size == (32, 32)
    ys, xs = np.nonzero(_shape_mask(s.image, "blue"))
    assert abs(xs.mean() + 0.5 - s.attributes.cx) < 1.0 and s.attributes.cx > 16


def test_captions_state_exactly_the_mentioned_attributes():
    for s in WORLD.samples(300, seed=5):
        parsed = parse_prompt(s.caption)
        a = s.attributes
        assert parsed["shape"] == a.shape and parsed["colour"] == a.colour, s.caption
        for name in ("size", "position", "background"):
            if name in a.mentioned:
                assert parsed.get(name) == getattr(a, name), (name, s.caption)
            else:
                assert name not in parsed, (name, s.caption)
    wordings = {s.caption for s in WORLD.samples(200, seed=6, shape="circle", colour="red", position="left")}
    assert len(wordings) > 30  # varied wording


# -------------------------------------------------------------------------------------------- split


def test_heldout_split_really_holds_out():
    held = set(HELD_OUT_PAIRS)
    seen = {(a.shape, a.colour) for a in (WORLD.prompt(3, i)[1] for i in range(3000))}
    assert not seen & held
    assert seen == {(s, c) for s in SHAPES for c in COLOURS} - held  # every other pair does occur
    # Every shape and every colour still occurs in training.
    assert {s for s, _ in seen} == set(SHAPES) and {c for _, c in seen} == set(COLOURS)
    assert {(a.shape, a.colour) for _, a in heldout_prompts(50)} == held
    assert {(WORLD.prompt(3, i, "heldout")[1].shape, WORLD.prompt(3, i, "heldout")[1].colour)
            for i in range(200)} == held
    for text in prior_prompts(500, seed=9):
        p = parse_prompt(text)
        assert (p["shape"], p["colour"]) not in held


def test_bad_inputs():
    with pytest.raises(NullBoothError, match="unknown split"):
        WORLD.sample(0, 0, split="test")
    with pytest.raises(NullBoothError, match="held-out pair"):
        WorldConfig(held_out=(("hexagon", "red"),))
    with pytest.raises(NullBoothError, match="≥ 16"):
        WorldConfig(resolution=8)
    with pytest.raises(NullBoothError, match="no pair matching"):
        WORLD.sample(0, 0, split="train", shape="circle", colour="green")  # a held-out pair
    with pytest.raises(NullBoothError, match="not a world value"):
        WORLD.sample(0, 0, colour="teal")


# ---------------------------------------------------------------------------------------------- subject


def test_subject_instances_and_prompt_lists(tmp_path):
    imgs = subject_instances(5)
    assert len(imgs) == 5 and all(im.size == (64, 64) for im in imgs)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, subject_instances(5)))
    for im in imgs:
        a = np.asarray(im, np.float64)
        teal = (np.linalg.norm(a - (0, 160, 160), axis=-1) < 40).sum()
        pink = (np.linalg.norm(a - (250, 110, 185), axis=-1) < 40).sum()
        assert teal > 15 and pink > 15  # both stripe colours are visible
    assert len({np.asarray(im).tobytes() for im in imgs}) == 5  # varied views
    assert all(SUBJECT.identifier in p and "star" in p for p in subject_prompts())
    assert all(parse_prompt(p)["shape"] == "star" for p in class_prompts("star", 20))
    files = write_prompt_lists(tmp_path, n_prior=30, n_eval=10)
    lines = (tmp_path / "prior_prompts.txt").read_text().splitlines()
    assert len(files) == 5 and len(lines) == 30 and lines == prior_prompts(30)


# ------------------------------------------------------------------------------------------------ judge


def test_concept_token_prompts_rewrite_only_the_identifier():
    subject = subject_suite(1)[1]
    assert subject.concept_token == "<sks>"
    for prompt in subject_prompts(subject):
        rewritten = with_concept_token(prompt, subject)
        assert rewritten == prompt.replace("sks ", "<sks> ", 1) and rewritten.count("<sks>") == 1
    assert with_concept_token("a red circle", subject) == "a red circle"  # no identifier: unchanged


def test_judge_save_load_roundtrip_and_interface(tmp_path):
    from nullbooth.world.judge import (
        FeatureExtractor,
        Judge,
        JudgeConfig,
        load_feature_extractor,
    )

    judge = Judge(JudgeConfig(widths=[8, 8, 8, 8], embed_dim=16))
    imgs = [s.image for s in WORLD.samples(4, seed=0)]
    emb = judge(imgs)
    assert emb.shape == (4, 16) and emb.dtype == np.float64
    assert isinstance(judge, FeatureExtractor)
    judge.save(tmp_path / "j")
    again = load_feature_extractor(tmp_path / "j")
    # fp16 storage: embeddings agree to fp16 precision of the weights.
    np.testing.assert_allclose(again(imgs), emb, rtol=0, atol=2e-2 * np.abs(emb).max())
    pred = again.predict(imgs)
    assert set(pred) == {"shape", "colour", "position", "size", "background", "pattern", "pattern_kind"}
    with pytest.raises(NullBoothError, match="empty list"):
        judge([])


def test_shipped_judge_reads_world_attributes():
    from nullbooth.world.judge import JUDGE_DIR, load_judge

    if not (JUDGE_DIR / "judge.json").is_file():
        pytest.skip("no shipped judge yet (python scripts/train_judge.py)")
    judge = load_judge()
    samples = list(WORLD.samples(150, seed=424242, split="all"))
    pred = judge.predict([s.image for s in samples])
    for name in ("shape", "colour", "position", "size", "background"):
        acc = np.mean([p == getattr(s.attributes, name) for p, s in zip(pred[name], samples)])
        assert acc >= 0.97, (name, acc)  # shipped judge: ≥ 98 % on 2000 augmented renders (judge.json)
    assert judge.config.accuracy and min(v for k, v in judge.config.accuracy.items()) >= 0.98


def test_feature_extractor_errors(tmp_path):
    from nullbooth.world.judge import load_feature_extractor

    with pytest.raises(NullBoothError, match="does not exist"):
        load_feature_extractor(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NullBoothError, match="config.json"):
        load_feature_extractor(tmp_path / "empty")
    wrong = tmp_path / "bert"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(NullBoothError, match="'bert' model"):
        load_feature_extractor(wrong)


def test_hf_clip_and_dinov2_folders(tmp_path):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
    )

    from nullbooth.world.judge import load_feature_extractor

    imgs = [s.image for s in WORLD.samples(3, seed=1)]
    clip_dir, dino_dir = tmp_path / "clip", tmp_path / "dino"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(clip_dir)
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)).save_pretrained(dino_dir)
    for folder in (clip_dir, dino_dir):
        fx = load_feature_extractor(folder)
        f = fx(imgs)
        assert f.shape == (3, 32) and f.dtype == np.float64 and np.isfinite(f).all()
        assert not np.allclose(f[0], f[1])


def test_shape_colour_match_counts_what_the_prompt_states():
    from nullbooth.world.judge import JUDGE_DIR, load_judge, shape_colour_match

    if not (JUDGE_DIR / "judge.json").is_file():
        pytest.skip("no shipped judge yet (python scripts/train_judge.py)")
    drawn = [WORLD.prompt(9, i, "train", shape="square", colour="blue") for i in range(4)]
    images = [WORLD.render(a) for _, a in drawn]
    prompts = ["a blue square", "a red square", "a blue circle", "a green star"]
    assert shape_colour_match(load_judge(), images, prompts) == {
        "n": 4, "shape": 0.5, "colour": 0.5, "shape_and_colour": 0.25}


# ---------------------------------------------------------------------------------------- shipped model


def shipped_model() -> Path:
    import nullbooth

    folder = Path(nullbooth.__file__).parent / "data" / "models" / "tiny-sd"
    if not (folder / "model_index.json").is_file():
        pytest.skip("no shipped tiny-sd yet (python scripts/train_world_model.py)")
    return folder


def test_shipped_world_model_loads_with_plain_diffusers():
    folder = shipped_model()
    from diffusers import StableDiffusionPipeline

    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert size <= 25 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # no dtype: every part must come back float32
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe.text_encoder.config.hidden_size >= 128
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle on the left"], num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_load_pipeline_auto_puts_the_model_on_the_available_device():
    from nullbooth.models import load_pipeline

    assert load_pipeline("tiny-sd", device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_shipped_vae_gate_is_recorded_and_passed():
    """The general VAE's gate (scripts/vae_gate.py) on 160 held-out random subjects × 5 views, as recorded: PSNR
    35.8 dB (≥ 28 required); the judge reads the reconstruction as the original for shape 100 %, colour 98.5 % and
    pattern kind 95.0 % — each at or above the 95 % issue 15 asks, so ``passed`` is true."""
    gate = json.loads((shipped_model() / "vae_gate.json").read_text())
    assert gate["subjects"] >= 160 and gate["images"] == 5 * gate["subjects"]
    kept = gate["kept"]
    assert all(lo <= kept[k] <= hi and hi - lo < 0.08 for k, (lo, hi) in gate["kept_ci95"].items())
    assert min(kept["shape"], kept["colour"], kept["pattern"]) >= gate["gate"]["keep"] == 0.95
    assert gate["psnr_db"]["mean"] >= gate["gate"]["psnr_db"] == 28.0
    assert gate["passed"] is True


@pytest.mark.slow
def test_shipped_vae_keeps_new_subjects(scripts_importable):
    """A re-measurement on 6 held-out subjects (30 images): PSNR per image recomputed here from the pixels; the
    recorded mean is ≥ 28 dB over 800 images, and 30 of them average ≥ 26 dB unless the weights changed."""
    from diffusers import AutoencoderKL
    from vae_gate import psnr, reconstruct

    from nullbooth.world.subjects import HELDOUT_SEED, random_subject

    vae = AutoencoderKL.from_pretrained(shipped_model(), subfolder="vae", dtype=torch.float32).eval()
    views = [im for i in range(6) for im in subject_instances(5, random_subject(HELDOUT_SEED, i))]
    values = [psnr(a, b) for a, b in zip(views, reconstruct(vae, views))]
    assert np.mean(values) >= 26.0, values


def _judged(pipe, judge, prompts: list[str], gate: dict) -> dict[str, float]:
    from nullbooth.world.judge import shape_colour_match

    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=gate["steps"], guidance_scale=gate["guidance"], generator=gens).images
    return shape_colour_match(judge, images, prompts)


@pytest.mark.slow
def test_shipped_world_model_draws_what_it_is_prompted():
    """A small re-measurement of the recorded gate with the shipped weights and the shipped judge.

    20 prompts of seen shape × colour pairs and 20 of held-out pairs (never captioned in training), at the gate's
    settings. The recorded rates (``composition_gate.json``, 500 prompts each) are 0.994 and 0.956; with 20 samples a
    true rate of 0.94 falls below 0.7 with probability < 1 % (binomial).
    """
    from nullbooth.models import load_pipeline
    from nullbooth.world.judge import load_judge

    gate = json.loads((shipped_model() / "composition_gate.json").read_text())
    pipe, judge = load_pipeline("tiny-sd"), load_judge()
    seen = _judged(pipe, judge, prior_prompts(20, seed=123), gate)
    held = _judged(pipe, judge, [p for p, _ in heldout_prompts(20, seed=123)], gate)
    assert seen["shape_and_colour"] >= 0.8, seen
    assert held["shape_and_colour"] >= 0.7, held
