"""``nullbooth inspect`` and ``nullbooth validate``: tables of a run's dimensions, spectra and consistency checks."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from nullbooth.cli.common import add_common, overrides
from nullbooth.errors import NullBoothError

log = logging.getLogger("nullbooth")
MODES = ("absolute", "relative", "energy", "rank", "percentile")


def _model_check(args: argparse.Namespace, run_dir: Path) -> None:
    if args.model or args.config:
        from nullbooth.config import load_config
        from nullbooth.models import load_pipeline
        from nullbooth.runs.diagnostics import check_model

        cfg = load_config(args.config, overrides(args, {"model": "pretrained_model_name_or_path"}))
        check_model(run_dir, load_pipeline(cfg.pretrained_model_name_or_path), statistics=False)  # validate reports them


def cmd_inspect(args: argparse.Namespace) -> int:
    from nullbooth.runs.diagnostics import format_table, inspect_matrix, inspect_run, null_space_advice

    target = Path(args.target)
    if target.suffix == ".npy":
        settings = [(args.mode, args.threshold)] if args.mode else [
            ("absolute", 2e-2), ("relative", 1e-3), ("energy", 1e-3), ("percentile", 5.0)]
        if args.mode and args.threshold is None:
            raise NullBoothError(f"--mode {args.mode} needs --threshold (one of the modes {', '.join(MODES)})")
        rows = inspect_matrix(target, settings)
    else:
        _model_check(args, target)
        rows = inspect_run(target, args.mode, args.threshold)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    for advice in null_space_advice(rows):
        log.warning("%s", advice)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from nullbooth.runs.diagnostics import format_table, validate_run

    run_dir = Path(args.run_dir)
    _model_check(args, run_dir)
    rows, problems = validate_run(run_dir)
    print(format_table(rows, ["where", "symmetric", "positive_semidefinite", "condition_number", "rank", "null_dim"]))
    for problem in problems:
        log.error(problem)
    print(f"{len(rows)} matrices checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def register_cli(subparsers) -> None:
    """Add ``inspect`` and ``validate`` to ``nullbooth``'s sub-parsers."""
    p = subparsers.add_parser("inspect", help="table of dimensions, null dimensions and spectra of a run (or a .npy matrix)")
    p.add_argument("target", help="a run directory or a .npy second-moment matrix")
    add_common(p)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--threshold", type=float)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("validate", help="check every matrix of a run (symmetric, PSD, condition, rank, projectors)")
    p.add_argument("run_dir")
    add_common(p)
    p.set_defaults(func=cmd_validate)
