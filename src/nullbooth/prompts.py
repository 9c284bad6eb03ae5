"""Prompt lists: read, clean and check against the tokenizer."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from nullbooth.errors import NullBoothError
from nullbooth.text import read_user_text

log = logging.getLogger(__name__)


MAX_PROMPT_FILE_BYTES = 64 << 20  # ~500k prompts; a bigger file is almost surely the wrong file
# Characters that would split one line into several prompts (str.splitlines breaks on them) or that no prompt
# holds: NUL and the other control characters but tab and the line endings \n and \r.
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")


def _prompt_text(p: Path, what: str) -> str:
    """The UTF-8 text of a prompt file (a byte-order mark dropped); every problem is one ``NullBoothError``."""
    text = read_user_text(p, what, "a text file with one prompt per line", MAX_PROMPT_FILE_BYTES)
    bad = _FORBIDDEN.search(text)
    if bad:
        raise NullBoothError(f"{what}: expected plain text in {p}, got the control character U+{ord(bad[0]):04X} on line "
                             f"{text.count(chr(10), 0, bad.start()) + 1}; remove it (is this a text file?)")
    return text


def read_prompt_file(path: str | Path | None, what: str = "original_knowledge_prompts") -> list[str]:
    """Non-blank, stripped lines of a UTF-8 text file; an error when the file is missing, unreadable, not plain
    text or holds no prompt."""
    if path is None:
        raise NullBoothError(f"{what}: expected a text file with one prompt per line, got no path; set {what} in the config")
    p = Path(path)
    lines = _prompt_text(p, what).splitlines()
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
