"""Where a personalisation's loss goes, by timestep, and what guidance does with it: one suite subject, a few runs.

For each run (method, learning rate, loss weighting, Perfusion's gate scope) it trains ``--steps`` × batch 2 on the
subject's five instance images with the real ``nullbooth.training.loop.train``, then measures

- the **instance loss by timestep**: ``‖ε − ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, τ(y))‖²`` on the instance latents at fixed
  t, averaged over ``--noise-draws`` seeded noise draws (the same draws for the base model and every run): where the
  training signal went;
- the **guidance split**: on the same noisy latents, how far the run moved the conditional prediction
  (``δ_c = ε_θ'(z_t, y) − ε_θ(z_t, y)``) and the unconditional one (``δ_u``, empty prompt), their cosine, against the
  base model's own guidance direction ``‖ε_θ(z_t, y) − ε_θ(z_t, ∅)‖``: guidance g adds ``δ_u + g (δ_c − δ_u)``, so a
  method that keeps ``δ_u = 0`` has its learned shift multiplied by g, and one whose ``δ_u`` differs from ``δ_c`` has the
  difference multiplied;
- the **judged attributes** of samples for the subject's prompts at guidance 1, 2 and 4 (shape, main colour, pattern
  kind, all four): whether what the conditional branch learned survives classifier-free guidance.

Nothing here is tuned to the subject: ``--subject`` indexes the public suite (1 = its first random draw).

    python benchmarks/bench_timesteps.py               # → results/timesteps.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
TIMESTEPS = (50, 250, 500, 750, 950)
SPLIT_TIMESTEPS = (950, 750, 500)
GUIDANCES = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Run:
    label: str
    method: str
    lr: float
    snr_gamma: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)


RUNS: tuple[Run, ...] = (
    Run("dreambooth plain", "dreambooth", 3e-4),
    Run("attn2_finetune plain", "attn2_finetune", 3e-3),
    Run("attn2_finetune γ5", "attn2_finetune", 3e-3, 5.0),
    Run("nullbooth ε 0.1 γ5", "nullbooth", 3e-3, 5.0,
        {"nullbooth": {"nullspace_mode": "rank", "nullspace_threshold": 0, "leakage_budget": 0.1}}),
    Run("perfusion concept_token γ5", "perfusion", 3e-2, 5.0, {"perfusion": {"gate_scope": "concept_token"}}),
)


def config(run: Run, subject, folder: Path, prior: Path, args) -> Any:
    from nullbooth.config import config_from_dict
    from nullbooth.world.subjects import instance_prompt, with_concept_token

    prompt = instance_prompt(subject)
    cfg: dict[str, Any] = {
        "pretrained_model_name_or_path": args.model, "seed": 0, "method": run.method,
        "output_dir": str(folder / "out"), "instance_data_dir": str(folder / "instances"),
        "instance_prompt": prompt, "learning_rate": run.lr, "train_batch_size": 2, "max_train_steps": args.steps,
        "checkpointing_steps": args.steps, "snr_gamma": run.snr_gamma,
        "nullbooth": {"original_knowledge_prompts": str(prior), "num_denoising_steps": 10,
                      "cov_matrices_output_dir": str(folder.parent / "cov"), "collection_batch_size": 16},
    }
    if run.method == "perfusion":  # a new token, keys locked to the class word (as bench_suite.py)
        cfg["instance_prompt"] = with_concept_token(prompt, subject)
        cfg["perfusion"] = {"concept_token": subject.concept_token, "superclass": subject.class_name,
                            "covariance_prompts": str(prior)}
    for key, value in run.settings.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return config_from_dict(cfg)


def latents(pipe, images) -> torch.Tensor:
    """The instance images' posterior means, scaled: ``[n, c, h, w]``."""
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def encode(pipe, prompt: str, n: int) -> torch.Tensor:
    """``prompt``'s encoding, ``n`` times: ``[n, 77, d]``."""
    from nullbooth.conditioning import encode_prompts

    return encode_prompts(pipe, [prompt] * n).hidden


@torch.no_grad()
def loss_by_timestep(pipe, images, prompt: str, draws: int) -> dict[str, float]:
    """Mean ε-MSE on the instance latents (posterior means) at each of :data:`TIMESTEPS`, seeded noise."""
    z, text = latents(pipe, images), encode(pipe, prompt, len(images))
    out = {}
    for t in TIMESTEPS:
        g = torch.Generator().manual_seed(t)
        tt = torch.full((len(images),), t)
        losses = []
        for _ in range(draws):
            eps = torch.randn(z.shape, generator=g)
            pred = pipe.unet(pipe.scheduler.add_noise(z, eps, tt), tt, text).sample
            losses.append(float(((pred - eps) ** 2).mean()))
        out[str(t)] = float(np.mean(losses))
    return out


@torch.no_grad()
def guidance_split(base, pipe, images, prompt: str) -> dict[str, dict[str, float]]:
    """Per t of :data:`SPLIT_TIMESTEPS`: ``‖δ_c‖``, ``‖δ_u‖``, ``cos(δ_c, δ_u)`` and the base's ``‖ε_c − ε_u‖``,
    each a mean over the instance images (norms over the whole latent), one seeded noise draw."""
    z, n = latents(base, images), len(images)
    cond, uncond = encode(pipe, prompt, n), encode(pipe, "", n)
    base_cond, base_uncond = encode(base, prompt, n), encode(base, "", n)
    out = {}
    for t in SPLIT_TIMESTEPS:
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
        tt = torch.full((n,), t)
        zt = base.scheduler.add_noise(z, eps, tt)
        bc, bu = base.unet(zt, tt, base_cond).sample.flatten(1), base.unet(zt, tt, base_uncond).sample.flatten(1)
        dc, du = pipe.unet(zt, tt, cond).sample.flatten(1) - bc, pipe.unet(zt, tt, uncond).sample.flatten(1) - bu
        out[str(t)] = {"delta_cond": float(dc.norm(dim=1).mean()), "delta_uncond": float(du.norm(dim=1).mean()),
                       "cos": float(torch.nn.functional.cosine_similarity(dc, du, dim=1).mean()),
                       "base_guidance": float((bc - bu).norm(dim=1).mean())}
    return out


def judged(pipe, judge, subject, prompts: list[str], seeds: list[int], steps: int) -> dict[str, dict[str, float]]:
    from nullbooth.eval.fidelity import reference_from_subject, subject_fidelity_scores
    from nullbooth.sampling import sample

    flat = [p for p in prompts for _ in seeds]
    out = {}
    for g in GUIDANCES:
        images = sample(pipe, flat, seeds * len(prompts), steps=steps, guidance=g, size=64)
        f = subject_fidelity_scores(judge, images, flat, reference_from_subject(subject))
        out[f"{g:g}"] = {k: f[f"{k}_match"] for k in ("subject", "shape", "colour", "pattern")}
    return out


def measure(args) -> dict[str, Any]:
    from nullbooth.config import PerfusionBlock
    from nullbooth.generate import load_personalization
    from nullbooth.models import load_pipeline
    from nullbooth.training.loop import train
    from nullbooth.world.judge import load_judge
    from nullbooth.world.scenes import prior_prompts
    from nullbooth.world.subjects import (
        instance_prompt,
        subject_instances,
        subject_prompts,
        subject_suite,
        with_concept_token,
    )

    torch.set_num_threads(args.threads)
    subject = subject_suite(max(args.subject, 1))[args.subject]
    images = subject_instances(5, subject)
    prompts = subject_prompts(subject)[:args.prompts]
    seeds = list(range(args.sample_seeds))
    judge, base = load_judge(), load_pipeline(args.model)
    rows = [{"label": "base", "loss": loss_by_timestep(base, images, instance_prompt(subject), args.noise_draws),
             "judged": judged(base, judge, subject, prompts, seeds, args.sample_steps)}]
    work = Path(tempfile.mkdtemp(prefix="bench_timesteps_"))
    try:
        prior = work / "prior.txt"
        prior.write_text("\n".join(prior_prompts(200, seed=0)) + "\n", encoding="utf-8")
        for run in RUNS:
            folder = work / run.label.replace(" ", "_")
            (folder / "instances").mkdir(parents=True)
            for i, im in enumerate(images):
                im.save(folder / "instances" / f"{i:02d}.png")
            cfg = config(run, subject, folder, prior, args)
            t0 = time.perf_counter()
            train(cfg, progress=False)
            seconds = time.perf_counter() - t0
            pipe = load_pipeline(args.model)
            load_personalization(pipe, cfg.output_dir, PerfusionBlock())
            concept = run.method == "perfusion"
            rows.append({"label": run.label, "method": run.method, "lr": run.lr, "snr_gamma": run.snr_gamma,
                         "settings": run.settings, "train_seconds": round(seconds, 1),
                         "loss": loss_by_timestep(pipe, images, cfg.instance_prompt, args.noise_draws),
                         "guidance_split": guidance_split(base, pipe, images, cfg.instance_prompt),
                         "judged": judged(pipe, judge, subject,
                                          [with_concept_token(p, subject) if concept else p for p in prompts],
                                          seeds, args.sample_steps)})
            print(f"{run.label}: {rows[-1]['loss']}  {rows[-1]['judged']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    settings = {k: getattr(args, k) for k in ("model", "subject", "steps", "noise_draws", "prompts", "sample_seeds",
                                              "sample_steps")}
    return {"settings": settings, "subject": subject.as_dict(), "timesteps": list(TIMESTEPS),
            "guidances": list(GUIDANCES), "rows": rows,
            "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__}}


def markdown(result: dict[str, Any]) -> str:
    a, ts = result["settings"], result["timesteps"]
    n = a["prompts"] * a["sample_seeds"]
    lines = [f"Subject {a['subject']} of the suite ({result['subject']['description']}), `{a['model']}`, "
             f"{a['steps']} steps × batch 2; loss = ε-MSE on the instance latents, mean of {a['noise_draws']} noise "
             f"draws per t; judged = share of {n} samples ({a['prompts']} subject prompts × {a['sample_seeds']} "
             f"seeds, {a['sample_steps']} steps) whose main colour / pattern kind / all four attributes match.", "",
             "| run | " + " | ".join(f"loss t={t}" for t in ts) + " | "
             + " | ".join(f"colour · pattern · all, g={g}" for g in result["guidances"]) + " |",
             "|---" * (1 + len(ts) + len(result["guidances"])) + "|"]
    for r in result["rows"]:
        loss = " | ".join(f"{r['loss'][str(t)]:.4f}" for t in ts)
        judged = " | ".join("{colour:.2f} · {pattern:.2f} · {subject:.2f}".format(**r["judged"][f"{g:g}"])
                            for g in result["guidances"])
        lines.append(f"| {r['label']} | {loss} | {judged} |")
    split = [r for r in result["rows"] if "guidance_split" in r]
    first = split[0]["guidance_split"] if split else {}
    lines += ["", "Guidance split: ‖δ_c‖ / ‖δ_u‖ / cos(δ_c, δ_u) — the run's change of the conditional and the "
              "unconditional prediction on the same noisy instance latents; the base model's guidance direction "
              "‖ε_c − ε_u‖ is " + ", ".join(f"{first[t]['base_guidance']:.2f} at t={t}" for t in first) + ".", "",
              "| run | " + " | ".join(f"t={t}" for t in first) + " |", "|---" * (1 + len(first)) + "|"]
    for r in split:
        g = r["guidance_split"]
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{g[t]['delta_cond']:.2f} / {g[t]['delta_uncond']:.2f} / {g[t]['cos']:.2f}" for t in first) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--subject", type=int, default=1, help="index into the public suite (0 is the striped star)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--noise-draws", type=int, default=4)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--sample-seeds", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    result = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timesteps.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "timesteps.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
