"""Shared fixtures: built-in tiny pipelines (built once per session) and small collection configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors: one thread is faster than two, and much faster on a loaded shared machine.
torch.set_num_threads(1)

PROMPTS = ["a red circle on the left", "a small blue square", "a green triangle at the top, white background"]


@pytest.fixture(scope="session")
def tiny_pipe():
    from nullbooth.models import load_pipeline

    return load_pipeline("tiny-sd")


@pytest.fixture(scope="session")
def tiny_pipe2():
    from nullbooth.models import load_pipeline

    return load_pipeline("tiny-sd2")


def subject_images(folder: Path, sizes=((20, 24), (24, 24), (28, 24))) -> Path:
    """Striped teal/pink squares at odd sizes (a personalisation subject), one PNG per size."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        a = np.zeros((h, w, 3), np.uint8)
        stripes = (np.add.outer(np.arange(h), np.arange(w)) // 3) % 2 == 0
        a[stripes], a[~stripes] = (0, 160, 160), (250, 110, 185)
        Image.fromarray(a).save(folder / f"subject_{i}.png")
    return folder


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def small_config(tmp_path: Path, **nullbooth):
    from nullbooth.config import config_from_dict

    block = {
        "original_knowledge_prompts": str(write_prompts(tmp_path / "prompts.txt")),
        "cov_matrices_output_dir": str(tmp_path / "cov"),
        "num_denoising_steps": 3,
        "collection_batch_size": 2,
        "nullspace_mode": "relative",
        "nullspace_threshold": 1e-3,
        **nullbooth,
    }
    return config_from_dict({"pretrained_model_name_or_path": "tiny-sd", "nullbooth": block})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_pipe):
    """One complete collection run on tiny-sd: 3 prompts, 3 steps, batches of 2."""
    from nullbooth.runs.collect import collect

    tmp = tmp_path_factory.mktemp("run")
    cfg = small_config(tmp)
    return collect(cfg, pipe=tiny_pipe, progress=False), cfg


def random_adapter(folder: Path, scale: float) -> Path:
    """A nullbooth adapter on tiny-sd with random half-width null spaces and random ``M`` (× ``scale``), saved in
    ``folder``; the unet is returned with the adapters still injected (for exports)."""
    from nullbooth.methods.adapter_files import save_adapter
    from nullbooth.methods.adapters import adapter_targets, inject_null_space_adapters
    from nullbooth.models import load_pipeline

    pipe = load_pipeline("tiny-sd")
    g = torch.Generator().manual_seed(0)
    bases = {}
    for path, linear in adapter_targets(pipe.unet).items():
        Q, _ = torch.linalg.qr(torch.randn(linear.in_features, linear.in_features, generator=g, dtype=torch.float64))
        bases[path] = Q[:, : linear.in_features // 2]  # [in, k], orthonormal
    with torch.no_grad():
        for w in inject_null_space_adapters(pipe.unet, bases).values():
            w.M.copy_(torch.randn(w.M.shape, generator=g) * scale)
    save_adapter(folder, pipe.unet, {"method": "nullbooth", "pretrained_model_name_or_path": "tiny-sd"})
    return pipe.unet
