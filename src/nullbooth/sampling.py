"""The one seeded sampler: every image nullbooth draws from a pipeline goes through :func:`sample`.

Seed convention: image ``k`` is ``prompts[k]`` sampled from its own generator
``torch.Generator(device).manual_seed(seeds[k])``. Each image owns its generator, so an image depends only
on its (prompt, seed) pair — never on the batch size, the batch it lands in, or the other prompts — and
the same pair gives the same image from any model of the same architecture (base and personalised
samples are compared pixel for pixel). "Never on the batch size" holds up to float round-off: a kernel may sum in
another order for another batch shape (tiny-sd on CPU: ≤ 1e-5 between batches of 1 and 6, which can move a rare
pixel by one 8-bit level in a PNG); the seeds, and so the noise, are the same. :func:`prompt_seed_pairs` spells
out "every prompt × every seed"; sequences of one prompt use ``seeds = range(seed, seed + n)``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from nullbooth.errors import NullBoothError

DEFAULT_BATCH = 8
# The largest image side drawn unless $NULLBOOTH_MAX_RESOLUTION says otherwise, × the model's native side (check_size).
MAX_SIZE_FACTOR = 4
MAX_SIZE_ENV = "NULLBOOTH_MAX_RESOLUTION"
EXAMPLE_SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                      "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
SEED_LIMIT = 2**63  # the seeds config.generate.seeds accepts: non-negative and within a signed 64-bit integer


def prompt_seed_pairs(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    """Every prompt with every seed, prompt-major: ``(p0, s0), (p0, s1), …, (p1, s0), …``."""
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


def default_size(pipe) -> int:
    """The pipeline's native image side (``sample_size × vae_scale_factor``; SD 1.5: 512, SD 2.1: 768, SDXL: 128 × 8 =
    1024, tiny-sd and tiny-sdxl: 64), as diffusers' SD and SDXL pipelines both default their height and width."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def check_sampling_args(*, seeds: Sequence[int], steps: int, guidance: float, size: int | None = None,
                        batch: int | None = None, who: str = "sample") -> None:
    """Refuse, before any model is loaded, sampling settings that could only fail later or give noise.

    Every problem is reported at once, each named by its flag (``--steps``, ``--resolution``, ``--batch``, …).
    """
    problems = []
    if not seeds:
        problems.append("--seeds: expected at least one seed, got none (e.g. --seeds 0,1)")
    bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
    if bad:
        problems.append(f"--seeds: expected seeds in [0, 2**63), got {bad[:3]}")
    if steps < 1:
        problems.append(f"--steps: expected at least 1 denoising step, got {steps}")
    if not math.isfinite(guidance) or guidance < 0:
        problems.append(f"--guidance: expected a finite scale ≥ 0 (≤ 1 turns guidance off), got {guidance}")
    if size is not None and (size < 8 or size % 8):
        problems.append(f"--resolution: expected a multiple of 8 (diffusers' pipelines refuse others), got {size}")
    if batch is not None and batch < 1:
        problems.append(f"--batch: expected at least 1 image per pipeline call, got {batch}")
    if problems:
        raise NullBoothError(f"{who}: " + "; ".join(problems))


def size_limit(pipe) -> int:
    """The largest image side :func:`check_size` allows: ``MAX_SIZE_FACTOR`` × the native side, or
    ``$NULLBOOTH_MAX_RESOLUTION`` when set."""
    raw = os.environ.get(MAX_SIZE_ENV)
    if raw is None:
        return MAX_SIZE_FACTOR * default_size(pipe)
    try:
        return int(raw)
    except ValueError:
        raise NullBoothError(f"{MAX_SIZE_ENV}: expected an image side in pixels, got {raw!r}") from None


def check_size(pipe, size: int | None, name: str = "resolution") -> int:
    """The image side to sample ``pipe`` at (``size``, default the native one), refused unless the model can draw it.

    The VAE turns ``size`` pixels into ``size / f`` latents (``f = vae_scale_factor``), so ``size`` must be a
    multiple of ``f``; the UNet halves the latent once per level below the top (``L`` levels), so
    ``size ≥ f · 2^(L-1)`` leaves the deepest level at least one latent pixel. Above: at most
    ``MAX_SIZE_FACTOR`` × the native side (SD 1.x: 2048, SDXL: 4096, tiny-sd: 256). Convolutions cost ∝ side²,
    self-attention ∝ side⁴ in memory without a fused kernel, and a model trained at side ``N`` repeats and breaks up
    its subjects well before ``4N``; an 8192 image on tiny-sd ran away with 12 GB. ``$NULLBOOTH_MAX_RESOLUTION`` (pixels) moves
    the cap for whoever means it. Training and every sampling verb call this before any work.
    """
    native = default_size(pipe)
    if size is None:
        return native
    f = int(pipe.vae_scale_factor)
    smallest = f * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    largest = size_limit(pipe)
    if size % f or size < smallest:
        raise NullBoothError(f"{name}: expected a multiple of {f} of at least {smallest} for this model (its VAE "
                             f"scales by {f}, its UNet has {len(pipe.unet.config.block_out_channels)} levels), got "
                             f"{size}; the model's native size is {native}")
    if size > largest:
        raise NullBoothError(f"{name}: expected at most {largest} pixels for a model whose native size is {native} "
                             f"(×{MAX_SIZE_FACTOR}), got {size}; use {native}, or set {MAX_SIZE_ENV}={size} if "
                             "you mean it (memory grows with the fourth power of the side)")
    return size


def check_steps(pipe, steps: int, name: str = "steps") -> None:
    """Refuse a step count the scheduler cannot take: at least 1, at most its training timesteps."""
    most = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000))
    if not 1 <= steps <= most:
        raise NullBoothError(f"{name}: expected between 1 and {most} denoising steps (the scheduler was trained on "
                             f"{most} timesteps), got {steps}")


def scheduler_names() -> list[str]:
    """Every scheduler class diffusers exports (PyTorch ones; nothing is imported to list them)."""
    import diffusers

    return sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))


def scheduler_class(name: str, who: str = "--scheduler") -> type:
    """The diffusers scheduler class called ``name``; a one-line error with the nearest names otherwise."""
    import diffusers

    names = scheduler_names()
    if name in names:
        try:
            cls = getattr(diffusers, name)
            if issubclass(cls, diffusers.SchedulerMixin):
                return cls
            cls()  # diffusers' placeholder for a class whose optional package is missing: it raises, naming it
        except (ImportError, RuntimeError) as err:
            raise NullBoothError(f"{who}: diffusers cannot load {name}: {' '.join(str(err).split())}") from None
    # "ddim" or "euler discrete" should find DDIMScheduler / EulerDiscreteScheduler: compare lower-case, suffix-free.
    keys = {**{n.lower().removesuffix("scheduler"): n for n in names}, **{n.lower(): n for n in names}}
    typed = re.sub(r"[^a-z0-9]", "", name.lower())
    prefixed = sorted((n for n in names if typed and n.lower().startswith(typed)), key=len)
    similar = [keys[k] for k in difflib.get_close_matches(typed, keys, n=6, cutoff=0.5)]
    close = list(dict.fromkeys(prefixed + similar))[:3]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise NullBoothError(f"{who}: expected a diffusers scheduler class name, got {name!r}; {hint}e.g. "
                         f"{', '.join(EXAMPLE_SCHEDULERS)} ({len(names)} in all: diffusers.schedulers)")


def set_scheduler(pipe, name: str, who: str = "--scheduler") -> None:
    """Replace ``pipe.scheduler`` by the scheduler class ``name`` built from the current one's config (betas,
    timestep count and prediction type carry over); refused unless diffusers lists it as compatible."""
    cls = scheduler_class(name, who)
    current = type(pipe.scheduler).__name__
    compatible = {c.__name__ for c in getattr(pipe.scheduler, "compatibles", [])} | {current}
    if cls.__name__ not in compatible:
        raise NullBoothError(f"{who}: {name} is not compatible with this model's {current} (diffusers "
                             f"lists {', '.join(sorted(compatible))}); choose one of those")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
           size: int | None = None, batch_size: int | None = DEFAULT_BATCH, output_type: str = "pil",
           **pipe_kwargs: Any) -> list[Any]:
    """Images (or latents, with ``output_type="latent"``) of ``prompts[k]`` with seed ``seeds[k]``, in order.

    ``batch_size`` images per pipeline call (``None``: all in one call); any batch size gives the same
    images up to float round-off (see the module docstring). Extra keyword arguments go to the pipeline call
    unchanged. SDXL's micro-conditioning keeps the pipeline's defaults: original and target size ``(size, size)``,
    crop corner ``(0, 0)`` — the conditioning of an uncropped image drawn at the size asked for.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: expected one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    size = size or default_size(pipe)
    device = pipe.unet.device
    step = batch_size or max(len(prompts), 1)
    out: list[Any] = []
    for start in range(0, len(prompts), step):
        chunk = slice(start, start + step)
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[chunk]]
        result = pipe(prompt=list(prompts[chunk]), height=size, width=size, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generators, output_type=output_type, **pipe_kwargs)
        out.extend(result.images)  # a list of PIL images, or an array / tensor iterated over its batch axis
    return out
