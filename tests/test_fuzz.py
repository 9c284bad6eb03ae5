"""Fuzzing the config loader, ``--set`` overrides and the file readers of ``nullbooth.io`` (issue 18, part C).

Whatever the input, the only exception allowed is ``NullBoothError``, its message is one line (the CLI prints
it as ``nullbooth <verb>: error: …``), a reader's message names the file, and nothing hangs (the deadline).
Derandomized, so CI sees the same few thousand inputs every run.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from nullbooth.cli.common import overrides
from nullbooth.config import Config, config_from_dict, load_config
from nullbooth.errors import NullBoothError
from nullbooth.io import load_npy, load_tensors, read_json

FUZZ = settings(derandomize=True, database=None, deadline=2000, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _refused_cleanly(call, path: Path | None = None):
    """``call()``'s result, or ``None`` when it raised a one-line ``NullBoothError`` (naming ``path``)."""
    try:
        return call()
    except NullBoothError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, message
        if path is not None:
            assert str(path) in message, message
        return None


# --------------------------------------------------------------------------- junk values and keys

BLOCKS = {"nullbooth": Config.model_fields["nullbooth"].annotation, "generate": Config.model_fields["generate"].annotation,
          "perfusion": Config.model_fields["perfusion"].annotation}
FIELD_NAMES = sorted({*Config.model_fields, *(n for b in BLOCKS.values() for n in b.model_fields), "collect_features",
                      "q_features", "out_features"})
WORDS = st.sampled_from(FIELD_NAMES) | st.text(max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([2**63, -(2**63) - 1, 2**32, -1, 0])
           | st.floats() | st.text(max_size=12)
           | st.sampled_from(["all", "relative", "energy", "float16", "eigh", "nullbooth", "lora", "auto", "no", "1e-3"]))
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(WORDS, inner, max_size=5),
                    max_leaves=25)
CONFIG_DICTS = st.dictionaries(WORDS, JUNK, max_size=8) | st.fixed_dictionaries(
    {}, optional={name: st.dictionaries(WORDS, JUNK, max_size=6) | JUNK for name in BLOCKS})


@settings(FUZZ, max_examples=400)
@given(data=CONFIG_DICTS)
def test_config_from_arbitrary_nested_dicts(data):
    cfg = _refused_cleanly(lambda: config_from_dict(data))
    if cfg is not None:
        assert isinstance(cfg, Config)


# --------------------------------------------------------------------------- YAML text and bytes

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def _mutate(base: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (kind, position, bytes) edits: 0 overwrite, 1 insert, 2 delete, 3 truncate."""
    out = bytearray(base)
    for kind, pos, chunk in ops:
        pos %= len(out) + 1
        if kind == 0:
            out[pos:pos + len(chunk)] = chunk
        elif kind == 1:
            out[pos:pos] = chunk
        elif kind == 2:
            del out[pos:pos + len(chunk)]
        else:
            del out[pos:]
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=6)),
                 min_size=1, max_size=4)
YAML_SYNTAX = st.text(alphabet=st.sampled_from(list("abseod:-[]{},&*!?|>#'\"\n\t 019.%@`~\\") + ["\x00", "\xe9", "\u2028"]),
                      max_size=80)


def _load(folder: Path, content: bytes):
    path = folder / "fuzz.yaml"
    path.write_bytes(content)
    return _refused_cleanly(lambda: load_config(path), path)


@settings(FUZZ, max_examples=500)
@given(content=st.binary(max_size=300) | YAML_SYNTAX.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_config_loader_on_arbitrary_bytes(folder, content):
    _load(folder, content)


@settings(FUZZ, max_examples=500)
@given(index=st.integers(0, len(SHIPPED) - 1), edits=EDITS)
def test_config_loader_on_mutated_shipped_configs(folder, index, edits):
    _load(folder, _mutate(SHIPPED[index].read_bytes(), edits))


@settings(FUZZ, max_examples=250)
@given(data=CONFIG_DICTS)
def test_config_loader_on_dumped_junk(folder, data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return
    cfg = _load(folder, text.encode("utf-8", "surrogatepass"))
    if cfg is not None and data:
        assert cfg.model_dump() == config_from_dict(yaml.safe_load(text)).model_dump()  # same file, same config


# --------------------------------------------------------------------------- --set overrides

KEYS = st.lists(st.sampled_from(FIELD_NAMES + ["", " ", "x"]) | st.text(max_size=5), min_size=1, max_size=4).map(".".join)
VALUES = YAML_SYNTAX | SCALARS.map(lambda v: yaml.safe_dump(v, default_flow_style=True).removesuffix("\n...\n").strip())


@settings(FUZZ, max_examples=700)
@given(items=st.lists(st.tuples(KEYS, VALUES).map("=".join) | st.text(max_size=10), max_size=4),
       config=st.none() | st.sampled_from(SHIPPED))
def test_set_overrides(items, config):
    args = argparse.Namespace(set=items, seed=None)

    def run():
        return load_config(config, overrides(args, {"seed": "seed"}))

    cfg = _refused_cleanly(run)
    if cfg is not None:
        assert isinstance(cfg, Config)


# --------------------------------------------------------------------------- .npy reader

def _npy(header: str, data: bytes, version: int = 1) -> bytes:
    """A hand-built .npy file (format 1.0/2.0): magic, padded header, data."""
    magic = b"\x93NUMPY" + bytes([version, 0])
    size = struct.calcsize("<H" if version == 1 else "<I")
    pad = -(len(magic) + size + len(header) + 1) % 64
    body = (header + " " * pad + "\n").encode("latin1")
    return magic + struct.pack("<H" if version == 1 else "<I", len(body)) + body + data


DESCRS = st.sampled_from(["'<f4'", "'<f8'", "'<f2'", "'>f4'", "'|O'", "'<i8'", "'<c8'", "'<U3'", "'|V4'", "'<f16'",
                          "[('a', '<f4')]", "('<f4', (2,))", "'zz'", "None", "{}"])
SHAPES = st.lists(st.integers(-3, 8) | st.sampled_from([2**40, 2**62, 2**63]), max_size=3).map(
    lambda s: "(" + "".join(f"{x}, " for x in s) + ")") | st.sampled_from(["[2]", "'x'", "(2.5,)", "((((", "None"])
NPY_HEADERS = st.builds(lambda d, f, s: f"{{'descr': {d}, 'fortran_order': {f}, 'shape': {s}, }}", DESCRS,
                        st.sampled_from(["False", "True", "0", "'no'"]), SHAPES)


def _read_npy(folder: Path, content: bytes):
    path = folder / "fuzz.npy"
    path.write_bytes(content)
    array = _refused_cleanly(lambda: load_npy(path), path)
    if array is not None:
        assert array.dtype in (np.float16, np.float32, np.float64) and array.dtype.isnative
        assert np.isfinite(array).all()


@settings(FUZZ, max_examples=500)
@given(content=st.binary(max_size=200) | st.builds(_npy, NPY_HEADERS, st.binary(max_size=64), st.sampled_from([1, 2])))
def test_npy_reader_on_arbitrary_and_hand_built_files(folder, content):
    _read_npy(folder, content)


@settings(FUZZ, max_examples=400)
@given(n=st.integers(0, 4), dtype=st.sampled_from(["<f2", "<f4", ">f8", "<i4", "O"]), edits=st.none() | EDITS,
       poison=st.sampled_from([None, np.nan, np.inf]))
def test_npy_reader_on_mutated_valid_files(folder, n, dtype, edits, poison):
    array = np.arange(n * n, dtype=float).reshape(n, n)
    if poison is not None and n:
        array[0, 0] = poison
    path = folder / "valid.npy"
    if dtype == "O":
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    else:
        with np.errstate(invalid="ignore"):  # NaN/inf cast to int: whatever comes out is fine
            np.save(path, array.astype(dtype))
    base = path.read_bytes()
    _read_npy(folder, base if edits is None else _mutate(base, edits))


# --------------------------------------------------------------------------- safetensors reader

ST_DTYPES = st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
                             "F8_E4M3", "F8_E5M2", "C64", "F4", "E8M0", "F6_E2M3", "QQ", ""])
TENSOR_ENTRIES = st.fixed_dictionaries({"dtype": ST_DTYPES,
                                        "shape": st.lists(st.integers(-1, 6) | st.just(2**40), max_size=3),
                                        "data_offsets": st.lists(st.integers(-1, 80), min_size=0, max_size=3)})
ST_HEADERS = st.dictionaries(st.text(max_size=4), TENSOR_ENTRIES | JUNK, max_size=3) | JUNK


def _safetensors(header, data: bytes, length_delta: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", max(len(raw) + length_delta, 0)) + raw + data


def _read_tensors(folder: Path, content: bytes):
    path = folder / "fuzz.safetensors"
    path.write_bytes(content)
    loaded = _refused_cleanly(lambda: load_tensors(path, "fuzzed tensors"), path)
    if loaded is not None:
        tensors, metadata = loaded
        assert all(isinstance(v, str) for v in metadata.values())
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


@settings(FUZZ, max_examples=500)
@given(content=st.binary(max_size=200) | st.builds(_safetensors, ST_HEADERS, st.binary(max_size=80),
                                                   st.sampled_from([0, 0, 0, -1, 1, 1 << 40])))
def test_safetensors_reader_on_arbitrary_and_hand_built_files(folder, content):
    _read_tensors(folder, content)


@settings(FUZZ, max_examples=400)
@given(n=st.integers(0, 3), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.uint8,
                                                   torch.int64, torch.float8_e4m3fn]),
       poison=st.sampled_from([None, float("nan"), float("-inf")]), edits=st.none() | EDITS)
def test_safetensors_reader_on_mutated_valid_files(folder, n, dtype, poison, edits):
    tensor = torch.arange(n * n, dtype=torch.float64).reshape(n, n)
    if poison is not None and n:
        tensor[0, 0] = poison
    path = folder / "valid.safetensors"
    save_file({"w": tensor.to(dtype), "b": torch.ones(2)}, str(path), metadata={"format": "pt"})
    base = path.read_bytes()
    _read_tensors(folder, base if edits is None else _mutate(base, edits))


# --------------------------------------------------------------------------- JSON reader

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=20)


def _read_json(folder: Path, content: bytes):
    path = folder / "fuzz.json"
    path.write_bytes(content)
    data = _refused_cleanly(lambda: read_json(path, "a fuzzed JSON file"), path)
    assert data is None or isinstance(data, dict)


@settings(FUZZ, max_examples=400)
@given(content=st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode())
       | st.integers(1, 60_000).map(lambda n: b"[" * n + b"]" * n) | st.integers(4000, 6000).map(lambda n: b"1" * n))
def test_json_reader_on_arbitrary_bytes(folder, content):
    _read_json(folder, content)


@settings(FUZZ, max_examples=200)
@given(value=st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=5), edits=EDITS)
def test_json_reader_on_mutated_valid_files(folder, value, edits):
    _read_json(folder, _mutate(json.dumps(value, indent=2).encode(), edits))
