"""``nullbooth train``: flags → config → :func:`nullbooth.training.loop.train` → the report."""

from __future__ import annotations

import argparse
import json

from nullbooth.cli.common import add_config_source, overrides
from nullbooth.cli.flags import add_config_flags
from nullbooth.config import FLAG_GROUPS, Config

# Other spellings of a key: our --model, and diffusers' LoRA scripts' --rank for lora_rank.
ALIASES = {"pretrained_model_name_or_path": ("--model",), "lora_rank": ("--rank",)}

DESCRIPTION = """\
Personalise the model on instance images. Every config key is a flag spelled as the key (diffusers'
train_dreambooth.py names), e.g.
  nullbooth train --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --method nullbooth
--config FILE is optional; flags win over it, --set KEY=VALUE over both.

true/false keys: --KEY on, --no-KEY (or --no_KEY) off. Text keys take the text verbatim; other values are
read as YAML: --learning_rate 1e-4, --resolution null (unset), --nullbooth.cross_attention_layers [0,2].
A block's keys are dotted: --nullbooth.leakage_budget 0.1, --perfusion.concept_token '<x>'. Several
subjects: --subjects '[{instance_data_dir: a/, instance_prompt: a photo of sks dog}, …]'.
Aliases: --model for --pretrained_model_name_or_path, --rank for --lora_rank (diffusers' LoRA scripts)."""


def cmd_train(args: argparse.Namespace) -> int:
    from nullbooth.config import load_config
    from nullbooth.training.loop import train
    from nullbooth.training.report import format_report

    cfg = load_config(args.config, overrides(args))
    report = train(cfg)
    if report:
        print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def register_cli(subparsers) -> None:
    """Add the ``train`` verb to ``nullbooth``'s sub-parsers."""
    p = subparsers.add_parser("train", help="personalise the model on instance images (nullbooth, perfusion and the baselines)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="%(prog)s [--config FILE] [--KEY VALUE | --KEY | --no-KEY]… [--set KEY=VALUE]…")
    add_config_source(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    add_config_flags(p, Config, FLAG_GROUPS, ALIASES)
    p.set_defaults(func=cmd_train)
