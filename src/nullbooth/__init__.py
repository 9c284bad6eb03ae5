"""nullbooth: knowledge-preserving personalization of diffusers Stable Diffusion models.

The public API is loaded lazily: ``import nullbooth`` (and ``nullbooth --help``) imports no torch; the first
use of a name imports the module that defines it.

Layers, each importing only from those above it in this list::

    errors, filenames, config, io, prompts          foundations
    stats/      capture, second moments, null spaces, compression
    models, sampling, dataset, world/               pipelines, the one seeded sampler, images, the shapes world
    runs/       a collection run: layout, identity, plan, accumulate, shards, write, collect, merge,
                distributed, diagnostics, attention recording
    report/     HTML, covariance plots, run and training reports, image grids, attention pictures
    methods/    strategy base, nullbooth, baselines, registry, adapters, adapter files, leakage, LoRA export,
                perfusion/
    training/   setup → loop → finish, checkpoints, prior data, report
    generate, eval/
    cli/        argparse and printing only
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_API: dict[str, str] = {
    "NullBoothError": "nullbooth.errors",
    "Config": "nullbooth.config",
    "load_config": "nullbooth.config",
    "config_from_dict": "nullbooth.config",
    "SecondMoment": "nullbooth.stats.moments",
    "merge_all": "nullbooth.stats.moments",
    "NullSpace": "nullbooth.stats.nullspace",
    "null_space": "nullbooth.stats.nullspace",
    "null_dimension": "nullbooth.stats.nullspace",
    "spectrum": "nullbooth.stats.nullspace",
    "validate_covariance": "nullbooth.stats.nullspace",
    "cross_attention_layers": "nullbooth.stats.capture",
    "record_inputs": "nullbooth.stats.capture",
    "load_pipeline": "nullbooth.models",
    "load_covariance_data": "nullbooth.runs.layout",
    "RunData": "nullbooth.runs.layout",
    "collect": "nullbooth.runs.collect",
    "merge_runs": "nullbooth.runs.merge",
    "extend": "nullbooth.runs.merge",
    "inspect_run": "nullbooth.runs.diagnostics",
    "validate_run": "nullbooth.runs.diagnostics",
    "visualize_run": "nullbooth.report.run_report",
    "inject_null_space_adapters": "nullbooth.methods.adapters",
    "load_adapter": "nullbooth.methods.adapter_files",
    "save_adapter": "nullbooth.methods.adapter_files",
    "bases_from_run": "nullbooth.methods.adapter_files",
    "relative_leakage": "nullbooth.methods.leakage",
    "export_diffusers_lora": "nullbooth.methods.lora_export",
    "Rank1EditModule": "nullbooth.methods.perfusion.module",
    "PerfusionEditor": "nullbooth.methods.perfusion.editor",
    "make_method": "nullbooth.methods.registry",
    "train": "nullbooth.training.loop",
    "generate": "nullbooth.generate",
    "evaluate": "nullbooth.eval.evaluate",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'nullbooth' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from nullbooth.config import Config, config_from_dict, load_config
    from nullbooth.errors import NullBoothError
    from nullbooth.eval.evaluate import evaluate
    from nullbooth.generate import generate
    from nullbooth.methods.adapter_files import bases_from_run, load_adapter, save_adapter
    from nullbooth.methods.adapters import inject_null_space_adapters
    from nullbooth.methods.leakage import relative_leakage
    from nullbooth.methods.lora_export import export_diffusers_lora
    from nullbooth.methods.perfusion.editor import PerfusionEditor
    from nullbooth.methods.perfusion.module import Rank1EditModule
    from nullbooth.methods.registry import make_method
    from nullbooth.models import load_pipeline
    from nullbooth.report.run_report import visualize_run
    from nullbooth.runs.collect import collect
    from nullbooth.runs.diagnostics import inspect_run, validate_run
    from nullbooth.runs.layout import RunData, load_covariance_data
    from nullbooth.runs.merge import extend, merge_runs
    from nullbooth.stats.capture import cross_attention_layers, record_inputs
    from nullbooth.stats.moments import SecondMoment, merge_all
    from nullbooth.stats.nullspace import NullSpace, null_dimension, null_space, spectrum, validate_covariance
    from nullbooth.training.loop import train
