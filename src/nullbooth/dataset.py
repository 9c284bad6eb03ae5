"""DreamBooth data: instance images, prior-preservation class images, and a resumable batch order.

Images are read with PIL only (no torchvision): every file in the folder is tried, files that are
not images or cannot be decoded are skipped with one warning, and what remains is converted to
8-bit RGB by :func:`to_rgb` (grayscale, palette, CMYK, alpha and 16-bit / float images included;
transparency is composited over white), resized on its shorter side and cropped to ``resolution``.
With ``dataloader_num_workers`` the files are decoded and resized on that many threads, in the same order.

Augmentation is a fixed pool of variants per image (:class:`Augmentation`): the VAE is frozen and every image
is encoded once, so instead of transforming the image at every step, each crop and mirror image that
diffusers' transforms could draw is made — and encoded — up front, and the loop draws among them.

The batch order is a pure function of ``(seed, micro-step, process rank)``: a seeded permutation
per epoch, the processes taking interleaved slices of one global stream. A resumed run therefore
needs only its step counter to continue exactly where it stopped.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

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
# Crop positions per image when center_crop is false (diffusers' RandomCrop draws a new one every step).
RANDOM_CROPS = 8

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class Augmentation:
    """diffusers' ``center_crop`` and ``random_flip`` as the variants each image is encoded in.

    ``center_crop``: the centre square only. Otherwise ``crops`` distinct crop positions of the resized image
    (all of them when it has fewer: a square image has exactly one), drawn once from a generator seeded by
    ``seed``; the loop picks one of them uniformly, as ``RandomCrop`` picks among all positions.
    ``random_flip``: each crop mirrored as well, so a drawn variant is mirrored with probability ½
    (``RandomHorizontalFlip``).
    """

    center_crop: bool = True
    random_flip: bool = False
    seed: int = 0
    crops: int = RANDOM_CROPS


CENTER = Augmentation()  # one variant per image: the centre crop


@dataclass(frozen=True)
class Example:
    """One training image as its variants ``[V, 3, H, W]`` in ``[-1, 1]`` (crop 0, crop 0 mirrored, crop 1, …;
    ``V = 1`` without augmentation) and the prompt it is paired with.

    ``original_size`` ``(h, w)`` (before resizing) and each variant's ``crops_top_left`` ``(top, left)`` in the resized
    image are SDXL's size micro-conditioning (Podell et al. 2023, §2.2; :func:`nullbooth.conditioning.time_ids`). A
    mirrored variant's crop is given in the mirrored image, as diffusers' ``train_dreambooth_lora_sdxl.py`` flips
    before it crops. Empty: the variants are whole ``resolution``² images (original = target, no crop).
    """

    variants: torch.Tensor
    prompt: str
    source: str
    original_size: tuple[int, int] | None = None
    crops_top_left: tuple[tuple[int, int], ...] = ()

    @property
    def pixels(self) -> torch.Tensor:
        """``[3, H, W]``: the first variant (the only one without augmentation)."""
        return self.variants[0]


def thread_map(fn: Callable[[_T], _R], items: Sequence[_T], workers: int) -> list[_R]:
    """``[fn(x) for x in items]``, computed on ``workers`` threads when ``workers > 0`` (the order is kept).

    PIL releases the GIL while it decodes and resizes, so threads are enough; there is no per-step loading
    to overlap with (every image is encoded once).
    """
    if workers <= 0:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nullbooth-images") as pool:
        return list(pool.map(fn, items))


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


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """``(w, h)`` of an image of ``size`` once its shorter side is resized to ``resolution``."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def crop_corners(size: tuple[int, int], resolution: int, augmentation: Augmentation,
                 generator: torch.Generator) -> list[tuple[int, int]]:
    """Top-left corners ``(left, top)`` of the ``resolution`` squares cut from an (upright) image of ``size`` after
    :func:`resized_size`: the centre, or ``augmentation.crops`` distinct positions drawn from ``generator``."""
    w, h = resized_size(size, resolution)
    if augmentation.center_crop:
        return [((w - resolution) // 2, (h - resolution) // 2)]
    nx, ny = w - resolution + 1, h - resolution + 1
    if nx * ny == 1:
        return [(0, 0)]  # nothing to choose: no draw
    picks = torch.randperm(nx * ny, generator=generator)[:augmentation.crops].sort().values.tolist()
    return [(p % nx, p // nx) for p in picks]


def image_variants(image: Image.Image, resolution: int, corners: Sequence[tuple[int, int]],
                   flip: bool = False) -> torch.Tensor:
    """``image`` (8-bit RGB, :func:`to_rgb`) resized on its shorter side to ``resolution``, cut at each of ``corners``
    (and, with ``flip``, each cut mirrored too), scaled to ``[-1, 1]``: ``[V, 3, r, r]``, crop 0, its mirror, crop 1, …"""
    size = resized_size(image.size, resolution)
    image = image.resize(size, Image.Resampling.BILINEAR)
    out = []
    for left, top in corners:
        crop = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0  # [r, r, 3]
        x = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, r, r]
        out += [x, x.flip(-1)] if flip else [x]
    return torch.stack(out)


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, center-crop to a square, scale to ``[-1, 1]``: ``[3, r, r]``."""
    image = to_rgb(image)
    corner = crop_corners(image.size, resolution, CENTER, torch.Generator())[0]
    return image_variants(image, resolution, [corner])[0]


def _decode(path: Path) -> tuple[Path, Image.Image | str]:
    """``path`` decoded as 8-bit RGB, or why it cannot be."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not in the middle of training
            return path, to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return path, f"{path.name} ({type(err).__name__})"


def read_image_folder(folder: str | Path, what: str, *, allow_empty: bool = False,
                      workers: int = 0) -> list[tuple[Path, Image.Image]]:
    """Every decodable image in ``folder`` (sorted by name) as 8-bit RGB (:func:`to_rgb`), decoded on ``workers``
    threads (:func:`thread_map`); others are skipped with a warning.

    Raises when the folder is missing, or (unless ``allow_empty``) when no image remains.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if allow_empty and not folder.exists():
            return []
        raise NullBoothError(f"{what}: expected a folder of images at {folder}, found "
                             f"{'a file' if folder.exists() else 'nothing'}; point {what} at a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    decoded = thread_map(_decode, files, workers)
    images = [(p, im) for p, im in decoded if not isinstance(im, str)]
    skipped = [im for _, im in decoded if isinstance(im, str)]
    if skipped:
        warnings.warn(f"{what}: skipped {len(skipped)} file(s) in {folder} that are not readable images: "
                      f"{', '.join(skipped[:5])}{', …' if len(skipped) > 5 else ''}", stacklevel=2)
    if not images and not allow_empty:
        found = f"{len(files)} file(s), none of them a readable image" if files else "an empty folder"
        raise NullBoothError(f"{what}: expected at least one image in {folder}, found {found}; add PNG/JPEG images")
    return images


def make_examples(images: Sequence[tuple[Path, Image.Image]], prompts: Sequence[str], resolution: int,
                  augmentation: Augmentation = CENTER, workers: int = 0) -> list[Example]:
    """One :class:`Example` per image, paired with ``prompts[i]``, its variants made on ``workers`` threads.

    The crop positions are drawn in the images' order before any thread starts, so they do not depend on
    ``workers``; every image set (instance, class) draws from its own generator seeded by ``augmentation.seed``.
    """
    generator = torch.Generator().manual_seed(augmentation.seed)
    corners = [crop_corners(image.size, resolution, augmentation, generator) for _, image in images]
    variants = thread_map(lambda i: image_variants(images[i][1], resolution, corners[i], augmentation.random_flip),
                          range(len(images)), workers)
    return [Example(v, prompt, str(path), (image.height, image.width),
                    crop_offsets(image.size, resolution, c, augmentation.random_flip))
            for (path, image), v, prompt, c in zip(images, variants, prompts, corners)]


def crop_offsets(size: tuple[int, int], resolution: int, corners: Sequence[tuple[int, int]],
                 flip: bool) -> tuple[tuple[int, int], ...]:
    """``(top, left)`` of every variant :func:`image_variants` makes from ``corners`` ``(left, top)``, in its order;
    a mirrored crop at ``left`` is the crop at ``w − resolution − left`` of the mirrored resized image."""
    w, _ = resized_size(size, resolution)
    out: list[tuple[int, int]] = []
    for left, top in corners:
        out += [(top, left), (top, w - resolution - left)] if flip else [(top, left)]
    return tuple(out)


def load_examples(folder: str | Path, prompt: str, resolution: int, what: str, *, allow_empty: bool = False,
                  limit: int | None = None, augmentation: Augmentation = CENTER, workers: int = 0) -> list[Example]:
    """The images of ``folder`` (the first ``limit``) as examples of ``prompt`` (:func:`make_examples`)."""
    images = read_image_folder(folder, what, allow_empty=allow_empty, workers=workers)[:limit]
    small = [p.name for p, im in images if min(im.size) < resolution]
    if small:
        log.warning("%s: %d image(s) are smaller than resolution %d and are upscaled (first: %s)",
                    what, len(small), resolution, small[0])
    return make_examples(images, [prompt] * len(images), resolution, augmentation, workers)


# --------------------------------------------------------------------------- class images


def collection_examples(run_dir: Path, prompts: Sequence[str], resolution: int, limit: int,
                        augmentation: Augmentation = CENTER, workers: int = 0) -> list[Example]:
    """A collection run's own generations (``generations/NNNNNN.png``), each paired with the prompt that made it."""
    folder = Path(run_dir) / "generations"
    found = [(path, image) for path, image in read_image_folder(folder, "collection generations", allow_empty=True,
                                                                  workers=workers)
             if path.stem.isdigit() and int(path.stem) < len(prompts)][:limit]
    return make_examples(found, [prompts[int(p.stem)] for p, _ in found], resolution, augmentation, workers)


def generate_class_images(pipe, prompt: str, folder: Path, count: int, *, start: int, resolution: int,
                          steps: int, batch_size: int, seed: int, autocast: torch.dtype | None = None,
                          progress: bool = False) -> list[Path]:
    """Sample ``count`` images of ``prompt`` with the base model into ``folder`` (``class_{i:05d}.png``).

    Image ``i`` uses seed ``seed + i`` (:func:`nullbooth.sampling.sample`) so a rerun that is interrupted
    regenerates the same set. Each batch is written before the next is sampled: an interruption keeps them.
    ``autocast``: sample under ``torch.autocast`` with this dtype (diffusers' ``prior_generation_precision``);
    the weights themselves are not cast, since training needs them at full precision.
    """
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=count, desc="class images", unit="img", disable=not progress)
    precision = nullcontext() if autocast is None else torch.autocast(pipe.unet.device.type, dtype=autocast)
    for first in range(start, start + count, batch_size):
        ids = list(range(first, min(first + batch_size, start + count)))
        with precision:
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

