"""Fidelity vs preservation of every personalisation method over a suite of subjects, with confidence intervals.

The suite (:func:`nullbooth.world.subjects.subject_suite`) is the striped star plus subjects drawn by a seeded
generator over the whole space — any shape, any main colour, any pattern kind, period, angle and pattern colour;
nothing in the methods or their defaults knows any of them. The base model is the bundled ``tiny-sd``. Every method
trains the same number of steps on each subject's five instance images, checkpoints along the way, and each
checkpoint is scored against the base model with the same prompts and seeds:

- **fidelity** ``subject_match``: the share of subject-prompt samples (``a sks hexagon on the left`` …) whose judged
  shape, main colour, pattern kind and pattern colour all match the subject's ground truth (open-palette judge,
  :mod:`nullbooth.world.judge`); ``subject_similarity``, an embedding similarity to the subject; ``in_context``,
  the share whose judged position / background is the one the prompt asks for;
- **preservation** ``prior_agreement``: on world prompts, same-seed agreement of the judged shape, colour, position and
  size with the base model; ``class_agreement`` the same on prompts naming the subject's class (drift).

Methods (:data:`VARIANTS`): ``dreambooth`` (full UNet, diffusers' recipe), ``attn2_finetune`` (Custom-Diffusion-like:
the cross-attention weights, unconstrained), ``lora`` (diffusers' default targets), ``oft`` (peft), ``perfusion``
(as published, and with ``gate_scope: concept_token``), ``nullbooth`` (a null-space threshold, and a certified leakage
budget ε; on the ``attn2`` weights, and with ``scope: unet`` on every UNet weight). Each method's learning rate comes
from the committed sweep (``--sweep`` writes ``lr_sweep.json``: every method at each rate of its grid on the first
``--sweep-subjects`` random suite subjects; the rate with the best mean of fidelity and preservation wins).

Every method trains with the same loss weighting: diffusers' plain ε-MSE by default, Min-SNR-γ with ``--snr-gamma``
(Hang et al. 2023; diffusers' ``--snr_gamma``). The plain loss is dominated by the smallest timesteps (on ``tiny-sd``
the base model's loss on a subject's instance images is 283× larger at t = 50 than at t = 950:
``results/timesteps.md``), where only fine detail is decided.

Every number is a mean over subjects × training seeds with a 95 % Student-t interval.

    python benchmarks/bench_suite.py --sweep                    # the learning-rate sweep → results/lr_sweep.json
    S="--seeds 2 --methods dreambooth attn2_finetune lora oft perfusion 'perfusion concept_token' 'nullbooth ε 0.1' \
       'nullbooth unet ε 0.03' 'nullbooth unet ε 0.1'"
    eval python benchmarks/bench_suite.py $S --shard 0/2 & eval python benchmarks/bench_suite.py $S --shard 1/2; \
        wait; eval python benchmarks/bench_suite.py $S --report  # the committed table and plot
    python benchmarks/bench_suite.py --quick --out /tmp/b       # a CI-sized slice (a minute or two)

Runs are resumable: each (subject, method, seed) writes its rows to ``--work``/rows and is skipped when present.
Writes ``suite.json``, ``suite.md`` and ``suite.png`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench_suite")


@dataclass(frozen=True)
class Variant:
    """One curve of the plot: a method, the config keys that make it, and its learning-rate grid for the sweep."""

    label: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    grid: tuple[float, ...] = ()


VARIANTS: tuple[Variant, ...] = (
    Variant("dreambooth", "dreambooth", {}, (1e-4, 3e-4, 1e-3)),
    Variant("attn2_finetune", "attn2_finetune", {}, (1e-3, 3e-3, 1e-2)),
    Variant("lora", "lora", {"lora_rank": 4}, (1e-3, 3e-3, 1e-2)),
    # OFT rotates every attention input: at 1e-3 it already lost half the base model's answers (the first sweep).
    Variant("oft", "oft", {}, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
    Variant("perfusion", "perfusion", {}, (1e-2, 3e-2, 1e-1)),  # o*_V's rate; the paper's 0.03 in the middle
    Variant("perfusion concept_token", "perfusion", {"perfusion": {"gate_scope": "concept_token"}}, (1e-2, 3e-2, 1e-1)),
    Variant("nullbooth relative 1e-3", "nullbooth",
            {"nullbooth": {"nullspace_mode": "relative", "nullspace_threshold": 1e-3}}, (1e-3, 3e-3, 1e-2)),
    Variant("nullbooth ε 0.1", "nullbooth", {"nullbooth": {"nullspace_mode": "rank", "nullspace_threshold": 0,
                                                          "leakage_budget": 0.1}}, (1e-3, 3e-3, 1e-2)),
    # Every UNet weight, each under the per-weight budget: dreambooth's capacity with NullBooth's promise, on
    # dreambooth's grid (ε 0.03 first swept from 3e-4 up: its best rate was the lowest, so the grid went down).
    *(Variant(f"nullbooth unet ε {eps:g}", "nullbooth",
              {"nullbooth": {"nullspace_mode": "rank", "nullspace_threshold": 0, "leakage_budget": eps, "scope": "unet"}},
              grid) for eps, grid in ((0.1, (1e-4, 3e-4, 1e-3)), (0.03, (1e-4, 3e-4, 1e-3, 3e-3)))),
)


# ------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    prior_file: Path  # what the world knows: NullBooth's collection and Perfusion's covariance
    eval_prompts: list[str]  # preservation: world prompts


def write_inputs(work: Path, args: argparse.Namespace) -> Inputs:
    from nullbooth.world.scenes import prior_prompts

    prior_file = work / "prior_prompts.txt"
    prior_file.write_text("\n".join(prior_prompts(args.prior, seed=0)) + "\n", encoding="utf-8")
    # Seeds disjoint from the collection's.
    return Inputs(prior_file, prior_prompts(args.eval_prompts, seed=1_000_003))


def instance_dir(work: Path, subject, n: int) -> Path:
    from nullbooth.world.subjects import subject_instances

    folder = work / "subjects" / subject.name
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for i, image in enumerate(subject_instances(n, subject)):
            image.save(folder / f"{i:02d}.png")
    return folder


def train_config(args, inputs: Inputs, subject, v: Variant, lr: float, seed: int, out: Path, stats_run: Path | None):
    from nullbooth.config import config_from_dict
    from nullbooth.world.subjects import instance_prompt, with_concept_token

    cfg: dict[str, Any] = {
        "pretrained_model_name_or_path": args.model, "seed": seed, "method": v.method, "output_dir": str(out),
        "instance_data_dir": str(instance_dir(Path(args.work), subject, args.instances)),
        "instance_prompt": instance_prompt(subject), "learning_rate": lr,
        "train_batch_size": args.batch, "max_train_steps": args.steps, "snr_gamma": args.snr_gamma or None,
        "checkpointing_steps": max(1, args.steps // args.checkpoints),
        "nullbooth": {"original_knowledge_prompts": str(inputs.prior_file), "num_denoising_steps": args.collect_steps,
                      "cov_matrices_output_dir": str(Path(args.work) / "cov"), "collection_batch_size": 16},
    }
    if v.method == "perfusion":
        # Perfusion binds a new token; its keys are locked to the superclass word.
        cfg["instance_prompt"] = with_concept_token(instance_prompt(subject), subject)
        cfg["perfusion"] = {"concept_token": subject.concept_token, "superclass": subject.class_name,
                            "covariance_prompts": str(inputs.prior_file)}
    for key, value in v.settings.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    if stats_run is not None:
        cfg["nullbooth"]["stats_run"] = str(stats_run)
    return config_from_dict(cfg)


def prompts_for(v: Variant | None, subject, prompts: list[str]) -> list[str]:
    if v is None or v.method != "perfusion":
        return prompts
    from nullbooth.world.subjects import with_concept_token

    return [with_concept_token(p, subject) for p in prompts]


# ------------------------------------------------------------------------------------------- scoring


@dataclass
class Renders:
    """One model's images for the three prompt sets (same prompts and seeds for every model)."""

    subject: Any
    eval: Any
    cls: Any


class Scorer:
    """Renders a model on one subject's prompt sets and scores it against the base model's renders."""

    def __init__(self, args, inputs: Inputs) -> None:
        from nullbooth.eval.evaluate import Sampling
        from nullbooth.models import load_pipeline
        from nullbooth.world.judge import load_judge

        self.args, self.inputs = args, inputs
        self.sampling = Sampling(seeds=tuple(range(args.sample_seeds)), steps=args.sample_steps,
                                 guidance=args.guidance)
        self.judge = load_judge()
        self.base_pipe = load_pipeline(args.model)
        self._base_eval = None
        self._base: dict[str, Renders] = {}

    def prompts(self, subject) -> tuple[list[str], list[str]]:
        from nullbooth.world.subjects import class_prompts, subject_prompts

        return (subject_prompts(subject)[:self.args.subject_prompts],
                class_prompts(subject.class_name, self.args.class_prompts, seed=2_000_003))

    def render(self, pipe, v: Variant | None, subject, with_eval: bool = True) -> Renders:
        from nullbooth.eval.evaluate import render

        subj, cls = self.prompts(subject)
        return Renders(render(pipe, prompts_for(v, subject, subj), self.sampling),
                       render(pipe, self.inputs.eval_prompts, self.sampling) if with_eval else None,
                       render(pipe, cls, self.sampling))

    def base(self, subject) -> Renders:
        if subject.name not in self._base:
            r = self.render(self.base_pipe, None, subject, with_eval=self._base_eval is None)
            self._base_eval = self._base_eval or r.eval
            self._base[subject.name] = Renders(r.subject, self._base_eval, r.cls)
        return self._base[subject.name]

    def score(self, model: Renders, subject) -> dict[str, float]:
        """Fidelity, preservation and class drift of ``model`` against the base model on ``subject``."""
        from nullbooth.eval.evaluate import compare
        from nullbooth.eval.fidelity import reference_from_subject, subject_fidelity_scores

        base = self.base(subject)
        # One prompt per image, in render order (prompt-major, every seed): the plain prompts, whatever the token.
        prompts = [p for p in self.prompts(subject)[0] for _ in self.sampling.seeds]
        fid = subject_fidelity_scores(self.judge, model.subject.flat(), prompts, reference_from_subject(subject))
        prior = compare(base.eval, model.eval, self.judge, self.judge)
        cls = compare(base.cls, model.cls, self.judge, self.judge)
        return {"subject_match": fid["subject_match"], "subject_similarity": fid["identity_similarity"],
                "in_context": fid["context_match"], "in_context_subject": fid["context_subject_match"],
                **{f"match_{k}": fid[f"{k}_match"] for k in ("shape", "colour", "pattern", "pattern_colour")},
                "prior_agreement": mean_agreement(prior), "prior_accuracy": prior["attributes"]["personalized"]["all"],
                "class_agreement": mean_agreement(cls)}


def mean_agreement(report: dict) -> float:
    """Same-seed agreement of the judged shape, colour, position and size (what world prompts state)."""
    agree = report["attributes"]["agreement"]
    return sum(agree[k] for k in ("shape", "colour", "position", "size")) / 4


# ------------------------------------------------------------------------------------------- running


def checkpoint_output(cfg, step: int, out: Path) -> Path:
    """The method's output as of ``checkpoint-<step>``: resuming at ``max_train_steps = step`` trains nothing and
    writes the files a finished run writes, exactly the state of that step (a constant learning rate)."""
    from nullbooth.training.loop import train

    if step == cfg.max_train_steps:
        return Path(cfg.output_dir)
    target = out.with_name(f"{out.name}@{step}")
    shutil.rmtree(target, ignore_errors=True)
    ckpt = Path(cfg.output_dir) / f"checkpoint-{step}"
    train(cfg.model_copy(update={"output_dir": str(target), "max_train_steps": step,
                                 "resume_from_checkpoint": str(ckpt)}), progress=False)
    return target


def run_one(scorer: Scorer, inputs: Inputs, subject, v: Variant, lr: float, seed: int, stats_run: Path | None,
            final_only: bool = False) -> list[dict[str, Any]]:
    """Train one (subject, method, seed), score every checkpoint; one row per checkpoint."""
    from nullbooth.config import PerfusionBlock
    from nullbooth.generate import load_personalization
    from nullbooth.models import load_pipeline
    from nullbooth.training.loop import train

    args = scorer.args
    out = Path(args.work) / "runs" / f"{subject.name}__{v.label.replace(' ', '_')}__lr{lr:g}__s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_config(args, inputs, subject, v, lr, seed, out, stats_run if v.method == "nullbooth" else None)
    t = time.perf_counter()
    summary = train(cfg, progress=False)["summary"]
    seconds = time.perf_counter() - t
    every = cfg.checkpointing_steps
    steps = [args.steps] if final_only else sorted({*range(every, args.steps + 1, every), args.steps})
    rows = []
    for step in steps:
        pipe = load_pipeline(args.model)
        load_personalization(pipe, checkpoint_output(cfg, step, out), PerfusionBlock())
        row = {"subject": subject.name, "label": v.label, "method": v.method, "lr": lr, "seed": seed, "step": step,
               "train_seconds": round(seconds, 1), "max_leak_preserved": summary["max_leak_preserved"],
               **scorer.score(scorer.render(pipe, v, subject), subject)}
        rows.append(row)
        log.info("%-12s %-24s lr %-6g step %3d  match %.2f  sim %.2f  prior %.3f  class %.3f", subject.name,
                 v.label, lr, step, row["subject_match"], row["subject_similarity"], row["prior_agreement"],
                 row["class_agreement"])
    shutil.rmtree(out, ignore_errors=True)  # checkpoints are large; the rows are what is kept
    for extra in out.parent.glob(f"{out.name}@*"):
        shutil.rmtree(extra, ignore_errors=True)
    return rows


def stats_run_for(args, inputs: Inputs, scorer: Scorer, variants: list[Variant]) -> Path | None:
    """One collection of the world's prior features, shared by every nullbooth run (it does not depend on the subject)."""
    from nullbooth.runs.collect import collect
    from nullbooth.world.subjects import SUBJECT

    nullbooth = next((v for v in variants if v.method == "nullbooth"), None)
    if nullbooth is None:
        return None
    marker = Path(args.work) / "stats_run.txt"
    while args.shard[0] != 0 and not marker.is_file():  # shard 0 collects; the others wait for its run
        time.sleep(5)
    if marker.is_file():
        return Path(marker.read_text().strip())
    cfg = train_config(args, inputs, SUBJECT, nullbooth, 1e-3, 0, Path(args.work) / "collect", None)
    run = collect(cfg, pipe=scorer.base_pipe, progress=False)
    if any(v.settings.get("nullbooth", {}).get("scope") == "unet" for v in variants):  # once, before any shard trains
        from nullbooth.methods.unet_scope import other_statistics

        other_statistics(cfg, run, scorer.base_pipe)
    marker.write_text(str(run))
    return run


def jobs(args, variants: list[Variant], lrs: dict[str, float]) -> list[tuple[Any, Variant, float, int]]:
    from nullbooth.world.subjects import subject_suite

    suite = subject_suite(args.subjects)
    if args.sweep:  # random subjects only: the rates must not be the star's
        return [(s, v, lr, 0) for s in sweep_subjects(args) for v in variants for lr in v.grid]
    return [(s, v, lrs.get(v.label, v.grid[len(v.grid) // 2]), seed)
            for s in suite for v in variants for seed in range(args.seeds)]


def sweep_subjects(args) -> list:
    from nullbooth.world.subjects import subject_suite

    return subject_suite(args.subjects)[1:1 + args.sweep_subjects]


def run(args) -> None:
    work = Path(args.work)
    (work / "rows").mkdir(parents=True, exist_ok=True)
    inputs = write_inputs(work, args)
    variants = [v for v in VARIANTS if not args.methods or v.label in args.methods]
    lrs = read_lrs(Path(args.out) / "lr_sweep.json") if not args.sweep else {}
    scorer = Scorer(args, inputs)
    stats_run = stats_run_for(args, inputs, scorer, variants)
    todo = jobs(args, variants, lrs)
    shard, shards = args.shard
    for k, (subject, v, lr, seed) in enumerate(todo):
        row_file = work / "rows" / f"{'sweep' if args.sweep else 'main'}__{subject.name}__{v.label.replace(' ', '_')}__lr{lr:g}__s{seed}.json"
        if k % shards != shard or row_file.is_file():
            continue
        rows = run_one(scorer, inputs, subject, v, lr, seed, stats_run, final_only=args.sweep)
        row_file.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    for subject in {s.name: s for s, *_ in todo}.values():  # the base model's rows (step 0), once per subject
        base_file = work / "rows" / f"base__{subject.name}.json"
        if not base_file.is_file() and shard == 0:
            row = {"subject": subject.name, "label": "base", "method": "base", "lr": 0.0, "seed": 0, "step": 0,
                   "train_seconds": 0.0, **scorer.score(scorer.base(subject), subject)}
            base_file.write_text(json.dumps([row], indent=1) + "\n", encoding="utf-8")


def read_lrs(path: Path) -> dict[str, float]:
    if not path.is_file():
        log.warning("no %s: every method at the middle of its grid (run --sweep first)", path)
        return {}
    return {label: entry["chosen"] for label, entry in json.loads(path.read_text())["methods"].items()}


# ------------------------------------------------------------------------------------------- aggregation

METRICS = ("subject_match", "subject_similarity", "in_context", "in_context_subject", "match_shape", "match_colour", "match_pattern",
           "match_pattern_colour", "prior_agreement", "prior_accuracy", "class_agreement")


# t₀.₉₇₅ of Student's t with 1 … 30 degrees of freedom (any statistics table); 1.96 (the normal's) beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values: list[float | None]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (0 for a single value); None values are skipped."""
    x = np.asarray([v for v in values if v is not None], np.float64)  # a solid subject has no pattern colour
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) < 2:
        return float(x.mean()), 0.0
    t = T975[len(x) - 2] if len(x) - 1 <= len(T975) else 1.96
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def load_rows(work: Path, kind: str) -> list[dict[str, Any]]:
    rows = []
    for f in sorted((work / "rows").glob(f"{kind}__*.json")) + sorted((work / "rows").glob("base__*.json")):
        rows.extend(json.loads(f.read_text()))
    return rows


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (label, step): every metric's mean and 95 % interval over subjects × seeds."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["step"]), []).append(r)
    out = []
    for (label, step), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "base", kv[0])):
        entry = {"label": label, "method": rs[0]["method"], "step": step, "n": len(rs),
                 "lr": rs[0]["lr"], "subjects": sorted({r["subject"] for r in rs})}
        for m in METRICS:
            entry[m], entry[m + "_ci95"] = mean_ci([r[m] for r in rs])
        entry["train_seconds"] = float(np.mean([r["train_seconds"] for r in rs]))
        out.append(entry)
    return {"curves": out}


def sweep_choice(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: the mean fidelity and preservation of each rate, and the rate maximising their mean."""
    methods: dict[str, Any] = {}
    for label in dict.fromkeys(r["label"] for r in rows if r["method"] != "base"):
        grid = []
        for lr in sorted({r["lr"] for r in rows if r["label"] == label}):
            rs = [r for r in rows if r["label"] == label and r["lr"] == lr]
            fid, pres = float(np.mean([r["subject_match"] for r in rs])), float(np.mean([r["prior_agreement"] for r in rs]))
            grid.append({"lr": lr, "subject_match": fid, "prior_agreement": pres, "score": (fid + pres) / 2, "n": len(rs)})
        methods[label] = {"chosen": max(grid, key=lambda g: g["score"])["lr"], "grid": grid}
    return {"rule": "argmax over the grid of mean(subject_match, prior_agreement) on the sweep subjects",
            "methods": methods}


def to_markdown(result: dict[str, Any]) -> str:
    a = result["settings"]
    finals = [c for c in result["curves"] if c["step"] in (0, a["steps"])]
    cols = [("subject_match", "subject match ↑"), ("match_colour", "colour ↑"), ("match_pattern", "pattern ↑"),
            ("subject_similarity", "subject sim ↑"), ("in_context", "in context ↑"),
            ("prior_agreement", "prior agree ↑"), ("class_agreement", "class agree ↑")]
    lines = [f"Model `{a['model']}`, {len(result['subjects'])} subjects × {a['seeds']} training seed(s), "
             f"{a['steps']} steps × batch {a['batch']} per method at its swept learning rate"
             f"{loss_weighting(a)}; "
             f"{a['subject_prompts']} subject, {a['eval_prompts']} preservation and {a['class_prompts']} class prompts "
             f"× {a['sample_seeds']} sampling seeds, {a['sample_steps']} steps, guidance {a['guidance']}. "
             "Mean ± 95 % interval over subjects × seeds.", "",
             "| method | lr | " + " | ".join(h for _, h in cols) + " | train s |",
             "|---" * (len(cols) + 3) + "|"]
    for c in finals:
        lr = "" if c["method"] == "base" else f"{c['lr']:g}"
        lines.append(f"| {c['label']} | {lr} | " + " | ".join(f"{c[k]:.3f} ± {c[k + '_ci95']:.3f}" for k, _ in cols)
                     + f" | {c['train_seconds']:.0f} |")
    return "\n".join(lines + ["", *metric_check(result)]) + "\n"


def loss_weighting(settings: dict[str, Any]) -> str:
    gamma = settings.get("snr_gamma")  # absent from results written before the flag: the plain ε-MSE
    return f", Min-SNR-γ {gamma:g}" if gamma else ", plain ε-MSE"


def metric_check(result: dict[str, Any], reference: str = "dreambooth") -> list[str]:
    """Per subject: does the metric tell a learned subject from none? The base model against the full fine-tune
    (``reference``) at its last checkpoint, on the judged match and the identity similarity."""
    steps = result["settings"]["steps"]
    by = {(r["subject"], r["label"]): r for r in result["rows"] if r["step"] in (0, steps)}
    lines = [f"Metric check, per subject: base model vs `{reference}` (full fine-tune) after {steps} steps.", "",
             "| subject | base match | fine-tune match | base sim | fine-tune sim | sim ranks fine-tune above base |",
             "|---|---|---|---|---|---|"]
    for s in result["subjects"]:
        base, tuned = by.get((s["name"], "base")), by.get((s["name"], reference))
        if base is None or tuned is None:
            continue
        lines.append(f"| {s['description']} | {base['subject_match']:.2f} | {tuned['subject_match']:.2f} | "
                     f"{base['subject_similarity']:.3f} | {tuned['subject_similarity']:.3f} | "
                     f"{'yes' if tuned['subject_similarity'] > base['subject_similarity'] else '**no**'} |")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """The Pareto plot: fidelity vs preservation, one curve per method through its checkpoints, 95 % bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 5.0), dpi=120)
    ax = fig.subplots()
    base = next((c for c in result["curves"] if c["method"] == "base"), None)
    for label in dict.fromkeys(c["label"] for c in result["curves"] if c["method"] != "base"):
        curve = sorted((c for c in result["curves"] if c["label"] == label), key=lambda c: c["step"])
        pts = ([base] if base else []) + curve
        x = [c["subject_match"] for c in pts]
        y = [c["prior_agreement"] for c in pts]
        line = ax.plot(x, y, "-o", ms=4, lw=1.2, label=label)[0]
        ax.errorbar(x[-1], y[-1], xerr=pts[-1]["subject_match_ci95"], yerr=pts[-1]["prior_agreement_ci95"],
                    color=line.get_color(), capsize=3, lw=1)
    if base:
        ax.scatter([base["subject_match"]], [base["prior_agreement"]], marker="*", s=140, color="k", zorder=5,
                   label="base")
    ax.set_xlabel("subject fidelity (share of samples judged the subject: shape, colour, pattern, pattern colour)")
    ax.set_ylabel("preservation (same-seed attribute agreement with the base)")
    ax.set_title(f"{result['settings']['model']}: {len(result['subjects'])} subjects, checkpoints along training")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def report(args) -> dict[str, Any]:
    from nullbooth.world.subjects import subject_suite

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("model", "steps", "batch", "checkpoints", "seeds", "sample_seeds",
                                              "sample_steps", "guidance", "eval_prompts", "class_prompts",
                                              "subject_prompts", "prior", "instances", "snr_gamma")}
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__}
    if args.sweep:
        result = {"settings": settings, "machine": machine, **sweep_choice(load_rows(work, "sweep")),
                  "subjects": [s.as_dict() for s in sweep_subjects(args)]}
        (out / "lr_sweep.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return result
    rows = load_rows(work, "main")
    trained = {r["subject"] for r in rows if r["method"] != "base"}
    rows = [r for r in rows if r["subject"] in trained]  # a stopped run: only the subjects every row is about
    result = {"settings": settings, "machine": machine,
              "subjects": [s.as_dict() for s in subject_suite(args.subjects) if s.name in trained],
              **aggregate(rows), "rows": rows}
    (out / "suite.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "suite.md").write_text(to_markdown(result), encoding="utf-8")
    plot(result, out / "suite.png")
    print(to_markdown(result), end="")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--subjects", type=int, default=8, help="random suite subjects (plus the striped star)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--checkpoints", type=int, default=2, help="evenly spaced checkpoints scored along training")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--snr-gamma", type=float, default=0.0,
                   help="Min-SNR-γ loss weighting for every method (default 0: off, diffusers' plain ε-MSE)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per subject")
    p.add_argument("--methods", nargs="*", default=None, help="variant labels (default: all of VARIANTS)")
    p.add_argument("--sweep", action="store_true", help="the learning-rate sweep instead of the benchmark")
    p.add_argument("--sweep-subjects", type=int, default=2, help="the first N random suite subjects")
    p.add_argument("--report", action="store_true", help="only aggregate the rows already in --work")
    p.add_argument("--shard", type=lambda s: tuple(int(x) for x in s.split("/")), default=(0, 1), help="I/N")
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--prior", type=int, default=200, help="prompts collected for the null spaces / covariance")
    p.add_argument("--collect-steps", type=int, default=10)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--class-prompts", type=int, default=8)
    p.add_argument("--subject-prompts", type=int, default=9)
    p.add_argument("--sample-seeds", type=int, default=1, help="sampling seeds per prompt")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a CI-sized slice: 2 subjects, 3 methods, few steps")
    p.add_argument("--work", default=None, help="scratch folder (default outputs/bench_suite)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.steps, args.checkpoints, args.prior, args.collect_steps = 1, 4, 2, 8, 2
        args.eval_prompts, args.class_prompts, args.subject_prompts, args.sample_seeds, args.sample_steps = 6, 6, 3, 1, 2
        args.methods = args.methods or ["dreambooth", "lora", "nullbooth ε 0.1", "nullbooth unet ε 0.03"]
        args.sweep_subjects = 1
    args.work = args.work or str(HERE.parent / "outputs" / ("bench_suite_quick" if args.quick else "bench_suite"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "nullbooth"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" on every UNet-only LoRA load
    torch.set_num_threads(args.threads)
    if not args.report:
        run(args)
    if args.shard == (0, 1) or args.report:
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
