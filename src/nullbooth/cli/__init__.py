"""The command line: argparse and printing only, on top of the library; nothing below imports it.

Each verb has one module with ``register_cli(subparsers)`` and its ``cmd_*`` functions. At import time they
use only the standard library, so ``nullbooth --help`` answers without loading torch; the library is
imported when a command runs.
"""

from nullbooth.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
