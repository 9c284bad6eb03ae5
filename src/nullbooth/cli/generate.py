"""``nullbooth generate``: flags → config → :func:`nullbooth.generate.generate` → the written pictures."""

from __future__ import annotations

import argparse

from nullbooth.cli.common import add_common, overrides, parse_seeds

GENERATE_FLAGS = {"model": "pretrained_model_name_or_path", "seed": "seed", "adapter": "generate.adapter",
                  "prompt": "generate.prompts", "prompts": "generate.prompts_file", "seeds": "generate.seeds",
                  "steps": "generate.num_inference_steps", "guidance": "generate.guidance_scale",
                  "out": "generate.out_dir", "compare_base": "generate.compare_base",
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


def register_cli(subparsers) -> None:
    """Add the ``generate`` verb to ``nullbooth``'s sub-parsers."""
    p = subparsers.add_parser("generate", help="sample the base model + a trained adapter into image grids")
    add_common(p)
    p.add_argument("--adapter", help="a training output_dir (nullbooth adapter, dreambooth unet/ or diffusers LoRA)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--seeds", type=parse_seeds, help="comma-separated seeds, e.g. 0,1,2,3")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--out", help="output folder (default <adapter>/samples)")
    p.add_argument("--compare-base", dest="compare_base", action="store_true",
                   help="also sample the base model and write both side by side")
    p.add_argument("--concept", action="append", help="another Perfusion concept file (repeatable: several concepts)")
    p.add_argument("--beta", type=float, help="Perfusion gate bias β at inference (lower: more of the concept)")
    p.add_argument("--tau", type=float, help="Perfusion gate temperature τ at inference")
    p.set_defaults(func=cmd_generate)
