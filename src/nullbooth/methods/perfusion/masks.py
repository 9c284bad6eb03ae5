"""Subject masks for Perfusion's mask-weighted loss: one per instance image, aligned to it, at latent resolution."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from nullbooth.dataset import image_to_tensor, read_image_folder, to_rgb
from nullbooth.errors import NullBoothError
from nullbooth.methods.perfusion.subjects import ConceptSpec

__all__ = ["load_masks", "subject_masks"]

_MASK_SUFFIXES = ("", "_mask", "-mask", ".mask")


def _find_mask(image: Path, files: dict[str, Path]) -> Path | None:
    for suffix in _MASK_SUFFIXES:
        if image.stem + suffix in files:
            return files[image.stem + suffix]
    return None


def _read_mask(mpath: Path, field: str) -> Image.Image:
    try:
        with Image.open(mpath) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise NullBoothError(f"{field}: cannot read mask {mpath} ({type(err).__name__}); give a PNG/JPEG mask") from None


def load_masks(instance_dir: str | Path, mask_dir: str | Path, resolution: int, latent_size: int,
               field: str = "perfusion.mask_dir") -> torch.Tensor:
    """One mask per instance image, in the loop's image order, at latent resolution: ``[N, h, w]`` in ``[0, 1]``.

    The mask of ``dog1.jpg`` is the file ``dog1.*`` (or ``dog1_mask.*``) in ``mask_dir``; white is the
    subject. It must have its image's size (after EXIF rotation); it is then resized and center-cropped
    exactly like the image (:func:`nullbooth.dataset.image_to_tensor`) and area-averaged to the latent grid.
    ``field`` names the config key in errors.
    """
    mask_dir = Path(mask_dir)
    with warnings.catch_warnings():  # the loop has already warned about skipped instance files
        warnings.simplefilter("ignore")
        images = read_image_folder(instance_dir, "instance_data_dir")
    files = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}
    missing = [p.name for p, _ in images if _find_mask(p, files) is None]
    if missing:
        listed = ", ".join(missing[:3]) + (", …" if len(missing) > 3 else "")
        raise NullBoothError(f"{field}: no mask for {len(missing)} instance image(s) ({listed}) in "
                             f"{mask_dir}; give each image a mask with the same file stem (e.g. dog1.png for "
                             "dog1.jpg) or remove mask_dir")
    masks = []
    for path, image in images:
        mpath = _find_mask(path, files)
        mask, shown = ImageOps.exif_transpose(_read_mask(mpath, field)), ImageOps.exif_transpose(image)
        if mask.size != shown.size:
            raise NullBoothError(
                f"{field}: mask {mpath.name} is {mask.size[0]}×{mask.size[1]} but its image {path.name} is "
                f"{shown.size[0]}×{shown.size[1]}; a mask must have its image's size (resize the mask, do not crop it)"
            )
        gray = to_rgb(mask).convert("L").convert("RGB")  # white = subject; the same geometry as the image below
        m = (image_to_tensor(gray, resolution)[0] + 1.0) / 2.0  # [r, r] in [0, 1]
        m = F.interpolate(m[None, None], size=(latent_size, latent_size), mode="area")[0, 0]  # [h, w]
        if float(m.max()) <= 0.0:
            raise NullBoothError(f"{field}: mask {mpath.name} is empty (all black); the subject must be "
                                 "white, or remove the mask")
        masks.append(m)
    return torch.stack(masks)  # [N, h, w]


def subject_masks(specs: Sequence[ConceptSpec], resolution: int, latent_size: int) -> torch.Tensor | None:
    """Every subject's masks, concatenated in subject order like the loop's instance examples: ``[N, h, w]``.

    A subject without ``mask_dir`` weighs each of its pixels 1 (the plain loss: ``loss_fn_weighted_by_mask``
    with an all-ones mask is the MSE, up to summation order); ``None`` when no subject has masks.
    """
    if all(s.mask_dir is None for s in specs):
        return None
    parts = []
    for s in specs:
        if s.mask_dir is not None:
            parts.append(load_masks(s.instance_data_dir, s.mask_dir, resolution, latent_size, s.field("mask_dir")))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                n = len(read_image_folder(s.instance_data_dir, s.field("instance_data_dir")))
            parts.append(torch.ones(n, latent_size, latent_size))
    return torch.cat(parts)
