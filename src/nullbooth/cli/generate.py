"""``nullbooth generate``: flags → config → :func:`nullbooth.generate.generate` → the written pictures."""

from __future__ import annotations

import argparse

from nullbooth.cli.common import add_common, add_key_flag, overrides, parse_seeds
from nullbooth.cli.flags import add_block_flags
from nullbooth.config import GenerateBlock

GENERATE_FLAGS = {"model": "pretrained_model_name_or_path", "seed": "seed"}


def cmd_generate(args: argparse.Namespace) -> int:
    from nullbooth.config import load_config
    from nullbooth.generate import generate

    cfg = load_config(args.config, overrides(args, GENERATE_FLAGS))
    for path in generate(cfg):
        print(path)
    return 0


DESCRIPTION = """\
Sample the base model, alone or with a trained result (nullbooth adapter, dreambooth unet/, diffusers
LoRA, peft OFT folder, Perfusion concept files), for every prompt × every seed.

Writes under --out: images/<i>_<slug>_seed<seed>.png, one PNG per image (i: the prompt's index, slug:
its words); <i>_<slug>.png, a grid per prompt with one column per seed; with --compare-base also
images/<i>_<slug>_seed<seed>_base.png and <i>_<slug>_compare.png (base row over personalised row).
Prints the grids' paths. Every image has its own generator seeded with its seed: --batch-size changes
no image (beyond float round-off), and --num-images-per-prompt K --seed S draws exactly what
--seeds S,S+1,…,S+K-1 draws."""


def register_cli(subparsers) -> None:
    """Add the ``generate`` verb to ``nullbooth``'s sub-parsers."""
    p = subparsers.add_parser("generate", help="sample the base model (+ a trained adapter) into images and grids",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="%(prog)s [--config FILE] [--adapter DIR] [--prompt TEXT]… [--KEY VALUE]… "
                                    "[--set KEY=VALUE]…")
    add_common(p)
    add_key_flag(p, "--adapter", "generate.adapter", help="a training output_dir (nullbooth adapter, dreambooth "
                 "unet/, diffusers LoRA, oft/ or Perfusion concepts); default: output_dir when it holds one, else the base model alone")
    add_key_flag(p, "--prompt", "generate.prompts", action="append", help="a prompt (repeatable)")
    add_key_flag(p, "--prompts", "generate.prompts_file", help="a file with one prompt per line")
    seeds = p.add_mutually_exclusive_group()
    add_key_flag(seeds, "--seeds", "generate.seeds", type=parse_seeds,
                 help="comma-separated seeds, e.g. 0,1,2,3 (default 0,1,2,3)")
    add_key_flag(seeds, "--num-images-per-prompt", "generate.num_images_per_prompt", type=int, metavar="K",
                 help="K images per prompt with seeds --seed, --seed+1, …, --seed+K-1 (replaces the seeds of the "
                 "config)")
    add_key_flag(p, "--batch-size", "generate.batch_size", type=int, metavar="N",
                 help="images per pipeline call, prompts × seeds flattened (default 8; lower it if memory runs out)")
    add_key_flag(p, "--scheduler", "generate.scheduler", metavar="NAME",
                 help="a diffusers scheduler class, e.g. DPMSolverMultistepScheduler (default: the model's own)")
    add_key_flag(p, "--steps", "generate.num_inference_steps", type=int, help="sampling steps")
    add_key_flag(p, "--guidance", "generate.guidance_scale", type=float, help="classifier-free guidance scale")
    add_key_flag(p, "--out", "generate.out_dir", help="output folder (default <adapter or output_dir>/samples)")
    add_key_flag(p, "--compare-base", "generate.compare_base", action="store_true",
                 help="also sample the base model and write both side by side")
    add_key_flag(p, "--concept", "perfusion.concepts", action="append",
                 help="another Perfusion concept file (repeatable: several concepts)")
    add_key_flag(p, "--beta", "perfusion.eval_beta", type=float,
                 help="Perfusion gate bias β at inference (lower: more of the concept)")
    add_key_flag(p, "--tau", "perfusion.eval_tau", type=float, help="Perfusion gate temperature τ at inference")
    group = p.add_argument_group("generate settings", "the generate: block of a config file as --generate.KEY (the "
                                 "flags above set the same keys);\nvalues are read as YAML, e.g. --generate.seeds [0,1]")
    add_block_flags(group, GenerateBlock, "generate")
    p.set_defaults(func=cmd_generate)
