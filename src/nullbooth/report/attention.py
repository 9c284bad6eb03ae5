"""Attention pictures: the recorded cross-attention maps of a collection drawn over its images.

The grids are composed with PIL rather than matplotlib axes: a real run has ~16 layers × 50 timesteps
grids, and pasting arrays keeps every pixel of the overlay exactly the blend of image and upsampled map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nullbooth.errors import NullBoothError
from nullbooth.report.grids import font
from nullbooth.runs.attention import PADDING, AttentionMaps, upsample_map
from nullbooth.runs.layout import layer_dirname, timestep_dirname


def overlay(image: np.ndarray, attention: np.ndarray, *, alpha: float = 0.6) -> np.ndarray:
    """``(1 − α)·image + α·inferno(a / max a)`` for an ``[H, W, 3]`` image in [0, 1] and an ``[H, W]`` map."""
    from matplotlib import colormaps

    peak = float(attention.max())
    heat = colormaps["inferno"](attention / peak if peak > 0 else attention)[..., :3]
    return (1 - alpha) * image + alpha * heat


def attention_grid(maps: AttentionMaps, layer: str, timestep: int, *, cell: int = 160, alpha: float = 0.6):
    """One picture per (layer, timestep): a row per prompt, its image, then one overlay per token.

    Each overlay is the token's head-averaged map of the conditional branch, upsampled (bilinear) onto the
    image and scaled to its own maximum; under it the token and its share of the layer's attention (mean
    over pixels; a row's shares sum to 100 %, the last column being the padding tokens). The returned
    PIL image carries ``info["cells"]``: ``{(prompt, column): (x0, y0, x1, y1)}``, column 0 = the image.
    """
    from PIL import Image, ImageDraw

    rows = [p for p in sorted(maps.prompts) if (p, layer, timestep) in maps.maps]
    if not rows:
        raise NullBoothError(f"no attention maps for layer {layer} at timestep {timestep}")
    first = maps.maps[(rows[0], layer, timestep)]
    pad, big, small = 8, font(14), font(11)
    ncols = 1 + max(maps.maps[(p, layer, timestep)].shape[0] for p in rows)
    ref = maps.images.get(rows[0])
    ch = cell if ref is None else max(1, round(cell * ref.height / ref.width))  # keep the image's aspect
    title_h, label_h, caption_h, legend_h = 44, 18, 32, 34
    width = pad + ncols * (cell + pad)
    height = title_h + len(rows) * (label_h + ch + caption_h) + legend_h
    canvas = Image.new("RGB", (max(width, 520), height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), f"cross-attention · {layer}", fill="black", font=big)
    draw.text((pad, 24), f"timestep {timestep} · heads averaged · conditional (prompt) branch · "
              f"{first.shape[1]}x{first.shape[2]} map upsampled onto the image", fill=(60, 60, 60), font=small)
    cells: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    y = title_h
    for p in rows:
        m = maps.maps[(p, layer, timestep)].numpy()  # [K+1, h, w]
        image = maps.images.get(p)
        base = (np.asarray(image.convert("RGB").resize((cell, ch), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
                if image is not None else np.full((ch, cell, 3), 0.5))
        up = upsample_map(m, (ch, cell))  # [K+1, ch, cell]
        names = [*maps.tokens[p][: m.shape[0] - 1], PADDING]
        draw.text((pad, y + 2), _clip(f"#{p}: {maps.prompts[p]}", 2 * width // 7), fill="black", font=small)
        y += label_h
        tiles = [base] + [overlay(base, up[c], alpha=alpha) for c in range(m.shape[0])]
        captions = [("image", "")] + [(names[c], f"{100 * float(m[c].mean()):.1f}%") for c in range(m.shape[0])]
        for c, (tile, (name, share)) in enumerate(zip(tiles, captions)):
            x = pad + c * (cell + pad)
            canvas.paste(Image.fromarray(np.clip(np.rint(tile * 255), 0, 255).astype(np.uint8)), (x, y))
            cells[(p, c)] = (x, y, x + cell, y + ch)
            draw.text((x + cell // 2, y + ch + 2), _clip(name, cell // 7), fill="black", font=small, anchor="ma")
            draw.text((x + cell // 2, y + ch + 16), share, fill=(90, 90, 90), font=small, anchor="ma")
        y += ch + caption_h
    # Legend: the colour scale, shared meaning for every tile.
    from matplotlib import colormaps

    ramp = (colormaps["inferno"](np.linspace(0, 1, 160))[:, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp[None], 10, axis=0)), (pad, y + 4))
    draw.text((pad + 168, y + 2), "attention, each map scaled to its own maximum (0 to max); % = the token's share "
              "of the attention (mean over pixels)", fill=(60, 60, 60), font=small)
    canvas.info["cells"] = cells
    return canvas


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "…"


def render_attention_maps(maps: AttentionMaps, vis_dir: Path, *, cell: int = 160, progress: bool = True) -> list[Path]:
    """``vis_dir/timestep_XXXX/<layer_dir>.png`` for every recorded (layer, timestep)."""
    from tqdm.auto import tqdm

    todo = [(t, layer) for t in maps.timesteps for layer in maps.layers
            if any((p, layer, t) in maps.maps for p in maps.prompts)]
    written = []
    for t, layer in tqdm(todo, desc="attention maps", unit="picture", leave=False, disable=not progress):
        path = vis_dir / timestep_dirname(t) / f"{layer_dirname(layer)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        attention_grid(maps, layer, t, cell=cell).save(path)
        written.append(path)
    return written
