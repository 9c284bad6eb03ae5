"""``nullbooth collect`` (plain, distributed, ``--extend``, ``--prompt-offset``) and ``nullbooth merge``."""

from __future__ import annotations

import argparse
import os

from nullbooth.cli.common import add_common, add_key_flag, overrides
from nullbooth.cli.flags import add_block_flags, add_field_flag
from nullbooth.config import Config, NullBoothBlock
from nullbooth.errors import NullBoothError

STORAGE_CHOICES = ("float32", "float16", "eigh")
COLLECT_FLAGS = {"model": "pretrained_model_name_or_path", "seed": "seed"}
PROMPTS, OUTPUT = "nullbooth.original_knowledge_prompts", "nullbooth.cov_matrices_output_dir"


def add_collect_arguments(p: argparse.ArgumentParser) -> None:
    """The ``collect`` flags this module handles (add them to the ``collect`` sub-parser)."""
    add_key_flag(p, "--prompts", PROMPTS, help=f"prompt file ({PROMPTS})")
    add_key_flag(p, "--output", OUTPUT, help=OUTPUT)
    add_key_flag(p, "--steps", "nullbooth.num_denoising_steps", type=int, help="nullbooth.num_denoising_steps")
    p.add_argument("--fresh", action="store_true",
                   help="start a new run even if a matching (complete, partial or damaged) one exists; that one is "
                        "left as it is")
    p.add_argument("--extend", metavar="RUN_DIR",
                   help="add the prompts of --prompts to this complete run (a new run equal to one on the union)")
    p.add_argument("--prompt-offset", type=int, metavar="N", dest="prompt_offset",
                   help="number this file's prompts from global index N (seed + N + i), so the run can later be "
                        "merged into one equal to a run of the whole list")
    add_key_flag(p, "--storage", "nullbooth.storage", choices=STORAGE_CHOICES,
                 help="nullbooth.storage (how per-timestep matrices are stored)")
    group = p.add_argument_group("nullbooth (null-space) settings", "the nullbooth: block of a config file as "
                                 "--nullbooth.KEY (the flags above set some of the same keys)")
    add_field_flag(group, "resolution", Config.model_fields["resolution"])
    add_block_flags(group, NullBoothBlock, "nullbooth")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def cmd_collect(args: argparse.Namespace) -> int:
    """``nullbooth collect``: plain, distributed (under torchrun/accelerate), ``--extend`` or ``--prompt-offset``."""
    flags = overrides(args, COLLECT_FLAGS)
    if getattr(args, "extend", None):
        from nullbooth.runs.merge import extend

        # With --extend, --prompts are the prompts to add and --output where the new run goes, not config keys.
        prompts, output = flags.pop(PROMPTS, None), flags.pop(OUTPUT, None)
        if not prompts:
            raise NullBoothError("--extend RUN_DIR needs --prompts NEW.txt (the prompts to add)")
        if args.config:
            raise NullBoothError("--extend takes the model and settings from RUN_DIR; drop --config (storage options "
                                 "can be set with --storage or --nullbooth.KEY VALUE)")
        if getattr(args, "prompt_offset", None) is not None:
            raise NullBoothError("--extend numbers the new prompts after the run's own; drop --prompt-offset")
        run_dir = extend(args.extend, prompts, output_dir=output, overrides=flags, fresh=args.fresh)
    else:
        from nullbooth.config import load_config
        from nullbooth.report.observers import collection_observers
        from nullbooth.runs.collect import collect, collection_inputs

        cfg = load_config(args.config, flags)
        unet_scope = cfg.nullbooth.scope == "unet"
        # One process: the pipeline the collection samples also gives the UNet statistics (one load, not two), and
        # the inputs are checked before it loads. Under a launcher each rank loads its own on its GPU, and rank 0
        # alone samples the UNet statistics.
        prompts, pipe = None, None
        if unet_scope and not _is_launched():
            prompts = collection_inputs(cfg)
            pipe = _load(cfg)
        run_dir = collect(cfg, pipe=pipe, prompts=prompts, fresh=args.fresh,
                          prompt_offset=getattr(args, "prompt_offset", None) or 0, observers=collection_observers(cfg))
        if unet_scope and _is_main_process():
            from nullbooth.methods.unet_scope import other_statistics

            other_statistics(cfg, run_dir, pipe or _load(cfg))
    if _is_main_process():  # under torchrun every process returns the same run: print it once
        print(run_dir)
    return 0


def _is_launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _load(cfg: Config):
    """``scope: unet`` trains every UNet weight, so collect samples their statistics too and training starts from a
    complete run; this is the pipeline for them."""
    from nullbooth.models import load_pipeline

    return load_pipeline(cfg.pretrained_model_name_or_path, device="auto")


def cmd_merge(args: argparse.Namespace) -> int:
    """``nullbooth merge RUN_A RUN_B … -o OUT``: add compatible runs into a new run under OUT."""
    from nullbooth.runs.merge import merge_runs

    flags = overrides(args, {"storage": "nullbooth.storage", "mode": "nullbooth.nullspace_mode",
                             "threshold": "nullbooth.nullspace_threshold"})
    if args.keep_timestep_sums:
        flags["nullbooth.keep_timestep_sums"] = True
    run_dir = merge_runs(args.runs, args.output, overrides=flags)
    if _is_main_process():
        print(run_dir)
    return 0


def register_cli(subparsers) -> None:
    """Add ``collect`` and ``merge`` to ``nullbooth``'s sub-parsers."""
    p = subparsers.add_parser("collect", help="collect prior-knowledge statistics of the cross-attention layers",
                              usage="%(prog)s [--config FILE] [--prompts FILE] [--output DIR] [--KEY VALUE]… "
                                    "[--set KEY=VALUE]…")
    add_common(p)
    add_collect_arguments(p)
    p.set_defaults(func=cmd_collect)

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
