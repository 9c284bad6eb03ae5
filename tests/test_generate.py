"""``nullbooth generate``: adapters of every kind applied to the base model, grids, base comparison, CLI, errors.

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

from nullbooth.cli.generate import register_cli
from nullbooth.config import config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.filenames import LORA_WEIGHTS
from nullbooth.generate import (
    captioned_rows,
    generate,
    image_grid,
    load_personalization,
)
from nullbooth.methods.lora_export import export_diffusers_lora
from nullbooth.models import load_pipeline

RES = 16
PROMPT = "a photo of sks dog"



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
