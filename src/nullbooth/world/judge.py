"""The judge: a small CNN that reads the world's attributes off an image, and pluggable feature extractors.

The judge (:class:`Judge`) is trained on ground-truth renders of :mod:`nullbooth.world.scenes` (with blur, noise and
colour jitter so that it also reads generated images) and has one softmax head per attribute. Its
penultimate layer is an embedding used by the distribution metrics of :mod:`nullbooth.eval.metrics`
(MMD, coverage, 1-NN, Fréchet distance) when no CLIP/DINOv2 model is available — which is always the
case offline.

Feature extractors share one protocol, :class:`FeatureExtractor`: ``extractor(images) -> [n, d] float64``.
Besides the judge, :class:`HFVisionFeatures` wraps a local transformers folder holding a CLIP (vision) or
DINOv2 model. :func:`load_feature_extractor` picks one from a user string.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from nullbooth import __version__
from nullbooth.errors import NullBoothError
from nullbooth.filenames import JUDGE_CONFIG, JUDGE_DIR, JUDGE_WEIGHTS
from nullbooth.io import load_tensors, read_json
from nullbooth.models import check_pickled_weights
from nullbooth.world.scenes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTE_VALUES,
    World,
    WorldConfig,
    parse_prompt,
)

log = logging.getLogger(__name__)



# -------------------------------------------------------------------------------------------- protocol


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images to feature vectors: ``__call__(images) -> np.ndarray`` of shape ``[n, dim]``, float64."""

    name: str

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def _check_images(images: Sequence[Image.Image]) -> None:
    if len(images) == 0:
        raise NullBoothError("expected at least one image to extract features from, got an empty list")
    for k, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise NullBoothError(f"expected PIL images, item {k} is a {type(im).__name__}")


# ----------------------------------------------------------------------------------------------- network


class JudgeNet(nn.Module):
    """Four stride-2 conv stages (64→4 pixels) → flatten → ``embed_dim`` embedding → one linear head per attribute.

    Flattening (not pooling) keeps *where* things are, which the position head needs.
    """

    def __init__(self, heads: dict[str, int], widths: Sequence[int] = (32, 64, 64, 64), embed_dim: int = 128,
                 resolution: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = resolution // 2 ** len(widths)
        self.embed = nn.Linear(c_in * side * side, embed_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(embed_dim, n) for name, n in heads.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.features(x).flatten(1)  # [B, C·s·s]
        e = self.embed(h)  # [B, D] — the feature for distribution metrics (pre-activation)
        a = F.silu(e)
        return e, {name: head(a) for name, head in self.heads.items()}


@dataclass
class JudgeConfig:
    attributes: dict[str, list[str]] = field(
        default_factory=lambda: {n: list(ATTRIBUTE_VALUES[n]) for n in ATTRIBUTE_NAMES})
    widths: list[int] = field(default_factory=lambda: [32, 64, 64, 64])
    embed_dim: int = 128
    resolution: int = 64
    accuracy: dict[str, float] = field(default_factory=dict)
    nullbooth_version: str = __version__


class Judge:
    """Attribute classifier and feature extractor (the offline default for :mod:`nullbooth.eval.metrics`)."""

    name = "judge"

    def __init__(self, config: JudgeConfig | None = None, net: JudgeNet | None = None) -> None:
        self.config = config or JudgeConfig()
        c = self.config
        self.net = net or JudgeNet({k: len(v) for k, v in c.attributes.items()}, c.widths, c.embed_dim, c.resolution)
        self.net.eval()

    # -- tensors ------------------------------------------------------------------------------------------

    def to_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL → float32 ``[n, 3, R, R]`` in [-1, 1], resized to the judge's resolution."""
        _check_images(images)
        r = self.config.resolution
        arrs = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (r, r):
                im = im.resize((r, r), Image.Resampling.BILINEAR)
            arrs.append(np.asarray(im, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrs) / 127.5 - 1.0)  # [n, R, R, 3]
        return x.permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _run(self, images: Sequence[Image.Image], batch: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x = self.to_tensor(images)
        embs, probs = [], {k: [] for k in self.config.attributes}
        for s in range(0, x.shape[0], batch):
            e, logits = self.net(x[s:s + batch])
            embs.append(e.double().numpy())
            for k, v in logits.items():
                probs[k].append(torch.softmax(v.double(), -1).numpy())
        return np.concatenate(embs), {k: np.concatenate(v) for k, v in probs.items()}

    # -- public -------------------------------------------------------------------------------------------

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embeddings ``[n, embed_dim]`` float64 (the :class:`FeatureExtractor` interface)."""
        return self._run(images)[0]

    def predict_proba(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """Per attribute, class probabilities ``[n, n_values]`` (columns in ``config.attributes`` order)."""
        return self._run(images)[1]

    def predict(self, images: Sequence[Image.Image]) -> dict[str, list[str]]:
        """Per attribute, the most likely value of each image."""
        return {k: [self.config.attributes[k][i] for i in p.argmax(1)] for k, p in self.predict_proba(images).items()}

    def save(self, folder: str | Path) -> Path:
        """``judge.safetensors`` (fp16 weights: the judge is shipped) + ``judge.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / JUDGE_WEIGHTS), metadata={"format": "nullbooth-judge"})
        (folder / JUDGE_CONFIG).write_text(json.dumps(self.config.__dict__, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Judge":
        folder = Path(folder)
        cfg_path, w_path = folder / JUDGE_CONFIG, folder / JUDGE_WEIGHTS
        if not cfg_path.is_file() or not w_path.is_file():
            raise NullBoothError(
                f"expected a judge folder with {JUDGE_CONFIG} and {JUDGE_WEIGHTS} at {folder}, found "
                f"{sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'no folder'}; "
                "train one with: python scripts/train_judge.py"
            )
        raw = read_json(cfg_path, f"a judge config ({JUDGE_CONFIG})")
        known = set(JudgeConfig.__dataclass_fields__)
        try:
            judge = cls(JudgeConfig(**{k: v for k, v in raw.items() if k in known}))
            tensors, _ = load_tensors(w_path, f"judge weights ({JUDGE_WEIGHTS})")
            judge.net.load_state_dict({k: v.float() for k, v in tensors.items()})
        except (TypeError, ValueError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise NullBoothError(f"the judge in {folder} does not match its {JUDGE_CONFIG} ({first}); train it again "
                                 "with: python scripts/train_judge.py") from None
        judge.net.eval()
        return judge


def load_judge(folder: str | Path | None = None) -> Judge:
    """The shipped judge (``nullbooth/data/judge``) or one saved at ``folder``."""
    return Judge.load(JUDGE_DIR if folder is None else folder)


def shape_colour_match(judge: Judge, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """The world model's quality gate: the fraction of images whose judged shape, colour, and both, are what
    prompt ``i`` states (image ``i`` was drawn for prompt ``i``)."""
    judged = judge.predict(images)
    want = [parse_prompt(p) for p in prompts]
    shape = [judged["shape"][i] == w["shape"] for i, w in enumerate(want)]
    colour = [judged["colour"][i] == w["colour"] for i, w in enumerate(want)]
    n = len(want)
    return {"n": n, "shape": sum(shape) / n, "colour": sum(colour) / n,
            "shape_and_colour": sum(s and c for s, c in zip(shape, colour)) / n}


# ---------------------------------------------------------------------------------------------- training


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 3, H, W]`` (reflect padding)."""
    if sigma <= 0:
        return x
    radius = max(1, int(round(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Degrade clean renders the way generations are degraded: blur, noise, colour/contrast drift.

    Applied per chunk of 16 images so blur kernels stay batched.
    """
    out = []
    for chunk in x.split(16):
        u = torch.rand(6, generator=gen)
        y = _gaussian_blur(chunk, float(u[0]) * 1.3 if u[1] < 0.7 else 0.0)
        b = chunk.shape[0]
        gain = 1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.16  # ±8 % per channel
        shift = (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.16
        y = y * gain + shift
        y = y + torch.randn(y.shape, generator=gen) * float(u[2]) * 0.08
        out.append(y.clamp(-1, 1))
    return torch.cat(out)


def _render_set(world: World, pattern_world: World, n: int, seed: int, pattern_frac: float):
    """Clean renders ``[n, 3, R, R]`` in [-1, 1] and integer labels per attribute (all shape × colour pairs)."""
    rng = np.random.default_rng([seed, 17])
    res = world.config.resolution
    x = np.empty((n, res, res, 3), np.uint8)
    labels = {k: np.empty(n, np.int64) for k in ATTRIBUTE_NAMES}
    for i in range(n):
        w = pattern_world if rng.random() < pattern_frac else world
        a = w.sample_attributes(rng, "all")
        # Stripe/dot period and angle vary so the pattern head reads textures of any scale (the subject's stripes
        # are twice as wide as the world's default ones; a judge trained on one period called them "solid").
        texture = {} if a.pattern == "solid" else {"pattern_period": float(rng.uniform(0.07, 0.18)) * res,
                                                   "pattern_angle": float(rng.uniform(0, 180))}
        x[i] = np.asarray(w.render(a, **texture))
        for k, v in a.labels().items():
            labels[k][i] = v
    xt = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    return xt, {k: torch.from_numpy(v) for k, v in labels.items()}


def accuracy(judge: Judge, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy of ``judge`` on tensors ``x`` (in [-1, 1])."""
    correct = {k: 0 for k in labels}
    with torch.no_grad():
        for s in range(0, x.shape[0], 512):
            _, logits = judge.net(x[s:s + 512])
            for k in labels:
                correct[k] += int((logits[k].argmax(1) == labels[k][s:s + 512]).sum())
    return {k: correct[k] / x.shape[0] for k in labels}


def train_judge(n_train: int = 20000, n_test: int = 4000, epochs: int = 4, batch: int = 128, lr: float = 3e-3,
                seed: int = 0, resolution: int = 64, pattern_frac: float = 0.3,
                max_seconds: float | None = None) -> tuple[Judge, dict[str, float]]:
    """Train a judge on fresh renders; return it with its per-attribute accuracy on held-out renders.

    The test renders use a different seed and are augmented like the training ones (so the number is
    the accuracy on degraded images, the harder case); they include the held-out shape × colour pairs.
    """
    world = World(WorldConfig(resolution=resolution))
    pattern_world = World(WorldConfig(resolution=resolution, pattern_prob=1.0))
    t0 = time.monotonic()
    x, y = _render_set(world, pattern_world, n_train, seed, pattern_frac)
    xt, yt = _render_set(world, pattern_world, n_test, seed + 1, pattern_frac)
    log.info("rendered %d + %d images in %.1fs", n_train, n_test, time.monotonic() - t0)
    gen = torch.Generator().manual_seed(seed)
    xt_aug = augment(xt, torch.Generator().manual_seed(seed + 1))

    torch.manual_seed(seed)
    judge = Judge(JudgeConfig(resolution=resolution))
    net = judge.net
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    step = 0
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for s in range(0, n_train - batch + 1, batch):
            idx = perm[s:s + batch]
            xb = augment(x[idx], gen)  # [B, 3, R, R]
            _, logits = net(xb)
            loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                break
        net.eval()
        acc = accuracy(judge, xt_aug, yt)
        net.train()
        log.info("epoch %d  loss %.4f  test acc %s  (%.0fs)", epoch, float(loss),
                 {k: round(v, 4) for k, v in acc.items()}, time.monotonic() - t0)
        if max_seconds is not None and time.monotonic() - t0 > max_seconds:
            break
    net.eval()
    acc_aug = accuracy(judge, xt_aug, yt)
    acc_clean = accuracy(judge, xt, yt)
    judge.config.accuracy = {**{f"{k}": v for k, v in acc_aug.items()},
                             **{f"{k}_clean": v for k, v in acc_clean.items()}}
    return judge, acc_aug


# --------------------------------------------------------------------------------- transformers extractors

# Preprocessing defaults when a folder has no preprocessor_config.json.
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_SUPPORTED = ("clip", "clip_vision_model", "dinov2")


class HFVisionFeatures:
    """Image embeddings from a local CLIP (vision) or DINOv2 folder via transformers.

    CLIP: the projected image embedding (``image_embeds``) when the folder holds a full CLIP model, else
    the pooled output; DINOv2: the pooled (CLS, layer-normed) output. Images are resized to the model's
    input size and normalised with the folder's ``preprocessor_config.json`` (or the model family's defaults).
    """

    def __init__(self, folder: str | Path, device: str = "cpu", batch: int = 32) -> None:
        folder = Path(folder)
        if not folder.exists():
            raise NullBoothError(
                f"feature extractor folder {folder} does not exist; give a local CLIP or DINOv2 folder "
                "(saved with save_pretrained) or use the built-in 'judge'"
            )
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise NullBoothError(
                f"expected a transformers model folder with config.json at {folder}, found none; "
                "give a CLIP or DINOv2 folder saved with save_pretrained, or use 'judge'"
            )
        cfg = read_json(cfg_path, "a transformers model config")
        model_type = cfg.get("model_type")
        if model_type not in _SUPPORTED:
            raise NullBoothError(
                f"feature extractor folder {folder} holds a {model_type!r} model; expected one of "
                f"{', '.join(_SUPPORTED)} (a CLIP or DINOv2 vision model), or use 'judge'"
            )
        import transformers

        check_pickled_weights(folder, "transformers.AutoModel")
        self.model_type = model_type
        try:
            if model_type == "clip":
                self.model = transformers.CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=True)
                size = cfg.get("vision_config", {}).get("image_size", 224)
                mean, std = _CLIP_MEAN, _CLIP_STD
            elif model_type == "clip_vision_model":
                self.model = transformers.CLIPVisionModel.from_pretrained(folder, use_safetensors=True)
                size, mean, std = cfg.get("image_size", 224), _CLIP_MEAN, _CLIP_STD
            else:
                self.model = transformers.AutoModel.from_pretrained(folder, use_safetensors=True)
                size, mean, std = 224, _IMAGENET_MEAN, _IMAGENET_STD
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NullBoothError(f"could not load a {model_type} model from {folder}: {first}") from None
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            p = read_json(pre, "a preprocessor config")
            mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
            crop = p.get("crop_size", p.get("size", size))
            size = crop.get("height", crop.get("shortest_edge", size)) if isinstance(crop, dict) else int(crop)
        self.size, self.mean, self.std = int(size), np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.model.eval().to(device)
        self.device, self.batch = device, batch
        self.name = f"{model_type}:{folder.name}"

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        _check_images(images)
        out = []
        for s in range(0, len(images), self.batch):
            arr = np.stack([
                np.asarray(im.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC), np.float32)
                for im in images[s:s + self.batch]
            ]) / 255.0
            x = torch.from_numpy((arr - self.mean) / self.std).permute(0, 3, 1, 2).to(self.device)
            res = self.model(pixel_values=x)
            emb = res.image_embeds if self.model_type == "clip" else res.pooler_output
            out.append(emb.double().cpu().numpy())
        return np.concatenate(out)


def load_feature_extractor(spec: str | Path | None = None) -> FeatureExtractor:
    """``None`` or ``"judge"``: the shipped judge; a path: a judge folder or a CLIP/DINOv2 transformers folder."""
    if spec is None or str(spec) == "judge":
        return load_judge()
    path = Path(spec)
    if (path / JUDGE_CONFIG).is_file():
        return load_judge(path)
    return HFVisionFeatures(path)
