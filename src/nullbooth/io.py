"""Files that are whole or absent: atomic writers (temp file, fsync, rename) and readers that never unpickle.

Every reader turns a missing, truncated or foreign file into one ``NullBoothError`` line saying what was
expected where; ``.npy`` files are read with ``allow_pickle=False`` and tensors only from safetensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nullbooth.errors import NullBoothError

# --------------------------------------------------------------------------- atomic writes


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; published files get the usual mode
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    _atomic(path, write)


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {})))


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` a hard link of ``source`` (atomic replace); copy where links are not supported."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        _atomic(target, lambda t: Path(t).write_bytes(source.read_bytes()))


# --------------------------------------------------------------------------- readers


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NullBoothError(f"expected {what} at {path}, found nothing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NullBoothError(f"{path} is not valid JSON ({err}); the file is corrupt — recollect this run") from None
    if not isinstance(data, dict):
        raise NullBoothError(f"expected a JSON object in {path}, got {type(data).__name__}")
    return data


def load_npy(path: Path) -> np.ndarray:
    """``np.load`` without pickle, turning truncated or foreign files into one clear error."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise NullBoothError(f"expected a .npy matrix at {path}, found nothing") from None
    except (ValueError, OSError, EOFError) as err:
        raise NullBoothError(
            f"{path} is not a readable .npy array ({str(err).splitlines()[0]}); it is truncated or not written by "
            "nullbooth — delete it and recollect the run"
        ) from None
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
        raise NullBoothError(f"expected a float matrix in {path}, got {getattr(array, 'dtype', type(array))}")
    return array


def load_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata() or {}
    except FileNotFoundError:
        raise NullBoothError(f"expected {what} at {path}, found nothing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise NullBoothError(f"{path} is not a readable safetensors file ({err}); it is corrupt or foreign") from None
    return tensors, metadata
