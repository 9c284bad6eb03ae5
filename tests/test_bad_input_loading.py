"""Bad input and faults when loading and sampling (issue 18, part A): every case ends in one line
``nullbooth <verb>: error: …`` with exit code 2 — no traceback, no unpickling, nothing already written lost.

The battery runs the CLI in-process. Its inputs are tiny folders built once per module: adapters, a LoRA and a
dreambooth UNet trained on tiny-sd2 (applied to tiny-sd), a tiny-sd copy whose UNet is a ``torch.save`` pickle,
pipelines of unsupported families, a UNet without cross-attention.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import random_adapter
from PIL import Image

from nullbooth.cli.main import main
from nullbooth.dataset import image_to_tensor, read_image_folder, to_rgb
from nullbooth.methods.adapter_files import save_adapter
from nullbooth.methods.adapters import adapter_targets, inject_null_space_adapters
from nullbooth.methods.lora_export import export_diffusers_lora
from nullbooth.models import load_pipeline, materialize_builtin

GEN = ["--prompt", "a red circle", "--seeds", "0", "--steps", "1", "--set", "resolution=16"]
EVAL = ["--base", "tiny-sd", "--prompt", "a red circle", "--prompt", "a star", "--seeds", "0,1,2", "--steps", "1",
        "--resolution", "16"]


# ------------------------------------------------------------------------------------------------ inputs


def _sd2_outputs(root: Path) -> dict[str, Path]:
    """A nullbooth adapter (+ its LoRA export) and a dreambooth ``unet/`` trained on tiny-sd2."""
    pipe = load_pipeline("tiny-sd2")
    g = torch.Generator().manual_seed(0)
    bases = {}
    for path, linear in adapter_targets(pipe.unet).items():
        Q, _ = torch.linalg.qr(torch.randn(linear.in_features, linear.in_features, generator=g, dtype=torch.float64))
        bases[path] = Q[:, : linear.in_features // 2]  # [in, k]
    inject_null_space_adapters(pipe.unet, bases)
    save_adapter(root / "adapter2", pipe.unet, {"method": "nullbooth", "pretrained_model_name_or_path": "tiny-sd2"})
    lora = root / "lora2"
    export_diffusers_lora(lora, unet=pipe.unet)
    bare = root / "lora2_bare"  # the LoRA file alone: nothing records its base model
    bare.mkdir()
    shutil.copy(lora / "pytorch_lora_weights.safetensors", bare)
    (lora / "train_config.json").write_text(json.dumps({"pretrained_model_name_or_path": "tiny-sd2"}))
    dream = root / "dreambooth2"
    load_pipeline("tiny-sd2").unet.save_pretrained(dream / "unet")
    (dream / "train_config.json").write_text(json.dumps({"pretrained_model_name_or_path": "tiny-sd2"}))
    return {"adapter2": root / "adapter2", "lora2": lora, "lora2_bare": bare, "dreambooth2": dream}


def _pickled_and_foreign(root: Path) -> dict[str, Path]:
    """tiny-sd with its UNet as a pickle, a dreambooth output with a pickled UNet, a pickled CLIP feature folder,
    other pipeline families, a corrupt model_index.json and a UNet without cross-attention."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = load_pipeline("tiny-sd")
    pickled = root / "pickled_model"
    pipe.save_pretrained(pickled)
    pipe.unet.save_pretrained(pickled / "unet", safe_serialization=False)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    dream = root / "pickled_dreambooth"
    pipe.unet.save_pretrained(dream / "unet", safe_serialization=False)
    out = {"pickled_model": pickled, "pickled_dreambooth": dream}
    for family in ("StableDiffusion3Pipeline", "FluxPipeline", "StableDiffusionXLPipeline"):
        out[family] = root / family
        out[family].mkdir()
        (out[family] / "model_index.json").write_text(json.dumps({"_class_name": family}))
    out["pickled_features"] = root / "pickled_clip"  # never opened: the refusal comes from the file names
    out["pickled_features"].mkdir()
    (out["pickled_features"] / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    (out["pickled_features"] / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    out["corrupt_index"] = root / "corrupt_index"
    shutil.copytree(materialize_builtin("tiny-sd"), out["corrupt_index"])
    (out["corrupt_index"] / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    torch.manual_seed(0)
    plain = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                 mid_block_type="UNetMidBlock2D", cross_attention_dim=128)
    out["no_attn2"] = root / "no_attn2"
    StableDiffusionPipeline(**{**pipe.components, "unet": plain}).save_pretrained(out["no_attn2"])
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bad_loading")
    random_adapter(root / "adapter", scale=0.5)
    a_file = root / "a_file.txt"
    a_file.write_text("not a folder\n")
    return SimpleNamespace(root=root, adapter=root / "adapter", a_file=a_file,
                           **_sd2_outputs(root), **_pickled_and_foreign(root))


def _digest(paths: list[Path]) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else [])]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _one_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"nullbooth {verb}: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ battery

# case id → (argv built from the inputs, what the one line must say, the inputs that must stay byte-identical)
CASES = {
    "generate_out_is_a_file": (lambda x: ["generate", "--adapter", str(x.adapter), *GEN, "--out", str(x.a_file)],
                               "expected a folder at", ["a_file"]),
    "adapter_from_tiny_sd2": (lambda x: ["generate", "--adapter", str(x.adapter2), *GEN, "--out", str(x.root / "o")],
                              "trained on tiny-sd2, not tiny-sd", ["adapter2"]),
    "lora_from_tiny_sd2": (lambda x: ["generate", "--adapter", str(x.lora2), *GEN, "--out", str(x.root / "o")],
                           "this model needs [48, 128]", ["lora2"]),
    "dreambooth_from_tiny_sd2": (lambda x: ["generate", "--adapter", str(x.dreambooth2), *GEN, "--out",
                                            str(x.root / "o")], "trained on tiny-sd2, not tiny-sd", ["dreambooth2"]),
    "pickled_model": (lambda x: ["generate", "--model", str(x.pickled_model), "--adapter", str(x.adapter), *GEN,
                                 "--out", str(x.root / "o")],
                      os.path.join("unet", "diffusion_pytorch_model.bin: it is a torch.save pickle"),
                      ["pickled_model"]),
    "pickled_dreambooth": (lambda x: ["generate", "--adapter", str(x.pickled_dreambooth), *GEN, "--out",
                                      str(x.root / "o")], "safe_serialization=True", ["pickled_dreambooth"]),
    "sd3": (lambda x: ["generate", "--model", str(x.StableDiffusion3Pipeline), "--adapter", str(x.adapter), *GEN],
            "holds a StableDiffusion3Pipeline", []),
    "flux": (lambda x: ["generate", "--model", str(x.FluxPipeline), "--adapter", str(x.adapter), *GEN],
             "SD3, Flux and other transformer families are not supported", []),
    "sdxl_without_components": (lambda x: ["evaluate", str(x.adapter), *EVAL[2:], "--base",
                                           str(x.StableDiffusionXLPipeline)],
                                "holds a StableDiffusionXLPipeline without unet", []),
    "corrupt_model_index": (lambda x: ["generate", "--model", str(x.corrupt_index), "--adapter", str(x.adapter), *GEN],
                            "is not valid JSON", ["corrupt_index"]),
    "unet_without_attn2": (lambda x: ["generate", "--model", str(x.no_attn2), "--adapter", str(x.adapter), *GEN],
                           "no cross-attention (attn2)", []),
    "generate_resolution_too_large": (lambda x: ["generate", "--adapter", str(x.adapter), *GEN, "--set",
                                                 "resolution=512"], "at most 256", []),
    "generate_resolution_too_small": (lambda x: ["generate", "--adapter", str(x.adapter), *GEN, "--set",
                                                 "resolution=8"], "of at least 16", []),
    "evaluate_negative_steps": (lambda x: ["evaluate", str(x.adapter), *EVAL, "--steps", "-2"],
                                "--steps: expected at least 1", []),
    "evaluate_zero_steps": (lambda x: ["evaluate", str(x.adapter), *EVAL, "--steps", "0"],
                            "--steps: expected at least 1", []),
    "evaluate_too_many_steps": (lambda x: ["evaluate", str(x.adapter), *EVAL, "--steps", "5000"],
                                "between 1 and 1000", []),
    "evaluate_zero_batch": (lambda x: ["evaluate", str(x.adapter), *EVAL, "--batch", "0"], "--batch: expected", []),
    "evaluate_resolution_7": (lambda x: ["evaluate", str(x.adapter), *EVAL, "--resolution", "7"],
                              "--resolution: expected a multiple of 8", []),
    "evaluate_resolution_too_large": (lambda x: ["evaluate", str(x.adapter), *EVAL, "--resolution", "1024"],
                                      "NULLBOOTH_MAX_RESOLUTION", []),
    "evaluate_pickled_features": (lambda x: ["evaluate", str(x.adapter), *EVAL, "--features", str(x.pickled_features)],
                                  "pytorch_model.bin: it is a torch.save pickle", ["pickled_features"]),
    "evaluate_nan_guidance": (lambda x: ["evaluate", str(x.adapter), *EVAL, "--guidance", "nan"],
                              "--guidance: expected a finite", []),
    "evaluate_output_is_a_file": (lambda x: ["evaluate", str(x.adapter), *EVAL, "--output", str(x.a_file)],
                                  "expected a folder at", ["a_file"]),
    "evaluate_bare_lora_from_tiny_sd2": (lambda x: ["evaluate", str(x.lora2_bare), *EVAL, "--output",
                                                    str(x.root / "e")], "this model needs [48, 128]", ["lora2_bare"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, inputs, capsys):
    argv, needle, kept = CASES[case]
    before = _digest([getattr(inputs, k) for k in kept])
    assert main(argv(inputs)) == 2
    line = _one_line(capsys, argv(inputs)[0])
    assert needle in line, line
    assert "unsafe serialization" not in line
    assert _digest([getattr(inputs, k) for k in kept]) == before


def test_read_only_output_is_refused_before_any_work(inputs, capsys, monkeypatch):
    out = inputs.root / "read_only"
    out.mkdir()
    (out / "evaluation.json").write_text('{"earlier": true}\n')
    before = _digest([out])
    out.chmod(0o555)
    real_access = os.access
    if os.geteuid() == 0:  # root may write anywhere: make the folder read-only the way os.access reports it
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    try:
        assert main(["evaluate", str(inputs.adapter), *EVAL, "--output", str(out)]) == 2
    finally:
        out.chmod(0o755)
    assert "cannot write into" in _one_line(capsys, "evaluate")
    assert _digest([out]) == before


def test_a_full_disk_after_the_work_is_one_line_and_keeps_earlier_files(inputs, capsys, monkeypatch):
    out = inputs.root / "full_disk"
    out.mkdir()
    earlier = out / "00_a-red-circle.png"
    Image.new("RGB", (16, 16), "blue").save(earlier)
    before = _digest([out])

    def no_space(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")  # the disk fills up in the middle of the file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", no_space)
    assert main(["generate", "--adapter", str(inputs.adapter), *GEN, "--out", str(out)]) == 2
    line = _one_line(capsys, "generate")
    assert "could not write" in line and os.strerror(errno.ENOSPC) in line and "disk is full" in line
    assert _digest([out]) == before  # the earlier grid is intact and no temporary file is left


def test_verbose_keeps_the_traceback_of_a_file_system_error(inputs, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/somewhere/evaluation.json")

    monkeypatch.setattr("nullbooth.config.load_config", denied)
    with pytest.raises(PermissionError):
        main(["-v", "generate", "--adapter", str(inputs.adapter), *GEN])


@pytest.mark.parametrize("verb, resumes", [("collect", True), ("train", True), ("generate", False)])
def test_interrupt_says_how_to_resume(verb, resumes, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nullbooth.config.load_config", interrupted)
    assert main([verb]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nullbooth {verb}: interrupted") and len(err.splitlines()) == 1
    assert ("re-run the same command" in err and "resume from the last checkpoint" in err) == resumes


# ------------------------------------------------------------------------------------------------ images


def _gradient(bits: int) -> np.ndarray:
    top = 2**bits - 1
    return np.round(np.linspace(0, top, 48))[None].repeat(20, 0).astype(np.uint16 if bits == 16 else np.uint8)


def test_a_16_bit_png_trains_as_its_8_bit_image(tmp_path):
    Image.fromarray(_gradient(16)).save(tmp_path / "a16.png")  # mode I;16, values 0..65535
    Image.fromarray(_gradient(8), "L").save(tmp_path / "b8.png")
    (_, deep), (_, flat) = read_image_folder(tmp_path, "instance_data_dir")
    assert deep.mode == flat.mode == "RGB"
    a, b = np.asarray(deep, np.int16), np.asarray(flat, np.int16)
    assert np.abs(a - b).max() <= 1 and a.max() == 255 and a.min() == 0  # not clipped to white
    assert torch.allclose(image_to_tensor(deep, 16), image_to_tensor(flat, 16), atol=1.5 / 127.5)


@pytest.mark.parametrize("mode, make, expected", [
    ("I", lambda: Image.fromarray(np.full((6, 6), 32896, np.int32)), (128, 128, 128)),  # 16-bit value in an I image
    ("F", lambda: Image.fromarray(np.full((6, 6), 0.5, np.float32)), (128, 128, 128)),  # floats in 0..1
    ("F", lambda: Image.fromarray(np.full((6, 6), 200.0, np.float32)), (200, 200, 200)),  # floats in 0..255
    ("LA", lambda: Image.new("LA", (6, 6), (0, 0)), (255, 255, 255)),  # transparent black: composited on white
    ("LA", lambda: Image.new("LA", (6, 6), (50, 255)), (50, 50, 50)),
    ("P", lambda: _transparent_palette(), (255, 255, 255)),
    ("CMYK", lambda: Image.new("CMYK", (6, 6), (0, 255, 255, 0)), (255, 0, 0)),  # magenta + yellow = red
])
def test_every_mode_becomes_the_rgb_it_shows(mode, make, expected):
    image = make()
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and rgb.shape == (6, 6, 3)
    assert np.abs(rgb.astype(int) - expected).max() <= 1, rgb[0, 0]


def _transparent_palette() -> Image.Image:
    image = Image.new("P", (6, 6), 3)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 3
    return image
