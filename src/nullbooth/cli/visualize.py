"""``nullbooth visualize RUN_DIR``: covariance plots and one self-contained ``report.html``."""

from __future__ import annotations

import argparse
from pathlib import Path

from nullbooth.errors import NullBoothError


def cmd_visualize(args: argparse.Namespace) -> int:
    from nullbooth.report.run_report import visualize_run

    if args.max_timesteps is not None and args.max_timesteps < 0:
        raise NullBoothError(f"--max-timesteps: expected a number of timesteps ≥ 0 (0: no attention maps), got "
                             f"{args.max_timesteps}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise NullBoothError(f"--out: expected a folder for report.html and the plots, found a file at {args.out}; "
                             "choose another folder")
    report = visualize_run(Path(args.run_dir), Path(args.out) if args.out else None,
                           attention_maps=args.attention_maps, max_attention_timesteps=args.max_timesteps)
    print(report)  # the CLI's output: where the report is
    return 0


def register_cli(subparsers) -> None:
    """Add ``nullbooth visualize RUN_DIR [--out DIR]`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "visualize", help="covariance plots and one self-contained report.html for a run (no model needed)")
    p.add_argument("run_dir", help="a complete run directory (run_YYYYMMDD_HHMMSS)")
    p.add_argument("--out", help="folder for report.html and the plots (default: RUN_DIR/visualizations)")
    p.add_argument("--attention-maps", action="store_true",
                   help="also re-render the attention-map pictures from the raw maps saved in the run")
    p.add_argument("--max-timesteps", type=int, metavar="N",
                   help="embed the attention maps of at most N evenly spaced timesteps in the report (default: all)")
    p.set_defaults(func=cmd_visualize)
