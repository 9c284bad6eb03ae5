"""Pictures of a run's statistics (``visualizations/covariance_summaries``).

Eigenvalue spectra ``λ`` of ``C = Σxxᵀ/n`` per layer and feature with the run's null-space threshold drawn in
its own units, the null-space dimension over timesteps × layers (the ``null_space_dim`` stored in the
metadata), and the sample counts ``n``. Plots use matplotlib's object API (``matplotlib.figure.Figure``
rendered by Agg): headless, and no global pyplot state is touched in the caller's process.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nullbooth.filenames import COVARIANCE_STATISTICS
from nullbooth.io import read_json, write_json
from nullbooth.runs.layout import (
    layer_dirname,
    load_summed_statistics,
    read_manifest,
    timestep_dirname,
)
from nullbooth.stats.nullspace import null_dimension, spectrum

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
    # The text statistic is the same for every layer (docs/design.md §2): one curve.
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
    write_json(out_dir / COVARIANCE_STATISTICS, s.to_json())
    return s, drawn
