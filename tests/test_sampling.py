"""The one seeded sampler: image k depends only on (prompts[k], seeds[k]) — not on batching or its neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nullbooth.errors import NullBoothError
from nullbooth.sampling import prompt_seed_pairs, sample, scheduler_class

PROMPTS = ["a red circle", "a blue star", "a green square"]
KW = dict(steps=2, guidance=3.0, size=32, output_type="np")


def test_pairs_are_prompt_major():
    assert prompt_seed_pairs(["a", "b"], [0, 1, 2]) == (["a", "a", "a", "b", "b", "b"], [0, 1, 2, 0, 1, 2])


def test_batch_size_never_changes_an_image(tiny_pipe):
    seeds = [5, 6, 7]
    one_call = np.stack(sample(tiny_pipe, PROMPTS, seeds, batch_size=None, **KW))
    one_by_one = np.stack(sample(tiny_pipe, PROMPTS, seeds, batch_size=1, **KW))
    assert np.abs(one_call - one_by_one).max() < 1e-4  # float32 round-off of batched matmuls, no seed effect


def test_an_image_depends_only_on_its_own_seed(tiny_pipe):
    mixed = sample(tiny_pipe, [PROMPTS[1], PROMPTS[0]], [9, 4], batch_size=None, **KW)
    alone = tiny_pipe(prompt=[PROMPTS[0]], height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                      generator=[torch.Generator().manual_seed(4)], output_type="np").images[0]
    assert np.abs(mixed[1] - alone).max() < 1e-4
    other_seed = sample(tiny_pipe, [PROMPTS[0]], [5], batch_size=None, **KW)[0]
    assert np.abs(other_seed - alone).max() > 1e-2  # the seed does matter


def test_one_seed_per_prompt_is_required(tiny_pipe):
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample(tiny_pipe, PROMPTS, [0], **KW)


@pytest.mark.parametrize("typed, first", [("DDIMSchedular", "DDIMScheduler"), ("ddim", "DDIMScheduler"),
                                          ("euler", "EulerDiscreteScheduler"), ("UniPC", "UniPCMultistepScheduler")])
def test_a_scheduler_name_typo_suggests_the_nearest(typed, first):
    with pytest.raises(NullBoothError, match=f"got '{typed}'; did you mean {first} or") as err:
        scheduler_class(typed)
    assert "\n" not in str(err.value)


def test_only_scheduler_classes_are_schedulers():
    assert scheduler_class("DPMSolverMultistepScheduler").__name__ == "DPMSolverMultistepScheduler"
    for name in ("SchedulerMixin", "StableDiffusionPipeline", "", "__class__"):
        with pytest.raises(NullBoothError, match="expected a diffusers scheduler class name"):
            scheduler_class(name)
