"""One exception type for every problem a user can fix.

The CLI prints ``NullBoothError`` messages as one line and exits non-zero; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NullBoothError(Exception):
    """A user-facing error: what was expected, what was got, and how to fix it."""


def expect(condition: bool, message: str) -> None:
    """Raise ``NullBoothError(message)`` unless ``condition`` holds."""
    if not condition:
        raise NullBoothError(message)
