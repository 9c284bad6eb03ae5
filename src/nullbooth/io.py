"""Files that are whole or absent: atomic writers (temp file, fsync, rename) and readers that never unpickle.

Every reader turns a missing, truncated, foreign or non-finite file into one ``NullBoothError`` line saying what
was expected where; ``.npy`` files are read with ``allow_pickle=False`` and tensors only from safetensors.
Temporary files are named after their writer's host and PID, so :func:`remove_stale_temporaries` can delete
what a killed process left without touching a live writer's.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from nullbooth.errors import NullBoothError

# --------------------------------------------------------------------------- atomic writes


_UMASK = os.umask(0o022)
os.umask(_UMASK)
# `.<name>.<host>.<pid>.<random>.tmp`: unique per writer, and a leftover names the process that left it.
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[a-z0-9_]+\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name[:100]}.{_host()}.{os.getpid()}."


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a folder cannot be opened for that on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Inside `synced_at_exit`: the files written so far, made durable together when the block ends.
_DEFERRED: ContextVar[list[Path] | None] = ContextVar("nullbooth_deferred_sync", default=None)


def _syncfs(folder: Path) -> bool:
    """Flush the whole file system holding ``folder`` in one call (Linux ``syncfs``); False where there is none."""
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)


@contextlib.contextmanager
def synced_at_exit(folder: Path) -> Iterator[None]:
    """Atomic writes inside the block skip their own two fsyncs; a clean exit makes them all durable at once.

    For a folder whose completeness one later write declares (a run's manifest, written after the block):
    after a crash inside, a file's bytes may not have reached the disk, but the folder is undeclared and gets
    rewritten. Measured on a tiny-model collection (570 small files): the per-file fsyncs took 1.7–3.3 s of
    its 4–8 s; one ``syncfs`` (or, where there is none, one fsync per file and per folder) replaces them.
    """
    if _DEFERRED.get() is not None:  # nested: the outer block syncs
        yield
        return
    written: list[Path] = []
    token = _DEFERRED.set(written)
    try:
        yield
    finally:
        _DEFERRED.reset(token)
    if written and not _syncfs(Path(folder)):
        for path in written:
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
                os.fsync(fh.fileno())
        for parent in dict.fromkeys(path.parent for path in written):
            _fsync_folder(parent)


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``.

    On any failure (an exception, a full disk, Ctrl-C) the temporary file is removed and ``path`` keeps its
    previous bytes. An ``OSError`` keeps its errno but names ``path``, not the temporary file (the CLI and
    ``runs.write.disk_errors`` print it as one line). Inside :func:`synced_at_exit` the fsyncs wait for its end.
    """
    path = Path(path)
    deferred = _DEFERRED.get()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; published files get the usual mode
        if deferred is None:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    if deferred is None:
        _fsync_folder(path.parent)
    else:
        deferred.append(path)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still run (when unsure: yes)."""
    if pid <= 0 or pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: alive under another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporary files of this module's writers that a dead process left in ``folder`` (a kill
    between writing and renaming). Only files named by a process of this host whose PID is no longer alive
    are removed; other hosts' files (a shared file system) and live writers' files stay. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    host = _host()
    walk = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for parent, _, names in walk:
        for name in names:
            match = _TEMPORARY.match(name)
            if match and match["host"] == host and not _pid_alive(int(match["pid"])):
                path = Path(parent) / name
                try:
                    path.unlink()
                except OSError:  # gone meanwhile, or not ours to delete
                    continue
                removed.append(path)
    return removed


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    _atomic(path, write)


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_image(path: Path, image: Any) -> None:
    """A PIL image as PNG, atomically: an interrupted save never leaves half a picture that a rerun would count."""
    _atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# torch dtype → safetensors' name (the format is little-endian, as every platform torch ships wheels for)
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file written one tensor at a time, whose bytes depend only on its content.

    safetensors' own writer first moves every tensor to the host (a collection checkpoint of SDXL's 43 GB of
    device sums would need that much host memory again); here each tensor is moved to the host and written on
    its own. Tensors are laid out by name and the ``__metadata__`` keys sorted, so identical
    content gives identical bytes (safetensors orders metadata from a hash map).
    """
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise NullBoothError(f"{path}: tensor {name!r} has dtype {t.dtype}; expected one of "
                                 f"{', '.join(str(d) for d in _SAFETENSORS_DTYPES)}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if any(not isinstance(v, str) for v in header.get("__metadata__", {}).values()):
        raise NullBoothError(f"{path}: safetensors metadata values must be strings, got {dict(metadata or {})}")
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(len(text).to_bytes(8, "little"))
            fh.write(text)
            for name in names:
                flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
                fh.write(flat.view(torch.uint8).numpy().data)  # a view of the tensor's bytes, not a copy

    _atomic(path, write)


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` a hard link of ``source`` (atomic replace); copy where links are not supported."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{_temporary_prefix(target)}{secrets.token_hex(4)}.tmp")
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        _atomic(target, lambda t: Path(t).write_bytes(Path(source).read_bytes()))


# --------------------------------------------------------------------------- readers


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object; NaN/Infinity stay allowed (reports record infinite condition numbers and diverged losses)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise NullBoothError(f"expected {what} at {path}, found nothing") from None
    except OSError as err:
        raise NullBoothError(f"cannot read {what} at {path} ({err.strerror or err}); check the path and permissions") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number, deep nesting
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NullBoothError(f"{path} is not valid JSON ({problem[:200]}); the file is corrupt — recollect this run") from None
    if not isinstance(data, dict):
        raise NullBoothError(f"expected a JSON object in {path}, got {type(data).__name__}")
    return data


def _npy_header(fh, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header, checked against the file size before any data is allocated."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):  # float16/32/64 in either byte order
        raise NullBoothError(f"expected a float matrix (float16/32/64) in {path}, got dtype {dtype}; the file is not "
                             "written by nullbooth — delete it and recollect the run")
    expected = math.prod(shape) * dtype.itemsize
    left = os.fstat(fh.fileno()).st_size - fh.tell()
    if left != expected:
        raise ValueError(f"the header promises {expected} bytes of data, the file holds {left}")
    return shape, dtype


def load_npy(path: Path) -> np.ndarray:
    """A float16/32/64 ``.npy`` matrix without pickle; a truncated, foreign or non-finite file is one clear error."""
    try:
        with open(path, "rb") as fh:
            _npy_header(fh, path)
            fh.seek(0)
            array = np.load(fh, allow_pickle=False)
    except FileNotFoundError:
        raise NullBoothError(f"expected a .npy matrix at {path}, found nothing") from None
    except NullBoothError:
        raise
    except Exception as err:  # numpy's header parser raises ValueError, SyntaxError, tokenize.TokenError, TypeError…
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NullBoothError(
            f"{path} is not a readable .npy array ({problem[:200]}); it is truncated or not written by "
            "nullbooth — delete it and recollect the run"
        ) from None
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not np.isfinite(array).all():
        raise NullBoothError(f"expected finite numbers in {path}, got NaN or infinity; the file is corrupt — delete it "
                             "and recollect the run")
    return array


# What nullbooth writes (RNG states are uint8); anything else (fp8, fp4, complex, unsigned wide) is foreign.
_TENSOR_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.float16, torch.bfloat16, torch.float32, torch.float64}


def load_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a corrupt, foreign or non-finite file is one clear error."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata() or {}
    except FileNotFoundError:
        raise NullBoothError(f"expected {what} at {path}, found nothing") from None
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NullBoothError(f"{path} is not a readable safetensors file ({problem[:200]}); it is corrupt or "
                             "foreign") from None
    for name, tensor in tensors.items():
        if tensor.dtype not in _TENSOR_DTYPES:
            raise NullBoothError(f"expected {what} at {path}, got tensor {name!r} of dtype {tensor.dtype}, which "
                                 "nullbooth never writes; the file is foreign")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NullBoothError(f"expected finite numbers in {what} at {path}, got NaN or infinity in {name!r}; the "
                                 "file is corrupt (or training diverged) — delete it and rerun")
    return tensors, metadata
