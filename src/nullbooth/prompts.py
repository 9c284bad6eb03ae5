"""Prompt lists: read, clean and check against the tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

from nullbooth.errors import NullBoothError

log = logging.getLogger(__name__)


def read_prompt_file(path: str | Path | None, what: str = "original_knowledge_prompts") -> list[str]:
    """Non-blank, stripped lines of a UTF-8 text file; an error when the file is missing or holds no prompt."""
    if path is None:
        raise NullBoothError(f"{what}: expected a text file with one prompt per line, got no path; set {what} in the config")
    p = Path(path)
    if not p.is_file():
        raise NullBoothError(f"{what}: expected a text file with one prompt per line at {p}, found nothing")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise NullBoothError(f"{what}: {p} is not UTF-8 text; give a plain text file with one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise NullBoothError(f"{what}: {p} holds no prompt (empty or only blank lines); add one prompt per line")
    blank = len(lines) - len(prompts)
    if blank:
        log.warning("%s: skipped %d blank line(s) in %s", what, blank, p)
    return prompts


def warn_truncated(prompts: list[str], tokenizer) -> int:
    """Warn about prompts the tokenizer will cut at ``model_max_length``; returns how many."""
    limit = tokenizer.model_max_length
    ids = tokenizer(prompts, truncation=False, padding=False)["input_ids"]
    long = [i for i, x in enumerate(ids) if len(x) > limit]
    if long:
        log.warning(
            "%d prompt(s) exceed the tokenizer limit of %d tokens and are truncated (first: line %d, %d tokens)",
            len(long), limit, long[0] + 1, len(ids[long[0]]),
        )
    return len(long)
