"""``nullbooth generate``: adapters of every kind applied to the base model, the base model alone, batching,
seeds, schedulers, individual images, grids, base comparison, CLI, errors.

The adapter under test is built directly (random orthonormal null-space bases, random ``M``), so these
tests need no training run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_adapter
from PIL import Image

import nullbooth.generate
from nullbooth.cli.generate import register_cli
from nullbooth.cli.main import main
from nullbooth.config import config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.filenames import LORA_WEIGHTS
from nullbooth.generate import (
    captioned_rows,
    find_source,
    generate,
    image_grid,
    load_personalization,
)
from nullbooth.methods.lora_export import export_diffusers_lora
from nullbooth.models import load_pipeline

RES = 16
PROMPT = "a photo of sks dog"
PROMPTS = ["a red circle", "A blue/green square?"]  # the second one's name must come out filesystem-safe
STEMS = ["00_a-red-circle", "01_a-blue-green-square"]

@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A nullbooth adapter (random k-dim null spaces, ΔW large enough to change the images) + its LoRA export."""
    folder = tmp_path_factory.mktemp("adapter")
    unet = random_adapter(folder, scale=0.5)
    export_diffusers_lora(folder, unet=unet)
    return folder


def cfg_for(adapter: Path, out: Path, **generate_block):
    block = {"adapter": str(adapter), "prompts": [PROMPT], "seeds": [0, 1], "num_inference_steps": 2,
             "out_dir": str(out), **generate_block}
    return config_from_dict({"pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "generate": block})


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_grid_and_base_comparison(adapter_dir, tmp_path):
    files = generate(cfg_for(adapter_dir, tmp_path, compare_base=True), pipe=load_pipeline("tiny-sd"))
    assert [f.name for f in files] == ["00_a-photo-of-sks-dog.png", "00_a-photo-of-sks-dog_compare.png"]
    grid = pixels(files[0])
    assert grid.shape == (RES, 2 * RES, 3)  # one row, one column per seed
    compare = pixels(files[1])
    assert compare.shape[0] > 2 * RES and compare.shape[1] > 2 * RES  # title + two captioned rows
    # The personalised row of the comparison is the grid; the base row (sampled without adapter) differs.
    label_w = compare.shape[1] - 2 * RES
    top = compare.shape[0] - 2 * RES
    base_row, personal_row = compare[top:top + RES, label_w:], compare[top + RES:, label_w:]
    assert np.array_equal(personal_row, grid)
    assert np.abs(base_row - personal_row).max() > 10
    plain = load_pipeline("tiny-sd")
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    base_images = plain([PROMPT] * 2, height=RES, width=RES, num_inference_steps=2, generator=generators).images
    assert np.array_equal(base_row, np.asarray(image_grid(base_images), dtype=np.int16))
    images = tmp_path / "images"
    assert sorted(p.name for p in images.iterdir()) == [f"00_a-photo-of-sks-dog_seed{s}{b}.png"
                                                        for s in (0, 1) for b in ("", "_base")]
    assert np.array_equal(pixels(images / "00_a-photo-of-sks-dog_seed1_base.png"), base_row[:, RES:])
    assert np.array_equal(pixels(images / "00_a-photo-of-sks-dog_seed1.png"), grid[:, RES:])


def test_diffusers_lora_folder_gives_the_same_images(adapter_dir, tmp_path):
    lora_only = tmp_path / "lora_only"
    lora_only.mkdir()
    (lora_only / LORA_WEIGHTS).write_bytes((adapter_dir / LORA_WEIGHTS).read_bytes())
    pipe = load_pipeline("tiny-sd")
    assert load_personalization(pipe, lora_only) == "lora"
    ours = generate(cfg_for(adapter_dir, tmp_path / "ours"), pipe=load_pipeline("tiny-sd"))
    theirs = generate(cfg_for(lora_only, tmp_path / "theirs"), pipe=load_pipeline("tiny-sd"))
    # Same ΔW through peft instead of M Uᵀ: float32 round-off, at most one 8-bit level after decoding.
    assert np.abs(pixels(ours[0]) - pixels(theirs[0])).max() <= 1


def test_cli_flags(adapter_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="verb"))
    out = tmp_path / "cli"
    args = parser.parse_args(["generate", "--adapter", str(adapter_dir), "--prompt", PROMPT, "--prompt", "a dog",
                              "--seeds", "0,1,2", "--steps", "1", "--guidance", "3", "--out", str(out),
                              "--set", f"resolution={RES}"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["00_a-photo-of-sks-dog.png", "01_a-dog.png"]
    assert pixels(out / "01_a-dog.png").shape == (RES, 3 * RES, 3)


def test_errors(adapter_dir, tmp_path):
    pipe = load_pipeline("tiny-sd")
    with pytest.raises(NullBoothError, match="expected a training output folder"):
        load_personalization(pipe, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NullBoothError, match="no nullbooth adapter"):
        load_personalization(pipe, tmp_path / "empty")
    cfg = config_from_dict({"resolution": RES, "generate": {"adapter": str(adapter_dir), "out_dir": str(tmp_path)}})
    with pytest.raises(NullBoothError, match="at least one prompt"):
        generate(cfg, pipe=pipe)
    with pytest.raises(NullBoothError, match="at least one seed"):
        config_from_dict({"generate": {"seeds": []}})


def test_captioned_rows_layout():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    picture = captioned_rows([("base", [red, red]), ("nullbooth", [blue, blue])], title="t")
    a = np.asarray(picture)
    assert a.shape[1] > 16 and tuple(a[-1, -1]) == (0, 0, 255) and tuple(a[-9, -1]) == (255, 0, 0)


# --------------------------------------------------------------------------- the base model alone, batches, seeds


def base_cfg(tmp_path: Path, seed: int = 0, **generate_block):
    """No adapter, and an output_dir that holds no training result: the base model alone."""
    block = {"prompts": PROMPTS, "seeds": [0, 1], "num_inference_steps": 2, "out_dir": str(tmp_path / "out"),
             **generate_block}
    return config_from_dict({"pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": seed,
                             "output_dir": str(tmp_path / "no_run"),
                             "generate": {k: v for k, v in block.items() if v is not None}})


def reference(pipe, prompt: str, seed: int) -> np.ndarray:
    """The pipeline's own image for (prompt, seed), as the 8-bit values diffusers' PIL conversion writes."""
    image = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=2, guidance_scale=7.5,
                 height=RES, width=RES, output_type="np").images[0]
    return (image * 255).round().astype(np.int16)


def image_files(out: Path) -> dict[str, np.ndarray]:
    return {p.name: pixels(p) for p in sorted((out / "images").iterdir())}


def test_base_alone_is_the_pipelines_own_output(tiny_pipe, tmp_path):
    cfg = base_cfg(tmp_path, batch_size=1)
    assert find_source(cfg) is None
    files = generate(cfg, pipe=tiny_pipe)
    assert [f.name for f in files] == [f"{stem}.png" for stem in STEMS]
    images = image_files(tmp_path / "out")
    assert list(images) == [f"{stem}_seed{s}.png" for stem in STEMS for s in (0, 1)]
    for i, prompt in enumerate(PROMPTS):
        for seed in (0, 1):
            # One image per call, like the reference: the same arithmetic, so exactly its 8-bit values.
            assert np.array_equal(images[f"{files[i].stem}_seed{seed}.png"], reference(tiny_pipe, prompt, seed))
        row = [images[f"{files[i].stem}_seed{s}.png"] for s in (0, 1)]
        assert np.array_equal(pixels(files[i]), np.concatenate(row, axis=1))  # the grid: one column per seed
    assert not (tmp_path / "no_run").exists()


def test_batch_size_changes_no_image(tiny_pipe, tmp_path):
    runs = {n: image_files(generate(base_cfg(tmp_path / str(n), seeds=[0, 1, 2], batch_size=n), pipe=tiny_pipe)[0]
                           .parent) for n in (1, 4, 8)}  # 6 images: calls of 1, of 4 + 2, of all 6
    assert list(runs[1]) == list(runs[4]) == list(runs[8]) and len(runs[1]) == 6
    for n in (4, 8):
        a, b = np.stack(list(runs[1].values())), np.stack(list(runs[n].values()))
        # Same seeds, same noise: only float32 round-off of another batch shape (measured ≤ 4e-6 on CPU), which can
        # move a rare pixel across an 8-bit rounding boundary — never more than one level, never many pixels.
        assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.01
    seeds_swapped = np.abs(runs[1]["00_a-red-circle_seed0.png"] - runs[1]["00_a-red-circle_seed1.png"])
    assert seeds_swapped.max() > 10  # the tolerance above would catch a seed mix-up


def test_num_images_per_prompt_is_explicit_seeds(tiny_pipe, tmp_path):
    # The config's own seeds ([0, 1]) give way to K: configs/*.yaml all list seeds.
    counted = base_cfg(tmp_path / "k", seed=5, num_images_per_prompt=3, batch_size=4)
    explicit = base_cfg(tmp_path / "s", seeds=[5, 6, 7], batch_size=4)
    generate(counted, pipe=tiny_pipe)
    generate(explicit, pipe=tiny_pipe)
    k, s = tmp_path / "k" / "out", tmp_path / "s" / "out"
    assert sorted(p.name for p in (k / "images").iterdir())[:3] == [f"00_a-red-circle_seed{i}.png" for i in (5, 6, 7)]
    for a in [*k.glob("*.png"), *(k / "images").glob("*.png")]:
        assert a.read_bytes() == (s / a.relative_to(k)).read_bytes(), a.name
    with pytest.raises(NullBoothError, match=r"must lie in \[0, 2\*\*63\); got seed -1"):
        generate(base_cfg(tmp_path, seed=-1, num_images_per_prompt=3), pipe=None)


def test_scheduler_by_name(tiny_pipe, tmp_path):
    from diffusers import EulerDiscreteScheduler

    default = image_files(generate(base_cfg(tmp_path / "d", batch_size=1), pipe=tiny_pipe)[0].parent)
    cfg = base_cfg(tmp_path / "e", batch_size=1, scheduler="EulerDiscreteScheduler")
    euler = image_files(generate(cfg, pipe=tiny_pipe)[0].parent)
    assert type(tiny_pipe.scheduler).__name__ == "DDIMScheduler"  # the caller's pipeline gets its scheduler back
    assert max(np.abs(euler[n] - default[n]).max() for n in euler) > 10
    scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    with_euler = type(tiny_pipe)(**{**tiny_pipe.components, "scheduler": scheduler})
    for stem, prompt in zip(STEMS, PROMPTS, strict=True):
        assert np.array_equal(euler[f"{stem}_seed1.png"], reference(with_euler, prompt, 1))
    with pytest.raises(NullBoothError, match="FlowMatchEulerDiscreteScheduler is not compatible"):
        generate(base_cfg(tmp_path, scheduler="FlowMatchEulerDiscreteScheduler"), pipe=tiny_pipe)


def test_cli_base_alone_and_unknown_scheduler(tiny_pipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nullbooth.generate, "load_pipeline", lambda *a, **k: tiny_pipe)
    out = tmp_path / "cli"
    argv = ["generate", "--model", "tiny-sd", "--prompt", "a red circle", "--steps", "2", "--out", str(out),
            "--set", f"resolution={RES}", "--set", f"output_dir={tmp_path / 'no_run'}"]
    assert main([*argv, "--num-images-per-prompt", "2", "--batch-size", "3", "--scheduler", "DDIMScheduler"]) == 0
    assert capsys.readouterr().out.split() == [str(out / "00_a-red-circle.png")]
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    assert sorted(p.name for p in before) == ["00_a-red-circle.png", "00_a-red-circle_seed0.png",
                                              "00_a-red-circle_seed1.png"]

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad scheduler name was refused")

    monkeypatch.setattr(nullbooth.generate, "load_pipeline", refuse)
    assert main([*argv, "--scheduler", "DDIMSchedular"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("nullbooth generate: error: ")
    assert "got 'DDIMSchedular'; did you mean DDIMScheduler" in err
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--seeds", "0,1", "--num-images-per-prompt", "2"])
    assert exit_.value.code == 2 and "not allowed with argument --seeds" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before


def test_where_the_personalisation_comes_from(adapter_dir, tmp_path):
    assert find_source(base_cfg(tmp_path)) is None
    from_output_dir = config_from_dict({"output_dir": str(adapter_dir)})
    assert find_source(from_output_dir) == adapter_dir  # `train` then `generate` with defaults: the trained result
    missing = cfg_for(tmp_path / "missing", tmp_path / "out")
    assert find_source(missing) == tmp_path / "missing"  # an explicit --adapter must exist: no base-only fallback
    with pytest.raises(NullBoothError, match="expected a training output folder"):
        generate(missing, pipe=None)
    with pytest.raises(NullBoothError, match="expected a trained result to compare"):
        generate(base_cfg(tmp_path, compare_base=True), pipe=None)
