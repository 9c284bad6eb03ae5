"""``method: perfusion`` for ``nullbooth train``, and concept files for ``nullbooth generate``.

The strategy object the training loop in :mod:`nullbooth.training.loop` drives (see :class:`nullbooth.methods.base.Method`),
built on :class:`nullbooth.methods.perfusion.editor.PerfusionEditor`. What is trained (Tewel et al. 2023, Algorithm 1):

* ``o*_V`` of every cross-attention layer (value outputs, eq. 3), learning rate ``value_lr`` (paper 0.03);
* the concept token's input embedding, learning rate ``embedding_lr`` (paper 0.006);
* ``i*`` follows the concept token's encoding as an EMA (``input_decay``) -- a buffer, not a parameter;
* keys are locked to the superclass (``o*_K = W_K e_H`` per prompt): nothing to train.

Everything else (``W_K``, ``W_V``, the UNet, the text encoder, the rest of the vocabulary) is frozen, and
prompts without the concept token run through the base model bit for bit.

Data: the DreamBooth inputs of the loop (``instance_data_dir``, ``instance_prompt`` holding the concept
token, optional prior preservation) plus, optionally, one subject mask per instance image
(``perfusion.mask_dir``): the instance loss is then :func:`nullbooth.methods.perfusion.loss.loss_fn_weighted_by_mask`
at latent resolution.

Output (``output_dir``): ``perfusion_concept.safetensors`` (the per-concept tensors only, ≈107 KB for
SD 1.5 in float32) and ``perfusion_config.json`` (method, base model, token, superclass, gate, rates,
the covariance ``C`` it was trained with and its SHA-256, versions). ``C`` is not copied: generation
rebuilds it from the same source (:func:`perfusion_generation`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from nullbooth.config import Config, PerfusionBlock
from nullbooth.dataset import image_to_tensor, read_image_folder, to_rgb, tokenize
from nullbooth.errors import NullBoothError
from nullbooth.filenames import CONCEPT_FILE, PERFUSION_CONFIG
from nullbooth.io import read_json, write_json
from nullbooth.methods.base import Method, ParamGroups, WeightChanges
from nullbooth.methods.perfusion.covariance import default_covariance
from nullbooth.methods.perfusion.editor import DEFAULT_EMBEDDING_LR, DEFAULT_VALUE_LR, PerfusionEditor
from nullbooth.methods.perfusion.files import CONCEPT_FORMAT
from nullbooth.methods.perfusion.loss import loss_fn_weighted_by_mask
from nullbooth.prompts import read_prompt_file
from nullbooth.sampling import default_size

log = logging.getLogger(__name__)

__all__ = [
    "CONCEPT_FILE", "PERFUSION_CONFIG", "Perfusion", "find_concept_files", "load_perfusion_personalization",
    "perfusion_generation", "perfusion_problems", "read_covariance_file", "resolve_covariance",
]

PERFUSION_CONFIG_FORMAT = "nullbooth-perfusion"
# embedding_lr defaults to value_lr × this: the paper's 0.006 / 0.03
EMBEDDING_LR_RATIO = DEFAULT_EMBEDDING_LR / DEFAULT_VALUE_LR
_MASK_SUFFIXES = ("", "_mask", "-mask", ".mask")


# --------------------------------------------------------------------------- config checks


def perfusion_problems(cfg: Config) -> list[str]:
    """Every reason ``cfg`` cannot train Perfusion, as ``field: what is wrong; how to fix`` lines."""
    p = cfg.perfusion
    problems = []
    if not p.concept_token:
        problems.append("perfusion.concept_token: expected the new token the subject binds to (e.g. '<my-teddy>'), "
                        "got nothing")
    if not p.superclass or not p.superclass.strip():
        problems.append("perfusion.superclass: expected the subject's class word the keys are locked to "
                        "(e.g. 'teddy'), got nothing")
    if p.concept_token and cfg.instance_prompt and p.concept_token not in cfg.instance_prompt:
        problems.append(f"instance_prompt: {cfg.instance_prompt!r} does not contain perfusion.concept_token "
                        f"{p.concept_token!r}; write it where the subject goes, e.g. 'a photo of {p.concept_token}'")
    if p.concept_token and cfg.with_prior_preservation and cfg.class_prompt and p.concept_token in cfg.class_prompt:
        problems.append(f"class_prompt: {cfg.class_prompt!r} contains the concept token {p.concept_token!r}; the "
                        "class prompt must describe the plain class (e.g. 'a photo of a teddy')")
    for field in ("mask_dir", "covariance_file", "covariance_prompts"):
        value = getattr(p, field)
        if value is not None and not Path(value).exists():
            problems.append(f"perfusion.{field}: {value} does not exist")
    if p.mask_dir is not None and Path(p.mask_dir).exists() and not Path(p.mask_dir).is_dir():
        problems.append(f"perfusion.mask_dir: expected a folder of masks, {p.mask_dir} is a file")
    if p.covariance_file is not None and p.covariance_prompts is not None:
        problems.append("perfusion.covariance_prompts: give covariance_file or covariance_prompts, not both")
    return problems


# --------------------------------------------------------------------------- covariance C


def read_covariance_file(path: str | Path) -> torch.Tensor:
    """``C`` (float64 ``[d, d]``) from a ``.npy`` file or a ``.safetensors`` file with tensor ``C``."""
    path = Path(path)
    if not path.is_file():
        raise NullBoothError(f"perfusion.covariance_file: expected a file at {path}, found nothing")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise NullBoothError(f"perfusion.covariance_file: {path} is not a plain .npy array ({err})") from None
        return torch.from_numpy(np.asarray(array, dtype=np.float64))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "C" not in tensors:
            raise NullBoothError(f"perfusion.covariance_file: {path} has no tensor 'C' (has {sorted(tensors)[:4]})")
        return tensors["C"].to(torch.float64)
    raise NullBoothError(f"perfusion.covariance_file: expected a .npy or .safetensors file, got {path.name}")


def _sha256(C: torch.Tensor) -> str:
    return hashlib.sha256(C.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()


def resolve_covariance(pipe, block: PerfusionBlock) -> tuple[torch.Tensor, dict[str, Any]]:
    """``C`` for ``pipe``'s (base) text encoder and how it was obtained (recorded in ``perfusion_config.json``).

    ``covariance_file`` → that matrix; ``covariance_prompts`` → computed from those prompts (cached);
    otherwise :func:`nullbooth.methods.perfusion.covariance.default_covariance` (shipped for SD 1.x, else computed from a
    built-in prompt list and cached). Call it before the concept token is added.
    """
    if block.covariance_file is not None:
        path = Path(block.covariance_file).resolve()
        C, source = read_covariance_file(path), {"kind": "file", "path": str(path)}
    elif block.covariance_prompts is not None:
        path = Path(block.covariance_prompts).resolve()
        prompts = read_prompt_file(path, "perfusion.covariance_prompts")
        C, source = default_covariance(pipe, prompts), {"kind": "prompts", "path": str(path), "n_prompts": len(prompts)}
    else:
        C, source = default_covariance(pipe), {"kind": "default"}
    source["shape"] = list(C.shape)
    source["sha256"] = _sha256(C)
    return C, source


# --------------------------------------------------------------------------- masks


def _find_mask(image: Path, files: dict[str, Path]) -> Path | None:
    for suffix in _MASK_SUFFIXES:
        if image.stem + suffix in files:
            return files[image.stem + suffix]
    return None


def load_masks(instance_dir: str | Path, mask_dir: str | Path, resolution: int, latent_size: int) -> torch.Tensor:
    """One mask per instance image, in the loop's image order, at latent resolution: ``[N, h, w]`` in ``[0, 1]``.

    The mask of ``dog1.jpg`` is the file ``dog1.*`` (or ``dog1_mask.*``) in ``mask_dir``; white is the
    subject. It must have its image's size (after EXIF rotation); it is then resized and center-cropped
    exactly like the image (:func:`nullbooth.dataset.image_to_tensor`) and area-averaged to the latent grid.
    """
    mask_dir = Path(mask_dir)
    with warnings.catch_warnings():  # the loop has already warned about skipped instance files
        warnings.simplefilter("ignore")
        images = read_image_folder(instance_dir, "instance_data_dir")
    files = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}
    missing = [p.name for p, _ in images if _find_mask(p, files) is None]
    if missing:
        listed = ", ".join(missing[:3]) + (", …" if len(missing) > 3 else "")
        raise NullBoothError(f"perfusion.mask_dir: no mask for {len(missing)} instance image(s) ({listed}) in "
                             f"{mask_dir}; give each image a mask with the same file stem (e.g. dog1.png for "
                             "dog1.jpg) or remove mask_dir")
    masks = []
    for path, image in images:
        mpath = _find_mask(path, files)
        try:
            with Image.open(mpath) as im:
                im.load()
                mask = im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise NullBoothError(f"perfusion.mask_dir: cannot read mask {mpath} ({type(err).__name__}); "
                                 "give a PNG/JPEG mask") from None
        mask, shown = ImageOps.exif_transpose(mask), ImageOps.exif_transpose(image)
        if mask.size != shown.size:
            raise NullBoothError(
                f"perfusion.mask_dir: mask {mpath.name} is {mask.size[0]}×{mask.size[1]} but its image {path.name} is "
                f"{shown.size[0]}×{shown.size[1]}; a mask must have its image's size (resize the mask, do not crop it)"
            )
        gray = to_rgb(mask).convert("L").convert("RGB")  # white = subject; the same geometry as the image below
        m = (image_to_tensor(gray, resolution)[0] + 1.0) / 2.0  # [r, r] in [0, 1]
        m = F.interpolate(m[None, None], size=(latent_size, latent_size), mode="area")[0, 0]  # [h, w]
        if float(m.max()) <= 0.0:
            raise NullBoothError(f"perfusion.mask_dir: mask {mpath.name} is empty (all black); the subject must be "
                                 "white, or remove the mask")
        masks.append(m)
    return torch.stack(masks)  # [N, h, w]


# --------------------------------------------------------------------------- the strategy


class Perfusion(Method):
    """Key-locked rank-1 editing (Tewel et al. 2023): trains ``o*_V`` and the concept embedding only."""

    name = "perfusion"
    default_lr = DEFAULT_VALUE_LR
    trains_text_encoder = True  # the concept embedding is trained: the loop encodes the token ids every step

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        problems = perfusion_problems(cfg)
        if problems:
            raise NullBoothError(f"config: {len(problems)} problem(s): " + "; ".join(problems))
        self.block: PerfusionBlock = cfg.perfusion
        self.editor: PerfusionEditor | None = None
        self.masks: torch.Tensor | None = None  # [N, h, w] at latent size, or None
        self.covariance: dict[str, Any] = {}
        self._start: dict[str, dict[str, torch.Tensor]] = {}

    # -- rates

    @property
    def lr(self) -> float:
        """``o*_V``'s rate: ``perfusion.value_lr``, else ``learning_rate``, else the paper's 0.03."""
        if self.block.value_lr is not None:
            return self.block.value_lr
        return self.cfg.learning_rate if self.cfg.learning_rate is not None else self.default_lr

    @property
    def embedding_lr(self) -> float:
        return self.block.embedding_lr if self.block.embedding_lr is not None else self.lr * EMBEDDING_LR_RATIO

    # -- set-up

    def prepare(self, pipe, stats_run: Path | None) -> ParamGroups:
        """Read masks and ``C``, then attach the editor (validates everything before it mutates the pipeline)."""
        self.pipe, self.stats_run = pipe, stats_run
        b, cfg = self.block, self.cfg
        resolution = cfg.resolution or default_size(pipe)
        if b.mask_dir is not None:
            self.masks = load_masks(cfg.instance_data_dir, b.mask_dir, resolution, resolution // pipe.vae_scale_factor)
        C, self.covariance = resolve_covariance(pipe, b)
        gate: dict[str, Any] = {"train_beta": b.train_beta, "train_temperature": b.train_tau}
        if b.eval_beta is not None:
            gate["eval_beta"] = b.eval_beta
        if b.eval_tau is not None:
            gate["eval_temperature"] = b.eval_tau
        self.editor = PerfusionEditor.attach(pipe, b.concept_token, b.superclass, C,
                                             eigenvalue_floor=b.eigenvalue_floor, input_decay=b.input_decay,
                                             frac_gradient_concept_embed=b.frac_gradient_concept_embed, **gate)
        concept = self.editor.concepts[0]
        ids = tokenize(pipe.tokenizer, [cfg.instance_prompt])[0]  # [77]
        if not bool((ids == concept.token_id).any()):
            self.editor.detach()
            raise NullBoothError(
                f"instance_prompt: {cfg.instance_prompt!r} does not tokenize to the concept token {concept.token!r} "
                "(it is glued to another word or cut off at 77 tokens); separate it with spaces, e.g. "
                f"'a photo of {concept.token}'"
            )
        if len(concept.superclass_ids) > 1:
            log.info("superclass %r has %d tokens: the concept embedding starts at their mean and keys lock to the "
                     "encoding of its last token", concept.superclass, len(concept.superclass_ids))
        if self.masks is not None:
            self.masks = self.masks.to(pipe.unet.device)
        values = {n: v for n, (_, v) in self.editor.modules.items()}
        self._start = {"o_star": {n: v.concept_outputs[0].detach().clone() for n, v in values.items()},
                       "i_star": {n: v.ema_concept_text_encs[0].detach().clone() for n, v in values.items()},
                       "embedding": {"vector": self.editor.embedding.vectors[0].detach().clone()}}
        return self.editor.trainable_parameters(self.lr, self.embedding_lr, b.weight_decay)

    # -- in the loop

    def context(self) -> contextlib.AbstractContextManager:
        """Around the loop: the editor's records of concept prompts (matched to the UNet's K/V inputs)."""
        return self.editor.context()

    def loss(self, pred: torch.Tensor, target: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """Instance loss of examples ``idx``: plain MSE, or weighted by their masks (``loss_fn_weighted_by_mask``)."""
        if self.masks is None:
            return F.mse_loss(pred, target.float())
        mask = self.masks[list(idx)]  # [B, h, w]
        return loss_fn_weighted_by_mask(pred, target.float(), mask, self.block.normalized_mask_min_value)

    # -- checkpoints, report, output

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors plus every module's ``i*`` EMA and its initialised flag (exact resume)."""
        state = super().checkpoint_state()
        for name, (key, value) in self.editor.modules.items():
            for proj, module in (("to_k", key), ("to_v", value)):
                state[f"unet.{name}.{proj}.ema_concept_text_encs"] = module.ema_concept_text_encs.detach()
                state[f"unet.{name}.{proj}.initted"] = module.initted.detach()
        return state

    def weight_changes(self) -> WeightChanges:
        """None: Perfusion has no fixed ΔW (its edit is gated per input); plain prompts are unchanged exactly."""
        return {}

    @torch.no_grad()
    def changes(self) -> dict[str, Any]:
        """Relative change of ``o*_V``, ``i*`` (per layer) and the concept embedding since the start of training."""
        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            a, b = a.double().cpu(), b.double().cpu()
            return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())

        out: dict[str, Any] = {"layers": {}}
        for name, (_, value) in self.editor.modules.items():
            out["layers"][name] = {
                "o_star_change_rel": rel(value.concept_outputs[0], self._start["o_star"][name]),
                "i_star_change_rel": rel(value.ema_concept_text_encs[0], self._start["i_star"][name]),
            }
        out["embedding_change_rel"] = rel(self.editor.embedding.vectors[0], self._start["embedding"]["vector"])
        return out

    def report(self) -> dict[str, dict[str, Any]]:
        changes = self.changes()["layers"]
        superclass = self.block.superclass
        rows: dict[str, dict[str, Any]] = {}
        for name in self.editor.modules:
            rows[f"{name}.to_k"] = {"trained": False, "locked_to": superclass}
            rows[f"{name}.to_v"] = {"trained": True, "trained_tensor": "o*_V", **changes[name]}
        return rows

    def save(self, output_dir: Path, info: dict[str, Any]) -> list[Path]:
        """``perfusion_concept.safetensors`` (per-concept tensors, no ``C⁻¹``) and ``perfusion_config.json``."""
        output_dir = Path(output_dir)
        concept_path, config_path = output_dir / CONCEPT_FILE, output_dir / PERFUSION_CONFIG
        nbytes = self.editor.save(concept_path)
        concept = self.editor.concepts[0]
        value = next(iter(self.editor.modules.values()))[1]
        b = self.block
        write_json(config_path, {
            **info, "format": PERFUSION_CONFIG_FORMAT, "format_version": 1, "concept_file": CONCEPT_FILE,
            "concept_bytes": nbytes, "concept_token": concept.token, "token_id": concept.token_id,
            "superclass": concept.superclass, "superclass_ids": list(concept.superclass_ids),
            "value_lr": self.lr, "embedding_lr": self.embedding_lr, "weight_decay": b.weight_decay,
            "gate": {"train_beta": value.train_beta, "train_tau": value.train_temperature,
                     "eval_beta": value.eval_beta, "eval_tau": value.eval_temperature, "input_decay": value.input_decay,
                     "frac_gradient_concept_embed": value.frac_gradient_concept_embed},
            "eigenvalue_floor": b.eigenvalue_floor, "covariance": self.covariance,
            "masks": b.mask_dir is not None, "normalized_mask_min_value": b.normalized_mask_min_value,
            "layers": {n: v.out_features for n, (_, v) in self.editor.modules.items()},
            "changes": self.changes(),
        })
        log.info("wrote %s (%d bytes) and %s", concept_path, nbytes, config_path)
        return [concept_path, config_path]


# --------------------------------------------------------------------------- generation


def is_concept_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`nullbooth.methods.perfusion.files.save_concept`."""
    from safetensors import safe_open

    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == CONCEPT_FORMAT
    except Exception:  # a corrupt or foreign file is simply not a concept file here
        return False


def find_concept_files(path: str | Path) -> list[Path]:
    """The concept files at ``path``: the file itself, or every concept file directly in the folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path] if is_concept_file(path) else []
    if path.is_dir():
        return [p for p in sorted(path.glob("*.safetensors")) if is_concept_file(p)]
    return []


def _training_record(concept: Path) -> dict[str, Any] | None:
    """The ``perfusion_config.json`` of the training run that wrote ``concept``, when it sits beside it."""
    config = concept.parent / PERFUSION_CONFIG
    if not config.is_file():
        return None
    data = read_json(config, "a Perfusion training config")
    if data.get("format") != PERFUSION_CONFIG_FORMAT or data.get("concept_file") != concept.name:
        return None
    return data


def perfusion_generation(pipe, concept_paths: Sequence[str | Path], beta: float | None = None,
                         tau: float | None = None, *, covariance_file: str | Path | None = None,
                         covariance_prompts: str | Path | None = None,
                         eigenvalue_floor: float | Literal["auto", "training"] | None = "training",
                         use_cholesky: bool = False) -> PerfusionEditor:
    """Attach one or more trained concepts to ``pipe`` for sampling; returns the editor (``detach()`` undoes it).

    Several files → multi-concept generation (Appendix B; ``use_cholesky`` for the exact projection).
    ``beta``/``tau`` override the inference gate of every concept for every later ``pipe(...)`` call
    (lower β / higher τ: more of the concept, less prompt alignment); ``None`` keeps the files' values.
    Use ``with editor.context(beta=…, tau=…):`` for a scoped override instead.

    ``C⁻¹`` must be the one the concepts were trained with: ``C`` from an explicit ``covariance_file`` /
    ``covariance_prompts``, else the source recorded in the ``perfusion_config.json`` beside the first
    concept file, else :func:`~nullbooth.methods.perfusion.covariance.default_covariance` -- checked against the recorded
    SHA-256 (a warning when it differs); ``eigenvalue_floor="training"`` reuses the run's floor ("auto"
    without a record).
    """
    paths = [Path(p) for p in concept_paths]
    if not paths:
        raise NullBoothError("expected at least one Perfusion concept file, got none")
    for p in paths:
        if not is_concept_file(p):
            raise NullBoothError(f"perfusion concept: {p} is not a Perfusion concept file (a safetensors file "
                                 f"written by `nullbooth train` with method: perfusion, e.g. {CONCEPT_FILE})")
    if tau is not None and tau <= 0:
        raise NullBoothError(f"expected a gate temperature tau > 0, got {tau}")
    runs = [r for r in (_training_record(p) for p in paths) if r is not None]
    known = [r["covariance"] for r in runs if r.get("covariance")]
    if len({r.get("sha256") for r in known}) > 1:
        warnings.warn("the concept files were trained with different covariances C; using the first one's "
                      "(the others' outputs will differ from training)", stacklevel=2)
    block = PerfusionBlock(covariance_file=str(covariance_file) if covariance_file else None,
                           covariance_prompts=str(covariance_prompts) if covariance_prompts else None)
    record = known[0] if known else None
    if block.covariance_file is None and block.covariance_prompts is None and record is not None:
        if record.get("kind") in ("file", "prompts"):
            if not Path(record["path"]).exists():
                raise NullBoothError(
                    f"the concept was trained with the covariance from {record['path']}, which no longer exists; "
                    "pass the same file as perfusion.covariance_file (or covariance_prompts)")
            block = PerfusionBlock(**{f"covariance_{record['kind']}": record["path"]})
    C, source = resolve_covariance(pipe, block)
    if record is not None and record.get("sha256") not in (None, source["sha256"]):
        warnings.warn(f"the covariance C ({source['kind']}) differs from the one the concept was trained with "
                      f"({record.get('kind')}); the concept will not behave as in training -- pass the training "
                      "covariance as perfusion.covariance_file", stacklevel=2)
    if eigenvalue_floor == "training":
        eigenvalue_floor = runs[0].get("eigenvalue_floor", "auto") if runs else "auto"
    editor = PerfusionEditor.load(pipe, *paths, C=C, use_cholesky=use_cholesky, eigenvalue_floor=eigenvalue_floor)
    editor.ctx.beta, editor.ctx.tau = beta, tau  # read by every Rank1EditModule's gate (eq. 3)
    return editor


def load_perfusion_personalization(pipe, path: str | Path,
                                   block: PerfusionBlock | None = None) -> PerfusionEditor | None:
    """``nullbooth generate``: the concept files at ``path`` plus ``block.concepts``, attached; ``None`` if none."""
    block = block or PerfusionBlock()
    files = find_concept_files(path)
    for extra in block.concepts:
        if not Path(extra).is_file():
            raise NullBoothError(f"perfusion.concepts: expected a concept file at {extra}, found nothing")
        files.append(Path(extra))
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    if not unique:
        return None
    # the training run's floor unless this config sets one (C⁻¹ must be the training's)
    floor = block.eigenvalue_floor if "eigenvalue_floor" in block.model_fields_set else "training"
    return perfusion_generation(pipe, list(unique.values()), block.eval_beta, block.eval_tau,
                                covariance_file=block.covariance_file, covariance_prompts=block.covariance_prompts,
                                eigenvalue_floor=floor, use_cholesky=block.use_cholesky)
