"""What a training run shows people: validation grids, the report (JSON, text table, HTML), the NaN message.

The report's leakage is eq. 2 of :mod:`nullbooth.methods.leakage`, ``‖ΔW X₀‖_F / ‖W X₀‖_F``, on the
preserved features (the statistics run) and on held-out prompts, next to the bound a null-space
threshold implies. On the preserved features it is computed exactly from the float64 statistics, so with a
``leakage_budget`` it *certifies* the budget; on held-out prompts it is measured, never certified.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from nullbooth import __version__
from nullbooth.conditioning import text_encoders
from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.filenames import TRAIN_REPORT_HTML, VALIDATION_DIR
from nullbooth.methods.adapters import split_target
from nullbooth.methods.base import Method
from nullbooth.methods.leakage import relative_leakage
from nullbooth.report.grids import image_grid
from nullbooth.report.training_report import render_training_report
from nullbooth.runs.layout import load_summed_statistics
from nullbooth.sampling import sample
from nullbooth.stats.nullspace import empty_fix
from nullbooth.training.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- validation


def validate(cfg: Config, pipe, output_dir: Path, step: int, resolution: int) -> list[Image.Image]:
    """Sample the validation prompt with the model as it is now (image ``i`` with seed ``seed + i``, in one
    pipeline call); their grid is written to ``validation/step-<step>.png`` and the images are returned."""
    n = cfg.num_validation_images
    encoders = text_encoders(pipe)
    training, encoder_state = pipe.unet.training, [(e.training, e.device) for e in encoders]
    pipe.unet.eval()  # inference: e.g. Perfusion's i* EMA must not move while sampling, LoRA dropout must not act
    for encoder in encoders:
        encoder.eval()
        encoder.to(pipe.unet.device)  # pre_compute_text_embeddings parks it on the CPU while training
    try:
        images = sample(pipe, [cfg.validation_prompt] * n, range(cfg.seed, cfg.seed + n), size=resolution,
                        steps=cfg.generate.num_inference_steps, guidance=cfg.generate.guidance_scale, batch_size=None)
    finally:
        pipe.unet.train(training)
        for encoder, (encoder_training, encoder_device) in zip(encoders, encoder_state):
            encoder.train(encoder_training).to(encoder_device)
    path = output_dir / VALIDATION_DIR / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    return images


# --------------------------------------------------------------------------- the report


def output_info(cfg: Config, method: Method, stats_run: Path | None) -> dict[str, Any]:
    """The common header of every output: what was trained from what, and with which software.

    ``subjects`` lists every subject (instance prompt, class prompt, images; Perfusion: its concept token);
    ``instance_prompt`` / ``class_prompt`` are the one subject's, ``None`` with several."""
    import accelerate
    import diffusers
    import peft
    import transformers

    from nullbooth.methods.perfusion.subjects import concept_specs

    nb = cfg.nullbooth
    subjects = [{"instance_prompt": s.instance_prompt, "class_prompt": s.class_prompt,
                 "instance_data_dir": s.instance_data_dir} for s in cfg.subject_list()]
    if cfg.method == "perfusion":  # the token each subject's concept binds to (a lone entry may inherit it)
        for row, spec in zip(subjects, concept_specs(cfg)):
            row["concept_token"] = spec.token
    one = cfg.subject_list()[0] if len(subjects) == 1 else cfg  # the top-level keys are unset with several
    return {
        "method": method.name,
        "pretrained_model_name_or_path": cfg.pretrained_model_name_or_path,
        "stats_run": str(stats_run) if stats_run else None,
        "nullspace_mode": nb.nullspace_mode, "nullspace_threshold": nb.nullspace_threshold,
        "instance_prompt": one.instance_prompt, "class_prompt": one.class_prompt, "subjects": subjects,
        "max_train_steps": cfg.max_train_steps, "learning_rate": method.lr, "resolution": cfg.resolution,
        "versions": {"nullbooth": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__},
    }


def leakage_rows(method: Method, preserved: dict | None, heldout: dict | None) -> list[dict[str, Any]]:
    """Per trained weight: ``‖ΔW‖/‖W‖``, the leakage ``‖ΔW X₀‖/‖W X₀‖`` on the preserved (run) and held-out
    features, and for null-space methods the bound ``‖ΔW‖_F √λ_max(null) / ‖W X₀‖`` its threshold implies."""
    facts = method.report()
    changes = method.weight_changes()
    rows = []
    for path in facts or changes:
        layer, feature = _layer_feature(path)
        row: dict[str, Any] = {"weight": path, "layer": layer, "feature": feature, **facts.get(path, {})}
        if path in changes:
            dW, W = (t.detach().to("cpu", torch.float64) for t in changes[path])
            row["delta_rel"] = float(dW.norm() / W.norm()) if W.norm() > 0 else math.inf
            if preserved and (layer, feature) in preserved:
                stat = preserved[(layer, feature)]
                row["leak_preserved"] = relative_leakage(dW, W, stat)
                if "lambda_max_null" in row:
                    denom = float(((W @ stat.moment()) * W).sum())
                    row["leak_bound"] = math.sqrt(float(dW.square().sum()) * row["lambda_max_null"] / denom) if denom > 0 else math.inf
            if heldout and (layer, feature) in heldout:
                row["leak_heldout"] = relative_leakage(dW, W, heldout[(layer, feature)])
        rows.append(row)
    return rows


def _layer_feature(path: str) -> tuple[str, str]:
    """``(attn2 path, feature)`` of a protected weight; a weight outside attn2 (``nullbooth.scope: unet``, whose facts
    carry its certified leakage) is its own layer."""
    try:
        return split_target(path)
    except NullBoothError:
        return path, "weight"


def build_report(cfg: Config, method: Method, stats_run: Path | None, heldout: dict | None, losses: list[float],
                 info: dict[str, Any], seconds: float) -> dict[str, Any]:
    preserved = load_summed_statistics(stats_run) if stats_run else None
    rows = leakage_rows(method, preserved, heldout)
    warnings_ = []
    for row in rows:
        if row.get("null_dim") == 0:
            spectrum = [(row["lambda_min"], row["lambda_max"])] if "lambda_max" in row else []
            warnings_.append(f"{row['weight']}: the null space is empty ({cfg.nullbooth.nullspace_mode} threshold "
                             f"{cfg.nullbooth.nullspace_threshold:g}): nothing was learned there; "
                             f"{empty_fix(cfg.nullbooth.nullspace_mode, spectrum)}")
    unprotected = method.unprotected()  # e.g. nullbooth + train_text_encoder: the encoder moves X₀ itself
    warnings_ += [f"{part}: NOT protected — {why}" for part, why in unprotected.items()]
    for w in warnings_:
        log.warning(w)

    def summary(key: str) -> float | None:
        values = [r[key] for r in rows if key in r and r.get("trained", True)]
        return max(values) if values else None

    return {
        **info, "format": "nullbooth-train-report", "steps": len(losses), "seconds": seconds,
        "heldout_prompts": cfg.heldout_prompts,
        "summary": {"max_leak_preserved": summary("leak_preserved"), "max_leak_heldout": summary("leak_heldout"),
                    "max_leak_bound": summary("leak_bound"), "final_loss": losses[-1] if losses else None,
                    **budget_summary(cfg, rows),
                    "trained_weights": sum(1 for r in rows if r.get("trained", True)), "weights": len(rows),
                    "unprotected": sorted(unprotected)},
        "weights": rows, "losses": losses, "warnings": warnings_,
    }


def budget_summary(cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """With ``nullbooth.leakage_budget``: ε, whether every trained weight's certified leakage is within it, and
    how many weights the projection had to pull back at least once."""
    budget = cfg.nullbooth.leakage_budget if cfg.method == "nullbooth" else None
    if budget is None:
        return {}
    certified = [r["leak_preserved"] for r in rows if "leakage_budget" in r and "leak_preserved" in r]
    return {"leakage_budget": budget, "budget_certified": bool(certified) and max(certified) <= budget,
            "budget_active_weights": sum(1 for r in rows if r.get("budget_active_steps", 0) > 0)}


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what ``nullbooth train`` prints)."""
    def num(v: Any, fmt: str = ".3g") -> str:
        return "-" if v is None else format(v, fmt) if isinstance(v, float) else str(v)

    head = ["weight", "dim", "null", "|dW|/|W|", "leak prior", "bound", "budget", "projected", "leak held-out"]
    body = [[r["weight"].replace("transformer_blocks.", "tb.").replace("attentions.", "a."), num(r.get("dim")),
             num(r.get("null_dim")), num(r.get("delta_rel")), num(r.get("leak_preserved")), num(r.get("leak_bound")),
             num(r.get("leakage_budget")), num(r.get("budget_active_steps")), num(r.get("leak_heldout"))]
            for r in report["weights"]]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *body]]
    s = report["summary"]
    losses = report["losses"]
    curve = ", ".join(f"{x:.4f}" for x in losses[:: max(1, len(losses) // 10)])
    lines += [f"method {report['method']}: {report['steps']} steps in {report['seconds']:.1f} s, final loss "
              f"{num(s['final_loss'], '.4f')}; max leakage on prior features {num(s['max_leak_preserved'])}, on held-out "
              f"prompts {num(s['max_leak_heldout'])} (measured, not certified)", f"loss curve: {curve}"]
    if "leakage_budget" in s:
        verdict = "certified on every trained weight" if s["budget_certified"] else "NOT met"
        lines.append(f"leakage budget ε = {s['leakage_budget']:g} on the prior features: {verdict}; the projection "
                     f"pulled back {s['budget_active_weights']} weight(s) at least once (column 'projected': steps)")
    for part in s.get("unprotected", []):
        lines.append(f"NOT protected: {part} (see the report's warnings)")
    return "\n".join(lines)


def write_report_html(output_dir: Path, report: dict[str, Any]) -> Path:
    """``train_report.html``: the report in the run-report style — loss curve, leakage per weight, validation images."""
    leakage = [{"layer": r["layer"], "weight": f"{r['feature']} ({where})", "leakage": r[key]}
               for r in report["weights"]
               for key, where in (("leak_preserved", "prior, exact"), ("leak_heldout", "held-out, measured"))
               if r.get(key) is not None]
    images = [(f"validation, {p.stem}", Image.open(p)) for p in sorted((output_dir / VALIDATION_DIR).glob("step-*.png"))]
    page = {"title": f"{report['method']} training report", "loss": report["losses"], "leakage": leakage,
            **{k: v for k, v in report.items() if k not in ("losses", "weights", "format")},
            "weights": report["weights"]}
    return render_training_report(page, output_dir / TRAIN_REPORT_HTML, images)


def nan_message(cfg: Config, step: int, output_dir: Path) -> str:
    last = latest_checkpoint(output_dir)
    lr = cfg.learning_rate or "the method default"
    if last is None:
        return (f"the training loss became NaN/Inf at step {step}; stopped without applying that step (no checkpoint "
                f"was written yet); lower learning_rate (now {lr}) or use mixed_precision 'no' or 'bf16', then run "
                "train again from the start")
    # A resumed run keeps its checkpoint's learning rate (and refuses a changed one): a lower one means starting over.
    return (f"the training loss became NaN/Inf at step {step}; stopped without applying that step (the last good "
            f"checkpoint is {last}); resume it with mixed_precision 'no' or 'bf16' (resume_from_checkpoint: latest), "
            f"or start over with a lower learning_rate (now {lr}) and --overwrite")
