"""The model card: a ``README.md`` in every training output, in the shape diffusers' DreamBooth scripts write.

Hub front matter (``base_model``, ``library_name``, ``instance_prompt``, ``tags``) followed by what was trained
from what (with several subjects: every subject and its trigger), the hyper-parameters, what the method
guarantees and measured (null dimensions, the leakage budget, leakage on the prior and held-out features),
evaluation numbers when an ``evaluation.json`` sits in the folder's ``evaluation/`` (``nullbooth evaluate``
refreshes the card; with several subjects, fidelity per subject), the latest validation grid and how to load the
result with plain diffusers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nullbooth.filenames import (
    ADAPTER_WEIGHTS,
    CONCEPT_FILE,
    EVALUATION_DIR,
    EVALUATION_JSON,
    FULL_TEXT_ENCODER_DIR,
    FULL_UNET_DIR,
    LORA_WEIGHTS,
    MODEL_CARD,
    OFT_DIR,
    TRAIN_CONFIG,
    TRAIN_REPORT,
    VALIDATION_DIR,
)
from nullbooth.io import read_json, write_text

# Perfusion's concept files: one (perfusion_concept.safetensors), or one per subject (perfusion_concept_<i>…).
CONCEPT_FILES = f"{Path(CONCEPT_FILE).stem}*{Path(CONCEPT_FILE).suffix}"
HYPER_PARAMETERS = ("max_train_steps", "learning_rate", "train_batch_size", "gradient_accumulation_steps",
                    "resolution", "seed", "lr_scheduler", "lr_warmup_steps", "with_prior_preservation",
                    "prior_loss_weight", "mixed_precision", "lora_rank", "nullbooth_update")


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _front_matter(folder: Path, report: Mapping[str, Any]) -> list[str]:
    tags = ["text-to-image", "diffusers", "stable-diffusion", "dreambooth", "nullbooth", report["method"]]
    if (folder / LORA_WEIGHTS).is_file():
        tags.append("lora")
    lines = ["---", f"base_model: {json.dumps(report['pretrained_model_name_or_path'])}", "library_name: diffusers",
             f"instance_prompt: {json.dumps(report.get('instance_prompt'))}", "tags:"]
    return lines + [f"- {t}" for t in dict.fromkeys(tags)] + ["---", ""]


def _guarantees(report: Mapping[str, Any]) -> list[str]:
    s = report.get("summary", {})
    rows = [r for r in report.get("weights", []) if r.get("trained", True)]
    lines = ["## What was kept", ""]
    if any("null_dim" in r for r in rows):
        free = sum(r.get("null_dim", 0) for r in rows)
        total = sum(r.get("dim", 0) for r in rows)
        lines.append(f"- Null space: {free} of {total} input directions free over {len(rows)} trained weights "
                     f"(`{report.get('nullspace_mode')}` threshold {_num(report.get('nullspace_threshold'))}).")
    if "leakage_budget" in s:
        verdict = "certified" if s.get("budget_certified") else "NOT met"
        lines.append(f"- Leakage budget ε = {_num(s['leakage_budget'])}: ‖ΔW X₀‖/‖W X₀‖ ≤ ε on every trained weight, "
                     f"computed exactly on the collected prior features — {verdict}.")
    if s.get("max_leak_preserved") is not None:
        lines.append(f"- Largest leakage on the collected prior features: {_num(s['max_leak_preserved'])} (exact).")
    if s.get("max_leak_heldout") is not None:
        lines.append(f"- Largest leakage on held-out prompts: {_num(s['max_leak_heldout'])} (measured, not certified).")
    for warning in report.get("warnings", []):
        if "NOT protected" in warning:  # e.g. a text encoder trained beside a null-space UNet
            lines.append(f"- {warning}")
    return lines + [""] if len(lines) > 2 else []


def _evaluation(folder: Path) -> list[str]:
    """Headline numbers of ``nullbooth evaluate``'s report in ``<folder>/evaluation/`` (base vs this model)."""
    try:
        report = json.loads((folder / EVALUATION_DIR / EVALUATION_JSON).read_text(encoding="utf-8"))
        rows = [("paired same-seed RMSE (0 = unchanged)", report["paired"]["rmse"]),
                *((f"{k} (preservation)", v) for k, v in report["distribution"].items())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    attributes = report.get("attributes") or {}
    if attributes:
        rows.append(("stated attributes drawn, base → this model",
                     f"{_num(attributes['base'].get('all'))} → {_num(attributes['personalized'].get('all'))}"))
    subject = report.get("subject") or {}
    several = report.get("subjects") or []
    if subject:
        rows.append((f"subject fidelity{' (mean over subjects)' if several else ''}, base → this model",
                     f"{_num(subject['base'].get('fidelity'))} → {_num(subject['personalized'].get('fidelity'))}"))
    for entry in several:  # each subject's prompts scored against its own instance images
        rows.append((f"subject fidelity of `{entry.get('instance_prompt')}`, base → this model",
                     f"{_num(entry['base'].get('fidelity'))} → {_num(entry['personalized'].get('fidelity'))}"))
    return ["## Evaluation", "", f"`nullbooth evaluate`, {report.get('prompts')} prompts, seeds "
            f"{report.get('sampling', {}).get('seeds')} ({EVALUATION_DIR}/{EVALUATION_JSON}):", "",
            "| metric | value |", "|---|---|", *[f"| {k} | {_num(v)} |" for k, v in rows], ""]


def _subjects(report: Mapping[str, Any], files: str) -> list[str]:
    """How to trigger the model, and its files: one sentence for one subject, a table of every subject for several."""
    subjects = report.get("subjects") or []
    if len(subjects) < 2:
        return [f"Trigger: use `{report.get('instance_prompt')}` in a prompt. Files: {files}.", ""]
    lines = [f"{len(subjects)} subjects, each with its own trigger:", "",
             "| subject | instance prompt | class prompt | trigger | images |", "|---|---|---|---|---|"]
    for i, s in enumerate(subjects):
        trigger = s.get("concept_token") or s.get("instance_prompt")
        lines.append(f"| {i} | `{s.get('instance_prompt')}` | {_code(s.get('class_prompt'))} | `{trigger}` | "
                     f"`{s.get('instance_data_dir')}` |")
    return lines + ["", f"Files: {files}.", ""]


def _code(text: str | None) -> str:
    return f"`{text}`" if text else "–"


def _first_prompt(report: Mapping[str, Any]) -> str:
    subjects = report.get("subjects") or [{}]
    return report.get("instance_prompt") or subjects[0].get("instance_prompt") or ""


def _usage(report: Mapping[str, Any], folder: Path) -> list[str]:
    base = report["pretrained_model_name_or_path"]
    prompt = _first_prompt(report)
    if (folder / LORA_WEIGHTS).is_file():
        load = [f"pipe.load_lora_weights({str(folder)!r})"]
    elif (folder / FULL_UNET_DIR).is_dir():
        load = ["from diffusers import UNet2DConditionModel",
                f"pipe.unet = UNet2DConditionModel.from_pretrained({str(folder / FULL_UNET_DIR)!r}, use_safetensors=True)"]
        if (folder / FULL_TEXT_ENCODER_DIR).is_dir():
            load += ["from transformers import CLIPTextModel",
                     f"pipe.text_encoder = CLIPTextModel.from_pretrained({str(folder / FULL_TEXT_ENCODER_DIR)!r}, "
                     "use_safetensors=True)"]
    elif (folder / OFT_DIR).is_dir():
        load = ["from peft import PeftModel",
                f"pipe.unet = PeftModel.from_pretrained(pipe.unet, {str(folder / OFT_DIR)!r})"]
    else:
        return ["## How to use", "", f"`nullbooth generate --adapter {folder} --prompt {prompt!r}`", ""]
    return ["## How to use", "", "```python", "from diffusers import StableDiffusionPipeline", "",
            f"pipe = StableDiffusionPipeline.from_pretrained({base!r}, use_safetensors=True)", *load,
            f"image = pipe({prompt!r}).images[0]", "```", ""]


def model_card(folder: Path, report: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The card's markdown for the training output ``folder``, its ``report`` (``train_report.json``) and ``config``."""
    files = [name for name in (LORA_WEIGHTS, ADAPTER_WEIGHTS, FULL_UNET_DIR, FULL_TEXT_ENCODER_DIR, OFT_DIR)
             if (folder / name).exists()]
    files += sorted(p.name for p in folder.glob(CONCEPT_FILES))
    several = len(report.get("subjects") or []) > 1
    trained_on = (f"{len(report['subjects'])} subjects" if several else
                  f"the instance prompt `{report.get('instance_prompt')}`"
                  + (f" (class prompt `{report['class_prompt']}`)" if report.get("class_prompt") else ""))
    lines = _front_matter(folder, report) + [
        f"# {report['method']} — {folder.name}", "",
        f"{report['method']} weights for `{report['pretrained_model_name_or_path']}`, trained by nullbooth "
        f"{report.get('versions', {}).get('nullbooth', '')} on {trained_on}.", "",
        *_subjects(report, ", ".join(f"`{f}`" for f in files)),
        "## Training", "", "| setting | value |", "|---|---|",
        *[f"| {k} | {_num(config[k])} |" for k in HYPER_PARAMETERS if config.get(k) is not None],
        f"| steps run | {report.get('steps')} |", f"| final loss | {_num(report.get('summary', {}).get('final_loss'))} |",
        "",
    ]
    lines += _guarantees(report) + _evaluation(folder)
    grids = sorted((folder / VALIDATION_DIR).glob("step-*.png"))
    if grids:
        lines += ["## Samples", "", f"Validation prompt `{config.get('validation_prompt')}`, "
                  f"{grids[-1].stem}:", "", f"![validation]({VALIDATION_DIR}/{grids[-1].name})", ""]
    return "\n".join(lines + _usage(report, folder))


def write_model_card(folder: str | Path, report: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """Write ``README.md`` into the training output ``folder`` (atomically); returns its path."""
    folder = Path(folder)
    write_text(folder / MODEL_CARD, model_card(folder, report, config))
    return folder / MODEL_CARD


def refresh_model_card(folder: str | Path) -> Path | None:
    """Rewrite the card of a finished training output from its report and config (after ``nullbooth evaluate``);
    ``None`` when ``folder`` is not one."""
    folder = Path(folder)
    if not ((folder / TRAIN_REPORT).is_file() and (folder / TRAIN_CONFIG).is_file()):
        return None
    return write_model_card(folder, read_json(folder / TRAIN_REPORT, "the training report"),
                            read_json(folder / TRAIN_CONFIG, "the training config"))
