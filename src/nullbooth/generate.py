"""``nullbooth generate``: the base model plus a trained personalisation, prompts × seeds → image grids.

What a training ``output_dir`` holds decides how it is loaded: a nullbooth adapter
(``nullbooth_adapter_config.json`` + ``nullbooth_adapter.safetensors``) is injected exactly; a dreambooth
``unet/`` folder replaces the UNet; a diffusers LoRA (``pytorch_lora_weights.safetensors``, ours or
anyone's) goes through plain ``pipe.load_lora_weights``; Perfusion concept files (with ``--concept``
for more, ``--beta``/``--tau`` for the gate) are attached by :mod:`nullbooth.methods.perfusion.method`. ``compare_base`` samples the base model
first with the same seeds and writes both rows into one captioned picture.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

from nullbooth.config import Config, PerfusionBlock
from nullbooth.errors import NullBoothError
from nullbooth.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_WEIGHTS, TRAIN_CONFIG
from nullbooth.io import read_json
from nullbooth.methods.adapter_files import load_adapter
from nullbooth.methods.perfusion.method import load_perfusion_personalization
from nullbooth.models import load_pipeline
from nullbooth.prompts import read_prompt_file
from nullbooth.report.grids import captioned_rows, image_grid
from nullbooth.sampling import sample


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
    trained = adapter_dir / TRAIN_CONFIG
    source = read_json(trained, "a training config") if trained.is_file() else cfg.model_dump()
    for key in ("validation_prompt", "instance_prompt"):
        if source.get(key):
            return [source[key]]
    raise NullBoothError("generate: expected at least one prompt, got none; pass --prompt TEXT (repeatable), "
                         "--prompts FILE or set generate.prompts")


def _row(pipe, prompt: str, cfg: Config) -> list[Image.Image]:
    """``prompt`` with every seed of ``generate.seeds`` (one pipeline call)."""
    g = cfg.generate
    return sample(pipe, [prompt] * len(g.seeds), g.seeds, steps=g.num_inference_steps, guidance=g.guidance_scale,
                  size=cfg.resolution, batch_size=None)


def generate(cfg: Config, *, pipe=None) -> list[Path]:
    """Sample every prompt with every seed; one grid PNG per prompt (and base-vs-personalised comparisons)."""

    g = cfg.generate
    adapter_dir = Path(g.adapter or cfg.output_dir)
    out_dir = Path(g.out_dir or adapter_dir / "samples")
    prompts = resolve_prompts(cfg, adapter_dir)
    if pipe is None:
        pipe = load_pipeline(cfg.pretrained_model_name_or_path,
                             device="cuda" if torch.cuda.is_available() else "cpu")
    base = [_row(pipe, p, cfg) for p in prompts] if g.compare_base else []
    kind = load_personalization(pipe, adapter_dir, cfg.perfusion)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        images = _row(pipe, prompt, cfg)
        path = out_dir / f"{i:02d}_{_slug(prompt)}.png"
        image_grid(images).save(path)
        written.append(path)
        if g.compare_base:
            picture = captioned_rows([("base", base[i]), (kind, images)], title=prompt)
            path = out_dir / f"{i:02d}_{_slug(prompt)}_compare.png"
            picture.save(path)
            written.append(path)
    return written
