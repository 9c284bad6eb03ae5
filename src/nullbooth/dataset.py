"""DreamBooth data: instance images, prior-preservation class images, and a resumable batch order.

Images are read with PIL only (no torchvision): every file in the folder is tried, files that are
not images or cannot be decoded are skipped with one warning, and what remains is converted to
8-bit RGB by :func:`to_rgb` (grayscale, palette, CMYK, alpha and 16-bit / float images included;
transparency is composited over white), resized on its shorter side and center-cropped to ``resolution``.

The batch order is a pure function of ``(seed, micro-step, process rank)``: a seeded permutation
per epoch, the processes taking interleaved slices of one global stream. A resumed run therefore
needs only its step counter to continue exactly where it stopped.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from nullbooth.errors import NullBoothError
from nullbooth.io import write_image
from nullbooth.sampling import sample

log = logging.getLogger(__name__)

# Class images have always been sampled at the diffusers pipeline's default guidance (as in diffusers'
# train_dreambooth.py); the config has no setting for it.
CLASS_GUIDANCE = 7.5


@dataclass(frozen=True)
class Example:
    """One training image (``[3, H, W]`` in ``[-1, 1]``) and the prompt it is paired with."""

    pixels: torch.Tensor
    prompt: str
    source: str


# --------------------------------------------------------------------------- images


def _deep_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grayscale image as 8-bit ``L``, scaled by the range its values are stored in.

    PIL's own ``convert`` clips these to 0..255, which turns every 16-bit pixel above 255 white. ``I;16*``
    (16-bit PNG/TIFF) maps 0..65535 → 0..255; ``I`` does the same when its values fit 16 bits (older Pillow
    opens 16-bit PNGs as ``I``); ``F`` maps 0..1 (or, when its values exceed 1, 0..255) → 0..255. Anything else
    (32-bit integers, floats outside 0..255) is stretched from its own minimum to its maximum, with a warning.
    """
    a = np.nan_to_num(np.asarray(image, dtype=np.float64))  # [h, w]
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif image.mode == "F" and lo >= 0 and hi <= 255:
        lo, hi = 0.0, 1.0 if hi <= 1 else 255.0
    else:
        log.warning("a %s image with values %g..%g has no standard range; stretched to 0..255", image.mode, lo, hi)
    scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as upright 8-bit RGB: EXIF rotation applied, deep (16-bit, float) values rescaled, not
    clipped; alpha (``RGBA``, ``LA``, ``PA``, palette transparency) composited over white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _deep_to_l(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        # Dropping alpha would leave whatever colour the transparent pixels happen to store (often black).
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, center-crop to a square, scale to ``[-1, 1]``: ``[3, r, r]``."""
    image = to_rgb(image)
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [r, r, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, r, r]


def read_image_folder(folder: str | Path, what: str, *, allow_empty: bool = False) -> list[tuple[Path, Image.Image]]:
    """Every decodable image in ``folder`` (sorted by name) as 8-bit RGB (:func:`to_rgb`); others are skipped
    with a warning.

    Raises when the folder is missing, or (unless ``allow_empty``) when no image remains.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if allow_empty and not folder.exists():
            return []
        raise NullBoothError(f"{what}: expected a folder of images at {folder}, found "
                             f"{'a file' if folder.exists() else 'nothing'}; point {what} at a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images, skipped = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, not in the middle of training
                images.append((path, to_rgb(im)))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            skipped.append(f"{path.name} ({type(err).__name__})")
    if skipped:
        warnings.warn(f"{what}: skipped {len(skipped)} file(s) in {folder} that are not readable images: "
                      f"{', '.join(skipped[:5])}{', …' if len(skipped) > 5 else ''}", stacklevel=2)
    if not images and not allow_empty:
        found = f"{len(files)} file(s), none of them a readable image" if files else "an empty folder"
        raise NullBoothError(f"{what}: expected at least one image in {folder}, found {found}; add PNG/JPEG images")
    return images


def load_examples(folder: str | Path, prompt: str, resolution: int, what: str,
                  *, allow_empty: bool = False, limit: int | None = None) -> list[Example]:
    images = read_image_folder(folder, what, allow_empty=allow_empty)[:limit]
    small = [p.name for p, im in images if min(im.size) < resolution]
    if small:
        log.warning("%s: %d image(s) are smaller than resolution %d and are upscaled (first: %s)",
                    what, len(small), resolution, small[0])
    return [Example(image_to_tensor(im, resolution), prompt, str(p)) for p, im in images]


# --------------------------------------------------------------------------- class images


def collection_examples(run_dir: Path, prompts: Sequence[str], resolution: int, limit: int) -> list[Example]:
    """A collection run's own generations (``generations/NNNNNN.png``), each paired with the prompt that made it."""
    folder = Path(run_dir) / "generations"
    out = []
    for path, image in read_image_folder(folder, "collection generations", allow_empty=True):
        if path.stem.isdigit() and int(path.stem) < len(prompts):
            out.append(Example(image_to_tensor(image, resolution), prompts[int(path.stem)], str(path)))
        if len(out) == limit:
            break
    return out


def generate_class_images(pipe, prompt: str, folder: Path, count: int, *, start: int, resolution: int,
                          steps: int, batch_size: int, seed: int, progress: bool = False) -> list[Path]:
    """Sample ``count`` images of ``prompt`` with the base model into ``folder`` (``class_{i:05d}.png``).

    Image ``i`` uses seed ``seed + i`` (:func:`nullbooth.sampling.sample`) so a rerun that is interrupted
    regenerates the same set. Each batch is written before the next is sampled: an interruption keeps them.
    """
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=count, desc="class images", unit="img", disable=not progress)
    for first in range(start, start + count, batch_size):
        ids = list(range(first, min(first + batch_size, start + count)))
        images = sample(pipe, [prompt] * len(ids), [seed + i for i in ids], steps=steps, guidance=CLASS_GUIDANCE,
                        size=resolution, batch_size=None)
        for i, image in zip(ids, images):
            path = folder / f"class_{i:05d}.png"
            write_image(path, image)
            written.append(path)
        bar.update(len(ids))
    bar.close()
    return written


# --------------------------------------------------------------------------- batch order


def stream_indices(n: int, positions: Sequence[int], seed: int) -> list[int]:
    """Example index at each position of an endless stream of seeded per-epoch permutations of ``range(n)``."""
    out, cache = [], {}
    for p in positions:
        epoch = p // n
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(cache[epoch][p % n])
    return out


def batch_indices(n: int, batch_size: int, micro_step: int, rank: int, world: int, seed: int) -> list[int]:
    """The examples process ``rank`` of ``world`` trains on at ``micro_step`` (a pure function: resumable)."""
    first = (micro_step * world + rank) * batch_size
    return stream_indices(n, range(first, first + batch_size), seed)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """``[N, model_max_length]`` token ids, padded and truncated the way the pipelines do."""
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids
