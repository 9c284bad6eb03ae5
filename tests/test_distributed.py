"""Distributed collection on CPU (gloo, 2 processes under torchrun) equals a single-process run; killed workers resume.

Tolerance: the processes sum their shards' float64 statistics separately and rank 0 adds the totals,
so the order of float64 additions differs from a single process: ``‖S_dist − S_single‖_F / ‖S_single‖_F``
≤ 1e-12 (measured ≈ 2e-16). Features are bit-identical because every prompt keeps its seed
(``seed + global index``) and every process, the reference included, uses one thread.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_prompts

from nullbooth.config import config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.filenames import COLLECT_CHECKPOINT
from nullbooth.runs.collect import collect
from nullbooth.runs.distributed import setup
from nullbooth.runs.layout import RunData, load_statistics, read_manifest
from nullbooth.runs.shards import assign_shards

REL = 1e-12
PROMPTS = [f"a {c} {s} on a plain background" for c, s in
           [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]]


def _block(tmp: Path, out: str) -> dict:
    return {"original_knowledge_prompts": str(write_prompts(tmp / "prompts.txt", PROMPTS)),
            "cov_matrices_output_dir": str(tmp / out), "num_denoising_steps": 2, "collection_batch_size": 1,
            "nullspace_mode": "relative", "nullspace_threshold": 1e-3, "keep_timestep_sums": True}


def _config_file(tmp: Path, out: str) -> Path:
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump({"pretrained_model_name_or_path": "tiny-sd", "nullbooth": _block(tmp, out)}))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_pipe):
    """The single-process run (one thread, like each torchrun worker)."""
    tmp = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = config_from_dict({"pretrained_model_name_or_path": "tiny-sd", "nullbooth": _block(tmp, "single")})
        return collect(cfg, pipe=tiny_pipe, progress=False, distributed=False)
    finally:
        torch.set_num_threads(threads)


def assert_same_run(got: Path, want: Path) -> None:
    """Same key, counts, summed and per-timestep float64 sums to ``REL`` (relative Frobenius)."""
    assert read_manifest(got)["key"] == read_manifest(want)["key"]
    a, b = RunData(got), RunData(want)
    assert a.summed.keys() == b.summed.keys()
    for key in b.summed:
        assert a.summed[key].count == b.summed[key].count, key
        rel = float((a.summed[key].sum - b.summed[key].sum).norm() / b.summed[key].sum.norm())
        assert rel <= REL, (key, rel)
    assert a.exact_timesteps and b.exact_timesteps and a.timesteps == b.timesteps
    for t in b.timesteps:
        ta, tb = a.timestep(t), b.timestep(t)
        assert ta.keys() == tb.keys()
        for key in tb:
            assert ta[key].count == tb[key].count
            assert float((ta[key].sum - tb[key].sum).norm() / tb[key].sum.norm()) <= REL, (t, key)


def _torchrun(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(tmp_path, reference):
    proc = _torchrun(["-m", "nullbooth", "collect", "--config", str(_config_file(tmp_path, "dist"))])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    runs = list((tmp_path / "dist").glob("run_*"))
    assert len(runs) == 1 and str(runs[0]) in out  # one run, written by rank 0 alone, returned to every rank
    run = runs[0]
    manifest = read_manifest(run)
    assert manifest["status"] == "complete" and manifest["collection"]["shards"] == 2
    assert not (run / ".partial").exists()
    assert_same_run(run, reference)


def _descendants(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


@pytest.mark.slow
def test_killed_worker_resumes_per_shard(tmp_path, reference, tiny_pipe, caplog):
    """SIGKILL rank 1 mid-shard under torchrun; restart: both shards continue from their checkpoints.

    The restart runs in this process (world size 1, so it also takes over rank 1's shard file: a changed
    process count); with an unchanged one each rank gets its own file back (test_assign_shards_…).
    """
    config = _config_file(tmp_path, "killed")
    slow = tmp_path / "slow_collect.py"  # the CLI's collect, slowed so the kill lands mid-shard
    slow.write_text("import sys, time\nfrom nullbooth.config import load_config\nfrom nullbooth.runs.collect import collect\n"
                    "collect(load_config(sys.argv[1]), progress=False, on_batch=lambda acc, i: time.sleep(0.6))\n")
    proc = _torchrun([str(slow), str(config)])
    rank1 = COLLECT_CHECKPOINT.parent / "checkpoint.rank1.safetensors"
    deadline, victim, found = time.time() + 240, None, []
    while time.time() < deadline and victim is None and proc.poll() is None:
        found = list((tmp_path / "killed").glob(f"run_*/{rank1}"))
        if found:
            victim = _worker_of_rank(proc.pid, 1)
        time.sleep(0.03)
    assert victim is not None, "rank 1 never checkpointed"
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    run = found[0].parents[1]
    assert read_manifest(run)["status"] == "collecting"
    assert load_statistics(run / rank1)[1]["shards"] == '{"1": 1}'  # shard 1 holds batches 1 and 3: one was done

    cfg = config_from_dict({"pretrained_model_name_or_path": "tiny-sd", "nullbooth": _block(tmp_path, "killed")})
    caplog.set_level(logging.INFO, logger="nullbooth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = collect(cfg, pipe=tiny_pipe, progress=False, distributed=False)
    finally:
        torch.set_num_threads(threads)
    assert resumed == run and "resuming" in caplog.text
    assert_same_run(run, reference)


def test_assign_shards_same_and_changed_world_size():
    meta = lambda shards, key="k": {"key": key, "batch_size": "1", "n_shards": "4",  # noqa: E731
                                    "shards": __import__("json").dumps(shards)}
    files = {"a0": meta({"0": 2}), "a1": meta({"1": 1}), "a2": meta({"2": 2}), "a3": meta({"3": 0})}
    same, stale = assign_shards(files, 4, 4, "k", 1)
    assert not stale and [r["files"] for r in same] == [["a0"], ["a1"], ["a2"], ["a3"]]
    fewer, _ = assign_shards(files, 4, 2, "k", 1)  # rank r takes the files whose first shard is r mod 2
    assert fewer[0] == {"files": ["a0", "a2"], "shards": {"0": 2, "2": 2}}
    assert fewer[1] == {"files": ["a1", "a3"], "shards": {"1": 1, "3": 0}}
    # A crash after rank 0 wrote shards {0, 2} into one file but before it deleted a2: a2 is stale.
    merged = {"m0": meta({"0": 3, "2": 3}), "a2": meta({"2": 2}), "a1": meta({"1": 1})}
    out, stale = assign_shards(merged, 4, 3, "k", 1)
    assert stale == ["a2"] and out[0]["files"] == ["m0"]
    assert out[0]["shards"] == {"0": 3, "2": 3, "3": 0}  # shard 3 is in no file: it starts over on rank 3 % 3
    assert out[1] == {"files": ["a1"], "shards": {"1": 1}} and out[2] == {"files": [], "shards": {}}  # 2 is in m0
    with pytest.raises(NullBoothError, match="both hold shard 1"):
        assign_shards({"x": meta({"0": 1, "1": 1}), "y": meta({"1": 2, "3": 1})}, 4, 2, "k", 1)
    with pytest.raises(NullBoothError, match="different configuration"):
        assign_shards({"x": meta({"0": 1}, key="other")}, 4, 2, "k", 1)


def test_environment_detection():
    assert not setup(None, env={}).enabled and not setup(None, env={"WORLD_SIZE": "1"}).enabled
    with pytest.raises(NullBoothError, match="MASTER_ADDR, MASTER_PORT not set"):
        setup(None, env={"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(NullBoothError, match="expected WORLD_SIZE > 1"):
        setup(True, env={})
    with pytest.raises(NullBoothError, match="outside 0..1"):
        setup(None, env={"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def test_model_fingerprint_does_not_depend_on_the_thread_count(tiny_pipe):
    """torchrun workers run one thread each: they must compute the same run key as a multi-threaded process."""
    from nullbooth.runs.identity import model_fingerprint

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model_fingerprint(tiny_pipe)
        torch.set_num_threads(2)
        two = model_fingerprint(tiny_pipe)
    finally:
        torch.set_num_threads(threads)
    assert one == two
