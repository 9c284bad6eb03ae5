"""``nullbooth <verb>``: build the parser from every verb's module, run the verb, print one line on a user error."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

# Quiet third-party import-time chatter (e.g. transformers' torchvision notice) before anything imports them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from nullbooth.cli import collect, evaluate, generate, inspect, train, visualize  # noqa: E402
from nullbooth.errors import NullBoothError  # noqa: E402

VERBS = (collect, inspect, train, generate, evaluate, visualize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nullbooth", description="Knowledge-preserving personalization of diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in VERBS:
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
