"""diffusers' DreamBooth data options on tiny-sd: random crops and flips as a pool of encoded variants,
decoding on threads, class images under autocast, precomputed text encodings, several subjects in one run.

What is checked against independent computations:
- every latent the loop trains on is the VAE encoding of the image, of its mirror image (``random_flip``) or
  of one of its crops (``center_crop: false``), recomputed here; both mirror states and several crops occur;
- a default run draws exactly what the code before augmentation drew: its losses equal, bit for bit, those
  of the same run with the earlier ``micro_batch`` (plain indexing, no variant draw) put back;
- 0 and 2 decoding threads give identical examples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subject_images
from PIL import Image

import nullbooth.training.loop as loop_module
from nullbooth.conditioning import Encoded
from nullbooth.config import check_training, config_from_dict
from nullbooth.dataset import (
    Augmentation,
    Example,
    batch_indices,
    crop_corners,
    generate_class_images,
    image_to_tensor,
    image_variants,
    load_examples,
)
from nullbooth.errors import NullBoothError
from nullbooth.models import load_pipeline
from nullbooth.training.loop import train
from nullbooth.training.prior import class_examples, instance_examples, latent_distributions, prompt_inputs
from nullbooth.training.setup import setup

RES = 16  # tiny-sd's native size: 4×4 latents


def halves(folder: Path, size=(16, 16), name="halves.png") -> Path:
    """An image whose mirror image differs from it: black left half, white right half (a red dot top left)."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[:, w // 2:] = 255
    a[1:3, 1:3] = (255, 0, 0)
    Image.fromarray(a).save(folder / name)
    return folder


def make_cfg(tmp: Path, out: str, instance: Path, **overrides):
    data = {"pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": 3, "method": "lora",
            "lora_rank": 2, "instance_data_dir": str(instance), "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog", "output_dir": str(tmp / out), "max_train_steps": 3,
            "checkpointing_steps": 100, "learning_rate": 1e-3, **overrides}
    if "subjects" in overrides:
        for key in ("instance_data_dir", "instance_prompt", "class_prompt"):
            data.pop(key)
    return config_from_dict(data)


def spy_micro_batches(monkeypatch) -> list:
    """Record ``(ts, micro_batch output)`` of every micro-step the loop takes."""
    seen, real = [], loop_module.micro_batch

    def spy(ts, cfg, m):
        out = real(ts, cfg, m)
        seen.append((ts, out))
        return out

    monkeypatch.setattr(loop_module, "micro_batch", spy)
    return seen


def encodings(pipe, variants: torch.Tensor) -> torch.Tensor:
    """``q(z | x)`` means of ``[V, 3, r, r]`` pixels, recomputed with the base VAE: ``[V, 4, h, w]``."""
    return latent_distributions(pipe.vae, [Example(variants, "", "")])[0]


def which(mean: torch.Tensor, candidates: torch.Tensor) -> int:
    """The index of the candidate ``mean`` equals (tolerance 1e-5 absolute); -1 when none."""
    hits = [i for i, c in enumerate(candidates) if torch.allclose(mean, c, atol=1e-5)]
    return hits[0] if hits else -1


# --------------------------------------------------------------------------- the variant pool


def test_crops_are_seeded_distinct_positions_and_a_square_image_has_one():
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8))  # 40×16
    random = Augmentation(center_crop=False, seed=5)
    corners = crop_corners(wide.size, RES, random, torch.Generator().manual_seed(5))
    assert len(corners) == 8 == len(set(corners)) and all(0 <= x <= 24 and y == 0 for x, y in corners)
    assert corners == crop_corners(wide.size, RES, random, torch.Generator().manual_seed(5))  # seeded
    assert corners != crop_corners(wide.size, RES, random, torch.Generator().manual_seed(6))
    x = image_variants(wide, RES, corners, flip=True)  # [16, 3, 16, 16]: crop, its mirror, next crop, …
    assert x.shape == (16, 3, RES, RES)
    for k, (left, _) in enumerate(corners):
        direct = torch.from_numpy(np.asarray(wide, np.float32)[:, left:left + RES] / 127.5 - 1).permute(2, 0, 1)
        assert torch.equal(x[2 * k], direct) and torch.equal(x[2 * k + 1], direct.flip(-1))
    assert len({tuple(v.flatten().tolist()) for v in x}) == 16
    # Few positions: all of them. A square image: one, without a draw.
    assert sorted(crop_corners((19, 16), RES, random, torch.Generator())) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert crop_corners((30, 30), RES, random, g) == [(0, 0)] and torch.equal(g.get_state(), state)
    # The default is the centre crop image_to_tensor has always made.
    centre = crop_corners(wide.size, RES, Augmentation(), g)
    assert centre == [(12, 0)] and torch.equal(image_variants(wide, RES, centre)[0], image_to_tensor(wide, RES))


def test_threads_decode_the_same_examples_in_the_same_order(tmp_path):
    folder = subject_images(tmp_path / "images", ((20, 24), (24, 24), (40, 24), (24, 31), (17, 50)))
    (folder / "notes.txt").write_text("not an image")
    augmentation = Augmentation(center_crop=False, random_flip=True, seed=7)
    runs = []
    for workers in (0, 2):
        with pytest.warns(UserWarning, match="skipped 1 file"):
            runs.append(load_examples(folder, "p", RES, "instance_data_dir", augmentation=augmentation,
                                      workers=workers))
    a, b = runs
    assert [e.source for e in a] == [e.source for e in b] == sorted(str(p) for p in folder.glob("*.png"))
    # 20×24 → 16×19: 4 crop positions; 24×24: 1; 40×24: 8 of 11; 24×31 → 16×21: 6; 17×50: 8 of 32 — each mirrored
    assert [len(e.variants) for e in a] == [8, 2, 16, 12, 16]
    assert all(torch.equal(x.variants, y.variants) for x, y in zip(a, b))


# --------------------------------------------------------------------------- what the loop trains on


def old_micro_batch(ts, cfg, m):
    """``micro_batch`` as it was before augmentation: plain indexing, no draw from the generator."""
    rank, world, B = ts.accelerator.process_index, ts.accelerator.num_processes, cfg.train_batch_size
    idx = batch_indices(len(ts.instance), B, m, rank, world, cfg.seed)
    mean, std, prompt = ts.instance.mean[idx], ts.instance.std[idx], ts.instance.text[idx]
    sizes = ts.instance.sizes[idx]
    if ts.classes is not None:
        cidx = batch_indices(len(ts.classes), B, m, rank, world, cfg.seed + 1)
        mean, std = torch.cat([mean, ts.classes.mean[cidx]]), torch.cat([std, ts.classes.std[cidx]])
        prompt = Encoded.cat([prompt, ts.classes.text[cidx]])
        sizes = torch.cat([sizes, ts.classes.sizes[cidx]])
    return idx, mean, std, prompt, sizes


def test_a_default_run_trains_on_what_it_did_before_augmentation(tmp_path, monkeypatch, tiny_pipe):
    instance = subject_images(tmp_path / "instance")
    common = dict(with_prior_preservation=True, num_class_images=3, class_generation_steps=1, train_batch_size=2,
                  gradient_accumulation_steps=2, center_crop=True, random_flip=False, dataloader_num_workers=0)
    seen = spy_micro_batches(monkeypatch)
    now = train(make_cfg(tmp_path, "now", instance, **common), pipe=load_pipeline("tiny-sd"), progress=False)
    assert len(list((tmp_path / "now" / "class_images").glob("class_*.png"))) == 3  # one subject: no sub-folder
    ts = seen[0][0]
    assert not ts.instance.augmented and not ts.classes.augmented
    # Every latent is the centre crop's encoding, recomputed here.
    images = sorted(instance.glob("*.png"))
    expected = encodings(tiny_pipe, torch.stack([image_to_tensor(Image.open(p), RES) for p in images]))
    for _, (idx, mean, *_) in seen:
        assert torch.allclose(mean[:2], expected[idx], atol=1e-5)
    monkeypatch.setattr(loop_module, "micro_batch", old_micro_batch)
    before = train(make_cfg(tmp_path, "before", instance, **common, class_data_dir=str(tmp_path / "now" / "class_images")),
                   pipe=load_pipeline("tiny-sd"), progress=False)
    assert now["losses"] == before["losses"]  # bit for bit: no extra draw moved the generator


def test_random_flip_trains_on_the_image_and_its_mirror(tmp_path, monkeypatch, tiny_pipe):
    instance = halves(tmp_path / "instance")
    x = image_to_tensor(Image.open(instance / "halves.png"), RES)
    both = encodings(tiny_pipe, torch.stack([x, x.flip(-1)]))  # [2, 4, 4, 4]: unflipped, mirrored
    assert not torch.allclose(both[0], both[1], atol=1e-3)
    found = {}
    for flip in (False, True):
        seen = spy_micro_batches(monkeypatch)
        train(make_cfg(tmp_path, f"flip{flip}", instance, random_flip=flip, max_train_steps=8),
              pipe=load_pipeline("tiny-sd"), progress=False)
        found[flip] = [which(mean[0], both) for _, (_, mean, *_) in seen]
    assert found[False] == [0] * 8
    assert set(found[True]) == {0, 1}, found[True]  # 8 fair draws: both occur (seeded; P(not) = 2⁻⁷)


def test_random_crops_of_a_wide_image_and_one_of_a_square_image(tmp_path, monkeypatch):
    instance = halves(tmp_path / "instance", (40, 16), "a_wide.png")
    halves(instance, (16, 16), "b_square.png")
    cfg = make_cfg(tmp_path, "crops", instance, center_crop=False, train_batch_size=2)
    pipe = load_pipeline("tiny-sd")
    ts = setup(cfg, pipe=pipe, progress=False)
    ts.lock.release()
    assert ts.instance.count.tolist() == [8, 1] and ts.instance.first.tolist() == [0, 8]
    wide = Image.open(instance / "a_wide.png").convert("RGB")
    corners = crop_corners(wide.size, RES, Augmentation(center_crop=False, seed=cfg.seed),
                           torch.Generator().manual_seed(cfg.seed))
    crops = encodings(pipe, image_variants(wide, RES, corners))  # [8, 4, 4, 4]
    square = encodings(pipe, image_to_tensor(Image.open(instance / "b_square.png"), RES)[None])
    drawn = set()
    for m in range(12):
        idx, mean, *_ = loop_module.micro_batch(ts, cfg, m)
        for i, row in zip(idx, mean):
            if i == 0:
                drawn.add(which(row, crops))
            else:
                assert torch.allclose(row, square[0], atol=1e-5)
    assert -1 not in drawn and len(drawn) >= 4, drawn  # 12 uniform draws of 8 crops


# --------------------------------------------------------------------------- class images, text encoder


def test_class_images_under_bf16_autocast_differ_slightly_and_fp16_needs_cuda(tmp_path, tiny_pipe):
    paths = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        paths[name] = generate_class_images(tiny_pipe, "a photo of dog", tmp_path / name, 2, start=0,
                                            resolution=RES, steps=2, batch_size=2, seed=3, autocast=dtype)
    assert all(p.dtype == torch.float32 for p in tiny_pipe.unet.parameters())  # the weights are not cast
    pixels = {k: [np.asarray(Image.open(p), np.float64) for p in v] for k, v in paths.items()}
    seeds_apart = np.abs(pixels["fp32"][0] - pixels["fp32"][1]).mean()  # what a different seed changes
    for a, b in zip(pixels["fp32"], pixels["bf16"]):
        # bf16 round-off only: a fraction of what another seed changes (measured 4.2 of 255 on tiny-sd)
        assert 0 < np.abs(a - b).mean() <= 0.5 * seeds_apart, (np.abs(a - b).mean(), seeds_apart)
    if torch.cuda.is_available():
        return
    cfg = make_cfg(tmp_path, "fp16", halves(tmp_path / "instance"), with_prior_preservation=True,
                   num_class_images=1, prior_generation_precision="fp16")
    with pytest.raises(NullBoothError, match=r"^prior_generation_precision: fp16 needs a CUDA device[^\n]*$"):
        train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
    assert not (tmp_path / "fp16" / "class_images").exists()  # refused before generating anything


def test_precomputed_embeddings_are_refused_where_an_encoder_trains(tmp_path):
    instance = halves(tmp_path / "instance")
    for extra, what in (({"train_text_encoder": True}, "train_text_encoder trains the text encoder"),
                        ({"method": "perfusion"}, "method perfusion trains its concept token's embedding")):
        cfg = make_cfg(tmp_path, "pre", instance, pre_compute_text_embeddings=True, **extra)
        with pytest.raises(NullBoothError, match=f"pre_compute_text_embeddings: {what}, so its encodings cannot"):
            check_training(cfg)
    check_training(make_cfg(tmp_path, "pre", instance, pre_compute_text_embeddings=True))  # a frozen encoder: fine


def test_precomputed_text_embeddings_move_the_encoder_off_the_device(tmp_path, monkeypatch):
    instance = halves(tmp_path / "instance")
    pipe = load_pipeline("tiny-sd")
    moved = []
    real_to = pipe.text_encoder.to
    monkeypatch.setattr(pipe.text_encoder, "to", lambda *a, **k: (moved.append(a), real_to(*a, **k))[1])
    cfg = make_cfg(tmp_path, "pre", instance, pre_compute_text_embeddings=True)
    ts = setup(cfg, pipe=pipe, progress=False)
    ts.lock.release()
    assert moved and moved[-1] == ("cpu",) and pipe.text_encoder.device.type == "cpu"
    assert torch.equal(ts.instance.text.hidden, prompt_inputs(ts.method, pipe, [cfg.instance_prompt]).hidden)
    # Validation borrows the encoder back: its images equal those of a run that never moved it.
    for name, pre in (("pre2", True), ("plain", False)):
        train(make_cfg(tmp_path, name, instance, pre_compute_text_embeddings=pre, validation_prompt="a photo of sks dog",
                       num_validation_images=1, max_train_steps=1), pipe=load_pipeline("tiny-sd"), progress=False)
    grids = [np.asarray(Image.open(tmp_path / name / "validation" / "step-000001.png")) for name in ("pre2", "plain")]
    assert np.array_equal(*grids)


# --------------------------------------------------------------------------- several subjects


def test_two_subjects_train_in_one_run_with_their_own_prompts_and_class_images(tmp_path, monkeypatch, tiny_pipe):
    subjects = [{"instance_data_dir": str(subject_images(tmp_path / "dog", ((20, 24), (24, 24)))),
                 "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"},
                {"instance_data_dir": str(halves(tmp_path / "cat")),
                 "instance_prompt": "a photo of zwx cat", "class_prompt": "a photo of cat"}]
    cfg = make_cfg(tmp_path, "two", tmp_path, subjects=subjects, with_prior_preservation=True, num_class_images=2,
                   class_generation_steps=1)
    seen = spy_micro_batches(monkeypatch)
    report = train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
    assert len(report["losses"]) == 3 and all(np.isfinite(report["losses"]))
    examples = instance_examples(cfg, RES)
    assert [e.prompt for e in examples] == ["a photo of sks dog"] * 2 + ["a photo of zwx cat"]
    ts = seen[0][0]
    expected = prompt_inputs(ts.method, tiny_pipe, [e.prompt for e in examples])
    assert torch.allclose(ts.instance.text.hidden, expected.hidden, atol=1e-6)  # the loop's encodings: one per example
    # Class images per subject, each in its own folder with its own prompt (already there: nothing generated).
    classes = class_examples(cfg, None, None, None, RES)
    assert [e.prompt for e in classes] == ["a photo of dog"] * 2 + ["a photo of cat"] * 2
    assert [Path(e.source).parent.name for e in classes] == ["0", "0", "1", "1"]
    assert not torch.equal(classes[0].pixels, classes[2].pixels)  # seed 3 with another prompt
    assert torch.allclose(ts.classes.text.hidden, prompt_inputs(ts.method, tiny_pipe, [e.prompt for e in classes]).hidden,
                          atol=1e-6)
