"""``nullbooth evaluate``: what personalisation changed, measured on the same prompts and seeds.

The base model renders every prompt × seed; the personalised model (a training ``output_dir`` applied to
the base, or a whole diffusers folder) renders the same prompts with the same generator seeds. Then:

* **preservation** — distribution metrics between the two image sets on a pluggable feature extractor
  (:mod:`nullbooth.eval.metrics`: MMD², precision/recall/density/coverage, 1-NN accuracy, Fréchet distance),
  and the paired same-seed pixel distance (0 for an untouched model);
* **attributes** (models of the shapes world, judged by :class:`nullbooth.world.judge.Judge`) — per prompt, the
  fraction of stated attributes (shape, colour, position, …) the images show, for both models (text
  alignment), the same-seed agreement of judged attributes, and the JSD of each attribute's histogram;
* **subject fidelity** — with the judge (:mod:`nullbooth.eval.fidelity`): the share of subject-prompt samples
  whose judged shape, main colour, pattern kind and pattern colour all match the subject read off the instance
  images (``subject_match``), per-attribute match rates, a soft ``identity_similarity``, and for prompts that ask
  for a position or background the share drawn there (``context_*``); always the embedding cosine to the instance
  images (``fidelity``, DreamBooth's DINO/CLIP-I score). With several subjects each subject's prompts are scored
  against its own instance images (``subjects``, keyed by instance prompt), and ``subject`` holds their mean.

Rendering is separated from scoring (:func:`render`, :func:`compare`, :func:`subject_scores`) so the
method benchmark renders the base model once and scores many personalisations against it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nullbooth.conditioning import encoder_names
from nullbooth.config import PerfusionBlock
from nullbooth.dataset import read_image_folder
from nullbooth.errors import NullBoothError
from nullbooth.eval.fidelity import (
    COLOUR_TOLERANCE,
    reference_from_instances,
    reference_from_subject,
    subject_fidelity_scores,
)
from nullbooth.eval.metrics import (
    attribute_jsd,
    distribution_metrics,
    paired_image_distance,
    subject_fidelity,
)
from nullbooth.filenames import (
    EVALUATION_JSON,
    EVALUATION_MD,
    EVALUATION_SAMPLES,
    FULL_UNET_DIR,
    MODEL_INDEX,
    TRAIN_CONFIG,
    WORLD_MODEL_MARKER,
)
from nullbooth.generate import (
    check_fits,
    check_output_dir,
    find_personalization,
    load_personalization,
    trained_method,
)
from nullbooth.io import read_json, write_image, write_json, write_text
from nullbooth.models import load_pipeline, resolve_model_path
from nullbooth.report.grids import captioned_rows
from nullbooth.sampling import check_sampling_args, check_size, check_steps, prompt_seed_pairs, sample
from nullbooth.world.judge import (
    FeatureExtractor,
    Judge,
    load_feature_extractor,
    load_judge,
)
from nullbooth.world.scenes import parse_prompt
from nullbooth.world.subjects import Subject

log = logging.getLogger(__name__)

# What must agree between two models for their images to be comparable seed for seed.
_UNET_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "down_block_types", "up_block_types", "sample_size")
_TEXT_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size")
# The marker the world-model training script writes: attribute judging is on by default for such models.


@dataclass(frozen=True)
class Sampling:
    """How images are drawn; identical for both models. Image ``(i, j)`` uses generator seed ``seeds[j]``."""

    seeds: tuple[int, ...] = (0, 1)
    steps: int = 25
    guidance: float = 7.5
    resolution: int | None = None  # default: the model's native size
    batch: int = 32


@dataclass
class Rendered:
    """``images[i][j]``: prompt ``i``, seed ``j``."""

    prompts: list[str]
    images: list[list[Image.Image]] = field(default_factory=list)

    def flat(self) -> list[Image.Image]:
        return [im for row in self.images for im in row]


# ------------------------------------------------------------------------------------------- models


def architecture(folder: str | Path) -> dict[str, Any]:
    """The configuration values of a diffusers folder that decide whether weights are interchangeable."""
    folder = Path(folder)
    out: dict[str, Any] = {}
    for sub, keys in (("unet", _UNET_KEYS), ("text_encoder", _TEXT_KEYS), ("text_encoder_2", _TEXT_KEYS)):
        path = folder / sub / "config.json"
        if path.is_file():
            cfg = read_json(path, f"a {sub} config")
            out.update({f"{sub}.{k}": cfg.get(k) for k in keys if k in cfg})
    return out


def pipe_architecture(pipe) -> dict[str, Any]:
    out = {f"unet.{k}": pipe.unet.config.get(k) for k in _UNET_KEYS if k in pipe.unet.config}
    for name in encoder_names(pipe):  # SDXL: both encoders
        te = getattr(pipe, name).config
        out.update({f"{name}.{k}": getattr(te, k) for k in _TEXT_KEYS if hasattr(te, k)})
    return out


def _json_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def check_same_architecture(base: dict[str, Any], other: dict[str, Any], base_name: str, other_name: str) -> None:
    """Raise when two models differ in any architecture key both of them state."""
    diff = [k for k in base if k in other and _json_value(base[k]) != _json_value(other[k])]
    if diff:
        k = diff[0]
        raise NullBoothError(
            f"evaluate: the base model and the personalised model have different architectures ({len(diff)} "
            f"setting(s) differ, e.g. {k}: {base_name} has {_json_value(base[k])}, {other_name} has "
            f"{_json_value(other[k])}); compare a personalised model with the base it was trained from"
        )


def is_world_model(name_or_path: str) -> bool:

    return (Path(resolve_model_path(name_or_path)) / WORLD_MODEL_MARKER).is_file()


def personalized_kind(path: Path) -> str:
    """``"model"`` for a whole diffusers folder, ``"output"`` for a training output directory."""
    if not path.exists():
        raise NullBoothError(f"evaluate: expected the personalised model at {path} (a training output_dir or a "
                             "diffusers folder), found nothing")
    return "model" if (path / MODEL_INDEX).is_file() else "output"


def training_config(path: Path) -> dict[str, Any]:
    """The config a training output recorded (``train_config.json``), or ``{}`` for anything else."""

    recorded = path / TRAIN_CONFIG
    return read_json(recorded, "a training config") if recorded.is_file() else {}


def check_comparable(base_arch: dict[str, Any], base_name: str, pers_path: Path, kind: str) -> None:
    """Refuse a personalised model (or the base a training output records) of another architecture."""

    if kind == "model" or (pers_path / FULL_UNET_DIR / "config.json").is_file():
        check_same_architecture(base_arch, architecture(pers_path), base_name, str(pers_path))
    recorded = training_config(pers_path).get("pretrained_model_name_or_path") if kind == "output" else None
    if recorded and Path(resolve_model_path(recorded)).is_dir():
        check_same_architecture(base_arch, architecture(resolve_model_path(recorded)), base_name,
                                f"{recorded} (the base {pers_path} was trained on)")


# ----------------------------------------------------------------------------------------- rendering


def render(pipe, prompts: Sequence[str], sampling: Sampling) -> Rendered:
    """Every prompt × seed, ``sampling.batch`` images per pipeline call; same seeds for any model."""
    flat_prompts, seeds = prompt_seed_pairs(prompts, sampling.seeds)
    images = sample(pipe, flat_prompts, seeds, steps=sampling.steps, guidance=sampling.guidance,
                    size=sampling.resolution, batch_size=sampling.batch)
    k = len(sampling.seeds)
    return Rendered(list(prompts), [images[i * k:(i + 1) * k] for i in range(len(prompts))])


# ------------------------------------------------------------------------------------------- scoring


def required_images(k: int) -> int:
    """Images per model the distribution metrics need: PRDC with ``k`` neighbours needs ``k + 1``."""
    return max(k + 1, 2)


def check_counts(n_prompts: int, n_seeds: int, k: int) -> None:
    if n_prompts < 1:
        raise NullBoothError("evaluate: expected at least one prompt, got an empty prompt list; pass --prompt TEXT "
                             "or --prompts FILE with one prompt per line")
    if n_seeds < 1:
        raise NullBoothError("evaluate: expected at least one seed, got none; pass --seeds 0,1")
    if k < 1:
        raise NullBoothError(f"evaluate: expected k ≥ 1 neighbours for precision/recall/density/coverage, got {k}")
    need, have = required_images(k), n_prompts * n_seeds
    if have < need:
        raise NullBoothError(
            f"evaluate: the distribution metrics need at least {need} images per model (precision/recall/density/"
            f"coverage with k={k} neighbours), got {have} ({n_prompts} prompt(s) × {n_seeds} seed(s)); add prompts "
            "or seeds, or lower --k"
        )


def _accuracy(stated: list[dict[str, str]], labels: dict[str, list[str]], n_seeds: int) -> tuple[list[float | None], dict[str, float]]:
    """Per prompt: fraction of (image, stated attribute) pairs judged right; per attribute: the same overall."""
    per_prompt: list[float | None] = []
    hits: dict[str, list[bool]] = {}
    for i, want in enumerate(stated):
        ok = []
        for j in range(n_seeds):
            for name, value in want.items():
                if name in labels:
                    right = labels[name][i * n_seeds + j] == value
                    ok.append(right)
                    hits.setdefault(name, []).append(right)
        per_prompt.append(float(np.mean(ok)) if ok else None)
    overall = {name: float(np.mean(v)) for name, v in hits.items()}
    every = [x for v in hits.values() for x in v]
    if every:
        overall["all"] = float(np.mean(every))
    return per_prompt, overall


def compare(base: Rendered, personalized: Rendered, extractor: FeatureExtractor, judge: Judge | None = None,
            k: int = 5) -> dict[str, Any]:
    """Score ``personalized`` against ``base`` (same prompts, same seeds)."""
    if base.prompts != personalized.prompts or [len(r) for r in base.images] != [len(r) for r in personalized.images]:
        raise NullBoothError("evaluate: the two image sets must come from the same prompts and seeds")
    n_seeds = len(base.images[0])
    check_counts(len(base.prompts), n_seeds, k)
    flat_b, flat_p = base.flat(), personalized.flat()
    paired = paired_image_distance(flat_b, flat_p)
    report: dict[str, Any] = {
        "images_per_model": len(flat_b),
        "features": getattr(extractor, "name", type(extractor).__name__),
        "distribution": distribution_metrics(extractor(flat_b), extractor(flat_p), k=k),
        "paired": {"rmse": paired["rmse"], "mean_abs": paired["mean_abs"]},
    }
    rmse = np.asarray(paired["per_pair_rmse"]).reshape(len(base.prompts), n_seeds).mean(1)
    rows = [{"prompt": p, "paired_rmse": float(r)} for p, r in zip(base.prompts, rmse)]
    if judge is not None:
        stated = [parse_prompt(p) for p in base.prompts]
        lab_b, lab_p = judge.predict(flat_b), judge.predict(flat_p)
        acc_b, all_b = _accuracy(stated, lab_b, n_seeds)
        acc_p, all_p = _accuracy(stated, lab_p, n_seeds)
        names = list(judge.config.attributes)
        report["attributes"] = {
            "base": all_b,
            "personalized": all_p,
            # Same seed, same judged value: how much of what the base drew survives personalisation.
            "agreement": {n: float(np.mean([a == b for a, b in zip(lab_b[n], lab_p[n])])) for n in names},
            "jsd": {n: attribute_jsd(lab_b[n], lab_p[n], judge.config.attributes[n]) for n in names},
        }
        for row, a, b in zip(rows, acc_b, acc_p):
            row.update(base_accuracy=a, personalized_accuracy=b)
    report["per_prompt"] = rows
    return report


def subject_scores(generated: Rendered, instances: Sequence[Image.Image], extractor: FeatureExtractor,
                   judge: Judge | None = None, subject: Subject | None = None) -> dict[str, Any]:
    """Fidelity of subject-prompt generations to the subject.

    Always ``fidelity``: the mean embedding cosine to the instance images (DreamBooth's DINO/CLIP-I score; with
    the judge's embedding it barely separates subjects, see :mod:`nullbooth.eval.fidelity`). With the judge, the
    headline :func:`~nullbooth.eval.fidelity.subject_fidelity_scores` (``subject_match``, ``identity_similarity``,
    per-attribute matches, ``context_*``) against ``subject``'s ground truth, or against the judge's reading of the
    instance images when no subject is given; ``instance_*`` says what that reference is.
    """
    if not instances:
        raise NullBoothError("evaluate: subject fidelity needs at least one instance image, got none")
    flat = generated.flat()
    out: dict[str, Any] = {"images": len(flat), "instances": len(instances)}
    if judge is not None:
        reference = reference_from_subject(subject) if subject else reference_from_instances(judge, list(instances))
        prompts = [p for p, row in zip(generated.prompts, generated.images) for _ in row]
        out.update(subject_fidelity_scores(judge, flat, prompts, reference))
        out.update({f"instance_{k}": v for k, v in reference.as_dict().items()})
    out["fidelity"] = subject_fidelity(extractor(flat), extractor(list(instances)))
    return out


def mean_scores(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several subjects' :func:`subject_scores` in one: scores averaged over the subjects that have them (a solid
    subject has no pattern-colour match), counts summed (each subject's reference is per subject and left out)."""
    out: dict[str, Any] = {}
    for key in scores[0]:
        values = [s.get(key) for s in scores]
        if key in ("images", "instances", "context_samples"):
            out[key] = sum(v or 0 for v in values)
        elif not key.startswith("instance_") and any(isinstance(v, float) for v in values):
            out[key] = float(np.mean([v for v in values if isinstance(v, float)]))
    return out


@dataclass(frozen=True)
class EvalSubject:
    """One subject of a several-subject training output: its prompts, scored against its own instance images."""

    instance_prompt: str  # what the subject is reported under
    instance_dir: str
    prompts: tuple[str, ...]


def split_rendered(rendered: Rendered, sizes: Sequence[int]) -> list[Rendered]:
    """``rendered`` cut into consecutive groups of ``sizes`` prompts (one render call, several subjects)."""
    out, start = [], 0
    for n in sizes:
        out.append(Rendered(rendered.prompts[start:start + n], rendered.images[start:start + n]))
        start += n
    return out


def subjects_report(subjects: Sequence[EvalSubject], instances: Sequence[Sequence[Image.Image]],
                    base: Sequence[Rendered], personalized: Sequence[Rendered], extractor: FeatureExtractor,
                    judge: Judge | None = None) -> dict[str, Any]:
    """``subjects``: per subject, its prompts' fidelity to its own instance images for both models; ``subject``:
    the mean over subjects (what the single-subject report holds)."""
    entries = [{"instance_prompt": s.instance_prompt, "instance_dir": s.instance_dir, "prompts": list(s.prompts),
                "base": subject_scores(b, images, extractor, judge),
                "personalized": subject_scores(p, images, extractor, judge)}
               for s, images, b, p in zip(subjects, instances, base, personalized)]
    mean = {who: mean_scores([e[who] for e in entries]) for who in ("base", "personalized")}
    return {"subjects": entries,
            "subject": {"prompts": [p for s in subjects for p in s.prompts], "subjects": len(entries), **mean}}


# ------------------------------------------------------------------------------------------ end to end


@dataclass
class EvalRequest:
    base: str
    personalized: str
    prompts: list[str]
    sampling: Sampling = Sampling()
    features: str | None = None  # "judge" (default), a judge folder, or a CLIP / DINOv2 folder
    attributes: bool | None = None  # None: on for models of the shapes world
    subject_prompts: list[str] = field(default_factory=list)
    instance_dir: str | None = None
    subjects: list[EvalSubject] = field(default_factory=list)  # several subjects, instead of the two above
    k: int = 5
    output: str | None = None


def requested_subjects(req: EvalRequest) -> tuple[list[EvalSubject], list[list[Image.Image]]]:
    """The subjects to score and their instance images (read before any image is drawn); one subject from
    ``instance_dir`` + ``subject_prompts``, or ``req.subjects``."""
    if req.subjects and (req.instance_dir or req.subject_prompts):
        raise NullBoothError("evaluate: got several subjects and also one instance folder or subject prompts; pass "
                             "one or the other")
    empty = [s.instance_prompt for s in req.subjects if not s.prompts]
    if empty:
        raise NullBoothError(f"evaluate: subject {empty[0]!r} has no prompt to score; give each subject at least one")
    if req.subjects:
        return list(req.subjects), [[im for _, im in read_image_folder(s.instance_dir, f"instance_dir of subject "
                                                                         f"{s.instance_prompt!r}")]
                                    for s in req.subjects]
    if not req.instance_dir:
        return [], []
    if not req.subject_prompts:
        raise NullBoothError("evaluate: instance images were given but no subject prompt; pass --subject-prompt "
                             "'a sks star' (repeatable) or --subject-prompts FILE")
    images = [im for _, im in read_image_folder(req.instance_dir, "instance_dir")]
    return [EvalSubject("", req.instance_dir, tuple(req.subject_prompts))], [images]


def evaluate(req: EvalRequest) -> dict[str, Any]:
    """Render base and personalised images, score them, write ``evaluation.json`` / ``.md`` (with ``output``)."""

    s = req.sampling
    check_sampling_args(seeds=s.seeds, steps=s.steps, guidance=s.guidance, size=s.resolution, batch=s.batch,
                        who="evaluate")
    check_counts(len(req.prompts), len(req.sampling.seeds), req.k)
    if req.output:
        check_output_dir(Path(req.output), "evaluate: --output")
    pers_path = Path(req.personalized)
    kind = personalized_kind(pers_path)
    found = find_personalization(pers_path) if kind == "output" else None
    extractor = load_feature_extractor(req.features)  # bad folders fail before any image is drawn
    use_attributes = is_world_model(req.base) if req.attributes is None else req.attributes
    judge = (extractor if isinstance(extractor, Judge) else load_judge()) if use_attributes else None
    subjects, instances = requested_subjects(req)
    subject_prompts = [p for subject in subjects for p in subject.prompts]

    pipe = load_pipeline(req.base, device="auto")
    check_size(pipe, s.resolution, "evaluate: --resolution")
    check_steps(pipe, s.steps, "evaluate: --steps")
    check_comparable(pipe_architecture(pipe), req.base, pers_path, kind)
    if found:
        check_fits(pipe, *found, req.base)  # before the base images are drawn
    base = render(pipe, req.prompts, req.sampling)
    base_subject = render(pipe, subject_prompts, req.sampling) if subjects else None
    if kind == "model":
        device = pipe.device
        del pipe  # one pipeline in memory at a time
        pipe = load_pipeline(str(pers_path), device=device)
        what = "model"
    else:
        what = load_personalization(pipe, pers_path, PerfusionBlock(), req.base)
        what = trained_method(pers_path) or what
    pers = render(pipe, req.prompts, req.sampling)

    report: dict[str, Any] = {
        "base": req.base, "personalized": str(pers_path), "method": what,
        "sampling": {"seeds": list(req.sampling.seeds), "steps": req.sampling.steps,
                     "guidance": req.sampling.guidance, "resolution": req.sampling.resolution},
        "prompts": len(req.prompts),
    }
    report.update(compare(base, pers, extractor, judge, req.k))
    if subjects:
        sizes = [len(subject.prompts) for subject in subjects]
        scored = subjects_report(subjects, instances, split_rendered(base_subject, sizes),
                                 split_rendered(render(pipe, subject_prompts, req.sampling), sizes), extractor, judge)
        report.update(scored if req.subjects else {"subject": {k: scored["subjects"][0][k]
                                                               for k in ("prompts", "base", "personalized")}})
    if req.output:
        write_report(Path(req.output), report, base, pers)
    return report


# ---------------------------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(report: dict[str, Any], max_prompts: int = 50) -> str:
    """The report as markdown: summary metrics, attribute accuracy, subject fidelity, per-prompt rows."""
    lines = [f"# Evaluation: {report.get('method', '?')} vs base", "",
             f"base `{report['base']}`, personalised `{report['personalized']}`; {report['prompts']} prompts × "
             f"{len(report['sampling']['seeds'])} seeds = {report['images_per_model']} images per model, "
             f"{report['sampling']['steps']} steps, guidance {report['sampling']['guidance']}; features: "
             f"{report['features']}.", "",
             "## Preservation (base images = reference set)", "", "| metric | value |", "| --- | --- |"]
    for name, value in report["distribution"].items():
        lines.append(f"| {name} | {_fmt(value)} |")
    lines += [f"| paired same-seed RMSE (pixels in [0, 1]) | {_fmt(report['paired']['rmse'])} |", ""]
    attrs = report.get("attributes")
    if attrs:
        lines += ["## Attributes (judge)", "", "| attribute | base accuracy | personalised accuracy | same-seed "
                  "agreement | JSD |", "| --- | --- | --- | --- | --- |"]
        for name in attrs["agreement"]:
            lines.append(f"| {name} | {_fmt(attrs['base'].get(name))} | {_fmt(attrs['personalized'].get(name))} | "
                         f"{_fmt(attrs['agreement'][name])} | {_fmt(attrs['jsd'][name])} |")
        lines.append(f"| all stated | {_fmt(attrs['base'].get('all'))} | {_fmt(attrs['personalized'].get('all'))} "
                     "| | |")
        lines.append("")
    lines += _subject_markdown(report)
    rows = report["per_prompt"][:max_prompts]
    has_acc = rows and "base_accuracy" in rows[0]
    lines += ["## Per prompt", "", "| prompt | paired RMSE |" + (" base acc | personalised acc |" if has_acc else ""),
              "| --- | --- |" + (" --- | --- |" if has_acc else "")]
    for r in rows:
        extra = f" {_fmt(r['base_accuracy'])} | {_fmt(r['personalized_accuracy'])} |" if has_acc else ""
        lines.append(f"| {r['prompt']} | {_fmt(r['paired_rmse'])} |{extra}")
    if len(report["per_prompt"]) > max_prompts:
        lines.append(f"\n({len(report['per_prompt']) - max_prompts} more prompts in evaluation.json)")
    return "\n".join(lines) + "\n"


# Subject columns of the markdown report, headline first; the rest (context per attribute, errors) is in the JSON.
_SUBJECT_COLUMNS = {"subject_match": "subject match", "identity_similarity": "identity similarity",
                    "shape_match": "shape", "colour_match": "colour", "pattern_match": "pattern",
                    "pattern_colour_match": "pattern colour", "context_match": "in context",
                    "context_subject_match": "subject in context", "fidelity": "embedding cosine (legacy)"}
_PER_SUBJECT_COLUMNS = ("subject_match", "identity_similarity", "context_subject_match", "fidelity")


def _reference_text(scores: dict[str, Any]) -> str:
    if "instance_shape" not in scores:
        return "–"
    pattern = "solid" if scores["instance_pattern"] == "solid" else \
        f"{scores['instance_pattern']} in {scores['instance_pattern_colour']}"
    return f"{scores['instance_colour']} {scores['instance_shape']}, {pattern} ({scores['instance_source']})"


def _subject_markdown(report: dict[str, Any]) -> list[str]:
    """Subject fidelity: base and personalised; with several subjects their mean, then one row per subject."""
    subject = report.get("subject")
    if not subject:
        return []
    keys = [k for k in _SUBJECT_COLUMNS if k in subject["personalized"]]
    several = report.get("subjects") or []
    mean = f", the mean over {len(several)} subjects (each scored against its own instance images)" if several else ""
    judged = "subject_match" in subject["personalized"]
    lines = ["## Subject fidelity", "", f"{len(subject['prompts'])} subject prompt(s), "
             f"{subject['personalized']['instances']} instance image(s){mean}."
             + (f" A sample matches when its judged shape, colour, pattern kind and pattern colour all match the "
                f"subject (colours within {COLOUR_TOLERANCE:g} sRGB units); in context: drawn at the position / on "
                "the background its prompt asks for." if judged else ""), "",
             "| model | " + " | ".join(_SUBJECT_COLUMNS[k] for k in keys) + " |", "|" + " --- |" * (len(keys) + 1)]
    for who in ("base", "personalized"):
        lines.append(f"| {who} | " + " | ".join(_fmt(subject[who].get(k)) for k in keys) + " |")
    if judged and not several:
        lines.append(f"\nSubject as read: {_reference_text(subject['personalized'])}.")
    lines.append("")
    if several:
        cols = [k for k in _PER_SUBJECT_COLUMNS if k in keys]
        lines += ["| subject (instance prompt) | instance images | subject as read | " + " | ".join(
                  f"{_SUBJECT_COLUMNS[k]}, base → personalised" for k in cols) + " |", "|" + " --- |" * (len(cols) + 3)]
        for e in several:
            lines.append(f"| {e['instance_prompt']} | {e['personalized']['instances']} | "
                         f"{_reference_text(e['personalized'])} | " + " | ".join(
                f"{_fmt(e['base'].get(k))} → {_fmt(e['personalized'].get(k))}" for k in cols) + " |")
        lines.append("")
    return lines


def write_report(folder: Path, report: dict[str, Any], base: Rendered, personalized: Rendered) -> list[Path]:
    """``evaluation.json``, ``evaluation.md`` and ``samples.png`` (first seed of the first prompts, both models)."""

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / EVALUATION_JSON, folder / EVALUATION_MD, folder / EVALUATION_SAMPLES]
    write_json(paths[0], report)
    write_text(paths[1], to_markdown(report))
    n = min(12, len(base.prompts))
    write_image(paths[2], captioned_rows([("base", [row[0] for row in base.images[:n]]),
                                          ("personalised", [row[0] for row in personalized.images[:n]])]))
    return paths
