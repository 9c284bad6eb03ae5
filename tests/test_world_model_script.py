"""``scripts/train_world_model.py``'s stage budgets: a step budget ends a stage after exactly that many optimizer
steps, whatever the clock says (a zero-minute time budget here), and drives the stage's schedules by step fraction —
so a recipe runs the same on a slower machine or under load; a time budget alone ends at its deadline."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest

from nullbooth.world.scenes import World, WorldConfig


@pytest.fixture(scope="module")
def script(scripts_importable):
    spec = importlib.util.spec_from_file_location("train_world_model", scripts_importable / "train_world_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_budgets_end_each_stage_after_exactly_their_steps(script):
    from nullbooth.models import build_tiny_pipeline

    args = script.parse_args(["--smoke", "--minutes", "0", "--vae-steps", "2", "--unet-steps", "3", "--vae-batch", "4",
                              "--batch", "2"])
    pipe = build_tiny_pipeline(args.arch)
    world = World(WorldConfig(resolution=64))
    clock = script.Clock(args.minutes)
    assert script.Stage(clock, clock.deadline(1.0)).done(0)  # the time budget alone: over before it starts
    assert script.Stage(clock, clock.deadline(1.0), 0).done(0)  # 0 steps: timed too
    vae = script.train_vae(pipe.vae, world, script.Stage(clock, clock.deadline(1.0), args.vae_steps), args)
    assert vae["steps"] == 2
    assert all(p.is_contiguous() for p in pipe.vae.parameters())  # trained channels-last, saved as stored
    means, stds, attrs = script.training_latents(pipe.vae, world, 4, 0, seed=0)
    stage = script.Stage(clock, clock.t0 + clock.total, args.unet_steps)
    assert [stage.fraction(k) for k in (0, 3)] == [0.0, 1.0]
    unet = script.train_denoiser(pipe, world, means, stds, attrs, 1.0, clock, stage, args)
    assert unet["steps"] == 3 and unet["samples_seen"] == 6


def test_latent_channels_shape_the_vae_and_the_unet(script):
    from nullbooth.models import build_tiny_pipeline

    args = script.parse_args(["--smoke", "--latent-channels", "12"])
    pipe = build_tiny_pipeline(args.arch)
    assert pipe.vae.config.latent_channels == 12
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 12
    with pytest.raises(SystemExit):
        script.parse_args(["--smoke", "--latent-channels", "0"])


def test_a_vae_taken_from_a_saved_model_sets_the_unets_latent_geometry(script):
    from nullbooth.models import WORLD_ARCH, build_tiny_pipeline

    vae = build_tiny_pipeline(replace(WORLD_ARCH, latent_channels=16, vae_channels=(16, 32, 64, 64),
                                      latent_size=8)).vae
    arch = script.with_vae_geometry(WORLD_ARCH, vae.config, explicit=False)
    assert (arch.latent_channels, arch.vae_channels, arch.latent_size) == (16, (16, 32, 64, 64), 8)
    with pytest.raises(SystemExit, match="has 16 latent channels; drop --latent-channels or pass 16"):
        script.with_vae_geometry(WORLD_ARCH, vae.config, explicit=True)  # WORLD_ARCH asks for 8


def test_vae_crops_of_broad_images_centre_on_their_objects(script, monkeypatch):
    """``crops_at="objects"`` cuts each broad image's crop around one of its objects (jitter ≤ a quarter crop);
    ``"anywhere"`` does not; the default is ``"objects"``. World renders are kept out so that every image is a broad one."""
    import numpy as np

    monkeypatch.setattr(script, "WORLD_SHARE", 0.0)
    drawn = []
    real = script.broad_scene
    monkeypatch.setattr(script, "broad_scene", lambda rng, res: drawn.append(real(rng, res)) or drawn[-1])
    world = World(WorldConfig(resolution=64))

    def reachable(start: int, c: float) -> bool:  # x0 = clip(round(c) − 16 + jitter, 0, 32), |jitter| ≤ 8
        return any(min(max(round(c) - 16 + j, 0), 32) == start for j in range(-8, 9))

    def on_objects(crops_at: str) -> list[bool]:
        drawn.clear()
        x = script.vae_batch(world, np.random.default_rng(0), 16, world, crop=32, crops_at=crops_at)
        assert x.shape == (16, 3, 32, 32) and len(drawn) == 16
        flags = []
        for crop, (image, centres) in zip(x, drawn):
            pixels = np.rint((crop.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
            hits = [(y0, x0) for y0 in range(33) for x0 in range(33)
                    if np.array_equal(image[y0:y0 + 32, x0:x0 + 32], pixels)]
            flags.append(any(reachable(x0, cx) and reachable(y0, cy) for y0, x0 in hits for cx, cy in centres))
        return flags

    assert all(on_objects("objects"))
    assert not all(on_objects("anywhere"))
    assert script.parse_args([]).vae_crops == "objects"
    with pytest.raises(SystemExit):
        script.parse_args(["--smoke", "--vae-crops", "edges"])


def test_frozen_encodings_are_the_encoders_output_computed_once_per_caption(script):
    """The cache returns what the frozen encoder returns for the whole batch (tolerance 1e-6: a row's value must not
    depend on its batch), encodes each distinct caption once, and past its memory cap still answers correctly."""
    import torch

    from nullbooth.models import WORLD_ARCH, build_tiny_pipeline

    pipe = build_tiny_pipeline(WORLD_ARCH)
    encoder = pipe.text_encoder.eval()
    tokens = script.Tokens(pipe.tokenizer)
    calls = []
    encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    batches = [["a red circle", "", "a blue star on the left", ""], ["", "a red circle", "a green square"]]
    for max_bytes, expected_calls in ((2**30, [3, 1]), (0, [3, 3])):
        cache = script.FrozenEncodings(encoder, tokens, max_bytes)
        calls.clear()
        for captions in batches:
            with torch.no_grad():
                direct = encoder(tokens(captions))[0]
            calls.pop()
            torch.testing.assert_close(cache(captions), direct, rtol=0, atol=1e-6)
        assert calls == expected_calls  # only captions not seen before, each once per batch
        assert len(cache.rows) == (4 if max_bytes else 0) and cache.bytes <= max_bytes


def test_the_default_recipe_counts_steps_and_a_smoke_run_is_timed(script):
    default = script.parse_args([])
    assert (default.vae_steps, default.unet_steps) == (script.RECIPE_STEPS["vae"], script.RECIPE_STEPS["unet"])
    assert (default.vae_batch, default.vae_crops, default.vae_full_frac, default.latent_scale) == (
        8, "objects", 0.2, "global")
    smoke = script.parse_args(["--smoke"])
    assert (smoke.vae_steps, smoke.unet_steps, smoke.minutes) == (0, 0, 1.0)
    assert script.parse_args(["--smoke", "--vae-steps", "5"]).vae_steps == 5
    for flag in ("--vae-steps", "--unet-steps"):
        with pytest.raises(SystemExit):
            script.parse_args([flag, "-1"])


def test_a_global_latent_scale_centres_each_channel_and_keeps_their_ratios(script):
    """``--latent-scale global``: one divisor for all channels, so the standardised channels keep the raw ratio of
    their spreads (2 : 1 here) and the pooled variance is 1; ``channel`` makes each unit. Tolerance 1e-5."""
    import torch

    g = torch.Generator().manual_seed(0)
    means = torch.randn(4000, 2, 2, 2, generator=g) * torch.tensor([2.0, 1.0]).view(1, 2, 1, 1) + 3.0
    for scale in ("channel", "global"):
        m, s = means.mean(dim=(0, 2, 3)), script.latent_divisors(means.std(dim=(0, 2, 3)), scale)
        z = (means - m.view(1, 2, 1, 1)) / s.view(1, 2, 1, 1)
        assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-5
        spread = z.std(dim=(0, 2, 3))
        if scale == "channel":
            assert torch.allclose(spread, torch.ones(2), atol=1e-5)
        else:
            assert torch.allclose(spread[0] / spread[1], means[:, 0].std() / means[:, 1].std(), atol=1e-5)
            assert abs(float(spread.pow(2).mean()) - 1.0) < 1e-5
