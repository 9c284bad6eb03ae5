"""Image grids: plain grids and labelled rows (base vs personalised), the pictures every verb writes."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from nullbooth.errors import NullBoothError


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


def font(size: int):
    """PIL's default font at ``size`` pixels (one fixed size on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def captioned_rows(rows: Sequence[tuple[str, Sequence[Image.Image]]], title: str = "") -> Image.Image:
    """Labelled rows of images (``[(label, images), …]``) under an optional title: base vs personalised."""
    w, h = rows[0][1][0].size
    cols = max(len(images) for _, images in rows)
    font_size = max(10, min(18, h // 5))
    font_ = font(font_size)
    label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font_)) for label, _ in rows) + 12
    title_h = font_size + 10 if title else 0
    canvas = Image.new("RGB", (label_w + cols * w, title_h + len(rows) * h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill="black", font=font_)
    for r, (label, images) in enumerate(rows):
        y = title_h + r * h
        draw.text((6, y + h // 2 - font_size // 2), label, fill="black", font=font_)
        for c, image in enumerate(images):
            canvas.paste(image.convert("RGB"), (label_w + c * w, y))
    return canvas
