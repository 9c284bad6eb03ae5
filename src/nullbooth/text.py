"""Reading a small UTF-8 text file a user hands us (a config, a prompt list): every problem is one line."""

from __future__ import annotations

from pathlib import Path

from nullbooth.errors import NullBoothError

BYTE_ORDER_MARK = b"\xef\xbb\xbf"  # Windows editors start UTF-8 files with one


def read_user_text(path: str | Path, what: str, expected: str, max_bytes: int) -> str:
    """The UTF-8 text at ``path`` without a byte-order mark; a missing, oversized, unreadable or non-UTF-8 file is
    one ``NullBoothError`` starting with ``what`` and saying that ``expected`` was expected there."""
    p = Path(path)
    if not p.is_file():
        found = "a folder" if p.is_dir() else "nothing"
        raise NullBoothError(f"{what}: expected {expected} at {p}, found {found}")
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise NullBoothError(f"{what}: expected {expected} of at most {max_bytes >> 20} MiB at {p}, got {size} "
                                 "bytes; is this the right file?")
        raw = p.read_bytes()
    except OSError as err:
        raise NullBoothError(f"{what}: cannot read {p} ({err.strerror or err}); check the path and permissions") from None
    body = raw.removeprefix(BYTE_ORDER_MARK)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        offset = err.start + len(raw) - len(body)
        line = raw.count(b"\n", 0, offset) + 1
        raise NullBoothError(f"{what}: expected UTF-8 text in {p}, got byte 0x{raw[offset]:02x} at offset {offset} "
                             f"(line {line}); save it as UTF-8") from None
