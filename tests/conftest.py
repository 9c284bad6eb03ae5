"""Shared fixtures: built-in tiny pipelines (built once per session) and small collection configs."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# As the CLI sets it (nullbooth.cli.main): MKL results that depend on the inputs only, not on memory alignment.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors: one thread is faster than two, and much faster on a loaded shared machine.
torch.set_num_threads(1)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

PROMPTS = ["a red circle on the left", "a small blue square", "a green triangle at the top, white background"]


@pytest.fixture(scope="module")
def scripts_importable():
    """``scripts/`` on ``sys.path`` for a test module: the gate scripts are imported by name, as the training
    script imports them from beside it."""
    sys.path.insert(0, str(SCRIPTS))
    yield SCRIPTS
    sys.path.remove(str(SCRIPTS))


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


def other_sdxl_pipeline():
    """An SDXL-like pipeline unlike tiny-sdxl: encoders 32 + 48 wide (attn2 reads 80), projection 32, two levels."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from nullbooth.models import build_clip_tokenizer

    torch.manual_seed(0)
    tok = build_clip_tokenizer()
    clip = dict(vocab_size=49408, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, **clip))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=96, projection_dim=32, **clip))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=80, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32, transformer_layers_per_block=(1, 2),
        norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True)


def interrupt_after(pipe, calls: int):
    """Make the UNet raise on its ``calls + 1``-th forward: a run killed in the middle of a step."""
    count = [0]

    def hook(_module, _args):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt("simulated kill")

    pipe.unet.register_forward_pre_hook(hook)
    return pipe


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def budget_world(tmp: Path, prior: list[str]) -> dict:
    """Instance images and a prior-prompt list under ``tmp``: the inputs of :func:`budgeted_config`."""
    return {"tmp": tmp, "instance": subject_images(tmp / "instance"), "prompts": write_prompts(tmp / "prior.txt", prior)}


def budgeted_config(world: dict, out: str, *, epsilon: float, learning_rate: float, nullbooth: dict | None = None,
                    **top) -> dict:
    """A 4-step training config on tiny-sd at 16 px under a leakage budget ``epsilon`` over the whole input space
    (rank threshold 0); ``nullbooth`` and ``top`` override its block and top-level keys."""
    nb = {"original_knowledge_prompts": str(world["prompts"]), "cov_matrices_output_dir": str(world["tmp"] / "cov"),
          "num_denoising_steps": 2, "collection_batch_size": 4, "nullspace_mode": "rank", "nullspace_threshold": 0,
          "leakage_budget": epsilon, **(nullbooth or {})}
    return {"pretrained_model_name_or_path": "tiny-sd", "resolution": 16, "seed": 3,
            "instance_data_dir": str(world["instance"]), "instance_prompt": "a photo of sks dog",
            "output_dir": str(world["tmp"] / out), "max_train_steps": 4, "checkpointing_steps": 100,
            "learning_rate": learning_rate, "nullbooth": nb, **top}


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
