"""Bad input and faults around collection runs, training outputs, checkpoints and locks (issue 18, part B).

Every case ends in one line ``nullbooth <verb>: error: …`` (exit 2) or in the right behaviour, and what was
already written stays byte-identical: damaged summed statistics are reported by ``validate`` and never reused
by ``collect``/``train``; an earlier training result is never silently replaced or resumed from stale or
mismatched checkpoints; a full disk keeps the previous checkpoint resumable; a second process on the same
folder stops at once, naming the first one's PID.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from shutil import copytree

import numpy as np
import pytest
import torch
import yaml
from conftest import small_config, subject_images, write_prompts
from safetensors.torch import load_file, save_file

import nullbooth.io
import nullbooth.runs.collect
from nullbooth.cli.main import main as cli_main
from nullbooth.filenames import CHECKPOINT_STATE, LOCK_FILE, LORA_WEIGHTS, MANIFEST, SUMMED_STATS
from nullbooth.locks import lock_folder
from nullbooth.runs.collect import collect
from nullbooth.runs.layout import TEXT_KEY, load_statistics, read_manifest, save_statistics
from nullbooth.stats.moments import SecondMoment
from nullbooth.training.report import nan_message

RES = 16
HOLD = ("import sys, time\nfrom nullbooth.locks import lock_folder\nheld = lock_folder(sys.argv[1], 'testing')\n"
        "print('held', flush=True)\ntime.sleep(300)\n")


# --------------------------------------------------------------------------- helpers


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc: int, err: str, verb: str, *words: str, strict: bool = True) -> str:
    """Exit 2, no traceback, one error line containing every one of ``words``: all of stderr when ``strict``, else
    what follows the progress bars drawn before the failure."""
    assert rc == 2, err
    assert "Traceback" not in err
    marker = f"nullbooth {verb}: error: "
    assert err.count(marker) == 1, err
    line = marker + err.split(marker, 1)[1].split("\n", 1)[0]
    if strict:
        assert err.strip() == line, err
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the lock file, which names its latest holder) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def collect_yaml(folder: Path, prompts: Path, cov: Path, **nullbooth) -> Path:
    """The CLI twin of conftest's ``small_config`` (same key for the same prompts), with its own run folder."""
    block = {"original_knowledge_prompts": str(prompts), "cov_matrices_output_dir": str(cov), "num_denoising_steps": 1,
             "collection_batch_size": 2, "nullspace_mode": "relative", "nullspace_threshold": 1e-3, **nullbooth}
    path = folder / f"collect_{cov.name}.yaml"
    path.write_text(yaml.safe_dump({"pretrained_model_name_or_path": "tiny-sd", "nullbooth": block}))
    return path


def train_yaml(folder: Path, out: Path, **extra) -> Path:
    data = {"pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": 3, "method": "lora", "lora_rank": 2,
            "instance_data_dir": str(subject_images(folder / "instance")), "instance_prompt": "a photo of sks dog",
            "output_dir": str(out), "max_train_steps": 3, "checkpointing_steps": 1, "learning_rate": 1e-3, **extra}
    path = folder / f"train_{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextmanager
def holding(folder: Path):
    """Another process holding ``folder``'s lock until the block ends (then SIGKILLed: the kernel frees the lock)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_pipe):
    """A complete run (1 step, 3 prompts) and its prompt file; tests damage copies of it."""
    tmp = tmp_path_factory.mktemp("pristine")
    run = collect(small_config(tmp, num_denoising_steps=1), pipe=tiny_pipe, progress=False)
    return run, tmp / "prompts.txt"


@pytest.fixture
def copied(pristine, tmp_path):
    """A copy of the pristine run under ``tmp_path/cov`` (same key: ``collect_yaml`` finds and reuses it)."""
    run, prompts = pristine
    target = tmp_path / "cov" / run.name
    copytree(run, target)
    return target, prompts


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step lora output with checkpoint-1..3; tests work on copies of it."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "out"
    assert cli_main(["train", "--config", str(train_yaml(tmp, out))]) == 0
    return tmp, out


@pytest.fixture
def earlier(finished, tmp_path):
    tmp, out = finished
    target = tmp_path / "out"
    copytree(out, target)
    return train_yaml(tmp_path, target), target


# --------------------------------------------------------------------------- validate and reuse of damaged runs


def _rewrite_sums(run: Path, change) -> None:
    stats, meta = load_statistics(run / SUMMED_STATS)
    change(stats, next(k for k in stats if k.endswith("/q")))
    save_statistics(run / SUMMED_STATS, stats, meta)


def _poke(stats, key, value):
    stats[key].sum[0, 1] = value


def _indefinite(stats, key):
    stats[key].sum -= torch.eye(stats[key].dim, dtype=torch.float64) * 10 * float(stats[key].sum.abs().max())


def _narrow(stats, key):
    stats[key] = SecondMoment(3)
    stats[key].count = 5


def _projection_of_wrong_shape(run: Path) -> None:
    path = next(run.rglob("*_projection.npy"))
    np.save(path, np.eye(3, dtype=np.float32))


def _drop_manifest_field(run: Path) -> None:
    manifest = json.loads((run / MANIFEST).read_text())
    del manifest["layers"]
    (run / MANIFEST).write_text(json.dumps(manifest))


DAMAGE = {
    "summed missing": (lambda run: (run / SUMMED_STATS).unlink(), "is missing"),
    "summed truncated": (lambda run: (run / SUMMED_STATS).write_bytes((run / SUMMED_STATS).read_bytes()[:300]),
                         "not a readable safetensors file"),
    "summed random bytes": (lambda run: (run / SUMMED_STATS).write_bytes(random.Random(0).randbytes(4096)),
                            "not a readable safetensors file"),
    "summed NaN": (lambda run: _rewrite_sums(run, lambda s, k: _poke(s, k, float("nan"))), "NaN"),
    "summed asymmetric": (lambda run: _rewrite_sums(run, lambda s, k: _poke(s, k, 1e6)), "not symmetric"),
    "summed indefinite": (lambda run: _rewrite_sums(run, _indefinite), "not positive semi-definite"),
    "summed lacks text": (lambda run: _rewrite_sums(run, lambda s, k: s.pop(TEXT_KEY)), f"lacks the statistic {TEXT_KEY}"),
    "summed wrong width": (lambda run: _rewrite_sums(run, _narrow), "got 3×3"),
    "summed zero count": (lambda run: _rewrite_sums(run, lambda s, k: setattr(s[k], "count", 0)), "sample count"),
    "projection wrong shape": (_projection_of_wrong_shape, "projection shape (3, 3)"),
    "manifest lacks layers": (_drop_manifest_field, "'layers'"),
}
REUSE_REFUSED = ("summed missing", "summed random bytes", "summed NaN", "summed lacks text", "summed wrong width")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_validate_reports_what_training_could_not_read(copied, damage, capsys, caplog):
    run, _ = copied
    harm, words = DAMAGE[damage]
    harm(run)
    before = snapshot(run)
    rc, out, err = run_cli(capsys, "validate", run)
    assert rc == 1 and "Traceback" not in err, err
    assert "0 problem(s)" not in out and "problem(s)" in out
    assert words in caplog.text
    assert snapshot(run) == before


def test_validate_passes_the_pristine_run_and_reports_an_unfinished_one(copied, capsys, caplog):
    run, _ = copied
    rc, out, _ = run_cli(capsys, "validate", run)
    assert rc == 0 and "0 problem(s)" in out
    manifest = json.loads((run / MANIFEST).read_text())
    (run / MANIFEST).write_text(json.dumps({**manifest, "status": "collecting"}))
    rc, out, _ = run_cli(capsys, "validate", run)
    assert rc == 1 and "unfinished" in caplog.text and "rerun `nullbooth collect`" in caplog.text


@pytest.mark.parametrize("damage", REUSE_REFUSED)
def test_collect_never_reuses_a_damaged_run_and_names_fresh(copied, tmp_path, damage, capsys):
    run, prompts = copied
    DAMAGE[damage][0](run)
    before = snapshot(run.parent)
    rc, _, err = run_cli(capsys, "collect", "--config", collect_yaml(tmp_path, prompts, run.parent))
    assert_one_error(rc, err, "collect", str(run), "--fresh")
    assert snapshot(run.parent) == before


def test_collect_fresh_beside_a_damaged_run_then_train_uses_the_new_one(copied, tmp_path, capsys):
    run, prompts = copied
    DAMAGE["summed NaN"][0](run)
    before = snapshot(run)
    config = collect_yaml(tmp_path, prompts, run.parent)
    out = tmp_path / "trained"
    # the collection's seed and (native) size, so training looks for the same run
    train = train_yaml(tmp_path, out, method="nullbooth", max_train_steps=1, seed=0, resolution=None,
                       nullbooth=yaml.safe_load(config.read_text())["nullbooth"])
    rc, _, err = run_cli(capsys, "train", "--config", train)
    assert_one_error(rc, err, "train", "--fresh")
    rc, stdout, err = run_cli(capsys, "collect", "--config", config, "--fresh")
    assert rc == 0, err
    new = Path(stdout.strip())
    assert new != run and read_manifest(new)["status"] == "complete"
    assert snapshot(run) == before  # --fresh moves and deletes nothing
    rc, _, err = run_cli(capsys, "train", "--config", train)
    assert rc == 0, err
    assert json.loads((out / "train_report.json").read_text())["stats_run"] == str(new)


def test_explicit_stats_run_that_is_damaged_is_refused(copied, tmp_path, capsys):
    run, _ = copied
    DAMAGE["summed truncated"][0](run)
    train = train_yaml(tmp_path, tmp_path / "out", method="nullbooth", nullbooth={"stats_run": str(run)})
    rc, _, err = run_cli(capsys, "train", "--config", train)
    assert_one_error(rc, err, "train", "training cannot use this run", "nullbooth validate")


# --------------------------------------------------------------------------- an earlier training output


def _drop_settings(out: Path) -> None:
    state = out / "checkpoint-3" / CHECKPOINT_STATE
    data = json.loads(state.read_text())
    del data["settings"]
    state.write_text(json.dumps(data))


def _garbage_generator(out: Path) -> None:
    rng = out / "checkpoint-3" / "rng-0.safetensors"
    save_file({**load_file(str(rng)), "generator": torch.zeros(3, dtype=torch.uint8)}, str(rng))


EARLIER = {  # name: (extra CLI arguments, change to the copied output, words of the one error line)
    "finished, no flag": ([], None, ["already holds an earlier training run", "--overwrite", "resume_from_checkpoint"]),
    "stale checkpoint past max steps": (["--resume_from_checkpoint", "latest", "--max_train_steps", "2"], None,
                                        ["checkpoint-3", "beyond max_train_steps 2", "checkpoint-2"]),
    "other learning rate": (["--resume_from_checkpoint", "latest", "--learning_rate", "0.5"], None,
                            ["other settings", "learning_rate: 0.001 → 0.5"]),
    "other seed": (["--resume_from_checkpoint", "latest", "--seed", "4"], None, ["other settings", "seed: 3 → 4"]),
    "state without settings": (["--resume_from_checkpoint", "latest"], _drop_settings,
                               ["checkpoint-3", "lacks settings", "resume_from_checkpoint: checkpoint-2", "start over"]),
    "garbage RNG tensor": (["--resume_from_checkpoint", "latest"], _garbage_generator,
                           ["checkpoint-3", "RNG state 'generator' cannot be restored", "checkpoint-2"]),
    "unreadable RNG file": (["--resume_from_checkpoint", "latest"],
                            lambda out: (out / "checkpoint-3" / "rng-0.safetensors").write_bytes(b"\x00" * 64),
                            ["rng-0.safetensors", "not a readable safetensors file", "checkpoint-2"]),
    "overwrite and resume": (["--overwrite", "--resume_from_checkpoint", "latest"], None, ["set one of them"]),
    "a diffusers model folder": (["--overwrite"], lambda out: (out / "model_index.json").write_text("{}"),
                                 ["holds a diffusers pipeline"]),
    "too large for the model": (["--overwrite", "--set", "resolution=512"], None, ["resolution", "at most 256"]),
}


@pytest.mark.parametrize("case", list(EARLIER))
def test_an_earlier_output_is_never_silently_replaced_or_resumed_wrongly(earlier, case, capsys):
    config, out = earlier
    args, change, words = EARLIER[case]
    if change is not None:
        change(out)
    before = snapshot(out)
    rc, _, err = run_cli(capsys, "train", "--config", config, *args)
    assert_one_error(rc, err, "train", *words)
    assert snapshot(out) == before


def test_overwrite_deletes_only_what_nullbooth_wrote(earlier, capsys):
    config, out = earlier
    (out / "class_images").mkdir()
    (out / "class_images" / "class_0.png").write_bytes(b"not really a png")
    (out / "notes.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "train", "--config", config, "--overwrite", "--max_train_steps", "2")
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # no stale checkpoint-3
    assert json.loads((out / "train_report.json").read_text())["steps"] == 2
    assert (out / "notes.txt").read_text() == "mine" and (out / "class_images" / "class_0.png").is_file()


def test_resume_finishes_a_run_whose_last_checkpoint_is_its_end(earlier, finished, capsys):
    config, out = earlier
    (out / LORA_WEIGHTS).unlink()  # killed between the last checkpoint and the result
    rc, _, err = run_cli(capsys, "train", "--config", config, "--resume_from_checkpoint", "latest")
    assert rc == 0, err
    assert (out / LORA_WEIGHTS).read_bytes() == (finished[1] / LORA_WEIGHTS).read_bytes()


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_output_dir_that_cannot_be_a_folder(tmp_path, where, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    out = blocker if where == "a file" else blocker / "out"
    rc, _, err = run_cli(capsys, "train", "--config", train_yaml(tmp_path, out))
    assert_one_error(rc, err, "train", str(blocker))
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes anywhere")
def test_read_only_output_dir(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        rc, _, err = run_cli(capsys, "train", "--config", train_yaml(tmp_path, out))
    finally:
        out.chmod(0o700)
    assert_one_error(rc, err, "train", "writable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is fine on a GPU")
def test_fp16_on_the_cpu_is_refused_not_ignored(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--config", train_yaml(tmp_path, tmp_path / "out"), "--set",
                         "mixed_precision=fp16")
    assert_one_error(rc, err, "train", "fp16 needs a CUDA device", "'bf16'")


def test_nan_advice_resumes_only_a_checkpoint_that_exists(tmp_path, earlier):
    cfg = small_config(tmp_path)
    (tmp_path / "empty").mkdir()
    fresh = nan_message(cfg, 3, tmp_path / "empty")
    assert "resume" not in fresh and "run train again" in fresh
    assert "resume_from_checkpoint: latest" in nan_message(cfg, 4, earlier[1]) and "checkpoint-3" in nan_message(
        cfg, 4, earlier[1])


@pytest.mark.parametrize("mode, threshold, fix, wrong", [
    ("rank", 100000, "lower nullbooth.nullspace_threshold, the rank kept", "raise"),
    ("rank", 0, "raise nullbooth.nullspace_threshold, the rank kept as knowledge, above 0", "lower"),
    ("relative", 0, "raise nullbooth.nullspace_threshold above λ_min / λ_max", "use nullspace_mode 'relative'"),
])
def test_inspect_advice_matches_the_mode(copied, mode, threshold, fix, wrong, capsys, caplog):
    run, _ = copied
    rc, _, _ = run_cli(capsys, "inspect", run, "--mode", mode, "--threshold", threshold)
    assert rc == 0
    advice = [r.getMessage() for r in caplog.records if "null space" in r.getMessage()]
    assert advice and all(fix in a and wrong not in a.split(";")[-1] for a in advice), advice


# --------------------------------------------------------------------------- a full disk


def disk_full_at(monkeypatch, name: str, nth: int) -> dict:
    """The ``nth`` atomic write of a file called ``name`` fails with ENOSPC; the bytes there before are recorded."""
    real, seen = nullbooth.io._atomic, {"calls": 0, "before": None}

    def atomic(path, write):
        if Path(path).name == name:
            seen["calls"] += 1
            if seen["calls"] == nth:
                seen["before"] = Path(path).read_bytes() if Path(path).exists() else None
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)

    monkeypatch.setattr(nullbooth.io, "_atomic", atomic)
    return seen


def assert_same_sums(a: Path, b: Path) -> None:
    sa, sb = load_statistics(a / SUMMED_STATS)[0], load_statistics(b / SUMMED_STATS)[0]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k].sum, sb[k].sum) and sa[k].count == sb[k].count for k in sa)


@pytest.mark.parametrize("name, nth, words", [
    ("checkpoint.safetensors", 2, ["No space left on device", "previous checkpoint (1 batch(es)) is intact"]),
    ("summed.safetensors", 1, ["No space left on device", "safe in its checkpoint", "rerun the same command"]),
])
def test_disk_full_while_collecting_keeps_what_was_collected(pristine, tmp_path, tiny_pipe, monkeypatch, capsys, name,
                                                             nth, words):
    _, prompts = pristine
    straight = collect(small_config(tmp_path, num_denoising_steps=1, collection_batch_size=1,
                                    cov_matrices_output_dir=str(tmp_path / "straight")), pipe=tiny_pipe, progress=False)
    config = collect_yaml(tmp_path, prompts, tmp_path / "full", collection_batch_size=1)
    seen = disk_full_at(monkeypatch, name, nth)
    rc, _, err = run_cli(capsys, "collect", "--config", config)
    assert_one_error(rc, err, "collect", *words, strict=False)
    run = next((tmp_path / "full").glob("run_*"))
    checkpoint = run / ".partial" / "checkpoint.safetensors"
    assert checkpoint.read_bytes() == (seen["before"] if name == "checkpoint.safetensors" else checkpoint.read_bytes())
    assert not list(run.rglob("*.tmp")) and read_manifest(run)["status"] == "collecting"
    monkeypatch.undo()
    rc, out, err = run_cli(capsys, "collect", "--config", config)
    assert rc == 0 and Path(out.strip()) == run, err
    assert_same_sums(run, straight)


def test_disk_full_while_checkpointing_training_keeps_the_last_checkpoint(tmp_path, finished, monkeypatch, capsys):
    out = tmp_path / "out"
    config = train_yaml(tmp_path, out)
    real = nullbooth.io._atomic

    def atomic(path, write):
        if Path(path).parent.name == ".checkpoint-2.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)

    monkeypatch.setattr(nullbooth.io, "_atomic", atomic)
    rc, _, err = run_cli(capsys, "train", "--config", config)
    assert_one_error(rc, err, "train", "checkpoint-2", "No space left on device", "checkpoint-1 is intact",
                     "resume_from_checkpoint: latest", strict=False)
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["checkpoint-1"]  # no half-written folder
    kept = snapshot(out)
    monkeypatch.undo()
    rc, _, err = run_cli(capsys, "train", "--config", config)  # not resumed: refused, nothing touched
    assert_one_error(rc, err, "train", "resume_from_checkpoint: latest")
    assert snapshot(out) == kept
    rc, _, err = run_cli(capsys, "train", "--config", config, "--resume_from_checkpoint", "latest")
    assert rc == 0, err
    assert (out / LORA_WEIGHTS).read_bytes() == (finished[1] / LORA_WEIGHTS).read_bytes()  # = the uninterrupted run


# --------------------------------------------------------------------------- a second process


def test_a_second_train_on_a_locked_output_dir_names_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    config = train_yaml(tmp_path, out)
    with holding(out) as holder:
        rc, _, err = run_cli(capsys, "train", "--config", config)
        assert_one_error(rc, err, "train", f"PID {holder.pid}", "training into it")
        assert not (out / LORA_WEIGHTS).exists()
    # SIGKILLed: the kernel dropped its lock, nothing has to be cleaned up
    rc, _, err = run_cli(capsys, "train", "--config", config)
    assert rc == 0, err


def test_a_second_collect_of_a_run_in_progress_names_the_holder(pristine, tmp_path, tiny_pipe, capsys):
    _, prompts = pristine
    config = collect_yaml(tmp_path, prompts, tmp_path / "cov", collection_batch_size=1)
    cfg = small_config(tmp_path, num_denoising_steps=1, collection_batch_size=1, cov_matrices_output_dir=str(tmp_path / "cov"))

    def stop(acc, index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(cfg, pipe=tiny_pipe, progress=False, on_batch=stop)
    run = next((tmp_path / "cov").glob("run_*"))
    before = snapshot(run)
    with holding(run) as holder:
        rc, _, err = run_cli(capsys, "collect", "--config", config)
        assert_one_error(rc, err, "collect", f"PID {holder.pid}", "collecting this run")
        assert snapshot(run) == before
    rc, out, err = run_cli(capsys, "collect", "--config", config)
    assert rc == 0 and Path(out.strip()) == run, err


def test_choosing_a_run_waits_for_the_folder_then_names_the_holder(pristine, tmp_path, monkeypatch, capsys):
    _, prompts = pristine
    monkeypatch.setattr(nullbooth.runs.collect, "CHOOSING_WAIT", 0.5)
    with holding(tmp_path / "cov") as holder:
        rc, _, err = run_cli(capsys, "collect", "--config", collect_yaml(tmp_path, prompts, tmp_path / "cov"))
        assert_one_error(rc, err, "collect", f"PID {holder.pid}", "choosing its collection run")
    assert not list((tmp_path / "cov").glob("run_*"))


def test_locks_are_reentrant_in_a_process_and_free_after_release(tmp_path):
    outer = lock_folder(tmp_path, "testing")
    inner = lock_folder(tmp_path, "testing")  # train collecting into its own output_dir
    inner.release()
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(300)", "pass"), str(tmp_path)],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and f"PID {os.getpid()}" in probe.stderr  # still held by the outer one
    outer.release()
    with holding(tmp_path):
        pass


# --------------------------------------------------------------------------- SIGKILL, then the same command again


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nullbooth", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


@pytest.mark.slow
def test_sigkilled_collect_rerun_equals_an_uninterrupted_one(tmp_path):
    """Both runs in subprocesses: float sums depend on the thread count, which conftest sets to 1 in this one."""
    prompts = write_prompts(tmp_path / "p.txt", [f"a shape number {i}" for i in range(8)])
    straight = _cli("collect", "--config", collect_yaml(tmp_path, prompts, tmp_path / "s", num_denoising_steps=2,
                                                        collection_batch_size=1))
    assert straight.returncode == 0, straight.stderr
    config = collect_yaml(tmp_path, prompts, tmp_path / "killed", num_denoising_steps=2, collection_batch_size=1)
    proc = subprocess.Popen([sys.executable, "-m", "nullbooth", "collect", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def checkpointed() -> bool:
        found = list((tmp_path / "killed").glob("run_*/.partial/checkpoint.safetensors"))
        return bool(found) and load_statistics(found[0])[1]["batches_done"] != "0"

    _kill_when(proc, checkpointed)
    run = next((tmp_path / "killed").glob("run_*"))
    assert read_manifest(run)["status"] == "collecting", "the kill should land mid-run"
    again = _cli("collect", "--config", config)
    assert again.returncode == 0 and Path(again.stdout.strip()) == run, again.stderr
    assert_same_sums(run, Path(straight.stdout.strip()))


@pytest.mark.slow
def test_sigkilled_train_is_refused_without_resume_and_resumes_exactly(tmp_path):
    steps = 24
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _cli("train", "--config", train_yaml(tmp_path, straight, max_train_steps=steps))  # a subprocess, like the others
    assert done.returncode == 0, done.stderr
    config = train_yaml(tmp_path, killed, max_train_steps=steps)
    proc = subprocess.Popen([sys.executable, "-m", "nullbooth", "train", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _kill_when(proc, lambda: (killed / "checkpoint-2").is_dir())
    assert not (killed / LORA_WEIGHTS).exists(), "the kill should land mid-run"
    before = snapshot(killed)
    again = _cli("train", "--config", config)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().count("\n") == 0 and "resume_from_checkpoint: latest" in again.stderr
    assert snapshot(killed) == before
    resumed = _cli("train", "--config", config, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert (killed / LORA_WEIGHTS).read_bytes() == (straight / LORA_WEIGHTS).read_bytes()


def test_train_start_removes_what_a_killed_writer_left(tmp_path):
    """A temporary file named for a dead process of this host goes when the next run takes the folder's lock;
    one of a live process stays."""
    from types import SimpleNamespace

    from nullbooth.config import config_from_dict
    from nullbooth.io import _temporary_prefix
    from nullbooth.training.setup import prepare_output_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    target = out / "train_report.json"
    stale = out / (_temporary_prefix(target).replace(f".{os.getpid()}.", f".{dead.pid}.") + "abc.tmp")
    alive = out / (_temporary_prefix(target) + "xyz.tmp")
    stale.write_bytes(b"half")
    alive.write_bytes(b"half")
    lock, replaced = prepare_output_dir(config_from_dict({"output_dir": str(out)}), SimpleNamespace(is_main_process=True))
    lock.release()
    assert not stale.exists() and alive.exists() and replaced == []
