"""The training report in the run-report style: loss curve, leakage per weight, configuration, validation images."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nullbooth.io import write_text
from nullbooth.report.covariance import short_layer_name
from nullbooth.report.html import html_figure, html_page, html_table


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
