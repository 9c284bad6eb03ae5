"""Finalize, ``inspect`` and ``validate`` on an SD 1.5-shaped run (issue 14: a 50-step run in under a minute of CPU).

The run has SD 1.5's 16 ``attn2`` layers with their real names and widths (q/out 320 × 5, 640 × 5, 1280 × 6;
k/v 768) and is written by the project's own writer (:func:`nullbooth.runs.write.write_run`), so its layout is
real. The statistics are random (no model is run): per layer and feature a dense PSD matrix with eigenvalues
spread over five decades (relative threshold 1e-3: non-empty null spaces, projector files written), moved
per timestep by a random diagonal so no two matrices are equal.

Measured in this process:
- finalize of the whole run (``--steps``), and, on the first ``--compare-steps`` timesteps, finalize through
  the batched path against the old per-matrix path (``spectrum`` per matrix), both without the stored summed
  spectra (timed on their own) — medians of ``--repeats`` interleaved runs, same matrices, same process;
- ``inspect_run`` and ``validate_run`` of the whole run (CPU and wall seconds), and ``inspect_run`` of a copy
  without the stored spectra (an older run: ``eigvalsh`` of each summed statistic);
- ``eigh``/``eigvalsh`` calls made by inspect and validate (0 expected).

With ``--distinct-steps N`` only N timesteps are finalized (about 30 CPU s each here: the float64 ``eigh`` of 32
matrices up to 1280 wide) and the other timestep folders are byte copies of them, each a file of its own that
``validate`` reads and checks like any other; the finalize row then reports those N steps.

    python benchmarks/bench_inspect.py [--steps 50] [--distinct-steps N] [--compare-steps 2] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TEXT_WIDTH = 768
SD15_LAYERS = (
    [(f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", w) for b, w in ((0, 320), (1, 640), (2, 1280))
     for a in range(2)]
    + [("mid_block.attentions.0.transformer_blocks.0.attn2", 1280)]
    + [(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", w) for b, w in ((1, 1280), (2, 640), (3, 320))
       for a in range(3)]
)


def base_moments(seed: int = 0) -> dict[str, torch.Tensor]:
    """Per layer/feature a dense PSD ``[d, d]`` float64 matrix ``Q diag(λ) Qᵀ``, ``λ`` log-spread over 1e-5…1."""
    from nullbooth.runs.layout import TEXT_KEY, stat_key

    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, d in [(stat_key(n, f), w) for n, w in SD15_LAYERS for f in ("q", "out")] + [(TEXT_KEY, TEXT_WIDTH)]:
        Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
        lam = torch.logspace(-5, 0, d, dtype=torch.float64)
        out[key] = (Q * lam) @ Q.T
    return out


def statistics_at(base: dict[str, torch.Tensor], t: int, n: int = 4096) -> dict:
    """``{layer/feature: SecondMoment}`` of timestep ``t``: the base moment plus a random diagonal, ``n`` samples."""
    from nullbooth.runs.layout import TEXT_KEY
    from nullbooth.stats.moments import SecondMoment

    g = torch.Generator().manual_seed(10_000 + t)
    out = {}
    for key, C in base.items():
        if key == TEXT_KEY:
            continue
        stat = SecondMoment(C.shape[0])
        stat.sum.copy_((C + torch.diag(torch.rand(C.shape[0], dtype=torch.float64, generator=g) * 1e-3)) * n)
        stat.count = n
        out[key] = stat
    return out


def manifest(timesteps: list[int]) -> dict:
    from nullbooth.runs.layout import RUN_FORMAT

    return {
        "format": RUN_FORMAT, "status": "complete", "key": "bench-sd15-shaped", "identity": {"model": {}},
        "nullbooth": {"nullspace_mode": "relative", "nullspace_threshold": 1e-3},
        "layers": [{"name": n, "dir": n.replace(".", "_"),
                    "weight_shapes": {"q": [w, w], "k": [w, TEXT_WIDTH], "v": [w, TEXT_WIDTH], "out": [w, w]}}
                   for n, w in SD15_LAYERS],
        "features": ["q", "k", "v", "out"], "timesteps": timesteps,
    }


def build(run_dir: Path, base: dict[str, torch.Tensor], timesteps: list[int]) -> None:
    """Write a complete run through ``write_run`` (every ``eigh`` of a real finalize happens here)."""
    from nullbooth.runs.write import StoreSettings, write_run

    summed = summed_of(base, timesteps)
    shapes = {key: [stat.dim, stat.dim] for key, stat in summed.items()}
    write_run(run_dir, layers=[n for n, _ in SD15_LAYERS], features=["q", "k", "v", "out"], timesteps=timesteps,
              timestep_stats=lambda t: statistics_at(base, t), summed=summed, shapes=shapes,
              settings=StoreSettings("relative", 1e-3), manifest=manifest(timesteps), progress=False)


def replicate(run_dir: Path, distinct: list[int], timesteps: list[int]) -> None:
    """Fill ``timesteps`` beyond the finalized ``distinct`` ones with byte copies of their folders (metadata naming
    the copy's own timestep), and list every timestep in the manifest."""
    from nullbooth.filenames import MANIFEST
    from nullbooth.io import read_json, write_json
    from nullbooth.runs.layout import timestep_dirname

    for i, t in enumerate(t for t in timesteps if t not in distinct):
        source = run_dir / timestep_dirname(distinct[i % len(distinct)])
        target = run_dir / timestep_dirname(t)
        shutil.copytree(source, target)  # copies, not links: validate checks a linked file only once
        for meta in target.glob("*/*_metadata.json"):
            write_json(meta, {**read_json(meta, "a metadata file"), "timestep": t})
    manifest_file = run_dir / MANIFEST
    write_json(manifest_file, {**read_json(manifest_file, "the manifest"), "timesteps": timesteps})


@contextmanager
def per_timestep_only(per_matrix: bool):
    """Finalize without the stored summed spectra (timed on their own), and (``per_matrix``) with the old writer:
    one ``spectrum`` per matrix instead of batches of one width."""
    import nullbooth.runs.write as write
    from nullbooth.stats.nullspace import spectrum

    saved = write.spectra, write.save_summed_spectra
    if per_matrix:
        write.spectra = lambda mats, **_: [spectrum(C) for C in mats]
    write.save_summed_spectra = lambda *a, **k: None
    try:
        yield
    finally:
        write.spectra, write.save_summed_spectra = saved


def summed_of(base: dict[str, torch.Tensor], timesteps: list[int]) -> dict:
    from nullbooth.runs.layout import TEXT_KEY
    from nullbooth.stats.moments import SecondMoment

    summed: dict = {}
    for t in timesteps:
        for key, stat in statistics_at(base, t).items():
            summed.setdefault(key, SecondMoment(stat.dim)).merge(stat)
    text = SecondMoment(TEXT_WIDTH)
    text.sum.copy_(base[TEXT_KEY] * 4096)
    text.count = 4096
    summed[TEXT_KEY] = text
    return summed


@contextmanager
def eigen_counter():
    calls = {"n": 0}
    patched = [(torch.linalg, "eigh"), (torch.linalg, "eigvalsh"), (np.linalg, "eigh"), (np.linalg, "eigvalsh")]
    saved = [getattr(m, n) for m, n in patched]
    for (module, name), real in zip(patched, saved):
        def counted(*args, _real=real, **kwargs):
            calls["n"] += 1
            return _real(*args, **kwargs)
        setattr(module, name, counted)
    try:
        yield calls
    finally:
        for (module, name), real in zip(patched, saved):
            setattr(module, name, real)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}


def du(path: Path) -> int:
    seen, total = set(), 0
    for p in path.rglob("*"):
        st = p.stat()
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--distinct-steps", type=int, default=None,
                        help="finalize only this many timesteps; the others are copies of them (default: all)")
    parser.add_argument("--compare-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the finalize comparison")
    parser.add_argument("--keep", type=Path, help="build the run here and keep it (default: a temporary folder)")
    args = parser.parse_args()

    from nullbooth.filenames import SUMMED_SPECTRA
    from nullbooth.runs.diagnostics import inspect_run, validate_run
    from nullbooth.runs.layout import save_summed_spectra

    timesteps = [int(t) for t in np.linspace(999, 0, args.steps).round()]
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_inspect_"))
    root.mkdir(parents=True, exist_ok=True)
    base, setup = timed(lambda: base_moments())
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                 "platform": platform.platform(), "torch": torch.__version__},
                     "shape": {"layers": len(SD15_LAYERS), "q_out_widths": [w for _, w in SD15_LAYERS],
                               "text_width": TEXT_WIDTH, "steps": args.steps, "distinct_steps": args.distinct_steps,
                               "matrices_decomposed": 2 * len(SD15_LAYERS) * (args.distinct_steps or args.steps) + 1},
                     "random_moments": setup}
    try:
        few = timesteps[:args.compare_steps]
        torch.linalg.eigh(base[next(iter(base))])  # the first LAPACK call pays a one-off set-up: not in either path
        runs: dict[str, list] = {"batched": [], "per_matrix": []}
        for r in range(args.repeats):  # interleaved: a shared machine's load drifts, both paths see it alike
            for name in runs:
                with per_timestep_only(per_matrix=name == "per_matrix"):
                    runs[name].append(timed(lambda: build(root / f"{name}{r}", base, few))[1])
                shutil.rmtree(root / f"{name}{r}")
        batched, per_matrix = ({k: statistics.median(x[k] for x in runs[n]) for k in ("wall_s", "cpu_s")}
                               for n in ("batched", "per_matrix"))
        _, summed_spectra = timed(lambda: save_summed_spectra(root, summed_of(base, few), "bench"))
        results["finalize_compare"] = {"steps": len(few), "batched": batched, "per_matrix": per_matrix,
                                       "per_matrix_over_batched_cpu": round(per_matrix["cpu_s"] / batched["cpu_s"], 3),
                                       "summed_spectra_once_per_run": summed_spectra, "repeats": runs}

        run = root / "run"
        distinct = timesteps[::-(-args.steps // args.distinct_steps)] if args.distinct_steps else timesteps
        _, finalize = timed(lambda: build(run, base, distinct))
        results["finalize"] = {**finalize, "steps": len(distinct), "per_step_cpu_s": round(finalize["cpu_s"] / len(distinct), 2)}
        if len(distinct) < len(timesteps):
            replicate(run, distinct, timesteps)
        results["finalize"]["run_bytes"] = du(run)
        with eigen_counter() as calls:
            rows, inspect = timed(lambda: inspect_run(run))
        results["inspect"] = {**inspect, "rows": len(rows), "eigen_calls": calls["n"]}
        with eigen_counter() as calls:
            (rows, problems), validate = timed(lambda: validate_run(run))
        results["validate"] = {**validate, "matrices": len(rows), "problems": len(problems), "eigen_calls": calls["n"]}
        (run / SUMMED_SPECTRA).rename(run / "summed_eig.moved")
        with eigen_counter() as calls:
            _, old_inspect = timed(lambda: inspect_run(run))
        results["inspect_without_stored_spectra"] = {**old_inspect, "eigen_calls": calls["n"]}
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "inspect.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "inspect.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    c, s = r["finalize_compare"], r["shape"]
    lines = [
        f"# Finalize, inspect and validate on an SD 1.5-shaped run ({s['steps']} steps)",
        "",
        f"16 attn2 layers (q/out 320×5, 640×5, 1280×6; k/v {s['text_width']}), random PSD statistics written by "
        f"`write_run`; {s['matrices_decomposed']} matrices decomposed at finalize. Machine: {r['machine']['cpus']} CPUs, "
        f"{r['machine']['torch_threads']} torch threads (shared). CPU seconds are this process's user+system time.",
        "",
        "| step | wall s | CPU s | eigh/eigvalsh calls | notes |",
        "|---|---:|---:|---:|---|",
        f"| finalize, {c['steps']} step(s), per-matrix (old writer) | {c['per_matrix']['wall_s']} | "
        f"{c['per_matrix']['cpu_s']} | {32 * c['steps'] + 1} | per-timestep matrices + text |",
        f"| finalize, {c['steps']} step(s), batched by width | {c['batched']['wall_s']} | {c['batched']['cpu_s']} | "
        f"{3 * c['steps'] + 1} batches | same matrices; old/new CPU = {c['per_matrix_over_batched_cpu']} |",
        f"| summed spectra (once per run) | {c['summed_spectra_once_per_run']['wall_s']} | "
        f"{c['summed_spectra_once_per_run']['cpu_s']} | 3 batches | 33 matrices, stored for train/inspect/validate |",
        f"| finalize, {r['finalize']['steps']} steps, batched | {r['finalize']['wall_s']} | {r['finalize']['cpu_s']} | "
        f"batches | {r['finalize']['per_step_cpu_s']} CPU s per step; run {r['finalize']['run_bytes'] / 1e9:.2f} GB"
        + (f" once copied to {s['steps']} steps |" if r['finalize']['steps'] < s['steps'] else " |"),
        f"| inspect, {s['steps']} steps | {r['inspect']['wall_s']} | {r['inspect']['cpu_s']} | "
        f"{r['inspect']['eigen_calls']} | {r['inspect']['rows']} rows |",
        f"| validate, {s['steps']} steps | {r['validate']['wall_s']} | {r['validate']['cpu_s']} | "
        f"{r['validate']['eigen_calls']} | {r['validate']['matrices']} matrices, {r['validate']['problems']} problems |",
        f"| inspect, no stored spectra (older run) | {r['inspect_without_stored_spectra']['wall_s']} | "
        f"{r['inspect_without_stored_spectra']['cpu_s']} | {r['inspect_without_stored_spectra']['eigen_calls']} | |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
