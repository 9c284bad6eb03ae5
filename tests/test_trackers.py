"""``report_to`` trackers and ``validation_epochs`` on tiny-sd (16 px images, a few steps).

What is checked against independent values:
- the tensorboard event files, read back with tensorboard's own ``EventAccumulator``, hold every step's loss of
  ``train_report.json`` (equal in float32, the precision tensorboard stores), the learning rate each step used
  (a linear schedule, recomputed here), the leakage of every trained weight at the validation and checkpoint
  steps (equal to the report's at the end) and the validation images;
- ``validation_epochs`` validates every ``epochs × steps_per_epoch`` steps (steps_per_epoch worked out by hand);
- a missing tracker package is one line naming the pip command, before the first step; ``none`` writes no logs.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import subject_images, write_prompts
from PIL import Image

from nullbooth.config import config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.filenames import VALIDATION_DIR
from nullbooth.models import load_pipeline
from nullbooth.training.loop import train
from nullbooth.training.optim import steps_per_epoch
from nullbooth.training.trackers import open_tracker, validation_interval

RES = 16
LR = 1e-3
PRIOR = ["a red circle on the left", "a small blue square", "a photo of a dog", "a green triangle at the top"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    return {"tmp": tmp, "instance": subject_images(tmp / "instance"),  # 3 images
            "prompts": write_prompts(tmp / "prior.txt", PRIOR)}


def make_cfg(world, out: str, **overrides):
    data = {
        "pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": 5,
        "instance_data_dir": str(world["instance"]), "instance_prompt": "a photo of sks dog",
        "output_dir": str(world["tmp"] / out), "max_train_steps": 3, "checkpointing_steps": 100,
        "learning_rate": LR, "generate": {"num_inference_steps": 2},
        "nullbooth": {"original_knowledge_prompts": str(world["prompts"]),
                      "cov_matrices_output_dir": str(world["tmp"] / "cov"), "num_denoising_steps": 2,
                      "collection_batch_size": 4, "nullspace_mode": "relative", "nullspace_threshold": 1e-2},
        **overrides,
    }
    return config_from_dict(data)


def read_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})  # 0: keep every event
    events.Reload()
    return events


def test_tensorboard_holds_loss_lr_leakage_and_validation_images(world):
    cfg = make_cfg(world, "tb", report_to="tensorboard", lr_scheduler="linear", validation_prompt="a sks dog",
                   validation_steps=2, num_validation_images=2)
    report = train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
    log_dir = Path(cfg.output_dir) / "logs"
    assert list(log_dir.glob("events.out.tfevents.*"))
    events = read_events(log_dir)
    scalars = events.Tags()["scalars"]

    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    np.testing.assert_array_equal([e.value for e in loss], np.float32(report["losses"]))  # exact in float32

    # The rate step s used: linear decay from LR to 0 over 3 steps, no warm-up → LR·(3 − (s − 1))/3.
    lr = events.Scalars("lr/unet")
    np.testing.assert_allclose([e.value for e in lr], [LR, LR * 2 / 3, LR / 3], rtol=1e-6)

    trained = [r for r in report["weights"] if r.get("trained", True)]
    assert trained and all("leak_preserved" in r for r in trained)
    for row in trained:
        leak = events.Scalars(f"leak/{row['weight']}")
        assert [e.step for e in leak] == [2, 3]  # validation at 2; validation and the final checkpoint at 3
        assert leak[-1].value == pytest.approx(row["leak_preserved"], rel=1e-6)  # float32 storage
        assert leak[-1].value > 0  # the weight did move
    assert len([t for t in scalars if t.startswith("leak/")]) == len(trained)

    images = events.Images("validation")
    assert [e.step for e in images] == [2, 3]
    assert (images[0].height, images[0].width) == (RES, 2 * RES)  # 2 images tiled in a row


def test_validation_epochs_and_report_to_none(world):
    # 3 instance images, batches of 2 on 1 process, no accumulation: ceil(3 / 2) = 2 steps an epoch.
    cfg = make_cfg(world, "epochs", max_train_steps=5, train_batch_size=2, validation_prompt="a sks dog",
                   validation_steps=1, validation_epochs=1, num_validation_images=1, method="dreambooth")
    train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in (out / VALIDATION_DIR).iterdir()) == [
        "step-000002.png", "step-000004.png", "step-000005.png"]  # epochs 1 and 2, and the end
    assert not (out / "logs").exists()


def test_steps_per_epoch_and_interval(world):
    assert steps_per_epoch(3, 1, 1, 1) == 3
    assert steps_per_epoch(5, 2, 2, 2) == 1  # ceil(5 / 4) = 2 micro-steps → 1 step
    assert steps_per_epoch(10, 1, 1, 3) == 4  # ceil(10 / 3)
    assert steps_per_epoch(9, 2, 1, 2) == 3  # ceil(ceil(9 / 2) / 2) = ceil(5 / 2)
    assert validation_interval(make_cfg(world, "x", validation_steps=7), 3, 0, 1) == 7
    assert validation_interval(make_cfg(world, "x", validation_steps=7, validation_epochs=2, train_batch_size=2,
                                        gradient_accumulation_steps=2), 9, 0, 1) == 2 * 3  # 2 epochs of 3 steps
    # With prior preservation an epoch is as long as the larger image set (diffusers' DreamBooth dataset).
    assert validation_interval(make_cfg(world, "x", validation_epochs=1), 3, 5, 1) == 5


@pytest.mark.parametrize("backend, module, pip", [
    ("wandb", "wandb", "pip install wandb"),
    ("tensorboard", "torch.utils.tensorboard", 'pip install "nullbooth[tensorboard]"'),
])
def test_missing_tracker_package_is_one_line(world, monkeypatch, backend, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # what Python does when the package is not installed
    monkeypatch.setitem(sys.modules, backend, None)
    cfg = make_cfg(world, f"missing-{backend}", report_to=backend)
    for main in (True, False):  # every process stops, not only the one that would log
        with pytest.raises(NullBoothError) as err:
            open_tracker(cfg, main)
        assert pip in str(err.value) and "\n" not in str(err.value)
    assert not Path(cfg.output_dir).exists()


def test_missing_wandb_stops_train_before_the_first_step(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = make_cfg(world, "missing-train", report_to="wandb")
    steps = []
    with pytest.raises(NullBoothError, match="pip install wandb"):
        train(cfg, pipe=load_pipeline("tiny-sd"), progress=False, on_step=lambda step, loss: steps.append(step))
    assert steps == []
    assert not list(Path(cfg.output_dir).glob("checkpoint-*"))


def test_wandb_tracker_logs_offline_under_logging_dir(world, monkeypatch):
    """wandb is not installed here: a stand-in records the calls, so this checks how the documented API
    (``wandb.init(mode="offline", dir=...)``, ``run.log(..., step=)``, ``wandb.Image``, ``run.finish``) is used."""
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=lambda image: ("image", image.size)))
    cfg = make_cfg(world, "wandb", report_to="wandb", logging_dir="wb")
    with open_tracker(cfg, main_process=True) as tracker:
        tracker.log_scalars({"train/loss": 0.5, "lr/group0": LR}, 1)
        tracker.log_images("validation", [Image.new("RGB", (RES, RES))] * 2, 2)
    (_, init_kwargs), *logged = calls
    assert init_kwargs["mode"] == "offline" and init_kwargs["dir"] == str(Path(cfg.output_dir) / "wb")
    assert init_kwargs["config"]["report_to"] == "wandb"
    assert (Path(cfg.output_dir) / "wb").is_dir()
    assert logged == [("log", {"train/loss": 0.5, "lr/group0": LR}, 1),
                      ("log", {"validation": [("image", (RES, RES))] * 2}, 2), ("finish",)]


def test_only_the_main_process_writes(world):
    cfg = make_cfg(world, "other-process", report_to="tensorboard")
    with open_tracker(cfg, main_process=False) as tracker:
        assert not tracker.active
        tracker.log_scalars({"train/loss": 1.0}, 1)
    assert not Path(cfg.output_dir).exists()
