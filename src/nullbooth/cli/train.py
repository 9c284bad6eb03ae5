"""``nullbooth train``: flags → config → :func:`nullbooth.training.loop.train` → the report."""

from __future__ import annotations

import argparse
import json

from nullbooth.cli.common import add_common, overrides

TRAIN_FLAGS = {"model": "pretrained_model_name_or_path", "seed": "seed", "method": "method",
               "instance_data_dir": "instance_data_dir", "instance_prompt": "instance_prompt",
               "class_prompt": "class_prompt", "output_dir": "output_dir", "max_train_steps": "max_train_steps",
               "learning_rate": "learning_rate", "resume_from_checkpoint": "resume_from_checkpoint",
               "overwrite": "overwrite"}


def cmd_train(args: argparse.Namespace) -> int:
    from nullbooth.config import load_config
    from nullbooth.training.loop import train
    from nullbooth.training.report import format_report

    cfg = load_config(args.config, overrides(args, TRAIN_FLAGS))
    report = train(cfg)
    if report:
        print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def register_cli(subparsers) -> None:
    """Add the ``train`` verb to ``nullbooth``'s sub-parsers."""
    p = subparsers.add_parser("train", help="personalise the model on instance images (nullbooth, dreambooth, lora)")
    add_common(p)
    p.add_argument("--method", choices=["nullbooth", "dreambooth", "lora", "perfusion"])
    p.add_argument("--instance_data_dir")
    p.add_argument("--instance_prompt")
    p.add_argument("--class_prompt")
    p.add_argument("--output_dir")
    p.add_argument("--max_train_steps", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--resume_from_checkpoint", help="a checkpoint folder or 'latest'")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="output_dir holds an earlier run: delete its result and checkpoints, then train anew")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(func=cmd_train)
