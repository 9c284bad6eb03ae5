"""One nullbooth writer per folder: an advisory lock on a collection run, its parent folder, or a training output.

``fcntl.flock`` on ``<folder>/.nullbooth.lock``, which holds the holder's PID for the message a second
process prints. The kernel drops the lock when its holder exits, however it exits (an error, Ctrl-C,
SIGKILL, a power cut), so a lock left behind by a dead process never blocks anyone: the file stays, the
lock does not. A process may take the lock of a folder it already holds (``train`` collecting its
statistics into its own ``output_dir``); it is released when the last holder lets go. Where ``fcntl``
does not exist (Windows) nothing is locked.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

from nullbooth.errors import NullBoothError
from nullbooth.filenames import LOCK_FILE

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_HELD: dict[str, list[int]] = {}  # realpath → [fd, holders] of the locks this process holds
_GUARD = threading.Lock()


class FolderLock:
    """A held lock; :meth:`release` (or leaving the ``with`` block, or dropping the object) lets it go."""

    def __init__(self, key: str | None) -> None:
        self._key = key

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _GUARD:
            entry = _HELD.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                os.close(entry[0])  # closing the last descriptor drops the flock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def holder_pid(folder: str | os.PathLike) -> int | None:
    """The PID written into ``folder``'s lock file by its last holder (``None`` when unknown)."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def lock_folder(folder: str | os.PathLike, doing: str, *, wait: float = 0.0) -> FolderLock:
    """Hold ``folder``'s lock (creating the folder), or raise one ``NullBoothError`` naming the holder's PID.

    ``doing`` says what the holder does there (``"collecting this run"``); ``wait`` seconds are spent retrying
    before giving up (0: give up at once — the holder may run for hours).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NullBoothError(f"expected a writable folder at {folder}, got {err.strerror or err}; "
                             "choose another folder") from None
    if not folder.is_dir():
        raise NullBoothError(f"expected a folder at {folder}, got a file; pass a folder")
    if fcntl is None:
        return FolderLock(None)
    key = os.path.realpath(folder)
    with _GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return FolderLock(key)
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise NullBoothError(f"expected a writable folder at {folder}, got {err.strerror or err} creating its lock file "
                             f"{LOCK_FILE}; fix the permissions or choose another folder") from None
    deadline = time.monotonic() + wait
    while not _try_flock(fd, folder / LOCK_FILE):
        if time.monotonic() >= deadline:
            os.close(fd)
            pid = holder_pid(folder)
            who = f"PID {pid}" if pid else "another process"
            raise NullBoothError(
                f"expected {folder} to be free, but {who} holds its lock ({LOCK_FILE}): another nullbooth process is "
                f"{doing} there; wait for it to finish, stop it (kill {pid or '<pid>'}), or choose another folder")
        time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    with _GUARD:
        _HELD[key] = [fd, 1]
    return FolderLock(key)


def _try_flock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        # Some network file systems cannot lock at all: work unlocked rather than not at all.
        log.warning("cannot lock %s (%s); going on without protection against a second process", path, err.strerror)
        return True
