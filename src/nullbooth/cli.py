"""``nullbooth <verb>``: parse flags, call the library, print results. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

# Quiet third-party import-time chatter (e.g. transformers' torchvision notice) before anything imports them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .errors import NullBoothError  # noqa: E402

log = logging.getLogger("nullbooth")


def _value(text: str) -> Any:
    """Flag override values are YAML scalars/lists: ``--set nullbooth.cross_attention_layers=[0,2]``."""
    import yaml

    return yaml.safe_load(text)


def _overrides(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    out = {key: getattr(args, attr) for attr, key in mapping.items() if getattr(args, attr, None) is not None}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise NullBoothError(f"--set expects KEY=VALUE (e.g. nullbooth.num_denoising_steps=25), got {item!r}")
        key, value = item.split("=", 1)
        out[key] = _value(value)
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (dotted), repeatable")
    p.add_argument("--pretrained_model_name_or_path", "--model", dest="model")
    p.add_argument("--seed", type=int)


COLLECT_FLAGS = {"model": "pretrained_model_name_or_path", "seed": "seed", "prompts": "nullbooth.original_knowledge_prompts",
                 "output": "nullbooth.cov_matrices_output_dir", "steps": "nullbooth.num_denoising_steps"}


def _model_check(args: argparse.Namespace, run_dir: Path) -> None:
    if args.model or args.config:
        from .config import load_config
        from .diagnostics import check_model
        from .models import load_pipeline

        cfg = load_config(args.config, _overrides(args, {"model": "pretrained_model_name_or_path"}))
        check_model(run_dir, load_pipeline(cfg.pretrained_model_name_or_path))


def cmd_inspect(args: argparse.Namespace) -> int:
    from .diagnostics import MODES, format_table, inspect_matrix, inspect_run

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
    for row in rows:
        name = f"{row.get('layer', row.get('matrix'))}/{row.get('feature', row.get('mode'))}"
        if row["null_dim"] == 0:
            log.warning("%s: the null space is empty — nothing can be learned there; raise the threshold or use "
                        "nullspace_mode relative/energy", name)
        elif row["null_dim"] == row["dim"]:
            log.warning("%s: the null space is the whole space — nothing is protected; lower the threshold", name)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .diagnostics import format_table, validate_run

    run_dir = Path(args.run_dir)
    _model_check(args, run_dir)
    rows, problems = validate_run(run_dir)
    print(format_table(rows, ["where", "symmetric", "positive_semidefinite", "condition_number", "rank", "null_dim"]))
    for problem in problems:
        log.error(problem)
    print(f"{len(rows)} matrices checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nullbooth", description="Knowledge-preserving personalization of diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("collect", help="collect prior-knowledge statistics of the cross-attention layers")
    _common(p)
    p.add_argument("--prompts", help="prompt file (nullbooth.original_knowledge_prompts)")
    p.add_argument("--output", help="nullbooth.cov_matrices_output_dir")
    p.add_argument("--steps", type=int, help="nullbooth.num_denoising_steps")
    p.add_argument("--fresh", action="store_true", help="start a new run even if a matching one exists")
    from .scale_cli import add_collect_arguments, cmd_collect as scale_collect

    add_collect_arguments(p)  # --extend RUN_DIR, --prompt-offset N, --storage MODE
    p.set_defaults(func=scale_collect)

    p = sub.add_parser("inspect", help="table of dimensions, null dimensions and spectra of a run (or a .npy matrix)")
    p.add_argument("target", help="a run directory or a .npy second-moment matrix")
    _common(p)
    p.add_argument("--mode", choices=["absolute", "relative", "energy", "rank", "percentile"])
    p.add_argument("--threshold", type=float)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("validate", help="check every matrix of a run (symmetric, PSD, condition, rank, projectors)")
    p.add_argument("run_dir")
    _common(p)
    p.set_defaults(func=cmd_validate)

    from . import evaluate, generate, scale_cli, train, visualize

    for module in (train, generate, evaluate, visualize, scale_cli):
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.captureWarnings(True)
    warnings.simplefilter("default", UserWarning)
    for noisy in ("transformers", "diffusers", "httpx", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except NullBoothError as err:
        if args.verbose:
            raise
        print(f"nullbooth {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nullbooth {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
