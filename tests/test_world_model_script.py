"""``scripts/train_world_model.py``'s stage budgets: a step budget ends a stage after exactly that many optimizer
steps, whatever the clock says (a zero-minute time budget here), and drives the stage's schedules by step fraction —
so a recipe runs the same on a slower machine or under load; a time budget alone ends at its deadline."""

from __future__ import annotations

import importlib.util

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
    vae = script.train_vae(pipe.vae, world, script.Stage(clock, clock.deadline(1.0), args.vae_steps), args)
    assert vae["steps"] == 2
    assert all(p.is_contiguous() for p in pipe.vae.parameters())  # trained channels-last, saved as stored
    means, stds, attrs = script.training_latents(pipe.vae, world, 4, 0, seed=0)
    stage = script.Stage(clock, clock.t0 + clock.total, args.unet_steps)
    assert [stage.fraction(k) for k in (0, 3)] == [0.0, 1.0]
    unet = script.train_denoiser(pipe, world, means, stds, attrs, 1.0, clock, stage, args)
    assert unet["steps"] == 3 and unet["samples_seen"] == 6
