"""Bad config files, flag values and prompt files (issue 18, part C).

Every case runs ``nullbooth <verb> …`` in-process and must end in exit 2 with ONE stderr line
``nullbooth <verb>: error: …`` (no traceback), before any model is loaded, leaving every file written
before byte-identical and adding none.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nullbooth.cli.main import main
from nullbooth.errors import NullBoothError
from nullbooth.io import load_tensors, save_npy, save_tensors, write_json

PROMPTS = b"a red circle\na blue square\n"
GOOD = "pretrained_model_name_or_path: tiny-sd\nnullbooth:\n  num_denoising_steps: 2\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))

# id, verb, config file bytes (None: no --config, "DIR": a folder), extra argv, prompt file bytes, words of the error
CASES = [
    ("seed_not_a_number", "train", None, ["--seed", "abc"], None, ["seed", "valid integer", "got 'abc'"]),
    ("non_utf8", "collect", b"seed: 1\ninstance_prompt: caf\xe9\n", [], None, ["byte 0xe9 at offset 28", "save it as UTF-8"]),
    ("duplicate_key", "train", b"seed: 1\nnullbooth:\n  enable: true\nseed: 2\n", [], None,
     ["'seed' is given twice", "lines 1 and 4"]),
    ("duplicate_nested", "collect", b"nullbooth:\n  num_denoising_steps: 3\n  num_denoising_steps: 4\n", [], None,
     ["given twice", "lines 2 and 3"]),
    ("alias_bomb", "collect", BOMB.encode(), [], None, ["aliases are not allowed"]),
    ("deep_nesting", "train", ("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(), [], None, ["nesting deeper than 32"]),
    ("huge_file", "collect", b"# padding\n" * 120_000, [], None, ["at most 1 MiB"]),
    ("not_a_mapping", "generate", b"- seed\n- 1\n", [], None, ["expected a mapping", "got list"]),
    ("scalar_document", "train", b"just text\n", [], None, ["expected a mapping", "got str"]),
    ("invalid_yaml", "collect", b"seed: [1\n", [], None, ["not valid YAML", "line 2"]),
    ("nul_byte", "collect", b"seed: 1\x00\n", [], None, ["not allowed in YAML"]),
    ("python_tag", "train", b"seed: !!python/object/apply:os.system [echo]\n", [], None, ["could not determine a constructor"]),
    ("bad_timestamp", "train", b"seed: !!timestamp 2001-13-45\n", [], None, ["month must be in 1..12"]),
    ("multi_document", "collect", b"seed: 1\n---\nseed: 2\n", [], None, ["expected a single document"]),
    ("config_is_folder", "train", "DIR", [], None, ["found a folder"]),
    ("config_missing", "generate", "MISSING", [], None, ["found nothing"]),
    ("resolution_runaway", "collect", b"resolution: 8192\n", [], None, ["resolution", "at most 4096", "got 8192"]),
    ("nan_float", "train", b"prior_loss_weight: .nan\n", [], None, ["prior_loss_weight", "finite"]),
    ("inf_float", "train", b"learning_rate: .inf\n", [], None, ["learning_rate", "finite"]),
    ("bool_as_number", "train", b"max_train_steps: yes\n", [], None, ["max_train_steps", "expected a number"]),
    ("huge_int", "train", b"max_train_steps: 123456789012345678901234567890\n", [], None, ["max_train_steps", "below 2**63", "got 1234567890"]),
    ("steps_runaway", "generate", None, ["--steps", "5000"], None, ["num_inference_steps", "1000"]),
    ("negative_seed", "collect", None, ["--seed", str(-(2**32))], None, ["seed", "(-2**32, 2**32)", "got -4294967296"]),
    ("giant_seed", "train", None, ["--set", f"seed={2**40}"], None, ["seed", "(-2**32, 2**32)"]),
    ("seed_beyond_int64", "train", None, ["--set", f"seed={2**63}"], None, ["seed", "below 2**63", str(2**63)]),
    ("negative_generate_seed", "generate", None, ["--set", "generate.seeds=[0, -5]"], None, ["[0, 2**63)", "[-5]"]),
    ("set_into_scalar", "train", None, ["--set", "seed.x=1"], None, ["seed is a number, not a block"]),
    ("set_into_scalar_from_file", "train", b"nullbooth: 3\n", ["--set", "nullbooth.enable=false"], None,
     ["nullbooth is a number, not a block"]),
    ("set_block_to_value", "collect", None, ["--set", "nullbooth=3"], None, ["nullbooth is a block of settings"]),
    ("set_empty_part", "train", None, ["--set", "a..b=1"], None, ["'a..b'", "empty name between dots"]),
    ("set_empty_key", "train", None, ["--set", "=1"], None, ["empty name"]),
    ("set_no_equals", "generate", None, ["--set", "seed"], None, ["KEY=VALUE"]),
    ("set_bad_yaml", "collect", None, ["--set", "nullbooth.cross_attention_layers=[0,"], None, ["not valid YAML"]),
    ("set_alias", "collect", None, ["--set", "seed=*x"], None, ["not valid YAML"]),
    ("set_unknown_key", "train", None, ["--set", "nullboth.enable=false"], None, ["unknown key", "did you mean"]),
    ("set_duplicate_in_value", "train", None, ["--set", "nullbooth={enable: true, enable: false}"], None, ["given twice"]),
    ("prompts_non_utf8", "collect", None, [], b"a red circle\ncaf\xe9\n", ["expected UTF-8", "offset 16", "line 2"]),
    ("prompts_empty", "collect", None, [], b"", ["holds no prompt"]),
    ("prompts_blank", "collect", None, [], b"\n   \n\t\n", ["holds no prompt"]),
    ("prompts_nul", "collect", None, [], b"a red circle\nbad\x00prompt\n", ["U+0000", "line 2"]),
    ("prompts_line_separator", "collect", None, [], "one\u2028two\n".encode(), ["U+2028", "line 1"]),
]


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: bad input must be refused before that."""
    import nullbooth.generate  # noqa: F401 — bind every module's load_pipeline before it is replaced
    import nullbooth.runs.collect  # noqa: F401
    import nullbooth.training.loop  # noqa: F401

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    for name, module in list(sys.modules.items()):
        if name.startswith("nullbooth") and hasattr(module, "load_pipeline"):
            monkeypatch.setattr(module, "load_pipeline", refuse)


@pytest.mark.parametrize("case, verb, config, extra, prompts, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_model(case, verb, config, extra, prompts, words, tmp_path, capsys, no_model):
    # files an earlier run wrote: they must come out byte-identical
    save_npy(tmp_path / "cov" / "keep_covariance.npy", np.eye(3))
    write_json(tmp_path / "out" / "train_report.json", {"loss": 0.5})
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_bytes(PROMPTS if prompts is None else prompts)
    argv = [verb]
    if config == "DIR":
        (tmp_path / "conf.yaml").mkdir()
        argv += ["--config", str(tmp_path / "conf.yaml")]
    elif config == "MISSING":
        argv += ["--config", str(tmp_path / "nowhere.yaml")]
    elif config is not None:
        (tmp_path / "conf.yaml").write_bytes(config)
        argv += ["--config", str(tmp_path / "conf.yaml")]
    argv += extra
    if verb == "collect":
        argv += ["--prompts", str(prompt_file), "--output", str(tmp_path / "cov"), "--steps", "2"]
    elif verb == "train":
        argv += ["--output_dir", str(tmp_path / "out"), "--instance_data_dir", str(tmp_path),
                 "--instance_prompt", "a sks star"]
    else:
        argv += ["--adapter", str(tmp_path / "out"), "--prompt", "a star"]
    before = _tree(tmp_path)

    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"nullbooth {verb}: error: ") and "Traceback" not in captured.err
    for word in words:
        assert word in captured.err, (word, captured.err)
    assert _tree(tmp_path) == before


def test_good_config_still_loads_and_overrides_merge(tmp_path):
    from nullbooth.config import load_config

    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())  # a byte-order mark is fine
    cfg = load_config(path, {"nullbooth": {"storage": "float16"}, "generate.seeds": [7, 2**62]})
    assert cfg.nullbooth.num_denoising_steps == 2 and cfg.nullbooth.storage == "float16"  # merged, not replaced
    assert cfg.generate.seeds == [7, 2**62] and cfg.seed == 0
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text("seed: &s 3\n")  # an anchor nobody refers to is harmless
    assert load_config(anchors).seed == 3


def test_prompt_file_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    from nullbooth.prompts import read_prompt_file

    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfa red circle\r\na star\r\n")
    assert read_prompt_file(path) == ["a red circle", "a star"]
    path.write_bytes(b"\xef\xbb\xbfok\n\xff")
    with pytest.raises(NullBoothError, match="0xff at offset 6 .line 2"):
        read_prompt_file(path)


@pytest.mark.parametrize("argv,start", [
    (["generate", "--seeds", "-1", "--prompt", "x"], "nullbooth generate: error: argument --seeds"),
    (["generate", "--seeds", "0,-3", "--prompt", "x"], "nullbooth generate: error: argument --seeds"),
    (["generate", "--seeds", str(2**63), "--prompt", "x"], "nullbooth generate: error: argument --seeds"),
    (["generate", "--seeds", ",", "--prompt", "x"], "nullbooth generate: error: argument --seeds"),
    (["frob"], "nullbooth: error: argument VERB: invalid choice"),
])
def test_flag_errors_are_one_line(argv, start, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith(start), err


# --------------------------------------------------------------------------- file readers


def _npy_with_header(header: str, data: bytes = b"") -> bytes:
    body = header.encode("latin1")
    body += b" " * (-(10 + len(body) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body + data


def _bad_npy(path, kind):
    if kind == "object":
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif kind == "int":
        np.save(path, np.arange(4))
    elif kind == "complex":
        np.save(path, np.ones(2, np.complex64))
    elif kind == "nan":
        np.save(path, np.array([[1.0, np.nan], [0.0, 1.0]]))
    elif kind == "inf":
        np.save(path, np.array([np.inf], np.float32))
    elif kind == "truncated":
        np.save(path, np.eye(8))
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "huge_shape":  # a valid header promising 8 TB: refused before anything is allocated
        path.write_bytes(_npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000, 1000000), }", b"x" * 8))
    elif kind == "huge_header":
        path.write_bytes(_npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }" + " " * 20000))
    elif kind == "mangled_header":
        path.write_bytes(_npy_with_header("{'descr': '<f8', 'shape': ((((", b""))
    elif kind == "npz":
        np.savez(path.with_suffix(""), a=np.eye(2))
        path.with_suffix(".npz").rename(path)
    elif kind == "zip_garbage":
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    elif kind == "pickle":
        path.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()


NPY_KINDS = ["object", "int", "complex", "nan", "inf", "truncated", "huge_shape", "huge_header", "mangled_header", "npz",
             "zip_garbage", "pickle", "empty", "folder"]


@pytest.mark.parametrize("kind", NPY_KINDS)
def test_npy_reader_refuses_with_one_line_naming_the_file(kind, tmp_path):
    from nullbooth.io import load_npy

    path = tmp_path / "m_covariance.npy"
    _bad_npy(path, kind)
    with pytest.raises(NullBoothError) as err:
        load_npy(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_npy_reader_reads_big_endian_and_half_precision(tmp_path):
    from nullbooth.io import load_npy

    for dtype in (">f8", "<f2", ">f4"):
        np.save(tmp_path / "a.npy", np.eye(3).astype(dtype))
        array = load_npy(tmp_path / "a.npy")
        assert array.dtype.isnative and array.dtype.itemsize == np.dtype(dtype).itemsize
        assert np.array_equal(array, np.eye(3))


def _bad_safetensors(path, kind):
    import json
    import struct

    from safetensors.torch import save_file

    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    if kind == "nan":
        save_file({"w": torch.tensor([1.0, float("nan")])}, str(path))
    elif kind == "inf_bf16":
        save_file({"w": torch.tensor([float("-inf")], dtype=torch.bfloat16)}, str(path))
    elif kind == "fp8":
        save_file({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(path))
    elif kind == "complex":
        save_file({"w": torch.zeros(2, dtype=torch.complex64)}, str(path))
    elif kind == "truncated":
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 7)
    elif kind == "huge_header":
        path.write_bytes(struct.pack("<Q", 1 << 40) + raw)
    elif kind == "header_not_json":
        path.write_bytes(struct.pack("<Q", 5) + b"{{{{{")
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 3)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()


@pytest.mark.parametrize("kind", ["nan", "inf_bf16", "fp8", "complex", "truncated", "huge_header", "header_not_json",
                                  "random", "empty", "folder"])
def test_safetensors_reader_refuses_with_one_line_naming_the_file(kind, tmp_path):
    from nullbooth.io import load_tensors

    path = tmp_path / "state.safetensors"
    _bad_safetensors(path, kind)
    with pytest.raises(NullBoothError) as err:
        load_tensors(path, "checkpoint tensors")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000,
                                     b'{"n": ' + b"9" * 5000 + b"}", b"\x00" * 10, "folder"],
                         ids=["empty", "truncated", "list", "not_utf8", "deep", "long_number", "nul", "folder"])
def test_json_reader_refuses_with_one_line_naming_the_file(content, tmp_path):
    from nullbooth.io import read_json

    path = tmp_path / "manifest.json"
    if content == "folder":
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(NullBoothError) as err:
        read_json(path, "a run manifest")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_json_reader_keeps_infinite_numbers_reports_write(tmp_path):
    from nullbooth.io import read_json

    write_json(tmp_path / "r.json", {"condition_number": float("inf")})
    assert read_json(tmp_path / "r.json", "a report")["condition_number"] == float("inf")


# --------------------------------------------------------------------------- atomic writers


def _writers(tmp_path):

    from nullbooth.io import save_tensors, write_text

    return {
        "npy": (tmp_path / "c.npy", lambda p: save_npy(p, np.eye(2))),
        "json": (tmp_path / "m.json", lambda p: write_json(p, {"a": 1})),
        "text": (tmp_path / "p.txt", lambda p: write_text(p, "x\n")),
        "safetensors": (tmp_path / "w.safetensors", lambda p: save_tensors(p, {"w": torch.ones(2)})),
    }


@pytest.mark.parametrize("writer", ["npy", "json", "text", "safetensors"])
@pytest.mark.parametrize("failure", ["disk_full", "bug", "interrupt"])
def test_failed_write_keeps_the_previous_file_and_no_temporary(writer, failure, tmp_path, monkeypatch):
    import errno
    import os

    import nullbooth.io as nio

    path, write = _writers(tmp_path)[writer]
    path.write_bytes(b"previous bytes")
    seen = []
    real_replace = os.replace

    def fail(src, dst):
        seen.append(Path(src).name)
        assert Path(src).stat().st_size > 0  # the new content was written, the rename is what fails
        if failure == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt if failure == "interrupt" else RuntimeError("bug")

    monkeypatch.setattr(nio.os, "replace", fail)
    expected = {"disk_full": OSError, "bug": RuntimeError, "interrupt": KeyboardInterrupt}[failure]
    with pytest.raises(expected) as err:
        write(path)
    monkeypatch.setattr(nio.os, "replace", real_replace)
    if failure == "disk_full":  # the errno stays for the CLI's one line, which names the file, not the temporary
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_bytes() == b"previous bytes"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert f".{os.getpid()}." in seen[0] and seen[0].endswith(".tmp")  # unique per process
    write(path)
    assert path.read_bytes() != b"previous bytes" and [p.name for p in tmp_path.iterdir()] == [path.name]


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_temporaries_only_takes_dead_writers_files(tmp_path):
    import os

    from nullbooth.io import _host, remove_stale_temporaries

    host, dead = _host(), _dead_pid()
    (tmp_path / "run" / "timestep_0000").mkdir(parents=True)
    stale = [tmp_path / f".c.npy.{host}.{dead}.abcd1234.tmp",
             tmp_path / "run" / "timestep_0000" / f".q_covariance.npy.{host}.{dead}.x_y9zzzz.tmp"]
    kept = [tmp_path / f".c.npy.{host}.{os.getpid()}.abcd1234.tmp",  # this live process is still writing it
            tmp_path / f".c.npy.other-host.{dead}.abcd1234.tmp",  # another machine's (shared file system)
            tmp_path / "notes.tmp", tmp_path / "c.npy", tmp_path / f".c.npy.{host}.0.abcd1234.tmp"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_a_killed_writer_leaves_the_previous_file_and_a_removable_temporary(tmp_path):
    import subprocess

    from nullbooth.io import remove_stale_temporaries

    target = tmp_path / "c.npy"
    save_npy(target, np.eye(4))
    before = target.read_bytes()
    script = (
        "import os, signal, sys, numpy as np\n"
        "import nullbooth.io as nio\n"
        "def dying_save(fh, array, allow_pickle):\n"
        "    fh.write(b'half a matrix'); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "nio.np.save = dying_save\n"
        "nio.save_npy(nio.Path(sys.argv[1]), np.zeros((4, 4)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp") and target.read_bytes() == before
    assert remove_stale_temporaries(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["c.npy"] and target.read_bytes() == before


@pytest.mark.parametrize("has_syncfs", [True, False])
def test_writes_synced_at_exit_fsync_once_at_the_end_and_not_after_an_error(tmp_path, monkeypatch, has_syncfs):
    import os

    import nullbooth.io as nio

    calls: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(nio.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(nio, "_syncfs", lambda folder: (calls.append("syncfs"), has_syncfs)[1])
    paths = [tmp_path / "a" / "x.npy", tmp_path / "a" / "y.npy", tmp_path / "b" / "z.json"]

    with nio.synced_at_exit(tmp_path):
        save_npy(paths[0], np.eye(3))
        with nio.synced_at_exit(tmp_path / "a"):  # nested: the outer block syncs
            save_npy(paths[1], np.ones(2))
        write_json(paths[2], {"k": 1})
        assert calls == []  # nothing synced file by file
    # one syncfs, or where there is none an fsync per file (3) and per folder (2)
    assert calls == (["syncfs"] if has_syncfs else ["syncfs"] + ["fsync"] * 5)
    assert np.array_equal(np.load(paths[0]), np.eye(3)) and paths[2].read_text() == '{\n  "k": 1\n}\n'

    calls.clear()
    with pytest.raises(RuntimeError), nio.synced_at_exit(tmp_path):
        save_npy(paths[0], np.zeros(3))
        raise RuntimeError("interrupted")
    assert calls == []  # the caller never declares an interrupted folder complete; nothing to make durable
    write_json(paths[2], {"k": 2})  # outside a block: fsync of the file and of its folder, as before
    assert calls == ["fsync", "fsync"]


def test_safetensors_files_are_byte_identical_for_identical_content(tmp_path):
    """safetensors orders header metadata by a hash map; save_tensors sorts it, so identical runs write identical
    files (a resumed run's LoRA file equals an uninterrupted run's byte for byte)."""
    tensors = {"b": torch.ones(3, 2), "a": torch.arange(5.0)}
    metadata = {"format": "pt", "lora_adapter_metadata": '{"r": 2, "note": "é"}', "z": "1", "m": "2"}
    files = [tmp_path / f"{i}.safetensors" for i in range(12)]
    for path in files:
        save_tensors(path, tensors, metadata)
    assert len({p.read_bytes() for p in files}) == 1
    loaded, meta = load_tensors(files[0], "a test file")
    assert meta == metadata and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_save_tensors_writes_what_safetensors_reads_for_every_dtype_and_shape(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(7, 3, dtype=torch.float64, generator=g), "f32": torch.randn(5, generator=g),
        "f16": torch.randn(2, 2, generator=g).half(), "bf16": torch.randn(3, generator=g).bfloat16(),
        "i64": torch.tensor(41, dtype=torch.int64), "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i8": torch.tensor([-3, 4], dtype=torch.int8), "u8": torch.tensor([255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
    }
    path = tmp_path / "all.safetensors"
    save_tensors(path, tensors, {"k": "v"})
    loaded = load_file(str(path))  # safetensors' own reader validates offsets, sizes and the header
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape and torch.equal(loaded[name], t), name
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"k": "v"}
    save_tensors(tmp_path / "bare.safetensors", {"x": torch.ones(1)})  # no metadata at all
    assert torch.equal(load_file(str(tmp_path / "bare.safetensors"))["x"], torch.ones(1))

    with pytest.raises(NullBoothError, match="complex64"):
        save_tensors(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(NullBoothError, match="must be strings"):
        save_tensors(tmp_path / "m.safetensors", {"x": torch.ones(1)}, {"n": 3})
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


def test_save_tensors_holds_one_tensor_at_a_time_not_the_whole_file(tmp_path):
    """Writing device sums (a collection checkpoint: 43 GB for SDXL) must not need their size again in host memory:
    each tensor's host copy is made, written and dropped before the next (safetensors' save_file moves every tensor
    to the host first). Here the host copy is made when a tensor is read from the mapping; 32 tensors of 8 MB may
    grow the peak RSS by about one tensor, not by the 256 MB file (margin: 64 MB)."""
    import subprocess

    script = (
        "import resource, sys, torch\n"
        "from collections.abc import Mapping\n"
        "from pathlib import Path\n"
        "from nullbooth.io import save_tensors\n"
        "class HostCopies(Mapping):  # what .to('cpu') of a device tensor gives: a new host tensor per access\n"
        "    def __getitem__(self, k): return torch.full((1 << 20,), float(int(k[1:])), dtype=torch.float64)\n"
        "    def __iter__(self): return iter(f't{i:02d}' for i in range(32))\n"
        "    def __len__(self): return 32\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "save_tensors(Path(sys.argv[1]), HostCopies())\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    path = tmp_path / "big.safetensors"
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    growth_mb = int(done.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
    assert growth_mb < 64, f"peak RSS grew by {growth_mb:.0f} MB while writing 256 MB"
    loaded, _ = load_tensors(path, "a test file")
    assert len(loaded) == 32 and float(loaded["t31"][-1]) == 31.0
