"""Collection cost vs plain generation, and peak memory vs number of prompts.

Time: ``nullbooth collect`` (sampling with hooks + float64 accumulation + checkpoints + null spaces) against
plain ``pipe(...)`` sampling of the same prompts, steps, guidance and seeds on the same model in the same
process, interleaved and repeated; the ratio of medians is reported (target ≤ 1.10).
Memory: peak RSS of a fresh process collecting N prompts, for growing N (must not grow with N).

    python benchmarks/bench_collect.py [--model tiny-sd] [--prompts 16] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def make_prompts(n: int) -> list[str]:
    shapes = ["circle", "square", "triangle", "star", "dog", "house", "tree", "car"]
    colours = ["red", "blue", "green", "yellow", "purple", "black"]
    places = ["on the left", "on the right", "at the top", "in the center"]
    return [f"a {colours[i % 6]} {shapes[(i // 6) % 8]} {places[(i // 48) % 4]}" for i in range(n)]


def config(model: str, prompts: Path, out: Path, steps: int, batch: int):
    from nullbooth.config import config_from_dict

    return config_from_dict({"pretrained_model_name_or_path": model, "nullbooth": {
        "original_knowledge_prompts": str(prompts), "cov_matrices_output_dir": str(out),
        "num_denoising_steps": steps, "collection_batch_size": batch,
        "nullspace_mode": "relative", "nullspace_threshold": 1e-3}})


def time_pair(model: str, n: int, steps: int, batch: int, repeats: int) -> dict:
    from nullbooth.models import load_pipeline
    from nullbooth.runs.collect import collect
    from nullbooth.runs.plan import make_scheduler

    pipe = load_pipeline(model)
    prompts = make_prompts(n)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    collect_s, plain_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        pfile = Path(tmp) / "prompts.txt"
        pfile.write_text("\n".join(prompts))
        for r in range(repeats):
            start = time.perf_counter()
            collect(config(model, pfile, Path(tmp) / f"cov{r}", steps, batch), pipe=pipe, fresh=True, progress=False)
            collect_s.append(time.perf_counter() - start)

            original = pipe.scheduler
            pipe.scheduler = make_scheduler(pipe, "uniform")
            start = time.perf_counter()
            for i in range(0, n, batch):
                gens = [torch.Generator().manual_seed(i + j) for j in range(len(prompts[i:i + batch]))]
                pipe(prompts[i:i + batch], height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                     generator=gens, output_type="latent")
            plain_s.append(time.perf_counter() - start)
            pipe.scheduler = original
    return {"collect_s": collect_s, "plain_s": plain_s,
            "ratio": statistics.median(collect_s) / statistics.median(plain_s)}


def peak_rss_mb(model: str, n: int, steps: int, batch: int) -> float:
    """Peak RSS (MB) of a fresh process that collects ``n`` prompts."""
    code = f"""
import resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {str(HERE)!r})
from bench_collect import config, make_prompts
from nullbooth.runs.collect import collect
with tempfile.TemporaryDirectory() as tmp:
    p = Path(tmp) / "p.txt"; p.write_text("\\n".join(make_prompts({n})))
    collect(config({model!r}, p, Path(tmp) / "cov", {steps}, {batch}), fresh=True, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # a fair, quiet measurement on a shared 2-core machine

    timing = time_pair(args.model, args.prompts, args.steps, args.batch, args.repeats)
    memory = {n: peak_rss_mb(args.model, n, args.steps, args.batch) for n in (args.batch, 4 * args.batch, 16 * args.batch)}
    result = {
        "model": args.model, "prompts": args.prompts, "steps": args.steps, "batch": args.batch,
        "device": "cpu", "threads": 1, "machine": platform.processor() or platform.machine(),
        **timing, "target_ratio": 1.10, "peak_rss_mb_by_prompts": memory,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "collect.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Collection benchmark", "",
        f"Model `{args.model}`, {args.prompts} prompts, {args.steps} steps, batch {args.batch}, CFG 7.5, CPU, 1 thread.", "",
        "| | median seconds | runs |", "|---|---|---|",
        f"| plain `pipe(...)` (latents) | {statistics.median(timing['plain_s']):.2f} | {', '.join(f'{x:.2f}' for x in timing['plain_s'])} |",
        f"| `nullbooth collect` | {statistics.median(timing['collect_s']):.2f} | {', '.join(f'{x:.2f}' for x in timing['collect_s'])} |",
        f"| **ratio** (target ≤ 1.10) | **{timing['ratio']:.3f}** | |", "",
        "| prompts | peak RSS (MB) |", "|---|---|",
        *[f"| {n} | {mb:.0f} |" for n, mb in memory.items()], "",
    ]
    (out / "collect.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
