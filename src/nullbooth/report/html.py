"""Self-contained HTML: tables, embedded pictures (base64 data URIs) and one page style for every report."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nullbooth import __version__

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;color:#222;
padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.warn td{background:#fff3cd}
figure{display:inline-block;margin:.5em;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.8em;color:#555;max-width:60em}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}
.muted{color:#777;font-size:.85em}details{margin:.4em 0}summary{cursor:pointer;font-weight:600}
"""


def data_uri(picture: Any, *, jpeg: bool = False) -> str:
    """``data:image/…;base64,…`` of a PNG file path, a PIL image or a matplotlib figure.

    ``jpeg`` re-encodes photographs (attention grids over generated images) at quality 90: a tenth of the
    PNG's size, so a report with hundreds of them stays openable. Plots stay PNG (sharp lines and text).
    """
    buf = io.BytesIO()
    if jpeg:
        from PIL import Image

        image = Image.open(picture) if isinstance(picture, (str, Path)) else picture
        image.convert("RGB").save(buf, format="JPEG", quality=90)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    if isinstance(picture, (str, Path)):
        raw = Path(picture).read_bytes()
    else:
        if hasattr(picture, "savefig"):
            picture.savefig(buf, format="png", dpi=110)
        else:
            picture.save(buf, format="PNG")
        raw = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def _cell(value: Any) -> tuple[str, bool]:
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, int):
        return f"{value:,}", True
    if isinstance(value, float):
        return (f"{value:.4g}" if math.isfinite(value) else str(value)), True
    if isinstance(value, (list, dict)):
        return json.dumps(value), False
    return str(value), False


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
               warn: Sequence[bool] | None = None) -> str:
    if not rows:
        return "<p class='muted'>(empty)</p>"
    columns = list(columns or rows[0].keys())
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for c in columns:
            text, num = _cell(row.get(c, ""))
            cells.append(f"<td{' class=num' if num else ''}>{html.escape(text)}</td>")
        cls = " class=warn" if warn is not None and warn[i] else ""
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def html_figure(picture: Any, caption: str = "", *, jpeg: bool = False) -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f"<figure><img alt='{html.escape(caption)}' src='{data_uri(picture, jpeg=jpeg)}'>{cap}</figure>"


def html_page(title: str, sections: Sequence[str], subtitle: str = "") -> str:
    stamp = f"nullbooth {__version__} · {time.strftime('%Y-%m-%d %H:%M:%S')}"
    sub = f"<p class='muted'>{html.escape(subtitle)}</p>" if subtitle else ""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>{sub}\n" + "\n".join(sections)
            + f"\n<p class='muted'>written by {html.escape(stamp)}</p></body></html>\n")
