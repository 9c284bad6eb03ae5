"""``nullbooth generate``: the base model plus a trained personalisation, prompts × seeds → image grids.

What a training ``output_dir`` holds decides how it is loaded: a nullbooth adapter
(``adapter_config.json`` + ``nullbooth_adapter.safetensors``) is injected exactly; a dreambooth
``unet/`` folder replaces the UNet; a diffusers LoRA (``pytorch_lora_weights.safetensors``, ours or
anyone's) goes through plain ``pipe.load_lora_weights``; Perfusion concept files (with ``--concept``
for more, ``--beta``/``--tau`` for the gate) are attached by :mod:`nullbooth.perfusion_method`. ``compare_base`` samples the base model
first with the same seeds and writes both rows into one captioned picture.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_WEIGHTS, load_adapter
from .config import Config, PerfusionBlock, load_config
from .errors import NullBoothError
from .prompts import read_prompt_file
from .store import read_json


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images of one size in a grid of ``cols`` columns (default: one row)."""
    if not images:
        raise NullBoothError("expected at least one image for a grid, got none")
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def captioned_rows(rows: Sequence[tuple[str, Sequence[Image.Image]]], title: str = "") -> Image.Image:
    """Labelled rows of images (``[(label, images), …]``) under an optional title: base vs personalised."""
    w, h = rows[0][1][0].size
    cols = max(len(images) for _, images in rows)
    font_size = max(10, min(18, h // 5))
    font = _font(font_size)
    label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font)) for label, _ in rows) + 12
    title_h = font_size + 10 if title else 0
    canvas = Image.new("RGB", (label_w + cols * w, title_h + len(rows) * h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = title_h + r * h
        draw.text((6, y + h // 2 - font_size // 2), label, fill="black", font=font)
        for c, image in enumerate(images):
            canvas.paste(image.convert("RGB"), (label_w + c * w, y))
    return canvas


def load_personalization(pipe, path: str | Path, perfusion: PerfusionBlock | None = None) -> str:
    """Apply the trained result in ``path`` to ``pipe`` in place; returns what it was
    (nullbooth / dreambooth / lora / perfusion). ``perfusion`` carries the gate overrides and extra concept files."""
    path = Path(path)
    perfusion = perfusion or PerfusionBlock()
    if not path.exists() and not perfusion.concepts:
        raise NullBoothError(f"adapter: expected a training output folder at {path}, found nothing; pass --adapter DIR "
                             "(the output_dir of `nullbooth train`)")
    folder = path if path.is_dir() else path.parent
    config = folder / ADAPTER_CONFIG
    if (folder / ADAPTER_WEIGHTS).is_file() and config.is_file() and \
            read_json(config, "an adapter config").get("format") == "nullbooth-adapter":
        load_adapter(pipe.unet, folder)
        return "nullbooth"
    if (folder / "unet" / "config.json").is_file():
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=pipe.unet.dtype)
        pipe.unet = unet.to(pipe.unet.device)
        return "dreambooth"
    lora = path if path.is_file() and path.suffix == ".safetensors" else folder / LORA_WEIGHTS
    if lora.is_file():
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        return "lora"
    from .perfusion_method import load_perfusion_personalization

    if load_perfusion_personalization(pipe, path, perfusion) is not None:  # concept files here and/or --concept
        return "perfusion"
    raise NullBoothError(
        f"adapter: {path} holds no nullbooth adapter ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}), no dreambooth unet/ "
        f"folder, no diffusers LoRA ({LORA_WEIGHTS}) and no Perfusion concept file; point --adapter at a training "
        "output_dir"
    )


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def resolve_prompts(cfg: Config, adapter_dir: Path) -> list[str]:
    """``generate.prompts`` + ``generate.prompts_file``; default: the validation or instance prompt of the run."""
    g = cfg.generate
    prompts = list(g.prompts) + (read_prompt_file(g.prompts_file, "generate.prompts_file") if g.prompts_file else [])
    if prompts:
        return prompts
    trained = adapter_dir / "train_config.json"
    source = read_json(trained, "a training config") if trained.is_file() else cfg.model_dump()
    for key in ("validation_prompt", "instance_prompt"):
        if source.get(key):
            return [source[key]]
    raise NullBoothError("generate: expected at least one prompt, got none; pass --prompt TEXT (repeatable), "
                         "--prompts FILE or set generate.prompts")


@torch.no_grad()
def sample(pipe, prompt: str, seeds: Sequence[int], size: int, steps: int, guidance: float) -> list[Image.Image]:
    generators = [torch.Generator(device=pipe.unet.device).manual_seed(s) for s in seeds]
    return pipe([prompt] * len(seeds), height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                generator=generators).images


def generate(cfg: Config, *, pipe=None) -> list[Path]:
    """Sample every prompt with every seed; one grid PNG per prompt (and base-vs-personalised comparisons)."""
    from .models import load_pipeline

    g = cfg.generate
    adapter_dir = Path(g.adapter or cfg.output_dir)
    out_dir = Path(g.out_dir or adapter_dir / "samples")
    prompts = resolve_prompts(cfg, adapter_dir)
    if pipe is None:
        pipe = load_pipeline(cfg.pretrained_model_name_or_path,
                             device="cuda" if torch.cuda.is_available() else "cpu")
    size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    base = [sample(pipe, p, g.seeds, size, g.num_inference_steps, g.guidance_scale) for p in prompts] \
        if g.compare_base else []
    kind = load_personalization(pipe, adapter_dir, cfg.perfusion)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        images = sample(pipe, prompt, g.seeds, size, g.num_inference_steps, g.guidance_scale)
        path = out_dir / f"{i:02d}_{_slug(prompt)}.png"
        image_grid(images).save(path)
        written.append(path)
        if g.compare_base:
            picture = captioned_rows([("base", base[i]), (kind, images)], title=prompt)
            path = out_dir / f"{i:02d}_{_slug(prompt)}_compare.png"
            picture.save(path)
            written.append(path)
    return written


# --------------------------------------------------------------------------- CLI


GENERATE_FLAGS = {"model": "pretrained_model_name_or_path", "seed": "seed", "adapter": "generate.adapter",
                  "prompt": "generate.prompts", "prompts": "generate.prompts_file", "seeds": "generate.seeds",
                  "steps": "generate.num_inference_steps", "guidance": "generate.guidance_scale",
                  "out": "generate.out_dir", "compare_base": "generate.compare_base",
                  "concept": "perfusion.concepts", "beta": "perfusion.eval_beta", "tau": "perfusion.eval_tau"}


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from .cli import _overrides

    if not args.compare_base:
        args.compare_base = None  # leave the config's value alone unless the flag is given
    cfg = load_config(args.config, _overrides(args, GENERATE_FLAGS))
    for path in generate(cfg):
        print(path)
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` verb to ``nullbooth``'s sub-parsers."""
    from .cli import _common

    p = subparsers.add_parser("generate", help="sample the base model + a trained adapter into image grids")
    _common(p)
    p.add_argument("--adapter", help="a training output_dir (nullbooth adapter, dreambooth unet/ or diffusers LoRA)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds, e.g. 0,1,2,3")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--out", help="output folder (default <adapter>/samples)")
    p.add_argument("--compare-base", dest="compare_base", action="store_true",
                   help="also sample the base model and write both side by side")
    p.add_argument("--concept", action="append", help="another Perfusion concept file (repeatable: several concepts)")
    p.add_argument("--beta", type=float, help="Perfusion gate bias β at inference (lower: more of the concept)")
    p.add_argument("--tau", type=float, help="Perfusion gate temperature τ at inference")
    p.set_defaults(func=cmd_generate)
    return p
