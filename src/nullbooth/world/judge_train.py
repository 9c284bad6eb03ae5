"""Training the judge (:class:`nullbooth.world.judge.Judge`) and measuring it on subjects it never saw.

Training data: world renders (30 % striped/dotted, any period and angle) and renders of random subjects from
the family :data:`TRAIN_SEED` (neither :data:`~nullbooth.world.subjects.SUITE_SEED` nor
:data:`~nullbooth.world.subjects.HELDOUT_SEED`), each in a random view (position, size, background, rotation).
Every image carries targets for every head it defines; heads an image does not define (the palette colour name
of a random subject, the period of a gradient) are masked out of the loss.

Loss per image: ``Σ_heads CE`` + ``min_σ [w_c (|ĉ − c_σ(1)|₁ + |p̂ − c_σ(2)|₁) + w_a |â − a_σ|²]`` + ``w_p |log P̂ − log P|``,
with σ ranging over the identity and, for :data:`~nullbooth.world.judge.SYMMETRIC_KINDS`, the swap of the two
colours (a gradient's angle turns by half a period under the swap): the pixels do not say which colour is "main",
so the judge learns its own order (a permutation-invariant loss, as in set prediction).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nullbooth.world.judge import (
    JUDGE_ATTRIBUTES,
    SYMMETRIC_KINDS,
    Judge,
    JudgeConfig,
    colour_pair_errors,
    rgb_from_output,
)
from nullbooth.world.scenes import (
    ACCENT_COLOURS,
    ATTRIBUTE_NAMES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SIZES,
    World,
    WorldConfig,
)
from nullbooth.world.subjects import HELDOUT_SEED, Subject, draw_subject, random_subject
from nullbooth.world.textures import ORIENTED_KINDS, PATTERN_KINDS, PERIODIC_KINDS

log = logging.getLogger(__name__)

TRAIN_SEED = 31_415_926  # the random-subject family the judge trains on: neither SUITE_SEED nor HELDOUT_SEED
W_COLOUR, W_ANGLE, W_PERIOD = 4.0, 1.0, 1.0
_WORLD_PATTERN = {"solid": "solid", "stripes": "striped", "dots": "dotted"}  # texture kind → world word


@dataclass
class Targets:
    """Per image: categorical labels (−1: not defined for this image) and open-palette targets with masks."""

    labels: dict[str, np.ndarray]  # name → [n] int64
    rgb: np.ndarray  # [n, 3] float32 in [-1, 1]
    pattern_rgb: np.ndarray  # [n, 3]
    log_period: np.ndarray  # [n]
    angle: np.ndarray  # [n, 2] (cos, sin)(2π·angle/P_kind)
    has_pattern: np.ndarray  # [n] bool
    periodic: np.ndarray
    oriented: np.ndarray
    swappable: np.ndarray
    swap_sign: np.ndarray  # [n] −1 where swapping the colours turns the angle by half a period (gradient)

    @classmethod
    def empty(cls, n: int) -> "Targets":
        z = np.zeros
        return cls({k: np.full(n, -1, np.int64) for k in JUDGE_ATTRIBUTES}, z((n, 3), np.float32),
                   z((n, 3), np.float32), z(n, np.float32), z((n, 2), np.float32), z(n, bool), z(n, bool),
                   z(n, bool), z(n, bool), np.ones(n, np.float32))

    def set_texture(self, i: int, kind: str, base, accent, period_frac: float, angle: float) -> None:
        self.labels["pattern_kind"][i] = PATTERN_KINDS.index(kind)
        self.rgb[i] = np.asarray(base, np.float32) / 127.5 - 1.0
        self.pattern_rgb[i] = np.asarray(accent, np.float32) / 127.5 - 1.0
        self.has_pattern[i] = kind != "solid"
        self.periodic[i] = kind in PERIODIC_KINDS
        self.log_period[i] = math.log(period_frac)
        if kind in ORIENTED_KINDS:
            t = 2 * math.pi * angle / ORIENTED_KINDS[kind]
            self.oriented[i], self.angle[i] = True, (math.cos(t), math.sin(t))
        self.swappable[i] = kind in SYMMETRIC_KINDS
        self.swap_sign[i] = -1.0 if kind == "gradient" else 1.0

    def torch(self) -> dict[str, torch.Tensor]:
        out = {f"label_{k}": torch.from_numpy(v) for k, v in self.labels.items()}
        for k in ("rgb", "pattern_rgb", "log_period", "angle", "has_pattern", "periodic", "oriented", "swappable",
                  "swap_sign"):
            out[k] = torch.from_numpy(np.asarray(getattr(self, k)))
        return out


# ------------------------------------------------------------------------------------------------ renders


def render_view(subject: Subject, rng: np.random.Generator, resolution: int, supersample: int = 4,
                jitter: float = 0.015, size_jitter: float = 0.04, max_rotation: float = 10.0
                ) -> tuple[Image.Image, dict[str, str]]:
    """``subject`` in a random view (world position/size/background, the world's jitter, any small rotation)."""
    position, size, background = (str(rng.choice(list(d))) for d in (POSITIONS, SIZES, BACKGROUNDS))
    side = resolution * supersample
    fx, fy = np.asarray(POSITIONS[position]) + rng.uniform(-jitter, jitter, size=2)
    cx, cy = fx * side, fy * side
    r = SIZES[size] * side * rng.uniform(1 - size_jitter, 1 + size_jitter)
    canvas = draw_subject(subject, side, cx, cy, r, background, float(rng.uniform(-max_rotation, max_rotation)))
    view = {"position": position, "size": size, "background": background}
    return canvas.resize((resolution, resolution), Image.Resampling.BOX), view


def subject_set(n: int, family: int, seed: int, resolution: int = 64) -> tuple[np.ndarray, Targets]:
    """Subjects ``0..n-1`` of ``family``, one random view each: uint8 ``[n, R, R, 3]`` and their targets."""
    x = np.empty((n, resolution, resolution, 3), np.uint8)
    t = Targets.empty(n)
    for i in range(n):
        s = random_subject(family, i)
        image, view = render_view(s, np.random.default_rng([seed, i, 3]), resolution)
        x[i] = np.asarray(image)
        for name, value in (*view.items(), ("shape", s.shape)):
            t.labels[name][i] = JUDGE_ATTRIBUTES[name].index(value)
        if s.pattern in _WORLD_PATTERN:
            t.labels["pattern"][i] = JUDGE_ATTRIBUTES["pattern"].index(_WORLD_PATTERN[s.pattern])
        t.set_texture(i, s.pattern, s.colour, s.pattern_colour or s.colour, s.pattern_period, s.pattern_angle)
    return x, t


def world_set(n: int, seed: int, pattern_frac: float, resolution: int = 64) -> tuple[np.ndarray, Targets]:
    """World renders over every shape × colour pair; stripes/dots at any period (0.07–0.26 of the side) and angle."""
    world = World(WorldConfig(resolution=resolution))
    pattern_world = World(WorldConfig(resolution=resolution, pattern_prob=1.0))
    rng = np.random.default_rng([seed, 17])
    x = np.empty((n, resolution, resolution, 3), np.uint8)
    t = Targets.empty(n)
    kind_of = {v: k for k, v in _WORLD_PATTERN.items()}
    for i in range(n):
        w = pattern_world if rng.random() < pattern_frac else world
        a = w.sample_attributes(rng, "all")
        period, angle = float(rng.uniform(0.07, 0.26)), float(rng.uniform(0, 180))
        x[i] = np.asarray(w.render(a, pattern_period=period * resolution, pattern_angle=angle))
        for name, value in a.labels().items():
            t.labels[name][i] = JUDGE_ATTRIBUTES[name].index(getattr(a, name))
        accent = ACCENT_COLOURS[a.pattern_colour] if a.pattern_colour else COLOURS[a.colour]
        t.set_texture(i, kind_of[a.pattern], COLOURS[a.colour], accent, period, angle)
    return x, t


def to_input(x: np.ndarray) -> torch.Tensor:
    """uint8 ``[n, R, R, 3]`` → float32 ``[n, 3, R, R]`` in [-1, 1]."""
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------- augmentation


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


def translate(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``[B, 3, H, W]`` moved ``dx`` pixels right and ``dy`` down, the edge pixels repeated into the gap."""
    if dx == 0 and dy == 0:
        return x
    m = max(abs(dx), abs(dy))
    h, w = x.shape[-2:]
    padded = F.pad(x, (m, m, m, m), mode="replicate")
    return padded[..., m - dy:m - dy + h, m - dx:m - dx + w]


def augment(x: torch.Tensor, gen: torch.Generator, colour_jitter: float = 0.05, max_shift: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Degrade clean renders the way generations are degraded: blur, noise, a small per-channel affine drift, and
    with ``max_shift`` a translation by up to that many pixels in x and y (stride-2 convolutions alias: without it
    a one-pixel move of the same image changes some readings).

    Returns the images and the drift ``(gain, shift)`` ``[B, 3]`` so that colour targets move with the pixels
    (:func:`drift`): the open-palette heads read the colour that is drawn. Per chunk of 16 images (batched blur).
    """
    out, gains, shifts = [], [], []
    for chunk in x.split(16):
        if max_shift:
            dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
            chunk = translate(chunk, dx, dy)
        u = torch.rand(3, generator=gen)
        y = _gaussian_blur(chunk, float(u[0]) * 1.3 if u[1] < 0.7 else 0.0)
        b = chunk.shape[0]
        gain = 1 + (torch.rand(b, 3, generator=gen) - 0.5) * 2 * colour_jitter
        shift = (torch.rand(b, 3, generator=gen) - 0.5) * 2 * colour_jitter
        y = y * gain[:, :, None, None] + shift[:, :, None, None]
        y = y + torch.randn(y.shape, generator=gen) * float(u[2]) * 0.08
        out.append(y.clamp(-1, 1))
        gains.append(gain)
        shifts.append(shift)
    return torch.cat(out), torch.cat(gains), torch.cat(shifts)


def drift(rgb: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Colour targets ``[B, 3]`` in [-1, 1] under the drift :func:`augment` applied to the pixels."""
    return (rgb * gain + shift).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------- loss


def judge_loss(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The module docstring's loss, averaged over the batch."""
    ce = sum(F.cross_entropy(out[k], t[f"label_{k}"], ignore_index=-1) for k in JUDGE_ATTRIBUTES
             if bool((t[f"label_{k}"] >= 0).any()))
    pat, ori = t["has_pattern"].float(), t["oriented"].float()

    def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean(1)  # [B]

    def sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b) ** 2).sum(1)

    direct = W_COLOUR * (l1(out["rgb"], t["rgb"]) + pat * l1(out["pattern_rgb"], t["pattern_rgb"])) \
        + W_ANGLE * ori * sq(out["angle"], t["angle"])
    swapped = W_COLOUR * (l1(out["rgb"], t["pattern_rgb"]) + pat * l1(out["pattern_rgb"], t["rgb"])) \
        + W_ANGLE * ori * sq(out["angle"], t["angle"] * t["swap_sign"][:, None])
    palette = torch.where(t["swappable"], torch.minimum(direct, swapped), direct)
    period = W_PERIOD * t["periodic"].float() * (out["log_period"][:, 0] - t["log_period"]).abs()
    return ce + palette.mean() + period.mean()


def _batch_targets(t: dict[str, torch.Tensor], idx: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    b = {k: v[idx] for k, v in t.items()}
    b["rgb"], b["pattern_rgb"] = drift(b["rgb"], gain, shift), drift(b["pattern_rgb"], gain, shift)
    return b


# ------------------------------------------------------------------------------------------------ measures


def world_accuracy(judge: Judge, x: torch.Tensor, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Per world attribute, accuracy of ``judge`` on tensors ``x`` (in [-1, 1])."""
    names = list(ATTRIBUTE_NAMES)
    correct = {k: 0 for k in names}
    with torch.no_grad():
        for s in range(0, x.shape[0], 512):
            _, out = judge.net(x[s:s + 512])
            for k in names:
                correct[k] += int((out[k].argmax(1).numpy() == labels[k][s:s + 512]).sum())
    return {k: correct[k] / x.shape[0] for k in names}


def open_palette_errors(judge: Judge, x: torch.Tensor, t: Targets) -> dict[str, float]:
    """Shape and pattern-kind accuracy, colour errors (sRGB 0–255, best assignment for symmetric kinds), period
    error (fraction of the side, periodic kinds) and angle error (degrees, oriented kinds) on tensors ``x``."""
    with torch.no_grad():
        outs = [judge.net(x[s:s + 512])[1] for s in range(0, x.shape[0], 512)]
    out = {k: torch.cat([o[k] for o in outs]).double().numpy() for k in outs[0]}
    kinds = [PATTERN_KINDS[k] for k in t.labels["pattern_kind"]]
    rgb = rgb_from_output
    main, pattern, swapped = colour_pair_errors(rgb(out["rgb"]), rgb(out["pattern_rgb"]), rgb(t.rgb),
                                                rgb(t.pattern_rgb), t.swappable)
    res = {"shape": float(np.mean(out["shape"].argmax(1) == t.labels["shape"])),
           "pattern_kind": float(np.mean(out["pattern_kind"].argmax(1) == t.labels["pattern_kind"]))}
    for name, err in (("colour_error", main), ("pattern_colour_error", pattern[t.has_pattern])):
        res[f"{name}_median"], res[f"{name}_p95"] = float(np.median(err)), float(np.percentile(err, 95))
    per = np.abs(np.exp(out["log_period"][:, 0]) - np.exp(t.log_period))[t.periodic]
    res["period_error_median"], res["period_error_p95"] = float(np.median(per)), float(np.percentile(per, 95))
    sign = np.where(swapped, t.swap_sign, 1.0)[:, None]
    turn = np.arctan2(out["angle"][:, 1], out["angle"][:, 0]) - np.arctan2(t.angle[:, 1] * sign[:, 0],
                                                                            t.angle[:, 0] * sign[:, 0])
    turn = np.abs(np.mod(turn + math.pi, 2 * math.pi) - math.pi) / (2 * math.pi)  # [n] in [0, ½] of a period
    deg = (turn * np.array([ORIENTED_KINDS.get(k, 0.0) for k in kinds]))[t.oriented]
    res["angle_error_median"], res["angle_error_p95"] = float(np.median(deg)), float(np.percentile(deg, 95))
    return res


def heldout_report(judge: Judge, n: int = 2000, seed: int = 1) -> dict[str, float]:
    """:func:`open_palette_errors` on ``n`` subjects of :data:`HELDOUT_SEED` (never trained or tuned on), clean and
    degraded by :func:`augment` (keys ``…_aug``; colour targets drifted with the pixels)."""
    xs, t = subject_set(n, HELDOUT_SEED, seed, judge.config.resolution)
    x = to_input(xs)
    clean = open_palette_errors(judge, x, t)
    xa, gain, shift = augment(x, torch.Generator().manual_seed(seed))
    ta = Targets(**{**t.__dict__, "rgb": drift(torch.from_numpy(t.rgb), gain, shift).numpy(),
                    "pattern_rgb": drift(torch.from_numpy(t.pattern_rgb), gain, shift).numpy()})
    aug = open_palette_errors(judge, xa, ta)
    return {**clean, **{f"{k}_aug": v for k, v in aug.items()}}


# ---------------------------------------------------------------------------------------------- training


def _concat(parts: list[tuple[np.ndarray, Targets]]) -> tuple[np.ndarray, Targets]:
    x = np.concatenate([p[0] for p in parts])
    ts = [p[1] for p in parts]
    fields = {k: np.concatenate([getattr(t, k) for t in ts]) for k in Targets.__dataclass_fields__ if k != "labels"}
    labels = {k: np.concatenate([t.labels[k] for t in ts]) for k in ts[0].labels}
    return x, Targets(labels=labels, **fields)


def train_judge(n_world: int = 16000, n_subjects: int = 24000, n_test: int = 2000, epochs: int = 9,
                batch: int = 128, lr: float = 3e-3, seed: int = 0, resolution: int = 64, pattern_frac: float = 0.3,
                max_seconds: float | None = None, max_shift: int = 0, stem: int = 0) -> tuple[Judge, dict[str, float]]:
    """Train a judge on fresh renders; return it with its world accuracy on held-out world renders (augmented).

    ``judge.config.accuracy`` holds the world accuracies (augmented and ``_clean``), ``judge.config.training`` the
    settings, seconds and the :func:`heldout_report` on the :data:`HELDOUT_SEED` family.
    """
    t0 = time.monotonic()
    x_np, targets = _concat([world_set(n_world, seed, pattern_frac, resolution),
                             subject_set(n_subjects, TRAIN_SEED, seed, resolution)])
    xw_np, tw = world_set(n_test, seed + 1, pattern_frac, resolution)
    xw = to_input(xw_np)
    xw_aug = augment(xw, torch.Generator().manual_seed(seed + 1))[0]
    render_s = time.monotonic() - t0
    log.info("rendered %d + %d + %d images in %.1fs", n_world, n_subjects, n_test, render_s)
    t = targets.torch()
    n = x_np.shape[0]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge(JudgeConfig(resolution=resolution, stem=stem))
    net = judge.net
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch + 1, batch):
            idx = perm[s:s + batch]
            xb, gain, shift = augment(to_input(x_np[idx.numpy()]), gen, max_shift=max_shift)  # [B, 3, R, R]
            loss = judge_loss(net(xb)[1], _batch_targets(t, idx, gain, shift))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                break
        net.eval()
        log.info("epoch %d  loss %.4f  world acc %s  (%.0fs)", epoch, float(loss.detach()),
                 {k: round(v, 4) for k, v in world_accuracy(judge, xw_aug, tw.labels).items()},
                 time.monotonic() - t0)
        net.train()
        if max_seconds is not None and time.monotonic() - t0 > max_seconds:
            break
    net.eval()
    train_s = time.monotonic() - t0
    acc = world_accuracy(judge, xw_aug, tw.labels)
    judge.config.accuracy = {**acc, **{f"{k}_clean": v for k, v in world_accuracy(judge, xw, tw.labels).items()}}
    judge.config.training = {"seed": seed, "n_world": n_world, "n_subjects": n_subjects, "subject_family": TRAIN_SEED,
                             "epochs": epochs, "batch": batch, "lr": lr, "max_shift": max_shift,
                             "threads": torch.get_num_threads(), "render_seconds": round(render_s, 1), "train_seconds": round(train_s, 1)}
    judge.config.heldout = {"family": HELDOUT_SEED, "n": n_test,
                            **{k: round(v, 4) for k, v in heldout_report(judge, n_test).items()}}
    return judge, acc
