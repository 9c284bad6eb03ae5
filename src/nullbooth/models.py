"""Load a diffusers Stable Diffusion (1.x, 2.x, XL) pipeline: a built-in small model, a local folder or a hub id.

Built-in models are built in code from a fixed seed with the real CLIP tokenizer, written once to
``$NULLBOOTH_CACHE`` (default ``~/.cache/nullbooth``) and then loaded through plain
``DiffusionPipeline.from_pretrained`` like any other folder.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nullbooth.errors import NullBoothError
from nullbooth.filenames import BUNDLED_MODELS, MODEL_INDEX
from nullbooth.stats.capture import is_cross_attention

CLIP_VOCAB_SIZE = 49408
# The pipeline families nullbooth personalises, with the components each needs: Stable Diffusion 1.x / 2.x (one
# CLIP text encoder) and SDXL (two, their encodings concatenated for attn2). SD3 and Flux (transformers without
# attn2 cross-attention instead of a UNet) are not supported.
SD_PIPELINE, SDXL_PIPELINE = "StableDiffusionPipeline", "StableDiffusionXLPipeline"
REQUIRED_COMPONENTS: dict[str, tuple[str, ...]] = {
    SD_PIPELINE: ("unet", "text_encoder", "tokenizer", "vae", "scheduler"),
    SDXL_PIPELINE: ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"),
}
SUPPORTED_PIPELINES = tuple(REQUIRED_COMPONENTS)
SUPPORTED_FAMILIES = "Stable Diffusion 1.x / 2.x and SDXL (StableDiffusionPipeline, StableDiffusionXLPipeline)"
# Weight files written by torch.save: loading one unpickles it, which can run any code the file carries.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TinyXL:
    """What turns a :class:`TinyArch` into an SDXL-architecture pipeline (diffusers' ``StableDiffusionXLPipeline``).

    SDXL (Podell et al. 2023, §2.1–2.2) conditions on two CLIP encoders, their penultimate hidden states
    concatenated (cross-attention width = ``TinyArch.text_hidden + text_hidden_2``), and adds to the timestep
    embedding the second encoder's pooled projection and six Fourier-embedded sizes (original size, crop corner,
    target size: "micro-conditioning"), so ``projection_class_embeddings_input_dim = 6 · time_embed_dim +
    projection_dim``.
    """

    text_hidden_2: int = 64
    text_layers_2: int = 2
    text_heads_2: int = 4
    projection_dim: int = 32  # the pooled text_embeds width (SDXL: 1280)
    time_embed_dim: int = 8  # addition_time_embed_dim (SDXL: 256)
    # Transformer blocks per UNet level (SDXL: [1, 2, 10]; level 0 carries no attention, its entry is unused).
    transformer_layers: tuple[int, ...] = (1, 1, 2)


@dataclass(frozen=True)
class TinyArch:
    """Architecture of a small SD-style pipeline (text width, UNet widths, VAE widths, noise schedule)."""

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8  # diffusers' UNet2DConditionModel reads this as the number of heads
    use_linear_projection: bool = False
    vae_channels: tuple[int, ...] = (32, 64)
    latent_size: int = 32
    latent_channels: int = 4
    seed: int = 0
    # GroupNorm groups of UNet and VAE (None: min(first width, 32), diffusers' usual). One channel per group
    # normalises away each channel's spatial mean — exactly what encodes a flat colour — so the world model's
    # VAE could not reproduce colours with it (measured: every reconstruction came out brownish).
    norm_groups: int | None = None
    # "sd": SD 1.x scaled-linear betas 0.00085–0.012, "leading" spacing, ε-prediction. SD's schedule leaves
    # ᾱ_T = 0.0047 at t = 999; on a small latent the layout stays readable at that noise level, so a model
    # trained on it takes position and shape from the residual signal instead of the text and draws random
    # layouts from pure noise (measured on the first world model: shape 20 % from pure noise against 42 % when
    # started at t = 800). "zero-snr": the same betas rescaled to ᾱ_T = 0 with v-prediction and "trailing"
    # spacing (Lin et al. 2024, §3.1–3.3). "ddpm": linear betas 1e-4–0.02 (Ho et al. 2020), "trailing" — tried
    # for the world model and dropped: on an 8×8 latent ᾱ falls below 0.01 by t ≈ 650, so a third of the
    # training timesteps carry no content (the model ignored colour words after 2,500 steps: colour 32 %).
    schedule: str = "sd"
    # UNet levels (0 = full latent resolution) whose blocks carry cross-attention; None: all but the deepest,
    # the SD 1.x layout. Attention at 16×16 cost 40 % of a world-model training step (self-attention over 256
    # positions, cross-attention to 77 tokens) for little: the layout is decided at 8×8 and 4×4.
    attention_levels: tuple[int, ...] | None = None
    # None: an SD 1.x/2.x pipeline; set: an SDXL one (second text encoder, micro-conditioning, Euler sampler).
    xl: TinyXL | None = None


# The shapes world's model (scripts/train_world_model.py writes the trained weights shipped in data/models/tiny-sd,
# which take precedence over this seeded init): 64×64 images, VAE factor 4 → 16×16×4 latents (factor 8 left a
# small shape ~1 latent pixel: colour 49 %, shape at chance after an hour), cross-attention at 8×8 and 4×4, SD's
# schedule (zero-terminal-SNR v-prediction learned colours 5× slower in the same 25 minutes: 15 % vs 75 %).
# Eight latent channels: the general VAE must carry any colour and texture, and with four the 6-minute probe
# reached a median PSNR of 25.2 dB on held-out random subjects (the gate asks 28).
WORLD_ARCH = TinyArch(
    text_hidden=128, text_layers=4, text_heads=4, unet_channels=(32, 64, 64), layers_per_block=1,
    attention_head_dim=2, vae_channels=(16, 32, 64), latent_size=16, latent_channels=8, norm_groups=8, schedule="sd",
    attention_levels=(1, 2),
)

BUILTIN_MODELS: dict[str, TinyArch] = {
    # The default: SD 1.x layout (conv proj-in), CLIP text width 128.
    "tiny-sd": WORLD_ARCH,
    # An SD 2.x-like layout (linear proj-in, three levels) for users and tests that need a second architecture.
    "tiny-sd2": TinyArch(
        text_hidden=96, text_layers=2, text_heads=4, unet_channels=(16, 32, 32),
        layers_per_block=2, attention_head_dim=4, use_linear_projection=True,
        vae_channels=(16, 32), latent_size=16, seed=1,
    ),
    # SDXL's layout in small: no attention at the top level, linear proj-in, more transformer blocks deeper down,
    # two text encoders (widths 32 + 64 → attn2 keys 96 wide), 64×64 images (VAE factor 4, 16×16 latents).
    "tiny-sdxl": TinyArch(
        text_hidden=32, text_layers=2, text_heads=2, unet_channels=(32, 64, 64), layers_per_block=1,
        attention_head_dim=4, use_linear_projection=True, vae_channels=(16, 32, 64), latent_size=16,
        norm_groups=8, schedule="sdxl", attention_levels=(1, 2), seed=2, xl=TinyXL(),
    ),
}
DEFAULT_MODEL = "tiny-sd"


def _clip_bpe_path() -> Path:
    """The CLIP BPE merges file shipped inside ``open_clip_torch`` (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise NullBoothError(
            "building a built-in model needs the CLIP BPE vocabulary from open_clip_torch, which is not installed; "
            "fix: pip install --no-deps open_clip_torch"
        )
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise NullBoothError(f"expected the CLIP BPE file at {path}, found nothing; reinstall open_clip_torch")
    return path


def _byte_alphabet() -> list[str]:
    """CLIP's reversible byte→unicode map: printable bytes keep their character, the rest move above U+00FF."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def build_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The CLIP tokenizer (vocab 49408; ids identical to ``openai/clip-vit-large-patch14``).

    SD pads with ``<|endoftext|>`` (id 49407); SDXL's second tokenizer pads with ``"!"`` (id 0), as diffusers
    builds it for the OpenCLIP ViT-bigG encoder (``CLIPTokenizer.from_pretrained(…bigG…, pad_token="!")`` in its
    single-file conversion), so padded positions carry other encodings in the second encoder.
    """
    from transformers import CLIPTokenizer

    lines = gzip.open(_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77,
                         pad_token=pad_token)


def _clip_text_config(hidden: int, layers: int, heads: int, **extra: Any):
    """A CLIP text-encoder config of the given size with CLIP's vocabulary and special-token ids."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 4,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **extra)


def _tiny_unet(arch: TinyArch):
    """The UNet of :func:`build_tiny_pipeline`: SD's layout, or SDXL's (``text_time`` micro-conditioning) with ``xl``."""
    from diffusers import UNet2DConditionModel

    levels = len(arch.unet_channels)
    attn = set(range(levels - 1) if arch.attention_levels is None else arch.attention_levels)
    if not attn <= set(range(levels)):
        raise NullBoothError(f"TinyArch.attention_levels: expected levels in 0..{levels - 1}, got {arch.attention_levels}")
    xl: dict[str, Any] = {}
    if arch.xl is not None:
        if len(arch.xl.transformer_layers) != levels:
            raise NullBoothError(f"TinyXL.transformer_layers: expected one count per UNet level ({levels}), got "
                                 f"{arch.xl.transformer_layers}")
        xl = dict(addition_embed_type="text_time", addition_time_embed_dim=arch.xl.time_embed_dim,
                  projection_class_embeddings_input_dim=6 * arch.xl.time_embed_dim + arch.xl.projection_dim,
                  transformer_layers_per_block=arch.xl.transformer_layers)
    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels)),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(levels))),
        cross_attention_dim=arch.text_hidden + (arch.xl.text_hidden_2 if arch.xl is not None else 0),
        attention_head_dim=arch.attention_head_dim,
        use_linear_projection=arch.use_linear_projection,
        norm_num_groups=arch.norm_groups or min(arch.unet_channels[0], 32),
        **xl,
    )


def _tiny_scheduler(schedule: str):
    """The noise schedule named by ``TinyArch.schedule`` (see there); "sdxl" is SDXL's Euler sampler on SD's betas."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading")
    if schedule == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json
        return EulerDiscreteScheduler(**sd, steps_offset=1, prediction_type="epsilon", interpolation_type="linear",
                                      use_karras_sigmas=False)
    betas = {"sd": sd,
             "ddpm": dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", timestep_spacing="trailing"),
             "zero-snr": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")}
    if schedule not in betas:
        raise NullBoothError(f"TinyArch.schedule: expected one of {sorted(betas) + ['sdxl']}, got {schedule!r}")
    # steps_offset stays 1 with "trailing" too: trailing ignores it, and diffusers warns about any other value.
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **betas[schedule])


def build_tiny_pipeline(arch: TinyArch = TinyArch(), tokenizer=None):
    """A randomly initialised (seeded) Stable Diffusion pipeline small enough for CPU tests; SDXL when ``arch.xl``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tokenizer if tokenizer is not None else build_clip_tokenizer()
    scheduler = _tiny_scheduler(arch.schedule)
    torch.manual_seed(arch.seed)  # the order below (UNet, VAE, text encoders) fixes every built-in model's weights
    unet = _tiny_unet(arch)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=arch.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels),
        latent_channels=arch.latent_channels,
        norm_num_groups=arch.norm_groups or min(arch.vae_channels[0], 32),
        sample_size=arch.latent_size * 2 ** (len(arch.vae_channels) - 1),
        **({"scaling_factor": 0.13025} if arch.xl is not None else {}),  # SDXL's VAE latent scale
    )
    text_encoder = CLIPTextModel(_clip_text_config(arch.text_hidden, arch.text_layers, arch.text_heads))
    if arch.xl is None:
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    # SDXL's second encoder is OpenCLIP ViT-bigG: GELU (not CLIP-L's quick GELU) and a projection for the pooled output.
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(
        arch.xl.text_hidden_2, arch.xl.text_layers_2, arch.xl.text_heads_2, hidden_act="gelu",
        projection_dim=arch.xl.projection_dim))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def cache_dir() -> Path:
    return Path(os.environ.get("NULLBOOTH_CACHE", Path.home() / ".cache" / "nullbooth"))


def materialize_builtin(name: str) -> Path:
    """Write built-in model ``name`` to a diffusers folder (once) and return the folder."""
    shipped = BUNDLED_MODELS / name
    if (shipped / MODEL_INDEX).is_file():
        return shipped
    arch = BUILTIN_MODELS[name]
    key = hashlib.sha256(repr(arch).encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{name}-{key}"
    if (folder / MODEL_INDEX).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        build_tiny_pipeline(arch).save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        # Another process finished first; its folder is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / MODEL_INDEX).is_file():
            raise
    return folder


def resolve_model_path(name_or_path: str) -> str:
    """Map a built-in short name (``tiny-sd``, ``nullbooth/tiny-sd``) to its folder; leave paths and hub ids alone."""
    short = name_or_path.removeprefix("nullbooth/")
    if short in BUILTIN_MODELS or short == "default":
        return str(materialize_builtin(DEFAULT_MODEL if short == "default" else short))
    return name_or_path


def _model_index(folder: Path) -> dict[str, Any]:
    """``model_index.json`` of a local diffusers folder, refused when missing or unreadable."""
    index = folder / MODEL_INDEX
    if not index.is_file():
        raise NullBoothError(
            f"expected a diffusers model folder with model_index.json at {folder}, found none; point "
            "pretrained_model_name_or_path at a folder written by save_pretrained, a hub id, or 'tiny-sd'"
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NullBoothError(f"{index} is not valid JSON ({err}); the model folder is corrupt — save it again with "
                             "save_pretrained or download it again") from None
    if not isinstance(data, dict):
        raise NullBoothError(f"expected a JSON object in {index}, got {type(data).__name__}; the folder is corrupt")
    return data


def check_pickled_weights(where: Path, loader: str = "its diffusers/transformers class") -> None:
    """Refuse a model (sub)folder whose weights exist only as ``torch.save`` pickles: nullbooth loads safetensors only."""
    if not where.is_dir() or any(where.glob("*.safetensors")):
        return
    pickled = sorted(p for p in where.iterdir() if p.suffix in PICKLED_WEIGHTS)
    if pickled:
        raise NullBoothError(
            f"refusing to load {pickled[0]}: it is a torch.save pickle, which can run arbitrary code when loaded, and "
            "nullbooth loads only .safetensors weights; convert it once, in an environment you trust: "
            f"{loader}.from_pretrained('{where}', use_safetensors=False).save_pretrained('{where}', "
            "safe_serialization=True)"
        )


def _unsupported(what: str) -> NullBoothError:
    return NullBoothError(
        f"{what}; nullbooth supports {SUPPORTED_FAMILIES}, whose UNets steer images through attn2 cross-attention — "
        "SD3, Flux and other transformer families are not supported; give e.g. 'tiny-sd', 'tiny-sdxl', "
        "runwayml/stable-diffusion-v1-5 or stabilityai/stable-diffusion-xl-base-1.0"
    )


def check_model_folder(folder: Path) -> str:
    """The pipeline class of a local folder, refused before loading when nullbooth cannot use it: no readable
    ``model_index.json``, a family other than SD 1.x/2.x/XL, a component it needs missing, or pickled weights."""
    index = _model_index(folder)
    family = index.get("_class_name")
    if family not in SUPPORTED_PIPELINES:
        raise _unsupported(f"{folder} holds a {family or 'pipeline of unknown class'} (model_index.json)")
    missing = [c for c in REQUIRED_COMPONENTS[family]
               if not (isinstance(index.get(c), list) and len(index[c]) == 2 and index[c][0] is not None)]
    if missing:
        raise NullBoothError(f"{folder} holds a {family} without {', '.join(missing)} (model_index.json lists no "
                             f"such component); a {family} needs {', '.join(REQUIRED_COMPONENTS[family])} — save "
                             "the whole pipeline with save_pretrained")
    for component, spec in index.items():
        if not component.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[0] is not None:
            check_pickled_weights(folder / component, str(spec[1]))
    return family


def _check_loaded(pipe, path: str) -> None:
    """A loaded pipeline must be SD 1.x/2.x/XL with every part nullbooth uses and an attn2 cross-attention."""
    family = type(pipe).__name__
    if family not in SUPPORTED_PIPELINES:
        raise _unsupported(f"'{path}' loads as a {family}")
    for required in REQUIRED_COMPONENTS[family]:
        if getattr(pipe, required, None) is None:
            raise NullBoothError(f"expected a {family} with a {required}, '{path}' has none; save the whole "
                                 "pipeline with save_pretrained")
    if not any(is_cross_attention(m) for m in pipe.unet.modules()):
        raise NullBoothError(
            f"the UNet of '{path}' has no cross-attention (attn2) layers, so text cannot steer it and nullbooth has "
            "nothing to personalise; give a text-conditioned Stable Diffusion 1.x / 2.x / XL model"
        )


def _hub_family(repo_id: str) -> str | None:
    """The pipeline class a hub id's ``model_index.json`` names (fetched alone, or read from the cache)."""
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        # diffusers' load_config passes huggingface_hub an argument it deprecated; the warning is not the user's.
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return DiffusionPipeline.load_config(repo_id).get("_class_name")


def load_pipeline(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  **kwargs: Any):
    """Load a Stable Diffusion 1.x / 2.x / XL pipeline for inference, from safetensors weights only.

    A local folder is checked first (:func:`check_model_folder`), a hub id's ``model_index.json`` read first:
    corrupt or missing ``model_index.json``, another pipeline family or pickled weights give one clear error
    instead of a traceback, a large download or an unpickling load. ``device="auto"``: CUDA when available,
    else the CPU.
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from safetensors import SafetensorError
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    path = resolve_model_path(name_or_path)
    local = Path(path)
    try:
        # A hub id's model_index.json (a small download) names its family before any weights are fetched.
        family = check_model_folder(local) if local.exists() else _hub_family(path)
        if family not in SUPPORTED_PIPELINES:
            raise _unsupported(f"'{path}' holds a {family or 'pipeline of unknown class'} (model_index.json)")
        # Only SD 1.x/2.x pipelines take a safety checker; SDXL's from_pretrained would warn about the arguments.
        no_checker = {"safety_checker": None, "requires_safety_checker": False} if family == SD_PIPELINE else {}
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **{**no_checker, **kwargs, "use_safetensors": True})
    except (OSError, ValueError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NullBoothError(
            f"could not load a diffusers pipeline from '{path}': {first}; give a local diffusers folder with "
            "safetensors weights, a cached hub id (HF_HUB_OFFLINE=1 forbids downloads), or a built-in name "
            f"({', '.join(sorted(BUILTIN_MODELS))})"
        ) from None
    _check_loaded(pipe, path)
    pipe.set_progress_bar_config(disable=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return pipe.to(device)
