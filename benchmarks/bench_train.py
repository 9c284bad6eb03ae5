"""Training cost and preservation of nullbooth vs lora vs attn2_finetune on the same model, data and batch.

Every method runs the real ``nullbooth.training.loop.train`` in its own fresh process (so peak memory is its
own), in interleaved rounds (n, l, d / l, d, n / …) so that load on the machine hits all methods alike.
Per method it records:

- step time: median over the steps after ``--warmup`` of every round, then median over rounds; and,
  because separate processes see different machine load, the loop's step core timed with the three
  methods alternating step by step in one process. The headline is ``nullbooth / lora`` (target ≤ 1.15);
- memory: trainable parameters, Adam state bytes (exact, from the optimizer), and the peak RSS during
  steady-state steps (after step 1, when Adam's state exists) above the RSS at the end of step 1 —
  activations and gradients — plus the absolute peak RSS of the process (``torch.cuda`` peak on GPU);
- leakage at equal steps: ``‖ΔW X₀‖/‖W X₀‖`` per weight on the held-out prompts' features and on the
  collection run's preserved features (max and median over the 16 weights).

    python benchmarks/bench_train.py [--model tiny-sd] [--resolution 64] [--steps 12] [--batch 2] [--rounds 2]

Writes ``benchmarks/results/train.json`` and ``train.md``.
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
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
METHODS = ("nullbooth", "lora", "attn2_finetune")


# --------------------------------------------------------------------------- inputs


def write_inputs(folder: Path, n_prior: int, n_heldout: int, n_instance: int) -> dict[str, str]:
    """Instance images and prompt files: the synthetic world's subject and captions when available."""
    from PIL import Image

    inst = folder / "instance"
    inst.mkdir(parents=True, exist_ok=True)
    try:
        from nullbooth.world import subjects as world

        images = world.subject_instances(n_instance)
        prior = world.prior_prompts(n_prior, seed=0)
        heldout = [p for p, _ in world.heldout_prompts(n_heldout, seed=1)]
        instance_prompt, class_prompt = world.instance_prompt(), "a star"
    except (ImportError, AttributeError):
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n_instance)]
        prior = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "star", "dog")]
        prior = (prior * (n_prior // len(prior) + 1))[:n_prior]
        heldout = [f"a {c} {s} on the left" for c in ("purple", "orange") for s in ("cross", "cat")][:n_heldout]
        instance_prompt, class_prompt = "a sks star", "a star"
    for i, image in enumerate(images):
        image.save(inst / f"{i:02d}.png")
    (folder / "prior.txt").write_text("\n".join(prior) + "\n")
    (folder / "heldout.txt").write_text("\n".join(heldout) + "\n")
    return {"instance": str(inst), "prior": str(folder / "prior.txt"), "heldout": str(folder / "heldout.txt"),
            "instance_prompt": instance_prompt, "class_prompt": class_prompt}


def make_config(args: argparse.Namespace, inputs: dict[str, str], method: str, out: Path):
    from nullbooth.config import config_from_dict

    return config_from_dict({
        "pretrained_model_name_or_path": args.model, "resolution": args.resolution, "seed": 0, "method": method,
        "instance_data_dir": inputs["instance"], "instance_prompt": inputs["instance_prompt"],
        "class_prompt": inputs["class_prompt"], "train_batch_size": args.batch, "max_train_steps": args.steps,
        "checkpointing_steps": 10_000, "output_dir": str(out), "heldout_prompts": inputs["heldout"],
        "heldout_steps": 2, "lora_rank": args.lora_rank, "mixed_precision": args.mixed_precision,
        "nullbooth": {"original_knowledge_prompts": inputs["prior"], "cov_matrices_output_dir": str(out.parent / "cov"),
                      "num_denoising_steps": args.collect_steps, "collection_batch_size": 8,
                      "nullspace_mode": args.nullspace_mode, "nullspace_threshold": args.nullspace_threshold},
    })


# --------------------------------------------------------------------------- one method, one process


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Running maximum of this process's RSS, sampled every millisecond on a background thread."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def reset(self) -> int:
        self.peak = now = rss_bytes()
        return now

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


def worker(args: argparse.Namespace) -> None:
    """Train one method; print one JSON line with timings, memory and leakage."""
    torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from nullbooth.models import load_pipeline
    from nullbooth.training.loop import train

    inputs = json.loads(args.inputs)
    out = Path(args.out)
    cfg = make_config(args, inputs, args.worker, out)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    pipe = load_pipeline(args.model, device=accelerator.device)
    cuda = accelerator.device.type == "cuda"
    sampler = PeakSampler()
    marks: dict[str, int] = {}
    optimizer_bytes = [0]

    def on_step(step: int, _loss: float) -> None:
        if step == 1:  # steady state from here on: Adam's moments exist, step 1's activations are freed
            marks["after_step1"] = sampler.reset()
            if cuda:
                torch.cuda.synchronize()
                marks["cuda_after_step1"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()

    # Adam's state size, measured exactly on the optimizer the loop builds.
    original_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        result = original_step(self, *a, **k)
        if not optimizer_bytes[0]:
            optimizer_bytes[0] = sum(t.numel() * t.element_size() for s in self.state.values()
                                     for t in s.values() if isinstance(t, torch.Tensor))
        return result

    torch.optim.AdamW.step = counting_step
    report = train(cfg, pipe=pipe, accelerator=accelerator, progress=False, on_step=on_step)
    peak = sampler.stop()
    rows = [r for r in report["weights"] if r.get("trained", True)]
    trainable = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)

    def stat(key: str) -> dict[str, float | None]:
        values = [r[key] for r in rows if key in r]
        return {"max": max(values), "median": statistics.median(values)} if values else {"max": None, "median": None}

    result = {
        "method": args.worker, "step_seconds": report["step_seconds"], "trainable_params": trainable,
        "adam_state_bytes": optimizer_bytes[0],
        "steady_peak_rss_above_step1_bytes": max(peak - marks["after_step1"], 0), "peak_rss_bytes": peak,
        "leak_heldout": stat("leak_heldout"), "leak_preserved": stat("leak_preserved"),
        "delta_rel": stat("delta_rel"), "learning_rate": report["learning_rate"],
        "final_loss": report["summary"]["final_loss"],
    }
    if cuda:
        result["cuda_peak_above_step1_bytes"] = torch.cuda.max_memory_allocated() - marks["cuda_after_step1"]
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- driver


def run_worker(args: argparse.Namespace, method: str, inputs: dict[str, str], out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--inputs", json.dumps(inputs), "--out", str(out)]
    for key in ("model", "resolution", "steps", "batch", "threads", "lora_rank", "collect_steps", "nullspace_mode",
                "nullspace_threshold", "mixed_precision"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{method} worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def collect_once(args: argparse.Namespace, inputs: dict[str, str], root: Path) -> tuple[Path, float]:
    """The statistics run all methods share (nullbooth trains from it, all are measured on it)."""
    from nullbooth.models import load_pipeline
    from nullbooth.runs.collect import collect

    cfg = make_config(args, inputs, "nullbooth", root / "collect")
    started = time.perf_counter()
    run = collect(cfg, pipe=load_pipeline(args.model, device=device()), progress=False)
    return run, time.perf_counter() - started


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def interleaved_steps(args: argparse.Namespace, inputs: dict[str, str], root: Path, run: Path) -> dict[str, list[float]]:
    """Step times with the three methods alternating step by step in one process, on identical inputs.

    The step is the loop's core — UNet forward, MSE, backward, clipping, AdamW, ``after_step`` — without the
    data pipeline and bookkeeping; load on the machine then hits every method within the same second.
    """
    import torch.nn.functional as F

    from nullbooth.methods.registry import make_method
    from nullbooth.models import load_pipeline

    setups = {}
    for m in METHODS:
        cfg = make_config(args, inputs, m, root / f"interleaved-{m}")
        pipe = load_pipeline(args.model, device=device())
        method = make_method(cfg)
        optimizer = torch.optim.AdamW(method.prepare(pipe, run), weight_decay=1e-2)
        setups[m] = (pipe, method, optimizer)
    pipe = setups["lora"][0]
    g = torch.Generator(device=device()).manual_seed(0)
    size = args.resolution // pipe.vae_scale_factor
    with torch.no_grad():
        ids = pipe.tokenizer([inputs["instance_prompt"]] * args.batch, padding="max_length", max_length=77,
                             return_tensors="pt").input_ids.to(device())
        text = pipe.text_encoder(ids)[0]  # [B, 77, d], identical in every copy (text encoder untouched)
    latents = torch.randn(args.batch, pipe.unet.config.in_channels, size, size, generator=g, device=device())
    noise = torch.randn(latents.shape, generator=g, device=device())
    t = torch.randint(0, 1000, (args.batch,), generator=g, device=device())
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(args.warmup + args.interleaved_steps):
        order = METHODS[i % 3:] + METHODS[: i % 3]
        for m in order:
            p, method, optimizer = setups[m]
            sync()
            tick = time.perf_counter()
            loss = F.mse_loss(p.unet(latents, t, text).sample.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for grp in optimizer.param_groups for q in grp["params"]], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step()
            sync()
            if i >= args.warmup:
                times[m].append(time.perf_counter() - tick)
    return times


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def markdown(result: dict) -> str:
    env, s = result["environment"], result["summary"]
    lines = [
        "# Training benchmark: nullbooth vs lora vs attn2_finetune", "",
        f"`python benchmarks/bench_train.py {result['command']}` — {env['device']}, torch {env['torch']}, "
        f"{env['threads']} thread(s), model `{result['settings']['model']}`, {result['settings']['resolution']} px, "
        f"batch {result['settings']['batch']}, {result['settings']['steps']} steps × {result['settings']['rounds']} "
        f"interleaved rounds (each method in a fresh process), nullspace {result['settings']['nullspace_mode']} "
        f"{result['settings']['nullspace_threshold']:g}, lora rank {result['settings']['lora_rank']}.", "",
        "| method | lr | step time (s, median) | / lora | trainable params | Adam state (MiB) | step peak RSS above "
        "steady (MiB) | peak RSS (MiB) | leak held-out max / median | leak preserved max / median | ‖ΔW‖/‖W‖ max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        r = result["methods"][m]
        lines.append(
            f"| {m} | {g(r['learning_rate'])} | {r['step_time']:.4f} | {r['step_time'] / result['methods']['lora']['step_time']:.2f} "
            f"| {r['trainable_params']:,} | {mb(r['adam_state_bytes'])} | {mb(r['steady_peak_rss_above_step1_bytes'])} "
            f"| {mb(r['peak_rss_bytes'])} | {g(r['leak_heldout']['max'])} / {g(r['leak_heldout']['median'])} "
            f"| {g(r['leak_preserved']['max'])} / {g(r['leak_preserved']['median'])} | {g(r['delta_rel']['max'])} |")
    il = result["interleaved"]
    lines += [
        "", "Step time, methods alternating step by step in one process (identical inputs; UNet forward + backward + "
        f"AdamW + after_step; {il['lora']['steps']} steps each, median): "
        + ", ".join(f"{m} {il[m]['median_s']:.4f} s" for m in METHODS) + ".", "",
        f"**nullbooth / lora step time: {s['interleaved_nullbooth_over_lora']:.3f} interleaved** (target ≤ 1.15: "
        f"{'met' if s['interleaved_nullbooth_over_lora'] <= 1.15 else 'NOT met'}), "
        f"{s['nullbooth_over_lora']:.3f} end to end (median of rounds); "
        f"attn2_finetune / lora: {s['interleaved_attn2_finetune_over_lora']:.3f} interleaved, {s['attn2_finetune_over_lora']:.3f} end "
        f"to end. Per-round end-to-end ratios nullbooth/lora: "
        f"{', '.join(f'{x:.3f}' for x in s['per_round_nullbooth_over_lora'])} (separate processes: sensitive to the "
        f"load of the machine, {result['environment']['load_average_at_end'][0]:.1f} at the end of this run).", "",
        f"Held-out leakage at equal steps (max over weights): nullbooth {g(s['leak_heldout_max']['nullbooth'])}, "
        f"lora {g(s['leak_heldout_max']['lora'])}, attn2_finetune {g(s['leak_heldout_max']['attn2_finetune'])}. Each method "
        "uses its default learning rate, so the leakage of lora (larger lr, other parametrisation) is not a like-for-like "
        "figure; nullbooth vs attn2_finetune is (same weights, same lr).", "",
        f"Statistics run shared by all methods: collected once in {result['collect_seconds']:.1f} s "
        f"({result['settings']['prior_prompts']} prompts × {result['settings']['collect_steps']} steps).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the step-time median")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--interleaved-steps", type=int, default=30, help="timed steps per method, interleaved in-process")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--prior-prompts", type=int, default=32)
    p.add_argument("--heldout-prompts", type=int, default=16)
    p.add_argument("--collect-steps", type=int, default=10)
    p.add_argument("--nullspace-mode", default="relative")
    p.add_argument("--nullspace-threshold", type=float, default=1e-3)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        inputs = write_inputs(root / "inputs", args.prior_prompts, args.heldout_prompts, 5)
        run, collect_seconds = collect_once(args, inputs, root)
        interleaved = interleaved_steps(args, inputs, root, run)
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for r in range(args.rounds):
            order = METHODS[r % 3:] + METHODS[: r % 3]
            for method in order:
                runs[method].append(run_worker(args, method, inputs, root / f"{method}-{r}"))
                print(f"round {r} {method}: {statistics.median(runs[method][-1]['step_seconds'][args.warmup:]):.4f} s/step",
                      file=sys.stderr)

    def step_time(run: dict) -> float:
        return statistics.median(run["step_seconds"][args.warmup:])

    methods = {}
    for m in METHODS:
        last = runs[m][-1]
        methods[m] = {**{k: v for k, v in last.items() if k != "step_seconds"},
                      "step_time": statistics.median(step_time(r) for r in runs[m]),
                      "step_time_per_round": [step_time(r) for r in runs[m]],
                      "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs[m]),
                      "steady_peak_rss_above_step1_bytes": statistics.median(
                          r["steady_peak_rss_above_step1_bytes"] for r in runs[m])}
    per_round = [step_time(runs["nullbooth"][r]) / step_time(runs["lora"][r]) for r in range(args.rounds)]
    result = {
        "command": " ".join(sys.argv[1:]),
        "environment": {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
                        "torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(),
                        "load_average_at_end": os.getloadavg()},
        "settings": {k: getattr(args, k) for k in ("model", "resolution", "steps", "warmup", "batch", "rounds",
                                                  "lora_rank", "nullspace_mode", "nullspace_threshold",
                                                  "mixed_precision", "collect_steps")}
        | {"prior_prompts": args.prior_prompts, "heldout_prompts": args.heldout_prompts},
        "collect_seconds": collect_seconds,
        "methods": methods,
        "interleaved": {m: {"median_s": statistics.median(v), "steps": len(v)} for m, v in interleaved.items()},
        "summary": {
            "interleaved_nullbooth_over_lora": statistics.median(interleaved["nullbooth"]) / statistics.median(interleaved["lora"]),
            "interleaved_attn2_finetune_over_lora": statistics.median(interleaved["attn2_finetune"]) / statistics.median(interleaved["lora"]),
            "nullbooth_over_lora": methods["nullbooth"]["step_time"] / methods["lora"]["step_time"],
            "attn2_finetune_over_lora": methods["attn2_finetune"]["step_time"] / methods["lora"]["step_time"],
            "per_round_nullbooth_over_lora": per_round,
            "leak_heldout_max": {m: methods[m]["leak_heldout"]["max"] for m in METHODS},
            "leak_preserved_max": {m: methods[m]["leak_preserved"]["max"] for m in METHODS},
        },
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "train.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
