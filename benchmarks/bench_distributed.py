"""Distributed collection: 1 vs 2 processes on the same collection, and store size per storage mode.

Time: the same collection (model, prompts, steps, batch size) run by one process and by two processes
under ``torchrun`` (gloo), each process with one thread (``torch.set_num_threads(1)``, OMP_NUM_THREADS=1),
in one benchmark run. Reported per launch: the wall time of the whole command (Python start-up and model
load included) and the collection time measured inside rank 0 (from ``collect()``'s start to its return:
sampling, checkpoints, the float64 reduction and the null spaces). Also checked: the two results agree
(max relative Frobenius difference of the summed float64 statistics).
Size: bytes of a run per storage mode for SD 1.5 shapes (16 attn2 layers, q/out widths 320×5, 640×5,
1280×6, text 768, 50 timesteps), computed by :func:`nullbooth.stats.compress.sd15_store_sizes`; and the
measured bytes, reconstruction errors and null-dimension changes of this benchmark's run re-stored in
each mode.

    python benchmarks/bench_distributed.py [--model tiny-sd] [--prompts 16] [--steps 10] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_prompts(n: int) -> list[str]:
    shapes = ["circle", "square", "triangle", "star", "dog", "house", "tree", "car"]
    colours = ["red", "blue", "green", "yellow", "purple", "black"]
    return [f"a {colours[i % 6]} {shapes[(i // 6) % 8]} number {i}" for i in range(n)]


def worker(config_path: str, report: str) -> None:
    """One process of a launch: load the model, time ``collect()``, rank 0 writes the timing."""
    import torch

    torch.set_num_threads(1)
    from nullbooth.config import load_config
    from nullbooth.models import load_pipeline
    from nullbooth.runs.collect import collect

    cfg = load_config(config_path)
    pipe = load_pipeline(cfg.pretrained_model_name_or_path)
    start = time.perf_counter()
    run = collect(cfg, pipe=pipe, fresh=True, progress=False)
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        Path(report).write_text(json.dumps({"collect_s": seconds, "run": str(run),
                                            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}))


def launch(processes: int, config_path: Path, report: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(config_path), str(report)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *cmd[1:]]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{processes}-process launch failed:\n{done.stderr[-3000:]}")
    return {**json.loads(report.read_text()), "wall_s": wall, "processes": processes}


def max_rel_difference(a: Path, b: Path) -> float:
    from nullbooth.runs.layout import RunData

    x, y = RunData(a), RunData(b)
    return max(float((x.summed[k].sum - y.summed[k].sum).norm() / y.summed[k].sum.norm()) for k in y.summed)


def restored_sizes(run: Path, tmp: Path) -> list[dict]:
    """This run re-stored in every mode: measured bytes of the matrices, worst error, null-dimension changes."""
    from nullbooth.runs.layout import read_manifest
    from nullbooth.runs.merge import merge_runs

    rows = []
    for storage, energy in [("float32", None), ("float16", None), ("eigh", 0.9999), ("eigh", 0.99)]:
        overrides = {"storage": storage, **({"storage_energy": energy} if energy else {})}
        out = merge_runs([run], tmp / f"{storage}_{energy}", overrides=overrides, progress=False)
        seen = {}
        for path in out.glob("timestep_*/*/*"):
            if path.suffix in (".npy", ".safetensors"):
                seen[path.stat().st_ino] = path.stat().st_size
        report = read_manifest(out)["storage_report"]
        rows.append({"storage": storage, "storage_energy": energy, "matrix_bytes": sum(seen.values()),
                     "max_reconstruction_rel_error": report["max_reconstruction_rel_error"],
                     "matrices_with_other_null_dim": report["null_dim_changed"], "matrices": report["matrices"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "REPORT"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "distributed"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import yaml

    from nullbooth.stats.compress import sd15_store_sizes

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "prompts.txt").write_text("\n".join(make_prompts(args.prompts)) + "\n")
        timings = []
        for processes in (1, 2):
            config = tmp / f"p{processes}.yaml"
            config.write_text(yaml.safe_dump({"pretrained_model_name_or_path": args.model, "nullbooth": {
                "original_knowledge_prompts": str(tmp / "prompts.txt"), "cov_matrices_output_dir": str(tmp / f"cov{processes}"),
                "num_denoising_steps": args.steps, "collection_batch_size": args.batch,
                "nullspace_mode": "relative", "nullspace_threshold": 1e-3}}))
            timings.append(launch(processes, config, tmp / f"report{processes}.json"))
        one, two = timings
        agreement = max_rel_difference(Path(two["run"]), Path(one["run"]))
        restored = restored_sizes(Path(one["run"]), tmp)

    sizes = sd15_store_sizes()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1min_before": load_before},
        "collection": {"model": args.model, "prompts": args.prompts, "steps": args.steps, "batch_size": args.batch,
                       "threads_per_process": 1},
        "timing": timings,
        "ratio_collect_2_over_1": two["collect_s"] / one["collect_s"],
        "ratio_wall_2_over_1": two["wall_s"] / one["wall_s"],
        "max_rel_difference_summed_2_vs_1": agreement,
        "restored_tiny_run": restored,
        "sd15_store_sizes": sizes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Distributed collection benchmark", "",
        f"Collection: `{args.model}`, {args.prompts} prompts × {args.steps} steps, batch size {args.batch}, one thread "
        f"per process, gloo on CPU ({result['machine']['cpus']} shared cores; 1-minute load average {load_before:.2f} "
        "before the run: above 0.5, other jobs shared the cores and timings are noisy).", "",
        "| processes | collect() on rank 0 (s) | whole command (s) |", "|---|---|---|",
        *[f"| {t['processes']} | {t['collect_s']:.2f} | {t['wall_s']:.2f} |" for t in timings], "",
        f"Ratio 2 / 1 processes: **{result['ratio_collect_2_over_1']:.2f}** inside collect(), "
        f"{result['ratio_wall_2_over_1']:.2f} for the whole command (start-up and model load included).", "",
        f"Two-process result vs one-process result: max relative difference of the float64 summed statistics "
        f"{agreement:.1e} (different order of float64 additions; tolerance 1e-12).", "",
        "## Store size per storage mode, SD 1.5 shapes (computed)", "",
        "16 attn2 layers (q/out input widths 320×5, 640×5, 1280×6), text width 768, 50 timesteps; "
        "`stats/summed.safetensors` (float64, what training uses) is included in every row.", "",
        "| storage | case | per-timestep matrices (GB) | metadata (GB) | summed stats (GB) | timestep sums (GB) | total (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sizes:
        if "matrices_bytes" not in row:
            lines.append(f"| {row['storage']} | {row['note']} | | | | | {row['total_gb']:.2f} |")
            continue
        gb = lambda key: f"{row[key] / 1e9:.3f}"  # noqa: E731
        lines.append(f"| {row['storage']} | {row['note']} | {gb('matrices_bytes')} | {gb('metadata_bytes')} | "
                     f"{gb('summed_stats_bytes')} | {gb('timestep_sums_bytes')} | {row['total_gb']:.2f} |")
    lines += ["", "## This benchmark's run re-stored per mode (measured)", "",
              "| storage | energy | matrix files (bytes) | max relative reconstruction error | matrices with another null dim |",
              "|---|---|---|---|---|",
              *[f"| {r['storage']} | {r['storage_energy'] or ''} | {r['matrix_bytes']} | {r['max_reconstruction_rel_error']:.2e} "
                f"| {r['matrices_with_other_null_dim']} of {r['matrices']} |" for r in restored]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
