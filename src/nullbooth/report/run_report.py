"""A run's ``report.html``: configuration, the ``inspect`` table, covariance pictures and attention maps.

``nullbooth visualize RUN_DIR`` rewrites it from the run alone (no model needed).
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nullbooth.errors import NullBoothError
from nullbooth.filenames import ATTENTION_INDEX, ATTENTION_MAPS_DIR, RUN_REPORT, VISUALIZATIONS_DIR
from nullbooth.io import read_json, write_text
from nullbooth.report.attention import render_attention_maps
from nullbooth.report.covariance import SUMMARIES_DIR, plot_covariance_summaries
from nullbooth.report.html import html_figure, html_page, html_table
from nullbooth.runs.attention import AttentionMaps
from nullbooth.runs.diagnostics import inspect_run
from nullbooth.runs.layout import read_manifest, timestep_dirname

log = logging.getLogger(__name__)

def _evenly(items: Sequence[int], n: int | None) -> list[int]:
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in idx]


def _overview(run_dir: Path, manifest: dict) -> list[str]:
    nb, identity = manifest.get("nullbooth", {}), manifest.get("identity", {})
    overview = {
        "run": run_dir.name, "status": manifest.get("status"), "created": manifest.get("created"),
        "model": manifest.get("pretrained_model_name_or_path"),
        "model fingerprint": str(identity.get("model", {}).get("weights_sha256", ""))[:16],
        "prompts": identity.get("n_prompts"), "prompts file": manifest.get("prompts_file"),
        "timesteps": len(manifest.get("timesteps", [])), "layers": len(manifest.get("layers", [])),
        "features": ", ".join(manifest.get("features", [])), "resolution": identity.get("resolution"),
        "nullbooth version": manifest.get("nullbooth_version"),
    }
    config_rows = [{"key": f"nullbooth.{k}", "value": v} for k, v in nb.items()]
    rows = inspect_run(run_dir)
    warn = [r["null_dim"] == 0 or r["null_dim"] == r["dim"] for r in rows]
    return [
        "<h2>Run</h2>" + html_table([{"key": k, "value": v} for k, v in overview.items()]),
        "<h2>Configuration</h2>" + html_table(config_rows) + "<details><summary>manifest.json</summary><pre>"
        + html.escape(json.dumps(manifest, indent=2)) + "</pre></details>",
        "<h2>Null spaces (nullbooth inspect)</h2><p class='muted'>timestep-summed statistics, "
        f"{html.escape(str(nb.get('nullspace_mode')))} threshold {html.escape(str(nb.get('nullspace_threshold')))}; "
        "highlighted rows: empty null space (nothing can be "
        "learned) or the whole space (nothing is protected)</p>" + html_table(rows, warn=warn),
    ]


SUMMARY_CAPTIONS = {
    "covariance_statistics.png": "Overview. Top: eigenvalue spectra of the timestep-summed second moments "
    "(log scale, "
    "threshold dashed, dots where the null space starts). Middle: null-space dimension per layer and timestep "
    "(stored metadata). Bottom: null dims of the summed statistics vs input width; sample counts.",
    "null_space_dim.png": "Null-space dimension per layer × timestep, from each matrix's null_space_dim.",
    "spectra_by_timestep.png": "Spectra of every layer's q/out statistics at each timestep (colour = timestep).",
}


def _summaries(vis: Path, out_dir: Path) -> str:
    summaries = out_dir / SUMMARIES_DIR
    if not summaries.is_dir():
        summaries = vis / SUMMARIES_DIR
    pngs = sorted(summaries.glob("*.png"), key=lambda p: (p.name != "covariance_statistics.png", p.name))
    return "<h2>Covariance summaries</h2>" + (
        "".join(html_figure(p, SUMMARY_CAPTIONS.get(p.name, p.name)) for p in pngs) or "<p class='muted'>none</p>")


def _attention(vis: Path, out_dir: Path, max_timesteps: int | None) -> list[str]:
    root = out_dir if any(out_dir.glob("timestep_*/*.png")) else vis
    timesteps = sorted((int(p.name.removeprefix("timestep_")) for p in root.glob("timestep_*") if p.is_dir()),
                       reverse=True)
    if not timesteps:
        return []
    shown = _evenly(timesteps, max_timesteps)
    index_path = vis / ATTENTION_MAPS_DIR / ATTENTION_INDEX
    prompts = read_json(index_path, "an attention-map index")["prompts"] if index_path.is_file() else {}
    intro = ("<p class='muted'>Cross-attention of each prompt token over the generated image, heads averaged, "
             "conditional branch, recorded from the attention the layer applied. Prompts: "
             + "; ".join(f"#{int(k)}: “{html.escape(v)}”" for k, v in prompts.items()) + "</p>")
    if len(shown) < len(timesteps):
        intro += f"<p class='muted'>{len(shown)} of {len(timesteps)} timesteps embedded (--max-timesteps).</p>"
    blocks = []
    for n, t in enumerate(shown):
        figs = "".join(html_figure(p, p.stem, jpeg=True) for p in sorted((root / timestep_dirname(t)).glob("*.png")))
        blocks.append(f"<details{' open' if n == 0 else ''}><summary>timestep {t}</summary>{figs}</details>")
    return ["<h2>Attention maps</h2>" + intro + "".join(blocks)]


def _other_pictures(vis: Path) -> list[str]:
    """Anything else a user or another tool put under visualizations/ (not the run's own pictures)."""
    others = [p for p in sorted(vis.rglob("*.png"))
              if p.relative_to(vis).parts[0] not in (SUMMARIES_DIR, ATTENTION_MAPS_DIR)
              and not p.relative_to(vis).parts[0].startswith("timestep_")]
    if not others:
        return []
    return ["<h2>Other pictures</h2>" + "".join(html_figure(p, str(p.relative_to(vis))) for p in others)]


def write_run_report(run_dir: Path, out_dir: Path | None = None, *, max_attention_timesteps: int | None = None) -> Path:
    """``report.html``: configuration, the ``inspect`` table, covariance pictures and attention maps, self-contained."""
    run_dir = Path(run_dir)
    vis = run_dir / VISUALIZATIONS_DIR
    out_dir = Path(out_dir) if out_dir is not None else vis
    sections = [*_overview(run_dir, read_manifest(run_dir)), _summaries(vis, out_dir),
                *_attention(vis, out_dir, max_attention_timesteps), *_other_pictures(vis)]
    path = out_dir / RUN_REPORT
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
    vis = run_dir / VISUALIZATIONS_DIR
    out_dir = Path(out_dir) if out_dir is not None else vis

    raw = vis / ATTENTION_MAPS_DIR
    if attention_maps and not (raw / ATTENTION_INDEX).is_file():
        raise NullBoothError(f"{run_dir} has no saved attention maps ({raw}); collect with "
                             "nullbooth.visual_attention_map: true to record them")
    plot_covariance_summaries(run_dir, out_dir / SUMMARIES_DIR)
    if attention_maps:
        render_attention_maps(AttentionMaps.load(raw), out_dir)
    return write_run_report(run_dir, out_dir, max_attention_timesteps=max_attention_timesteps)
