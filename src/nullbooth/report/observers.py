"""What a collection run draws while it runs: attention maps, then the run's pictures and ``report.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nullbooth.filenames import VISUALIZATIONS_DIR
from nullbooth.report.attention import render_attention_maps
from nullbooth.report.run_report import visualize_run
from nullbooth.runs.attention import AttentionRecorder


class AttentionMapObserver(AttentionRecorder):
    """Records the maps during collection (:class:`AttentionRecorder`), then draws them into the run.

    On ``finish``: the raw maps, one picture per (layer, timestep) under ``visualizations/``, and — with
    ``summaries`` — the covariance summaries and ``report.html`` embedding at most ``report_timesteps``
    evenly spaced timesteps (``nullbooth visualize --max-timesteps`` rewrites the report).
    """

    def finish(self, run_dir: Path) -> None:
        super().finish(run_dir)
        if self.recorded.maps:
            render_attention_maps(self.recorded, Path(run_dir) / VISUALIZATIONS_DIR)
        if self.summaries:
            visualize_run(run_dir, max_attention_timesteps=self.report_timesteps)


def collection_observers(cfg: Any) -> tuple[AttentionMapObserver, ...]:
    """What a collection with ``cfg`` should watch: the attention maps when ``nullbooth.visual_attention_map``."""
    return (AttentionMapObserver.from_config(cfg),) if cfg.nullbooth.visual_attention_map else ()
