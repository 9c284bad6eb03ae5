"""Where a training run's curves go besides ``train_report.json``: ``report_to: tensorboard | wandb | none``.

A :class:`Tracker` takes scalars and images at an optimizer step. The loop logs ``train/loss`` and one
``lr/<group>`` per optimizer parameter group every step; the leakage of every trained weight, eq. 2 of
:mod:`nullbooth.methods.leakage` (``leak/<weight>`` on the preserved features, exact from the statistics run;
``leak_heldout/<weight>`` on held-out prompts, measured) at every validation and checkpoint step; and the
validation images. Only the main process writes; the others get the no-op :class:`Tracker`. Both backends are
optional packages, so a missing one is reported when the tracker is opened, before the first step — on every
process, so no process trains on while another has stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.methods.base import Method
from nullbooth.training.optim import steps_per_epoch
from nullbooth.training.report import leakage_rows

INSTALL = {"tensorboard": 'pip install "nullbooth[tensorboard]"', "wandb": "pip install wandb"}


class Tracker:
    """The interface, and the tracker of ``report_to: none`` and of every process but the main one: logs nothing."""

    active = False  # whether logging reaches anything (the loop skips computing what nobody would see)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Record ``values`` (tag → number) at optimizer step ``step``."""

    def log_images(self, tag: str, images: Sequence[Image.Image], step: int) -> None:
        """Record ``images`` under ``tag`` at optimizer step ``step``."""

    def close(self) -> None:
        """Flush and release the backend; the tracker takes nothing after this."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir`` (``tensorboard --logdir <output_dir>/<logging_dir>``); a resumed run adds a file."""

    active = True

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # checked importable by open_tracker

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_images(self, tag: str, images: Sequence[Image.Image], step: int) -> None:
        # One summary per call: tensorboard tiles the [N, H, W, 3] batch into a grid.
        batch = np.stack([np.asarray(image.convert("RGB")) for image in images])  # [N, H, W, 3] uint8
        self.writer.add_images(tag, batch, step, dataformats="NHWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """An offline wandb run under ``log_dir`` (``wandb sync`` uploads it later); the config is the run's config."""

    active = True

    def __init__(self, log_dir: Path, cfg: Config) -> None:
        import wandb  # checked importable by open_tracker

        self.wandb = wandb
        self.run = wandb.init(project="nullbooth", dir=str(log_dir), mode="offline",
                              config=cfg.model_dump(mode="json"))

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def log_images(self, tag: str, images: Sequence[Image.Image], step: int) -> None:
        self.run.log({tag: [self.wandb.Image(image) for image in images]}, step=step)

    def close(self) -> None:
        self.run.finish()


def check_backend(cfg: Config) -> None:
    """A one-line :class:`NullBoothError` naming the pip command when ``cfg.report_to``'s package is not installed."""
    backend = cfg.report_to
    if backend == "none":
        return
    try:
        if backend == "tensorboard":
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        else:
            import wandb  # noqa: F401
    except ImportError as err:
        raise NullBoothError(f"report_to: {backend} needs the {backend} package, which is not installed ({err}); "
                             f"install it ({INSTALL[backend]}) or set report_to: none") from None


def open_tracker(cfg: Config, main_process: bool) -> Tracker:
    """The tracker ``cfg.report_to`` names, writing into ``<output_dir>/<logging_dir>`` on the main process
    (:func:`check_backend` first, on every process)."""
    check_backend(cfg)
    backend = cfg.report_to
    if backend == "none" or not main_process:
        return Tracker()
    log_dir = Path(cfg.output_dir) / cfg.logging_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    return TensorBoardTracker(log_dir) if backend == "tensorboard" else WandbTracker(log_dir, cfg)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr/<name>`` of every parameter group (its ``name`` key, else ``group<i>``), as the optimizer holds them now."""
    return {f"lr/{group.get('name', f'group{i}')}": float(group["lr"]) for i, group in enumerate(optimizer.param_groups)}


def leakage_scalars(method: Method, preserved: dict | None, heldout: dict | None) -> dict[str, float]:
    """Eq. 2 of every trained weight as it is now, as the report computes it (:func:`leakage_rows`):
    ``leak/<weight>`` on the preserved features, ``leak_heldout/<weight>`` on the held-out prompts."""
    out = {}
    for row in leakage_rows(method, preserved, heldout):
        if row.get("trained", True):
            for key, prefix in (("leak_preserved", "leak"), ("leak_heldout", "leak_heldout")):
                if key in row:
                    out[f"{prefix}/{row['weight']}"] = row[key]
    return out


def validation_interval(cfg: Config, num_instances: int, num_classes: int, processes: int) -> int:
    """Optimizer steps between validations: ``validation_epochs`` epochs when set, else ``validation_steps``.

    An epoch is one pass over diffusers' DreamBooth dataset, as for ``num_train_epochs``: its length is the number
    of instance images, or of class images when prior preservation has more of them."""
    if cfg.validation_epochs is None:
        return cfg.validation_steps
    return cfg.validation_epochs * steps_per_epoch(max(num_instances, num_classes), cfg.train_batch_size, processes,
                                                   cfg.gradient_accumulation_steps)
