"""CLI wiring for scaling out collection: ``collect --extend/--prompt-offset/--storage`` and ``nullbooth merge``.

Only argparse and the standard library at import time (the CLI builds its parser on every call);
the work is imported when a command runs.
"""

from __future__ import annotations

import argparse
import os

from .errors import NullBoothError

STORAGE_CHOICES = ("float32", "float16", "eigh")


def add_collect_arguments(p: argparse.ArgumentParser) -> None:
    """The ``collect`` flags this module handles (add them to the ``collect`` sub-parser)."""
    p.add_argument("--extend", metavar="RUN_DIR",
                   help="add the prompts of --prompts to this complete run (a new run equal to one on the union)")
    p.add_argument("--prompt-offset", type=int, metavar="N", dest="prompt_offset",
                   help="number this file's prompts from global index N (seed + N + i), so the run can later be "
                        "merged into one equal to a run of the whole list")
    p.add_argument("--storage", choices=STORAGE_CHOICES, help="nullbooth.storage (how per-timestep matrices are stored)")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def cmd_collect(args: argparse.Namespace) -> int:
    """``nullbooth collect``: plain, distributed (under torchrun/accelerate), ``--extend`` or ``--prompt-offset``."""
    from .cli import COLLECT_FLAGS, _overrides

    overrides = _overrides(args, {**COLLECT_FLAGS, "storage": "nullbooth.storage"})
    if getattr(args, "extend", None):
        from .merge import extend

        if not args.prompts:
            raise NullBoothError("--extend RUN_DIR needs --prompts NEW.txt (the prompts to add)")
        if args.config:
            raise NullBoothError("--extend takes the model and settings from RUN_DIR; drop --config (storage options "
                                 "can be set with --storage or --set nullbooth.KEY=VALUE)")
        if getattr(args, "prompt_offset", None) is not None:
            raise NullBoothError("--extend numbers the new prompts after the run's own; drop --prompt-offset")
        for taken in ("nullbooth.original_knowledge_prompts", "nullbooth.cov_matrices_output_dir"):
            overrides.pop(taken, None)
        run_dir = extend(args.extend, args.prompts, output_dir=args.output, overrides=overrides, fresh=args.fresh)
    else:
        from .collect import collect
        from .config import load_config

        cfg = load_config(args.config, overrides)
        run_dir = collect(cfg, fresh=args.fresh, prompt_offset=getattr(args, "prompt_offset", None) or 0)
    if _is_main_process():  # under torchrun every process returns the same run: print it once
        print(run_dir)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``nullbooth merge RUN_A RUN_B … -o OUT``: add compatible runs into a new run under OUT."""
    from .cli import _overrides
    from .merge import merge_runs

    overrides = _overrides(args, {"storage": "nullbooth.storage", "mode": "nullbooth.nullspace_mode",
                                  "threshold": "nullbooth.nullspace_threshold"})
    if args.keep_timestep_sums:
        overrides["nullbooth.keep_timestep_sums"] = True
    run_dir = merge_runs(args.runs, args.output, overrides=overrides)
    if _is_main_process():
        print(run_dir)
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``merge`` verb to ``nullbooth``'s sub-parsers; returns its parser."""
    p = subparsers.add_parser(
        "merge", help="add compatible collection runs (same model, layers, features, sampler, steps, guidance, "
                      "resolution) into a new run; one run: re-store it (--storage, --mode/--threshold)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="complete run directories")
    p.add_argument("-o", "--output", help="folder to create the merged run_YYYYMMDD_HHMMSS in (default: the first run's)")
    p.add_argument("--storage", choices=STORAGE_CHOICES, help="how the merged per-timestep matrices are stored")
    p.add_argument("--mode", choices=["absolute", "relative", "energy", "rank", "percentile"],
                   help="nullspace_mode of the merged run (default: the first run's)")
    p.add_argument("--threshold", type=float, help="nullspace_threshold of the merged run (default: the first run's)")
    p.add_argument("--keep-timestep-sums", action="store_true", dest="keep_timestep_sums",
                   help="keep exact float64 per-timestep sums (needs them in every input)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="nullbooth.storage_energy=0.999 etc., repeatable")
    p.set_defaults(func=cmd_merge)
    return p
