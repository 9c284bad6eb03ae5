"""``nullbooth generate``: flags → config → :func:`nullbooth.generate.generate` → the written pictures."""

from __future__ import annotations

import argparse

from nullbooth.cli.common import add_common, overrides, parse_seeds

GENERATE_FLAGS = {"model": "pretrained_model_name_or_path", "seed": "seed", "adapter": "generate.adapter",
                  "prompt": "generate.prompts", "prompts": "generate.prompts_file", "seeds": "generate.seeds",
                  "steps": "generate.num_inference_steps", "guidance": "generate.guidance_scale",
                  "out": "generate.out_dir", "compare_base": "generate.compare_base",
                  "batch_size": "generate.batch_size", "num_images_per_prompt": "generate.num_images_per_prompt",
                  "scheduler": "generate.scheduler",
                  "concept": "perfusion.concepts", "beta": "perfusion.eval_beta", "tau": "perfusion.eval_tau"}


def cmd_generate(args: argparse.Namespace) -> int:
    from nullbooth.config import load_config
    from nullbooth.generate import generate

    if not args.compare_base:
        args.compare_base = None  # leave the config's value alone unless the flag is given
    cfg = load_config(args.config, overrides(args, GENERATE_FLAGS))
    for path in generate(cfg):
        print(path)
    return 0


DESCRIPTION = """\
Sample the base model, alone or with a trained result (nullbooth adapter, dreambooth unet/, diffusers
LoRA, Perfusion concept files), for every prompt × every seed.

Writes under --out: images/<i>_<slug>_seed<seed>.png, one PNG per image (i: the prompt's index, slug:
its words); <i>_<slug>.png, a grid per prompt with one column per seed; with --compare-base also
images/<i>_<slug>_seed<seed>_base.png and <i>_<slug>_compare.png (base row over personalised row).
Prints the grids' paths. Every image has its own generator seeded with its seed: --batch-size changes
no image (beyond float round-off), and --num-images-per-prompt K --seed S draws exactly what
--seeds S,S+1,…,S+K-1 draws."""


def register_cli(subparsers) -> None:
    """Add the ``generate`` verb to ``nullbooth``'s sub-parsers."""
    p = subparsers.add_parser("generate", help="sample the base model (+ a trained adapter) into images and grids",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--adapter", help="a training output_dir (nullbooth adapter, dreambooth unet/ or diffusers LoRA); "
                   "default: output_dir when it holds one, else the base model alone")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file with one prompt per line")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=parse_seeds, help="comma-separated seeds, e.g. 0,1,2,3 (default 0,1,2,3)")
    seeds.add_argument("--num-images-per-prompt", dest="num_images_per_prompt", type=int, metavar="K",
                       help="K images per prompt with seeds --seed, --seed+1, …, --seed+K-1 (replaces the seeds "
                       "of the config)")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="N",
                   help="images per pipeline call, prompts × seeds flattened (default 8; lower it if memory runs out)")
    p.add_argument("--scheduler", metavar="NAME",
                   help="a diffusers scheduler class, e.g. DPMSolverMultistepScheduler (default: the model's own)")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--out", help="output folder (default <adapter or output_dir>/samples)")
    p.add_argument("--compare-base", dest="compare_base", action="store_true",
                   help="also sample the base model and write both side by side")
    p.add_argument("--concept", action="append", help="another Perfusion concept file (repeatable: several concepts)")
    p.add_argument("--beta", type=float, help="Perfusion gate bias β at inference (lower: more of the concept)")
    p.add_argument("--tau", type=float, help="Perfusion gate temperature τ at inference")
    p.set_defaults(func=cmd_generate)
