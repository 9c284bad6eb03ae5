"""``nullbooth evaluate``: base vs personalised on the same prompts and seeds → ``evaluation.{json,md}``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nullbooth.cli.common import parse_seeds
from nullbooth.errors import NullBoothError
from nullbooth.filenames import EVALUATION_DIR, EVALUATION_JSON, EVALUATION_MD


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nullbooth.eval.evaluate import EvalRequest, Sampling, evaluate, to_markdown, training_config
    from nullbooth.prompts import read_prompt_file

    prompts = list(args.prompt or []) + (read_prompt_file(args.prompts, "--prompts") if args.prompts else [])
    pers = Path(args.personalized)
    cfg = training_config(pers)  # a training output knows its base, its subjects and their instance images
    base = args.base or cfg.get("pretrained_model_name_or_path")
    if not base:
        raise NullBoothError("evaluate: expected --base MODEL (the model the personalisation was trained from), "
                             f"got none and {pers} records none")
    req = EvalRequest(
        base=base, personalized=str(pers), prompts=prompts,
        sampling=Sampling(seeds=tuple(args.seeds), steps=args.steps, guidance=args.guidance, resolution=args.resolution,
                          batch=args.batch),
        features=args.features, attributes=args.attributes, k=args.k, output=args.output or str(pers / EVALUATION_DIR),
        **_subjects(args, cfg, pers),
    )
    report = evaluate(req)
    print(to_markdown(report, max_prompts=10), end="")
    print(f"wrote {Path(req.output) / EVALUATION_JSON} and {EVALUATION_MD}")
    if Path(req.output) == pers / EVALUATION_DIR:
        from nullbooth.report.model_card import refresh_model_card

        refresh_model_card(pers)  # the training output's card now shows these numbers
    return 0


def _subjects(args: argparse.Namespace, cfg: dict[str, Any], pers: Path) -> dict[str, Any]:
    """The subject-fidelity part of the request: the given instance folder and subject prompts, else what the
    training output recorded -- its one subject (validation and instance prompt), or with several subjects each
    one's instance prompt against its own instance images."""
    from nullbooth.eval.evaluate import EvalSubject
    from nullbooth.prompts import read_prompt_file

    subject = list(args.subject_prompt or []) + (
        read_prompt_file(args.subject_prompts, "--subject-prompts") if args.subject_prompts else [])
    recorded = cfg.get("subjects") or []
    if len(recorded) > 1 and not args.instance_dir:
        if subject:
            raise NullBoothError(f"evaluate: {pers} was trained on {len(recorded)} subjects, so --subject-prompt "
                                 "needs --instance-dir (the one subject those prompts show); or pass neither to score "
                                 "every subject's instance prompt against its own images")
        return {"subjects": [EvalSubject(s["instance_prompt"], s["instance_data_dir"], (s["instance_prompt"],))
                             for s in recorded]}
    one = recorded[0] if len(recorded) == 1 else cfg
    instance_dir = args.instance_dir or one.get("instance_data_dir")
    if instance_dir and not subject:
        subject = [p for p in (cfg.get("validation_prompt"), one.get("instance_prompt")) if p]
    return {"subject_prompts": subject, "instance_dir": instance_dir}


def register_cli(subparsers) -> None:
    """Add the ``evaluate`` verb to ``nullbooth``'s sub-parsers."""
    p = subparsers.add_parser("evaluate", help="compare a base and a personalised model on prompts with identical seeds")
    p.add_argument("personalized", help="a training output_dir (adapter, unet/, LoRA, Perfusion) or a diffusers folder")
    p.add_argument("--base", help="the base model (default: the one the training output records)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--seeds", type=parse_seeds, default=[0, 1], help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--batch", type=int, default=32, help="images per pipeline call")
    p.add_argument("--features", default=None,
                   help="feature extractor: 'judge' (default, offline), a judge folder, or a local CLIP/DINOv2 folder")
    p.add_argument("--attributes", action=argparse.BooleanOptionalAction, default=None,
                   help="judge the prompts' shape/colour/… (default: on for models of the shapes world)")
    p.add_argument("--subject-prompt", action="append", help="a prompt with the subject's identifier (repeatable; "
                   "default: the training output's instance prompt, per subject when it has several)")
    p.add_argument("--subject-prompts", help="a file of subject prompts")
    p.add_argument("--instance-dir", help="the instance images (default: the training output's instance_data_dir)")
    p.add_argument("--k", type=int, default=5, help="neighbours for precision/recall/density/coverage (default 5)")
    p.add_argument("--output", help="report folder (default <personalized>/evaluation)")
    p.set_defaults(func=cmd_evaluate)
