"""``nullbooth <verb>``: build the parser from every verb's module, run the verb, print one line on a user error."""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import sys
import warnings

# Quiet third-party import-time chatter (e.g. transformers' torchvision notice) before anything imports them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# diffusers resets its root logger's level when first imported, after main() has set it.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# On AVX-512 CPUs MKL picks kernels by the memory alignment of their operands, so the same computation can round
# differently from one process to the next (seen: 1.7e-6 on latents of magnitude 7, and a resumed run no longer
# equal to a straight one). Strict conditional numerical reproducibility makes results depend on the inputs only;
# it is read when MKL first runs, hence before torch loads. Set MKL_CBWR yourself to choose otherwise.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from nullbooth.cli import collect, evaluate, generate, inspect, train, visualize  # noqa: E402
from nullbooth.errors import NullBoothError  # noqa: E402

VERBS = (collect, inspect, train, generate, evaluate, visualize)
# Verbs that keep their progress on disk: re-running the same command continues where it stopped.
RESUMABLE = {"collect": "re-run the same command to resume from the last checkpoint (finished shards are kept)",
             "train": "re-run the same command with --resume_from_checkpoint latest to resume from the last "
                      "checkpoint (one is written every checkpointing_steps)"}
_WRITES = {errno.ENOSPC, errno.EROFS, errno.EEXIST, errno.EDQUOT, errno.EFBIG}
_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or choose an output folder on another disk, then re-run",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another output folder, then re-run",
    errno.EROFS: "the file system is read-only; choose an output folder on a writable disk",
    errno.EACCES: "check its permissions, or choose a path you can write to",
    errno.EPERM: "check its permissions, or choose a path you can write to",
    errno.EEXIST: "something of that name is in the way; move it away or choose another path",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.EISDIR: "expected a file there, found a folder; choose another path",
    errno.ENOENT: "check that the path exists",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and re-run",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as one line like every other error (its default prints the usage block first).

    Flags are never abbreviated (a typo must not silently match a longer flag), and an unknown one is named with
    the verb's closest flag: ``nullbooth train: error: unrecognized argument --lerning_rate; did you mean
    --learning_rate? see nullbooth train --help``. Sub-parsers are made by this class too.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._verbs: argparse.Action | None = None

    def add_subparsers(self, **kwargs):
        self._verbs = super().add_subparsers(**kwargs)
        return self._verbs

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # a verb's parser leaves its unknown arguments to this one: blame that verb's flags
            verb = getattr(parsed, self._verbs.dest, None) if self._verbs is not None else None
            parser = self._verbs.choices[verb] if verb is not None else self
            parser.error(unrecognized(parser, extras))
        return parsed

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}{' ' if message.endswith('?') else '; '}see {self.prog} --help\n")


def unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """``unrecognized argument --lerning_rate; did you mean --learning_rate?`` (difflib over the parser's flags)."""
    unknown = [x.split("=", 1)[0] for x in extras if x.startswith("-")] or extras[:1]  # the rest: their values
    name = unknown[0]
    more = f" (also {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
    flags = [f for f in parser._option_string_actions if f.startswith("--")]  # noqa: SLF001 — no public listing
    close = difflib.get_close_matches(name, flags, n=1) if name.startswith("-") else []
    return f"unrecognized argument {name}{more}" + (f"; did you mean {close[0]}?" if close else "")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nullbooth", description="Knowledge-preserving personalization of diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in VERBS:
        module.register_cli(sub)
    return parser


def os_error_line(err: OSError) -> str:
    """One line for a file-system failure: which file, what the system said, and what to do about it."""
    reason = err.strerror or (str(err).strip().splitlines() or [type(err).__name__])[0]
    if err.filename is None:  # not about a file (a network error, say): what it said is all there is
        return f"{type(err).__name__}: {reason}; {_HINTS.get(err.errno, 're-run with -v for the full traceback')}"
    hint = _HINTS.get(err.errno, "check the path, its permissions and the free disk space")
    action = "write" if err.errno in _WRITES else "read" if err.errno == errno.ENOENT else "access"
    other = f" (→ {err.filename2})" if err.filename2 is not None else ""
    return f"could not {action} {err.filename}{other}: {reason}; {hint}"


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
    except OSError as err:  # the file system refused: a user-fixable condition, not a bug
        if args.verbose:
            raise
        print(f"nullbooth {args.verb}: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = f"; {RESUMABLE[args.verb]}" if args.verb in RESUMABLE else ""
        print(f"nullbooth {args.verb}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
