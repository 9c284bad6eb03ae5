"""``nullbooth generate``: the base model, alone or with a trained personalisation, prompts × seeds → images + grids.

What a training ``output_dir`` holds decides how it is loaded: a nullbooth adapter
(``nullbooth_adapter_config.json`` + ``nullbooth_adapter.safetensors``) is injected exactly, with the text
encoders' LoRA (SDXL: both) from its LoRA file when they were trained; a dreambooth ``unet/`` folder replaces the UNet, and a
``text_encoder/`` folder beside it the text encoder; peft's OFT adapter folder ``oft/`` is injected with peft
(:func:`nullbooth.methods.oft.load_oft`); a diffusers LoRA (``pytorch_lora_weights.safetensors``, ours or
anyone's) goes through plain ``pipe.load_lora_weights``; Perfusion concept files (with ``--concept``
for more, ``--beta``/``--tau`` for the gate) are attached by :mod:`nullbooth.methods.perfusion.method`. Without
``generate.adapter``, ``output_dir`` is used when it holds a result, else the base model is sampled alone.
``compare_base`` samples the base model first with the same seeds and writes both rows into one captioned picture.

Prompts × seeds are flattened (prompt-major) into pipeline calls of ``generate.batch_size`` images, each image with
its own generator (:func:`nullbooth.sampling.sample`), so the batch size changes no image beyond float round-off.
``generate.scheduler`` swaps in any compatible diffusers scheduler, built from the model's scheduler config.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from nullbooth.conditioning import encoder_names
from nullbooth.config import Config, PerfusionBlock
from nullbooth.errors import NullBoothError
from nullbooth.filenames import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FULL_TEXT_ENCODER_DIR,
    FULL_UNET_DIR,
    GENERATE_IMAGES_DIR,
    LORA_WEIGHTS,
    OFT_DIR,
    TRAIN_CONFIG,
)
from nullbooth.io import read_json, write_image
from nullbooth.methods.adapter_files import load_adapter
from nullbooth.methods.lora_export import TEXT_ENCODER
from nullbooth.methods.oft import PEFT_CONFIG, PEFT_WEIGHTS, load_oft, oft_expectations, read_oft_config
from nullbooth.methods.perfusion.method import find_concept_files, load_perfusion_personalization
from nullbooth.models import check_pickled_weights, load_pipeline
from nullbooth.prompts import read_prompt_file
from nullbooth.report.grids import captioned_rows, image_grid
from nullbooth.sampling import (
    SEED_LIMIT,
    check_sampling_args,
    check_size,
    check_steps,
    prompt_seed_pairs,
    sample,
    scheduler_class,
    set_scheduler,
)

log = logging.getLogger(__name__)
SCHEDULER_KEY = "generate.scheduler (--scheduler)"
# diffusers / peft LoRA key suffixes → which side of ΔW = B A they hold: "A" is [r, in, …], "B" is [out, r, …].
_LORA_SIDES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora.down.weight": "A", ".lora.up.weight": "B"}


def find_personalization(path: str | Path, perfusion: PerfusionBlock | None = None) -> tuple[str | None, Path]:
    """What the training output at ``path`` holds, without loading it: ``("nullbooth" | "dreambooth" | "oft" | "lora",
    file or folder)``, or ``(None, path)`` when only Perfusion concept files can remain. ``"dreambooth"`` is any
    ``unet/`` folder (dreambooth's, or attn2_finetune's with its LoRA export beside it)."""
    path = Path(path)
    if not path.exists() and not (perfusion and perfusion.concepts):
        raise NullBoothError(f"adapter: expected a training output folder at {path}, found nothing; pass --adapter DIR "
                             "(the output_dir of `nullbooth train`)")
    folder = path if path.is_dir() else path.parent
    config = folder / ADAPTER_CONFIG
    if (folder / ADAPTER_WEIGHTS).is_file() and config.is_file() and \
            read_json(config, "an adapter config").get("format") == "nullbooth-adapter":
        return "nullbooth", folder
    if (folder / FULL_UNET_DIR / "config.json").is_file():
        return "dreambooth", folder / FULL_UNET_DIR
    if (folder / OFT_DIR / PEFT_CONFIG).is_file():
        return "oft", folder / OFT_DIR
    lora = path if path.is_file() and path.suffix == ".safetensors" else folder / LORA_WEIGHTS
    if lora.is_file():
        return "lora", lora
    return None, path


def trained_on(folder: Path) -> str | None:
    """The base model a training output records (its ``train_config.json`` or adapter config), if any."""
    for name in (TRAIN_CONFIG, ADAPTER_CONFIG):
        if (folder / name).is_file():
            recorded = read_json(folder / name, f"a training config ({name})").get("pretrained_model_name_or_path")
            if recorded:
                return str(recorded)
    return None


def trained_method(path: str | Path) -> str | None:
    """The method the training output at ``path`` (its folder, or a file in it) records in ``train_config.json``, if
    any: a whole ``unet/`` may be dreambooth's or nullbooth's with ``scope: unet``."""
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / TRAIN_CONFIG
    return read_json(config, "a training config").get("method") if config.is_file() else None


def _header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from safetensors headers (nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as fh:
                shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
        except (SafetensorError, OSError) as err:
            raise NullBoothError(f"adapter: {file} is not a readable safetensors file ({err}); it is corrupt or "
                                 "foreign — copy it again from the training output") from None
    return shapes


def _lora_expectations(pipe, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...] | None]:
    """For every peft/diffusers-style LoRA tensor, the shape ``pipe`` needs (``None``: no such layer in ``pipe``).
    Keys of other layouts (kohya, attention processors) are left to diffusers."""
    parts = {"unet": pipe.unet, **{name: getattr(pipe, name) for name in encoder_names(pipe)}}
    out: dict[str, tuple[int, ...] | None] = {}
    for key, shape in shapes.items():
        prefix, _, rest = key.partition(".")
        side = next((_LORA_SIDES[s] for s in _LORA_SIDES if rest.endswith(s)), None)
        if prefix not in parts or side is None or ".processor." in rest:
            continue
        module_path = rest[: -len(next(s for s in _LORA_SIDES if rest.endswith(s)))]
        if prefix != "unet" and not hasattr(parts[prefix], "text_model"):
            module_path = module_path.removeprefix("text_model.")  # transformers ≥ 5 flattens CLIPTextModel
        try:
            weight = parts[prefix].get_submodule(module_path).weight
        except AttributeError:
            out[key] = None
            continue
        dims = tuple(weight.shape)  # [out, in, …]
        out[key] = (shape[0], dims[1], *dims[2:]) if side == "A" else (dims[0], shape[1], *dims[2:])
    return out


def _adapter_expectations(pipe, config: dict) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...] | None]]:
    """The ``[out, in]`` weight each nullbooth adapter target was trained on, and what ``pipe``'s UNet has there."""
    got, need = {}, {}
    for target, spec in (config.get("targets") or {}).items():
        key = f"{target}.weight"
        got[key] = (int(spec.get("out_features", -1)), int(spec.get("in_features", -1)))
        try:
            need[key] = tuple(pipe.unet.get_submodule(target).weight.shape)
        except AttributeError:
            need[key] = None
    return got, need


def _full_expectations(model, where: Path, loader: str) -> tuple[dict[str, tuple[int, ...]],
                                                                  dict[str, tuple[int, ...] | None]]:
    """The tensor shapes of a saved whole model (``unet/``, ``text_encoder/``) and what ``model`` has under those
    names (``None``: nothing). ``text_model.`` is dropped on both sides: transformers ≥ 5 flattens CLIPTextModel
    and its loader maps either spelling."""
    check_pickled_weights(where, loader)
    got = {k.removeprefix("text_model."): v for k, v in _header_shapes(sorted(where.glob("*.safetensors"))).items()}
    need: dict[str, tuple[int, ...] | None] = {k.removeprefix("text_model."): tuple(v.shape)
                                               for k, v in model.state_dict().items()}
    need.update({k: None for k in got if k not in need})
    return got, need


def _trains_encoder(folder: Path) -> bool:
    """Whether the nullbooth adapter in ``folder`` was trained with the text encoder's LoRA (in its LoRA file)."""
    return bool(read_json(folder / ADAPTER_CONFIG, "an adapter config").get("train_text_encoder"))


def check_fits(pipe, kind: str | None, where: Path, model: str) -> None:
    """Refuse, before anything is loaded, an adapter, dreambooth UNet (and text encoder), OFT or LoRA whose tensors do
    not fit ``pipe``: one line naming the first tensor, the shape this model needs, the shape it has, and the model it
    was trained on."""
    if kind == "nullbooth":
        got, need = _adapter_expectations(pipe, read_json(where / ADAPTER_CONFIG, "an adapter config"))
        if _trains_encoder(where):
            shapes = {k: v for k, v in _header_shapes([where / LORA_WEIGHTS]).items() if k.startswith(TEXT_ENCODER)}
            got.update(shapes)
            need.update(_lora_expectations(pipe, shapes))
    elif kind == "dreambooth":
        got, need = _full_expectations(pipe.unet, where, "UNet2DConditionModel")
        encoder = where.parent / FULL_TEXT_ENCODER_DIR
        if encoder.is_dir():
            te_got, te_need = _full_expectations(pipe.text_encoder, encoder, type(pipe.text_encoder).__name__)
            got.update({f"{TEXT_ENCODER}.{k}": v for k, v in te_got.items()})
            need.update({f"{TEXT_ENCODER}.{k}": v for k, v in te_need.items()})
    elif kind == "oft":
        read_oft_config(where)  # a foreign config is refused before any image is drawn
        got, need = oft_expectations(pipe.unet, _header_shapes([where / PEFT_WEIGHTS]))
    elif kind == "lora":
        got = _header_shapes([where])
        need = _lora_expectations(pipe, got)
    else:
        return
    bad = sorted((k for k in need if k in got and need[k] != got[k]), key=lambda k: need[k] is None)
    if not bad:
        return
    key, base = bad[0], trained_on(where if kind == "nullbooth" else where.parent)
    first = (f"tensor {key} has shape {list(got[key])}, this model has no such layer" if need[key] is None else
             f"tensor {key} has shape {list(got[key])}, this model needs {list(need[key])}")
    fix = f"use it with {base} (generate --model, evaluate --base)" if base else "use it with the model it was trained on"
    raise NullBoothError(
        f"adapter: {where} does not fit {model}: {first} ({len(bad)} tensor(s) differ); this adapter was trained on "
        f"{base or 'another model'}, not {model}; {fix}, or an adapter trained on {model}"
    )


def load_personalization(pipe, path: str | Path, perfusion: PerfusionBlock | None = None,
                         model: str | None = None) -> str:
    """Apply the trained result in ``path`` to ``pipe`` in place; returns what it was
    (nullbooth / dreambooth / oft / lora / perfusion). ``perfusion`` carries the gate overrides and extra concept files;
    ``model`` names the base in errors (default: the folder ``pipe`` was loaded from)."""
    path = Path(path)
    perfusion = perfusion or PerfusionBlock()
    kind, where = find_personalization(path, perfusion)
    check_fits(pipe, kind, where, model or getattr(pipe, "name_or_path", None) or "this model")
    if kind == "nullbooth":
        load_adapter(pipe.unet, where)
        if _trains_encoder(where):
            _load_encoder_lora(pipe, where / LORA_WEIGHTS)
        return "nullbooth"
    if kind == "dreambooth":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(where, dtype=pipe.unet.dtype, use_safetensors=True)
        pipe.unet = unet.to(pipe.unet.device)
        encoder = where.parent / FULL_TEXT_ENCODER_DIR
        if encoder.is_dir():  # train_text_encoder: the whole fine-tuned encoder
            old = pipe.text_encoder
            pipe.text_encoder = type(old).from_pretrained(encoder, use_safetensors=True).to(old.device, old.dtype)
        return "dreambooth"
    if kind == "oft":
        load_oft(pipe.unet, where)
        return "oft"
    if kind == "lora":
        pipe.load_lora_weights(str(where.parent), weight_name=where.name, use_safetensors=True)
        return "lora"
    if load_perfusion_personalization(pipe, path, perfusion) is not None:  # concept files here and/or --concept
        return "perfusion"
    raise NullBoothError(
        f"adapter: {path} holds no nullbooth adapter ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}), no dreambooth unet/ "
        f"folder, no peft OFT folder ({OFT_DIR}/), no diffusers LoRA ({LORA_WEIGHTS}) and no Perfusion concept file; point --adapter at a training "
        "output_dir"
    )


def _load_encoder_lora(pipe, file: Path) -> None:
    """The ``text_encoder.`` (and SDXL's ``text_encoder_2.``) parts of a diffusers LoRA file into the pipeline's text
    encoders, through diffusers' own loader (the UNet part is nullbooth's exact adapter, already injected)."""
    if not file.is_file():
        raise NullBoothError(f"adapter: the nullbooth adapter in {file.parent} was trained with train_text_encoder and "
                             f"its text-encoder LoRA lives in {file.name}, which is missing; copy the whole training "
                             "output_dir")
    state, alphas = pipe.lora_state_dict(str(file.parent), weight_name=file.name, use_safetensors=True)
    # No metadata needed: rank from the shapes, α = r (scale 1) is what diffusers assumes without alphas.
    for name in encoder_names(pipe):
        part = {k: v for k, v in state.items() if k.startswith(f"{name}.")}
        if part:
            pipe.load_lora_into_text_encoder(part, alphas, getattr(pipe, name), prefix=name, _pipeline=pipe)


def check_output_dir(path: Path, what: str) -> None:
    """Refuse, before any work, an output folder that is a file or lies where nothing can be written."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise NullBoothError(f"{what}: expected a folder at {path}, found a file; choose another folder (or move the "
                             "file away)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise NullBoothError(f"{what}: cannot create {path} because {existing} is a file, not a folder; choose "
                             "another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NullBoothError(f"{what}: cannot write into {existing} (permission denied or read-only); choose a folder "
                             "you can write to, or fix its permissions")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def resolve_prompts(cfg: Config, folder: Path | None) -> list[str]:
    """``generate.prompts`` + ``generate.prompts_file``; default: the validation or instance prompt of the training
    run in ``folder`` (``None``: of ``cfg``)."""
    g = cfg.generate
    prompts = list(g.prompts) + (read_prompt_file(g.prompts_file, "generate.prompts_file") if g.prompts_file else [])
    if prompts:
        return prompts
    trained = folder / TRAIN_CONFIG if folder is not None else None
    source = read_json(trained, "a training config") if trained and trained.is_file() else cfg.model_dump()
    for key in ("validation_prompt", "instance_prompt"):
        if source.get(key):
            return [source[key]]
    subject_prompts = [s["instance_prompt"] for s in source.get("subjects") or [] if s.get("instance_prompt")]
    if subject_prompts:  # several subjects: one prompt each
        return subject_prompts
    raise NullBoothError("generate: expected at least one prompt, got none; pass --prompt TEXT (repeatable), "
                         "--prompts FILE or set generate.prompts")


def resolve_seeds(cfg: Config) -> list[int]:
    """``generate.seeds``, or with ``generate.num_images_per_prompt = K`` (which replaces them) ``seed, seed+1, …,
    seed+K-1``: ``--num-images-per-prompt 3 --seed 5`` draws exactly what ``--seeds 5,6,7`` draws."""
    k = cfg.generate.num_images_per_prompt
    if k is None:
        return list(cfg.generate.seeds)
    if not 0 <= cfg.seed <= SEED_LIMIT - k:
        raise NullBoothError(f"generate: --num-images-per-prompt {k} uses seeds seed … seed+{k - 1}, which must lie "
                             f"in [0, 2**63); got seed {cfg.seed}; pass a --seed ≥ 0")
    return list(range(cfg.seed, cfg.seed + k))


def find_source(cfg: Config) -> Path | None:
    """Where the personalisation comes from: ``generate.adapter``; else ``output_dir`` when it holds a training
    result (or ``perfusion.concepts`` are given); ``None``: the base model alone."""
    g = cfg.generate
    folder = Path(g.adapter or cfg.output_dir)
    if g.adapter or cfg.perfusion.concepts:
        return folder
    if folder.exists() and (find_personalization(folder)[0] or find_concept_files(folder)):
        return folder
    return None


class _Names:
    """The files of one ``generate`` run: ``<out>/<i>_<slug>.png`` grids, ``<out>/images/<i>_<slug>_seed<s>.png``."""

    def __init__(self, out_dir: Path, prompts: list[str]):
        width = max(2, len(str(len(prompts) - 1)))  # 00…99, then 000…: names sort in prompt order
        self.out_dir, self.stems = out_dir, [f"{i:0{width}d}_{_slug(p)}" for i, p in enumerate(prompts)]

    def grid(self, i: int, suffix: str = "") -> Path:
        return self.out_dir / f"{self.stems[i]}{suffix}.png"

    def image(self, i: int, seed: int, suffix: str = "") -> Path:
        return self.out_dir / GENERATE_IMAGES_DIR / f"{self.stems[i]}_seed{seed}{suffix}.png"


def _sample_chunk(pipe, prompts: list[str], seeds: list[int], cfg: Config, size: int) -> list[Image.Image]:
    """One pipeline call; running out of GPU memory is a one-line error that names ``--batch-size``."""
    g = cfg.generate
    try:
        return sample(pipe, prompts, seeds, steps=g.num_inference_steps, guidance=g.guidance_scale, size=size,
                      batch_size=None)
    except torch.OutOfMemoryError:
        raise NullBoothError(f"generate: out of GPU memory drawing {len(prompts)} images of {size}×{size} in one "
                             f"pipeline call; lower generate.batch_size (--batch-size, now {g.batch_size}); the "
                             "images written so far are kept") from None


def _rows(pipe, prompts: list[str], seeds: list[int], cfg: Config, size: int, names: _Names,
          suffix: str = "") -> Iterator[tuple[int, list[Image.Image]]]:
    """Every prompt × every seed in pipeline calls of ``generate.batch_size`` images (image ``k`` with its own
    generator, :func:`nullbooth.sampling.sample`), each saved as it comes; yields ``(prompt index, its images in seed
    order)`` as soon as a prompt's row is complete."""
    flat_prompts, flat_seeds = prompt_seed_pairs(prompts, seeds)
    index = [i for i in range(len(prompts)) for _ in seeds]
    batch, row = cfg.generate.batch_size, []
    for start in range(0, len(flat_prompts), batch):
        chunk = slice(start, start + batch)
        images = _sample_chunk(pipe, flat_prompts[chunk], flat_seeds[chunk], cfg, size)
        for i, seed, image in zip(index[chunk], flat_seeds[chunk], images, strict=True):
            write_image(names.image(i, seed, suffix), image)
            row.append(image)
            if len(row) == len(seeds):
                yield i, row
                row = []


def generate(cfg: Config, *, pipe=None) -> list[Path]:
    """Sample every prompt with every seed from the base model, alone or with the trained personalisation.

    Writes ``<out>/images/<i>_<slug>_seed<seed>.png`` for every image (``…_base.png``: the base model's, with
    ``compare_base``), a grid ``<out>/<i>_<slug>.png`` per prompt (one column per seed) and with ``compare_base``
    ``<out>/<i>_<slug>_compare.png``; returns the grids and comparisons. A ``pipe`` passed in keeps a loaded
    personalisation; its scheduler is put back.
    """
    g = cfg.generate
    source = find_source(cfg)
    out_dir = Path(g.out_dir or Path(source or cfg.output_dir) / "samples")
    check_output_dir(out_dir, "generate.out_dir (--out)")
    prompts, seeds = resolve_prompts(cfg, source), resolve_seeds(cfg)
    check_sampling_args(seeds=seeds, steps=g.num_inference_steps, guidance=g.guidance_scale, size=cfg.resolution,
                        who="generate")
    if g.scheduler:
        scheduler_class(g.scheduler, SCHEDULER_KEY)  # a typo is refused before any model is loaded
    if source is None and g.compare_base:
        raise NullBoothError(f"generate.compare_base (--compare-base): expected a trained result to compare with the "
                             f"base model, got none (no --adapter, and {cfg.output_dir} holds none); pass --adapter "
                             "DIR, or leave --compare-base out to sample the base model alone")
    kind, where = find_personalization(source, cfg.perfusion) if source else (None, out_dir)
    if pipe is None:
        pipe = load_pipeline(cfg.pretrained_model_name_or_path, device="auto")
    scheduler = pipe.scheduler
    try:
        if g.scheduler:
            set_scheduler(pipe, g.scheduler, SCHEDULER_KEY)
        size = check_size(pipe, cfg.resolution, "resolution")
        check_steps(pipe, g.num_inference_steps, "generate.num_inference_steps (--steps)")
        check_fits(pipe, kind, where, cfg.pretrained_model_name_or_path)  # before the base rows are drawn
        return _draw(pipe, cfg, source, prompts, seeds, size, _Names(out_dir, prompts))
    finally:
        pipe.scheduler = scheduler


def _draw(pipe, cfg: Config, source: Path | None, prompts: list[str], seeds: list[int], size: int,
          names: _Names) -> list[Path]:
    """The sampling half of :func:`generate`, once everything is checked."""
    (names.out_dir / GENERATE_IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    compare = cfg.generate.compare_base
    if compare:  # the base model's images go to disk first; the comparisons read them back (PNG is lossless)
        for _ in _rows(pipe, prompts, seeds, cfg, size, names, "_base"):
            pass
    if source is None:
        log.info("generate: no --adapter given and %s holds no training result: sampling %s alone", cfg.output_dir,
                 cfg.pretrained_model_name_or_path)
        kind = "base"
    else:
        kind = load_personalization(pipe, source, cfg.perfusion, cfg.pretrained_model_name_or_path)
        kind = trained_method(source) or kind
    written = []
    for i, images in _rows(pipe, prompts, seeds, cfg, size, names):
        write_image(names.grid(i), image_grid(images))
        written.append(names.grid(i))
        if compare:
            base = [Image.open(names.image(i, s, "_base")).convert("RGB") for s in seeds]
            write_image(names.grid(i, "_compare"), captioned_rows([("base", base), (kind, images)], title=prompts[i]))
            written.append(names.grid(i, "_compare"))
    return written
