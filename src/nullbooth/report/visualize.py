"""Pictures of a run and self-contained HTML reports (seed 000, ``visualizations/``).

- :func:`plot_covariance_summaries`: eigenvalue spectra ``λ`` of ``C = Σxxᵀ/n`` per layer and feature with
  the run's null-space threshold drawn in its own units, the null-space dimension over timesteps × layers
  (the ``null_space_dim`` stored in the metadata), and the sample counts ``n``.
- :func:`write_run_report` / :func:`visualize_run`: one ``report.html`` (images embedded as base64) with the
  run's configuration, the ``inspect`` table and every picture; ``nullbooth visualize RUN_DIR`` (no model).
- :func:`render_training_report`: the same style for the training report.

Plots use matplotlib's object API (``matplotlib.figure.Figure`` rendered by Agg): headless, and no global
pyplot state is touched in the caller's process.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nullbooth.errors import NullBoothError
from nullbooth.filenames import RUN_REPORT as REPORT
from nullbooth.io import read_json, write_json, write_text
from nullbooth.report.attention import render_attention_maps
from nullbooth.runs.attention import MAPS_DIR, AttentionMaps
from nullbooth.runs.layout import layer_dirname, read_manifest, timestep_dirname

log = logging.getLogger(__name__)

SUMMARIES_DIR = "covariance_summaries"
FEATURE_TITLES = {"q": "q: input of to_q (latent pixels)", "k": "k: input of to_k (text encodings)",
                  "v": "v: input of to_v (text encodings)", "out": "out: input of to_out.0 (attention output)",
                  "kv": "k, v: text encodings (one statistic for every layer)"}
FEATURE_COLORS = {"q": "tab:blue", "k": "tab:green", "v": "tab:green", "kv": "tab:green", "out": "tab:orange"}


def short_layer_name(name: str) -> str:
    """``down_blocks.0.attentions.1.transformer_blocks.0.attn2`` → ``down0.a1.t0`` (for axis labels)."""
    s = name.removesuffix(".attn2")
    for long, short in (("down_blocks.", "down"), ("up_blocks.", "up"), ("mid_block", "mid"),
                        (".attentions.", ".a"), (".transformer_blocks.", ".t")):
        s = s.replace(long, short)
    return s


# --------------------------------------------------------------------------- covariance data


@dataclass
class CovarianceSummary:
    """What the covariance pictures draw, read from a run without a model.

    Per-timestep arrays are ``[n_layers, n_timesteps]`` with timesteps in descending order (high noise
    first, as sampled); missing metadata is ``-1``. ``spectra`` holds descending eigenvalues of the
    timestep-summed statistic (the one training uses) per ``(layer, feature)``.
    """

    run_dir: Path
    layers: list[str]
    timesteps: list[int]
    features: list[str]
    mode: str
    threshold: float
    null_dim: dict[str, np.ndarray] = field(default_factory=dict)  # metadata null_space_dim
    n_samples: dict[str, np.ndarray] = field(default_factory=dict)  # metadata n_samples
    feature_dim: dict[str, np.ndarray] = field(default_factory=dict)  # [n_layers]
    timestep_spectra: dict[tuple[str, str, int], np.ndarray] = field(default_factory=dict)  # metadata singular_values
    spectra: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    summed_null_dim: dict[str, np.ndarray] = field(default_factory=dict)  # [n_layers]
    summed_count: dict[str, np.ndarray] = field(default_factory=dict)  # [n_layers]

    def shared_text(self) -> bool:
        """True when k and v are both collected (they share one statistic, drawn once)."""
        return "k" in self.features and "v" in self.features

    def panels(self) -> list[str]:
        """The distinct statistics to draw: q, kv (or k / v alone), out."""
        out = []
        for f in self.features:
            if f in ("k", "v") and self.shared_text():
                if "kv" not in out:
                    out.append("kv")
            else:
                out.append(f)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": self.layers, "timesteps": self.timesteps, "features": self.features,
            "nullspace_mode": self.mode, "nullspace_threshold": self.threshold,
            "null_space_dim": {f: a.tolist() for f, a in self.null_dim.items()},
            "n_samples": {f: a.tolist() for f, a in self.n_samples.items()},
            "feature_dim": {f: a.tolist() for f, a in self.feature_dim.items()},
            "summed_null_space_dim": {f: a.tolist() for f, a in self.summed_null_dim.items()},
            "summed_n_samples": {f: a.tolist() for f, a in self.summed_count.items()},
        }


def _panel_feature(panel: str) -> str:
    return "k" if panel == "kv" else panel


def covariance_summary(run_dir: Path, *, summed: bool = True) -> CovarianceSummary:
    """Read every ``{feature}_metadata.json`` of a run and (``summed``) the spectra of the summed statistics."""
    import torch

    from nullbooth.runs.layout import load_summed_statistics
    from nullbooth.stats.nullspace import null_dimension, spectrum

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    nb = manifest["nullbooth"]
    layers = [layer["name"] for layer in manifest["layers"]]
    timesteps = sorted((int(t) for t in manifest["timesteps"]), reverse=True)
    s = CovarianceSummary(run_dir, layers, timesteps, list(manifest["features"]), nb["nullspace_mode"],
                          float(nb["nullspace_threshold"]))
    for f in s.features:
        s.null_dim[f] = np.full((len(layers), len(timesteps)), -1, dtype=np.int64)
        s.n_samples[f] = np.full((len(layers), len(timesteps)), -1, dtype=np.int64)
        s.feature_dim[f] = np.array([layer["weight_shapes"][f][1] for layer in manifest["layers"]], dtype=np.int64)
    for j, t in enumerate(timesteps):
        for i, layer in enumerate(layers):
            folder = run_dir / timestep_dirname(t) / layer_dirname(layer)
            for f in s.features:
                path = folder / f"{f}_metadata.json"
                if not path.is_file():
                    continue
                meta = read_json(path, "a metadata file")
                s.null_dim[f][i, j] = int(meta["null_space_dim"])
                s.n_samples[f][i, j] = int(meta["n_samples"])
                if "singular_values" in meta and f in ("q", "out"):
                    s.timestep_spectra[(layer, f, t)] = np.asarray(meta["singular_values"], dtype=np.float64)
    if summed:
        stats = load_summed_statistics(run_dir)
        cache: dict[int, np.ndarray] = {}
        for f in s.features:
            s.summed_null_dim[f] = np.zeros(len(layers), dtype=np.int64)
            s.summed_count[f] = np.zeros(len(layers), dtype=np.int64)
        for i, layer in enumerate(layers):
            for f in s.features:
                stat = stats[(layer, f)]
                if id(stat) not in cache:  # k and v share the text statistic: one eigh
                    cache[id(stat)] = spectrum(stat.moment()).eigenvalues.numpy()
                lam = cache[id(stat)]  # ascending
                s.summed_null_dim[f][i] = null_dimension(torch.from_numpy(lam), s.mode, s.threshold)
                s.summed_count[f][i] = stat.count
                s.spectra[(layer, f)] = lam[::-1].copy()
    return s


def spectrum_in_mode_units(lam_desc: np.ndarray, mode: str, threshold: float
                           ) -> tuple[np.ndarray, np.ndarray, str, str, float]:
    """``(x, y, xlabel, ylabel, line)``: a descending spectrum in the units where ``mode``'s threshold is a line.

    absolute: ``λ`` vs ``τ``; relative: ``λ/λ_max`` vs ``τ``; energy: the tail energy ``Σ_{j≥i} λ_j / Σλ`` vs
    ``τ``; rank: ``λ`` with a vertical line at the kept rank ``τ``; percentile: ``λ`` over the rank in percent
    of ``d`` with a vertical line at ``100 − τ``. ``line`` is the threshold's coordinate (horizontal for the
    first three modes, vertical for the last two).
    """
    lam = np.clip(np.asarray(lam_desc, dtype=np.float64), 0.0, None)
    d = lam.size
    x = np.arange(1, d + 1, dtype=np.float64)
    xlabel = "eigenvalue index i (descending)"
    if mode == "relative":
        top = lam[0] if d and lam[0] > 0 else 1.0
        return x, lam / top, xlabel, "λ_i / λ_max", threshold
    if mode == "energy":
        total = lam.sum() or 1.0
        tail = np.cumsum(lam[::-1])[::-1] / total
        return x, tail, xlabel, "tail energy Σ_{j≥i} λ_j / Σλ", threshold
    if mode == "percentile":
        return 100.0 * x / d, lam, "eigenvalue rank (% of d, descending)", "λ_i", 100.0 - threshold
    if mode == "rank":
        return x, lam, xlabel, "λ_i", threshold + 0.5
    return x, lam, xlabel, "λ_i", threshold


def _log_floor(y: np.ndarray) -> tuple[np.ndarray, float]:
    """Zeros cannot sit on a log axis: draw them at 1e-12 of the largest value."""
    top = float(np.max(y)) if y.size and np.max(y) > 0 else 1.0
    floor = top * 1e-12
    return np.maximum(y, floor), floor


def _log_y(ax, numticks: int = 7) -> None:
    """Log y axis with a few decades labelled (dense log ticks cost seconds of text layout per figure)."""
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=numticks))
    ax.yaxis.set_minor_locator(NullLocator())


def draw_spectra(ax, summary: CovarianceSummary, panel: str) -> None:
    """Summed-statistic spectra of every layer for one statistic; dots mark where the null space starts."""
    from matplotlib import colormaps

    f = _panel_feature(panel)
    # The text statistic is the same for every layer (DESIGN §2): one curve.
    layers = summary.layers[:1] if panel in ("kv", "k", "v") else summary.layers
    cmap = colormaps["viridis"]
    vertical = summary.mode in ("rank", "percentile")
    xlabel = ylabel = ""
    for i, layer in enumerate(layers):
        lam = summary.spectra[(layer, f)]
        x, y, xlabel, ylabel, line = spectrum_in_mode_units(lam, summary.mode, summary.threshold)
        y, _ = _log_floor(y)
        k = int(summary.summed_null_dim[f][summary.layers.index(layer)])
        color = FEATURE_COLORS.get(panel) if len(layers) == 1 else cmap(i / max(len(layers) - 1, 1))
        who = "all layers" if panel in ("kv", "k", "v") else short_layer_name(layer)
        label = f"{who}: null {k}/{lam.size}"
        ax.plot(x, y, color=color, lw=1.2, label=label)
        if k:
            ax.plot(x[lam.size - k], y[lam.size - k], "o", color=color, ms=4)
    if vertical:
        ax.axvline(line, color="red", ls="--", lw=1, label=f"threshold ({summary.mode} {summary.threshold:g})")
    else:
        ax.axhline(line, color="red", ls="--", lw=1, label=f"threshold τ = {summary.threshold:g} ({summary.mode})")
    _log_y(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"spectrum of C (summed over timesteps)\n{FEATURE_TITLES[panel]}", fontsize=9)
    ax.text(0.99, 0.99, "zeros drawn at 1e-12 of the top value", transform=ax.transAxes, ha="right", va="top",
            fontsize=6, color="grey")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6, loc="lower left", ncol=1 + len(layers) // 9)


def draw_null_dim_heatmap(ax, summary: CovarianceSummary, panel: str, *, annotate: bool | None = None):
    """Heatmap of the stored ``null_space_dim`` (layers × timesteps); returns the ``AxesImage`` drawn."""
    f = _panel_feature(panel)
    data = summary.null_dim[f]
    masked = np.ma.masked_less(data, 0)
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    vmax = max(int(summary.feature_dim[f].max()), 1)
    im = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    L, T = data.shape
    if annotate is None:
        annotate = L * T <= 400
    if annotate:
        for i in range(L):
            for j in range(T):
                if data[i, j] >= 0:
                    light = data[i, j] < 0.6 * vmax
                    ax.text(j, i, str(int(data[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if light else "black")
    step = max(1, T // 12)
    ax.set_xticks(range(0, T, step))
    ax.set_xticklabels([str(t) for t in summary.timesteps[::step]], rotation=90, fontsize=7)
    ax.set_yticks(range(L))
    ax.set_yticklabels([f"{short_layer_name(l)} (d={d})" for l, d in zip(summary.layers, summary.feature_dim[f])],
                       fontsize=7)
    ax.set_xlabel("timestep (high noise → low noise)")
    ax.set_ylabel("cross-attention layer")
    ax.set_title(f"null-space dim per timestep ({summary.mode} {summary.threshold:g})\n{FEATURE_TITLES[panel]}",
                 fontsize=9)
    ax.figure.colorbar(im, ax=ax, label="null_space_dim (metadata)")
    return im


def _grouped_bars(summary: CovarianceSummary):
    """``(panel, feature, x, width)``: one group of bars per layer, one bar per feature panel."""
    panels = summary.panels()
    width = 0.8 / len(panels)
    for p_i, panel in enumerate(panels):
        yield panel, _panel_feature(panel), np.arange(len(summary.layers)) + (p_i - (len(panels) - 1) / 2) * width, width


def draw_summed_null_dims(ax, summary: CovarianceSummary) -> None:
    """Null dim of the timestep-summed statistic (what training projects with) vs the input width ``d``."""
    L = len(summary.layers)
    for panel, f, x, width in _grouped_bars(summary):
        ax.bar(x, summary.feature_dim[f], width, color="none", edgecolor="grey", lw=0.8)
        ax.bar(x, summary.summed_null_dim[f], width, color=FEATURE_COLORS.get(panel), label=panel.replace("kv", "k, v"))
    ax.set_xticks(range(L))
    ax.set_xticklabels([short_layer_name(l) for l in summary.layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("null-space dimension (outline: input width d)")
    ax.set_title("null space of the summed statistic (used for training)", fontsize=9)
    ax.legend(fontsize=7)


def draw_sample_counts(ax, summary: CovarianceSummary) -> None:
    """Rows accumulated into each summed statistic (log scale); per-timestep counts in the legend."""
    L = len(summary.layers)
    for panel, f, x, width in _grouped_bars(summary):
        bars = ax.bar(x, summary.summed_count[f], width, color=FEATURE_COLORS.get(panel),
                      label=panel.replace("kv", "k, v"))
        ax.bar_label(bars, labels=[f"{int(v):,}" for v in summary.summed_count[f]], fontsize=6, rotation=90, padding=2)
    _log_y(ax)
    ax.set_xticks(range(L))
    ax.set_xticklabels([short_layer_name(l) for l in summary.layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("samples n (rows of x)")
    ax.margins(y=0.25)
    ax.set_title(f"sample counts of the summed statistics ({len(summary.timesteps)} timesteps; k, v: text tokens)",
                 fontsize=9)
    ax.legend(fontsize=7)


def draw_timestep_spectra(ax, summary: CovarianceSummary, layer: str, feature: str) -> None:
    """Per-timestep spectra (metadata ``singular_values``) of one layer and feature, coloured by timestep."""
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    T = len(summary.timesteps)
    line = None
    for j, t in enumerate(summary.timesteps):
        lam = summary.timestep_spectra.get((layer, feature, t))
        if lam is None:
            continue
        x, y, _, ylabel, line = spectrum_in_mode_units(lam, summary.mode, summary.threshold)
        y, _ = _log_floor(y)
        ax.plot(x, y, color=cmap(j / max(T - 1, 1)), lw=0.8)
        ax.set_ylabel(ylabel, fontsize=7)
    if line is not None:
        (ax.axvline if summary.mode in ("rank", "percentile") else ax.axhline)(line, color="red", ls="--", lw=0.8)
    _log_y(ax, 5)
    ax.set_title(f"{short_layer_name(layer)} · {feature}", fontsize=8)
    ax.tick_params(labelsize=6)


def plot_covariance_summaries(run_dir: Path, out_dir: Path | None = None, *, dpi: int = 110
                              ) -> tuple[CovarianceSummary, dict[str, np.ndarray]]:
    """Write ``covariance_statistics.png`` and companions into ``out_dir``.

    ``out_dir`` defaults to ``RUN/visualizations/covariance_summaries``.

    Companions: ``null_space_dim.png`` (annotated heatmaps), ``spectra_by_timestep.png`` and
    ``covariance_statistics.json`` (the numbers drawn). Returns the summary and, per feature, the array
    the heatmap really drew (``AxesImage.get_array()``) under ``"null_space_dim/<feature>"``.
    """
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "visualizations" / SUMMARIES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    s = covariance_summary(run_dir)
    panels = s.panels()
    L = len(s.layers)
    drawn: dict[str, np.ndarray] = {}

    def record(panel: str, im) -> None:
        for f in (("k", "v") if panel == "kv" else (panel,)):
            drawn[f"null_space_dim/{f}"] = np.ma.filled(im.get_array(), -1).astype(np.int64)

    # Overview: spectra / heatmaps / null dims + counts.
    heat_h = max(3.2, 0.22 * L + 2.2)
    fig = Figure(figsize=(6.0 * max(len(panels), 2), 4.6 + heat_h + 4.4), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[4.6, heat_h, 4.4])
    for ax, panel in zip(np.atleast_1d(top.subplots(1, len(panels))), panels):
        draw_spectra(ax, s, panel)
    for ax, panel in zip(np.atleast_1d(middle.subplots(1, len(panels))), panels):
        record(panel, draw_null_dim_heatmap(ax, s, panel, annotate=L * len(s.timesteps) <= 120))
    ax_null, ax_count = bottom.subplots(1, 2)
    draw_summed_null_dims(ax_null, s)
    draw_sample_counts(ax_count, s)
    fig.suptitle(f"covariance statistics of {run_dir.name} · {len(s.timesteps)} timesteps · {L} layers · "
                 f"null space: {s.mode} threshold {s.threshold:g}", fontsize=11)
    fig.savefig(out_dir / "covariance_statistics.png", dpi=dpi)

    # Companion: large annotated heatmaps.
    fig = Figure(figsize=(max(6.0, 0.32 * len(s.timesteps) + 4.0), len(panels) * (0.3 * L + 2.2)), layout="constrained")
    for ax, panel in zip(np.atleast_1d(fig.subplots(len(panels), 1)), panels):
        draw_null_dim_heatmap(ax, s, panel, annotate=L * len(s.timesteps) <= 2000)
    fig.savefig(out_dir / "null_space_dim.png", dpi=dpi)

    # Companion: per-timestep spectra of q/out (k/v do not depend on the timestep).
    per_t = [f for f in ("q", "out") if f in s.features]
    if per_t and s.timestep_spectra:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        cells = [(layer, f) for layer in s.layers for f in per_t]
        ncols = min(4, len(cells))
        nrows = math.ceil(len(cells) / ncols)
        # A fixed grid (no layout engine): constrained layout costs seconds per dozen panels.
        fig_w, fig_h = 3.4 * ncols + 1.4, 2.6 * nrows + 1.0
        fig = Figure(figsize=(fig_w, fig_h))
        fig.subplots_adjust(left=0.8 / fig_w, right=1 - 1.3 / fig_w, top=1 - 0.6 / fig_h, bottom=0.55 / fig_h,
                            wspace=0.35, hspace=0.45)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (layer, f) in zip(axes, cells):
            draw_timestep_spectra(ax, s, layer, f)
        for ax in axes[len(cells):]:
            ax.axis("off")
        sm = ScalarMappable(Normalize(min(s.timesteps), max(s.timesteps)), colormaps["plasma_r"])
        fig.colorbar(sm, cax=fig.add_axes((1 - 0.95 / fig_w, 0.2, 0.15 / fig_w, 0.6)), label="timestep")
        fig.supxlabel(spectrum_in_mode_units(np.ones(2), s.mode, s.threshold)[2], y=0.1 / fig_h, fontsize=9)
        fig.suptitle(f"per-timestep spectra (metadata singular_values); red: {s.mode} threshold {s.threshold:g}",
                     fontsize=10)
        fig.savefig(out_dir / "spectra_by_timestep.png", dpi=dpi)
    write_json(out_dir / "covariance_statistics.json", s.to_json())
    return s, drawn


# --------------------------------------------------------------------------- HTML


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
    from nullbooth import __version__

    stamp = f"nullbooth {__version__} · {time.strftime('%Y-%m-%d %H:%M:%S')}"
    sub = f"<p class='muted'>{html.escape(subtitle)}</p>" if subtitle else ""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>{sub}\n" + "\n".join(sections)
            + f"\n<p class='muted'>written by {html.escape(stamp)}</p></body></html>\n")


# --------------------------------------------------------------------------- run report


def _evenly(items: Sequence[int], n: int | None) -> list[int]:
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in idx]


def write_run_report(run_dir: Path, out_dir: Path | None = None, *, max_attention_timesteps: int | None = None) -> Path:
    """``report.html``: configuration, the ``inspect`` table, covariance pictures and attention maps, self-contained."""
    from nullbooth.runs.diagnostics import inspect_run

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    vis = run_dir / "visualizations"
    out_dir = Path(out_dir) if out_dir is not None else vis
    nb = manifest.get("nullbooth", {})
    identity = manifest.get("identity", {})
    sections = []

    overview = {
        "run": run_dir.name, "status": manifest.get("status"), "created": manifest.get("created"),
        "model": manifest.get("pretrained_model_name_or_path"),
        "model fingerprint": str(identity.get("model", {}).get("weights_sha256", ""))[:16],
        "prompts": identity.get("n_prompts"), "prompts file": manifest.get("prompts_file"),
        "timesteps": len(manifest.get("timesteps", [])), "layers": len(manifest.get("layers", [])),
        "features": ", ".join(manifest.get("features", [])), "resolution": identity.get("resolution"),
        "nullbooth version": manifest.get("nullbooth_version"),
    }
    sections.append("<h2>Run</h2>" + html_table([{"key": k, "value": v} for k, v in overview.items()]))
    config_rows = [{"key": f"nullbooth.{k}", "value": v} for k, v in nb.items()]
    sections.append("<h2>Configuration</h2>" + html_table(config_rows)
                    + "<details><summary>manifest.json</summary><pre>"
                    + html.escape(json.dumps(manifest, indent=2)) + "</pre></details>")

    rows = inspect_run(run_dir)
    warn = [r["null_dim"] == 0 or r["null_dim"] == r["dim"] for r in rows]
    sections.append(
        "<h2>Null spaces (nullbooth inspect)</h2><p class='muted'>timestep-summed statistics, "
        f"{html.escape(str(nb.get('nullspace_mode')))} threshold {html.escape(str(nb.get('nullspace_threshold')))}; "
        "highlighted rows: empty null space (nothing can be "
        "learned) or the whole space (nothing is protected)</p>" + html_table(rows, warn=warn))

    summaries = out_dir / SUMMARIES_DIR
    if not summaries.is_dir():
        summaries = vis / SUMMARIES_DIR
    pngs = sorted(summaries.glob("*.png"), key=lambda p: (p.name != "covariance_statistics.png", p.name))
    captions = {
        "covariance_statistics.png": "Overview. Top: eigenvalue spectra of the timestep-summed second moments "
        "(log scale, "
        "threshold dashed, dots where the null space starts). Middle: null-space dimension per layer and timestep "
        "(stored metadata). Bottom: null dims of the summed statistics vs input width; sample counts.",
        "null_space_dim.png": "Null-space dimension per layer × timestep, from each matrix's null_space_dim.",
        "spectra_by_timestep.png": "Spectra of every layer's q/out statistics at each timestep (colour = timestep).",
    }
    sections.append("<h2>Covariance summaries</h2>" + (
        "".join(html_figure(p, captions.get(p.name, p.name)) for p in pngs) or "<p class='muted'>none</p>"))

    attention_root = out_dir if any(out_dir.glob("timestep_*/*.png")) else vis
    timesteps = sorted((int(p.name.removeprefix("timestep_")) for p in attention_root.glob("timestep_*") if p.is_dir()),
                       reverse=True)
    if timesteps:
        shown = _evenly(timesteps, max_attention_timesteps)
        index_path = vis / "attention_maps" / "index.json"
        prompts = read_json(index_path, "an attention-map index")["prompts"] if index_path.is_file() else {}
        intro = ("<p class='muted'>Cross-attention of each prompt token over the generated image, heads averaged, "
                 "conditional branch, recorded from the attention the layer applied. Prompts: "
                 + "; ".join(f"#{int(k)}: “{html.escape(v)}”" for k, v in prompts.items()) + "</p>")
        if len(shown) < len(timesteps):
            intro += f"<p class='muted'>{len(shown)} of {len(timesteps)} timesteps embedded (--max-timesteps).</p>"
        blocks = []
        for n, t in enumerate(shown):
            figs = "".join(html_figure(p, p.stem, jpeg=True)
                           for p in sorted((attention_root / timestep_dirname(t)).glob("*.png")))
            blocks.append(f"<details{' open' if n == 0 else ''}><summary>timestep {t}</summary>{figs}</details>")
        sections.append("<h2>Attention maps</h2>" + intro + "".join(blocks))

    # Anything else a user or another tool put under visualizations/ (not the run's own pictures, shown above).
    others = [p for p in sorted(vis.rglob("*.png"))
              if p.relative_to(vis).parts[0] not in (SUMMARIES_DIR, "attention_maps")
              and not p.relative_to(vis).parts[0].startswith("timestep_")]
    if others:
        sections.append("<h2>Other pictures</h2>" + "".join(html_figure(p, str(p.relative_to(vis))) for p in others))

    path = out_dir / REPORT
    write_text(path, html_page(f"NullBooth run {run_dir.name}", sections, str(run_dir)))
    size = path.stat().st_size
    if size > 50 * 2**20:
        log.warning("%s is %.0f MiB; pass --max-timesteps to embed fewer attention maps", path, size / 2**20)
    return path


def visualize_run(run_dir: Path, out_dir: Path | None = None, *, attention_maps: bool = False,
                  max_attention_timesteps: int | None = None) -> Path:
    """Regenerate the covariance pictures (and, with ``attention_maps``, the attention pictures from the
    raw maps saved in the run) and write ``report.html``; returns the report's path. No model needed."""
    run_dir = Path(run_dir)
    vis = run_dir / "visualizations"
    out_dir = Path(out_dir) if out_dir is not None else vis

    raw = vis / MAPS_DIR
    if attention_maps and not (raw / "index.json").is_file():
        raise NullBoothError(f"{run_dir} has no saved attention maps ({raw}); collect with "
                             "nullbooth.visual_attention_map: true to record them")
    plot_covariance_summaries(run_dir, out_dir / SUMMARIES_DIR)
    if attention_maps:
        render_attention_maps(AttentionMaps.load(raw), out_dir)
    return write_run_report(run_dir, out_dir, max_attention_timesteps=max_attention_timesteps)


# --------------------------------------------------------------------------- training and generation


def _series(value: Any) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values from ``[v…]``, ``[{"step", "loss"}…]`` or ``{"step": […], "loss": […]}``."""
    if isinstance(value, Mapping):
        y = np.asarray(value.get("loss", value.get("value", [])), dtype=np.float64)
        x = np.asarray(value.get("step", range(1, len(y) + 1)), dtype=np.float64)
        return x, y
    items = list(value)
    if items and isinstance(items[0], Mapping):
        x = np.asarray([it.get("step", i + 1) for i, it in enumerate(items)], dtype=np.float64)
        y = np.asarray([it.get("loss", it.get("value")) for it in items], dtype=np.float64)
        return x, y
    y = np.asarray(items, dtype=np.float64)
    return np.arange(1, len(y) + 1, dtype=np.float64), y


def loss_figure(loss: Any, title: str = "training loss"):
    """Loss per step with an exponential moving average (α = 0.1) to read the trend through the noise."""
    from matplotlib.figure import Figure

    x, y = _series(loss)
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(x, y, color="tab:blue", alpha=0.35, lw=0.8, label="loss")
    if y.size:
        ema = np.empty_like(y)
        acc = y[0]
        for i, v in enumerate(y):
            acc = 0.9 * acc + 0.1 * v
            ema[i] = acc
        ax.plot(x, ema, color="tab:blue", lw=1.8, label="moving average (α = 0.1)")
    if y.size and np.all(y > 0) and y.max() / y.min() > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _leakage_table(leakage: Any) -> dict[str, dict[str, float]]:
    """``{layer: {weight: value}}`` from ``{layer: v}``, ``{layer: {weight: v}}`` or rows with layer/weight/leakage."""
    table: dict[str, dict[str, float]] = {}
    if isinstance(leakage, Mapping):
        for layer, value in leakage.items():
            if isinstance(value, Mapping):
                table[str(layer)] = {str(k): float(v) for k, v in value.items()}
            else:
                table[str(layer)] = {"leakage": float(value)}
    else:
        for row in leakage:
            weight = str(row.get("weight", row.get("feature", "leakage")))
            table.setdefault(str(row["layer"]), {})[weight] = float(row.get("leakage", row.get("value")))
    return table


def leakage_figure(leakage: Any, title: str = "leakage ‖ΔW X₀‖ / ‖W X₀‖ on held-out prior prompts"):
    """Grouped bars: per layer, the relative output change of each trained weight on prior inputs."""
    from matplotlib.figure import Figure

    table = _leakage_table(leakage)
    layers = list(table)
    weights = list(dict.fromkeys(w for row in table.values() for w in row))
    fig = Figure(figsize=(max(6.0, 0.5 * len(layers) * max(1, len(weights)) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(weights), 1)
    values = np.array([v for row in table.values() for v in row.values()], dtype=np.float64)
    for i, w in enumerate(weights):
        x = np.arange(len(layers)) + (i - (len(weights) - 1) / 2) * width
        ax.bar(x, [table[l].get(w, np.nan) for l in layers], width, label=w)
    positive = values[values > 0]
    if positive.size and positive.max() / positive.min() > 100:
        ax.set_yscale("log")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([short_layer_name(l) for l in layers], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative output change")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if len(weights) > 1 or weights != ["leakage"]:
        ax.legend(fontsize=7)
    return fig


def render_training_report(report: Mapping[str, Any], out_html: Path,
                           images: Sequence[tuple[str, Any]] | None = None) -> Path:
    """Write a self-contained training report in the run-report style.

    Recognised keys of ``report``: ``title``; ``loss`` (list of floats, list of ``{"step", "loss"}`` or
    ``{"step": […], "loss": […]}``) → loss curve; ``leakage`` (``{layer: value}``, ``{layer: {weight:
    value}}`` or rows ``{"layer", "weight", "leakage"}``) → bar chart and table; ``config`` (mapping) →
    table. Other scalars form the summary table, lists of mappings become tables, anything else is shown
    as JSON. ``images`` are ``(caption, PIL image)`` pairs (validation samples).
    """
    out_html = Path(out_html)
    title = str(report.get("title", "NullBooth training report"))
    sections = []
    special = ("title", "loss", "leakage", "config")
    scalars = {k: v for k, v in report.items()
               if k not in special and (v is None or isinstance(v, (str, int, float, bool)))}
    if scalars:
        sections.append("<h2>Summary</h2>" + html_table([{"key": k, "value": v} for k, v in scalars.items()]))
    if report.get("loss") is not None and len(report["loss"]):
        x, y = _series(report["loss"])
        sections.append("<h2>Loss</h2>" + html_figure(loss_figure(report["loss"]),
                                                      f"{y.size} steps; last {y[-1]:.4g}, min {np.nanmin(y):.4g}"))
    if report.get("leakage"):
        table = _leakage_table(report["leakage"])
        rows = [{"layer": l, **row} for l, row in table.items()]
        sections.append("<h2>Leakage per layer</h2>" + html_figure(leakage_figure(report["leakage"]))
                        + html_table(rows))
    if isinstance(report.get("config"), Mapping):
        sections.append("<h2>Configuration</h2>" + html_table(
            [{"key": k, "value": v} for k, v in _flatten(report["config"]).items()]))
    for key, value in report.items():
        if key in special or key in scalars:
            continue
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            sections.append(f"<h2>{html.escape(key)}</h2>" + html_table(value))
        else:
            sections.append(f"<details><summary>{html.escape(key)}</summary><pre>"
                            + html.escape(json.dumps(value, indent=2, default=str)) + "</pre></details>")
    if images:
        sections.append("<h2>Validation images</h2>" + "".join(html_figure(im, cap) for cap, im in images))
    write_text(out_html, html_page(title, sections))
    return out_html


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
