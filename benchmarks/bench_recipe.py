"""What the default world-model recipe costs, and whether it reproduces the shipped ``tiny-sd`` bit for bit.

Runs ``python scripts/train_world_model.py --out OUT`` (the default recipe: step budgets, one thread, CPU-time clock)
under ``/usr/bin/time -v`` with its log in ``OUT.log``, or, with ``--summarise``, reads a run already made. From the
run it records:

- the training time in CPU-minutes of the training process (``train_minutes`` of ``nullbooth_world_model.json``,
  the recipe's own clock; the gates after it are not counted) against the 90-minute budget, and its wall time;
- each stage's wall minutes and the steady seconds per step of VAE crop, VAE full-image and UNet steps (from the log's
  timestamps, first logged steps of each phase left out: compilation, warm-up);
- the peak resident memory of the process;
- whether every safetensors file of the run is byte-identical to the shipped model's (``--compare``): the recipe
  counts steps, so on the machine that trained the shipped model it must give the same weights.

Measure with nothing else running: on a loaded machine the same steps take more CPU time (≈ 7 % beside a second run).

    python benchmarks/bench_recipe.py [--out outputs/recipe] [--summarise]

Writes ``benchmarks/results/rebuild_vae20k/recipe_minutes.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHIPPED = REPO / "src" / "nullbooth" / "data" / "models" / "tiny-sd"
BUDGET_MINUTES = 90.0
STEP_LINE = re.compile(r"^(\d\d:\d\d:\d\d) (vae|unet) step (\d+) .*?(crops|full)?$")


def step_times(log: str) -> dict[str, list[tuple[int, float]]]:
    """``(step, seconds since the first logged line)`` per phase (``vae_crops``, ``vae_full``, ``unet``) of a log."""
    phases: dict[str, list[tuple[int, float]]] = {"vae_crops": [], "vae_full": [], "unet": []}
    day, last, t0 = timedelta(0), None, None
    for line in log.splitlines():
        m = STEP_LINE.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%H:%M:%S")
        if last is not None and t < last:  # past midnight
            day += timedelta(days=1)
        last = t
        t0 = t0 or t
        phase = "unet" if m.group(2) == "unet" else f"vae_{m.group(4)}"
        phases[phase].append((int(m.group(3)), (t + day - t0).total_seconds()))
    return phases


def seconds_per_step(points: list[tuple[int, float]], skip: float = 0.1) -> float | None:
    """Least-squares slope of time against step over a phase's logged steps, its first ``skip`` fraction left out."""
    points = points[int(len(points) * skip):]
    if len(points) < 3:
        return None
    steps, seconds = np.array(points, dtype=np.float64).T
    return float(np.polyfit(steps, seconds, 1)[0])


def stage_wall_minutes(log: str) -> dict[str, float]:
    """Wall minutes from each stage's first log line to the next stage's."""
    marks = {}
    for line in log.splitlines():
        for stage, key in (("vae", "stage 1: VAE"), ("encoding", "stage 2:"), ("unet", "stage 3:"),
                           ("end", "denoiser: ")):
            if key in line and stage not in marks and re.match(r"^\d\d:\d\d:\d\d ", line):
                marks[stage] = datetime.strptime(line[:8], "%H:%M:%S")
    order = [s for s in ("vae", "encoding", "unet", "end") if s in marks]
    out = {}
    for a, b in zip(order, order[1:]):
        out[a] = round(((marks[b] - marks[a]).total_seconds() % 86400) / 60, 2)
    return out


def peak_rss_gib(log: str) -> float | None:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    return round(int(m.group(1)) / 2**20, 2) if m else None


def same_weights(run: Path, shipped: Path) -> dict:
    """Byte comparison of every safetensors file of ``shipped`` with ``run``'s."""
    files = sorted(p.relative_to(shipped) for p in shipped.rglob("*.safetensors"))
    differ = [str(f) for f in files if not (run / f).is_file() or (run / f).read_bytes() != (shipped / f).read_bytes()]
    model = str(shipped.relative_to(REPO)) if shipped.is_relative_to(REPO) else str(shipped)
    return {"model": model, "files": [str(f) for f in files], "identical": not differ,
            "differ": differ}


def summarise(run: Path, log_path: Path, command: str, compare: Path | None) -> dict:
    log = log_path.read_text()
    info = json.loads((run / "nullbooth_world_model.json").read_text())
    rates = {k: seconds_per_step(v) for k, v in step_times(log).items()}
    result = {
        "what": "the default recipe (python scripts/train_world_model.py) run alone on one thread: its training time "
                "in CPU-minutes of the training process (the recipe's clock, gates excluded) against the budget",
        "command": command,
        "clock": info["clock"],
        "threads": info["threads"],
        "steps": {"vae": info["vae"].get("steps"), "unet": info["denoiser"]["steps"]},
        "train_minutes": info["train_minutes"],
        "train_wall_minutes": info["train_wall_minutes"],
        "budget_minutes": BUDGET_MINUTES,
        "within_budget": info["train_minutes"] <= BUDGET_MINUTES,
        "stage_wall_minutes": stage_wall_minutes(log),
        "seconds_per_step": {k: (round(v, 4) if v is not None else None) for k, v in rates.items()},
        "peak_rss_gib": peak_rss_gib(log),
    }
    if (run / "vae_gate.json").is_file():
        g = json.loads((run / "vae_gate.json").read_text())
        result["vae_gate"] = {"passed": g["passed"], "kept": g["kept"], "psnr_db_mean": round(g["psnr_db"]["mean"], 2)}
    if (run / "composition_gate.json").is_file():
        g = json.loads((run / "composition_gate.json").read_text())
        result["composition_gate"] = {"passed": g["passed"], "heldout_shape_and_colour": g["heldout"]["shape_and_colour"],
                                      "ci95": [round(v, 4) for v in g["heldout"]["shape_and_colour_ci95"]]}
    if compare is not None:
        result["same_weights"] = same_weights(run, compare)
    return result


def markdown(result: dict) -> str:
    """A short table of the run: stages, rates, the total against the budget, and weight identity."""
    rates, stages = result["seconds_per_step"], result["stage_wall_minutes"]
    lines = [f"`{result['command']}` — {result['steps']['vae']:,} VAE and {result['steps']['unet']:,} UNet steps, "
             f"{result['threads']} thread, alone", "",
             "| stage | wall minutes | seconds per step |", "|---|---|---|",
             f"| VAE | {stages.get('vae', '–')} | crops {rates['vae_crops']}, full images {rates['vae_full']} |",
             f"| encoding | {stages.get('encoding', '–')} | |",
             f"| UNet + frozen text encoder | {stages.get('unet', '–')} | {rates['unet']} |",
             f"| **training, CPU-minutes** | **{result['train_minutes']}** (budget {result['budget_minutes']:g}: "
             f"{'within' if result['within_budget'] else 'over'}) | |", ""]
    if "same_weights" in result:
        same = result["same_weights"]
        lines.append(f"Weights byte-identical to `{same['model']}`: {'yes' if same['identical'] else 'no'}"
                     + ("" if same["identical"] else f" ({', '.join(same['differ'])} differ)") + ".")
    lines.append(f"Peak resident memory {result['peak_rss_gib']} GiB.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "recipe", help="the run's model folder")
    p.add_argument("--summarise", action="store_true", help="read a run already made (OUT and OUT.log)")
    p.add_argument("--compare", type=Path, default=SHIPPED, help="model whose weights the run must reproduce")
    p.add_argument("--result", type=Path, default=HERE / "results" / "rebuild_vae20k" / "recipe_minutes.json")
    args = p.parse_args(argv)
    log_path = args.out.with_name(args.out.name + ".log")
    out = args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out
    command = f"python scripts/train_world_model.py --out {out}"
    if not args.summarise:
        with log_path.open("w") as log:
            subprocess.run(["/usr/bin/time", "-v", sys.executable, str(REPO / "scripts" / "train_world_model.py"),
                            "--out", str(args.out)], stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    result = summarise(args.out, log_path, command, args.compare)
    args.result.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    args.result.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
