"""SDXL pipelines (issue 14): the built-in tiny-sdxl, loading and refusing, sampling, fingerprint, and collection.

The collection check is the issue's "must show": a run's k statistic is the second moment of exactly what the
pipeline feeds attn2 — its own classifier-free-guidance encodings from ``encode_prompt`` (both encoders' penultimate
states concatenated; the negative branch zeros under ``force_zeros_for_empty_prompt``, the encoded empty prompt
otherwise) — on tiny-sdxl and on a second, differently shaped SDXL-like pipeline built here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PROMPTS, write_prompts

from nullbooth.cli.main import main
from nullbooth.conditioning import is_sdxl
from nullbooth.config import config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.models import (
    BUILTIN_MODELS,
    TinyArch,
    TinyXL,
    build_tiny_pipeline,
    check_model_folder,
    load_pipeline,
    materialize_builtin,
)
from nullbooth.runs.collect import collect
from nullbooth.runs.diagnostics import check_model
from nullbooth.runs.identity import model_fingerprint
from nullbooth.runs.layout import load_summed_statistics, read_manifest
from nullbooth.sampling import check_size, default_size, sample
from nullbooth.stats.capture import cross_attention_layers

# A second SDXL-like shape: other encoder widths and depths, pooled and time widths, two blocks per level,
# attention at every level with other transformer counts, and the negative branch encoded from "" instead of zeros.
OTHER_XL = TinyArch(
    text_hidden=24, text_layers=3, text_heads=2, unet_channels=(16, 32), layers_per_block=2, attention_head_dim=2,
    use_linear_projection=True, vae_channels=(16, 32), latent_size=8, norm_groups=8, schedule="sdxl",
    attention_levels=(0, 1), seed=7,
    xl=TinyXL(text_hidden_2=40, text_layers_2=3, text_heads_2=4, projection_dim=20, time_embed_dim=4,
              transformer_layers=(2, 1)),
)


@pytest.fixture(scope="module")
def xl_pipe():
    return load_pipeline("tiny-sdxl")


@pytest.fixture(scope="module")
def other_xl_pipe():
    pipe = build_tiny_pipeline(OTHER_XL)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _config(tmp: Path, model: str = "tiny-sdxl", **nullbooth):
    block = {"original_knowledge_prompts": str(write_prompts(tmp / "prompts.txt")),
             "cov_matrices_output_dir": str(tmp / "cov"), "num_denoising_steps": 2, "collection_batch_size": 2,
             "nullspace_mode": "relative", "nullspace_threshold": 1e-3, **nullbooth}
    return config_from_dict({"pretrained_model_name_or_path": model, "nullbooth": block})


@pytest.fixture(scope="module")
def xl_run(tmp_path_factory, xl_pipe):
    """A complete run on tiny-sdxl: 3 prompts, 2 steps, batches of 2."""
    return collect(_config(tmp_path_factory.mktemp("xl_run")), pipe=xl_pipe, progress=False)


# --------------------------------------------------------------------------- the built-in model


def test_tiny_sdxl_has_sdxl_architecture(xl_pipe):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch = BUILTIN_MODELS["tiny-sdxl"]
    assert isinstance(xl_pipe, StableDiffusionXLPipeline) and is_sdxl(xl_pipe)
    assert type(xl_pipe.text_encoder) is CLIPTextModel and type(xl_pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert (xl_pipe.text_encoder.config.hidden_size, xl_pipe.text_encoder_2.config.hidden_size) == (32, 64)
    assert xl_pipe.text_encoder_2.config.hidden_act == "gelu" and xl_pipe.text_encoder_2.config.projection_dim == 32
    unet = xl_pipe.unet.config
    assert unet.cross_attention_dim == 32 + 64 and unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + 32
    assert xl_pipe.unet.add_embedding.linear_1.in_features == 6 * 8 + 32
    assert list(unet.transformer_layers_per_block) == [1, 1, 2]
    assert unet.down_block_types[0] == "DownBlock2D"  # SDXL: no attention at full latent resolution
    assert any(".transformer_blocks.1.attn2" in l.name for l in cross_attention_layers(xl_pipe.unet))
    assert isinstance(xl_pipe.scheduler, EulerDiscreteScheduler) and xl_pipe.config.force_zeros_for_empty_prompt
    assert (xl_pipe.vae_scale_factor, unet.sample_size, default_size(xl_pipe)) == (4, arch.latent_size, 64)
    assert xl_pipe.vae.config.scaling_factor == 0.13025
    # Both tokenizers give CLIP's ids; only the padding differs: "<|endoftext|>" (49407) and "!" (0), as SDXL's.
    one, two = (tok("a red circle", padding="max_length", max_length=77).input_ids
                for tok in (xl_pipe.tokenizer, xl_pipe.tokenizer_2))
    assert one[:5] == two[:5] == [49406, 320, 736, 7117, 49407]
    assert set(one[5:]) == {49407} and set(two[5:]) == {0}


def test_tiny_sdxl_is_materialized_once_from_its_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("NULLBOOTH_CACHE", str(tmp_path))
    folder = materialize_builtin("tiny-sdxl")
    assert folder.is_relative_to(tmp_path) and materialize_builtin("tiny-sdxl") == folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    assert not list(folder.rglob("*.bin")) and list((folder / "text_encoder_2").glob("*.safetensors"))
    rebuilt = build_tiny_pipeline(BUILTIN_MODELS["tiny-sdxl"])
    assert model_fingerprint(rebuilt) == model_fingerprint(load_pipeline(str(folder)))


# --------------------------------------------------------------------------- sampling


def test_sample_sdxl_per_image_seeds_and_native_size(xl_pipe):
    prompts, seeds = [PROMPTS[0], PROMPTS[1]], [3, 4]
    together = sample(xl_pipe, prompts, seeds, steps=2, guidance=5.0, batch_size=None, output_type="latent")
    alone = sample(xl_pipe, prompts[1:], seeds[1:], steps=2, guidance=5.0, batch_size=1, output_type="latent")
    assert together[0].shape == (4, 16, 16)
    assert float((together[1] - alone[0]).abs().max()) < 1e-4  # fp32 UNet, batch 2 vs 1 (module docstring)
    assert float((together[0] - together[1]).abs().max()) > 1e-2  # other prompt and seed: another image
    image = sample(xl_pipe, prompts[:1], seeds[:1], steps=1, guidance=5.0)[0]
    assert image.size == (64, 64)
    assert check_size(xl_pipe, None) == 64 and check_size(xl_pipe, 32) == 32
    with pytest.raises(NullBoothError, match="multiple of 4 of at least 16"):
        check_size(xl_pipe, 18)


# --------------------------------------------------------------------------- collection


def _cfg_encodings(pipe, prompts: list[str]) -> torch.Tensor:
    """What the SDXL pipeline feeds attn2 under CFG for ``prompts``: [negative; prompt] rows, float64, ``[n, d]``."""
    with torch.no_grad():
        pos, neg, _, _ = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=True)
    both = torch.cat([neg, pos]).double()
    return both.reshape(-1, both.shape[-1])


def _check_k_statistic(run: Path, pipe) -> None:
    E = _cfg_encodings(pipe, PROMPTS)
    layer = read_manifest(run)["layers"][0]["name"]
    got = load_summed_statistics(run)[(layer, "k")]
    assert got.count == E.shape[0] == 2 * len(PROMPTS) * 77
    expected = E.T @ E  # Σ x xᵀ over both CFG branches of every prompt
    assert float((got.sum - expected).norm() / expected.norm()) < 1e-6  # fp32 encoders, batch composition
    assert got.sum.shape == (pipe.unet.config.cross_attention_dim,) * 2


def test_k_statistic_is_second_moment_of_the_pipelines_cfg_encodings(xl_run, xl_pipe):
    _check_k_statistic(xl_run, xl_pipe)
    assert xl_pipe.config.force_zeros_for_empty_prompt
    # The zero negative branch adds rows to the count but nothing to the sum: the prompt branch alone has all of it.
    pos = _cfg_encodings(xl_pipe, PROMPTS)[len(PROMPTS) * 77:]
    summed = load_summed_statistics(xl_run)[(read_manifest(xl_run)["layers"][0]["name"], "k")]
    assert float((summed.sum - pos.T @ pos).norm() / summed.sum.norm()) < 1e-6


def test_k_statistic_on_a_differently_shaped_sdxl(tmp_path, other_xl_pipe):
    run = collect(_config(tmp_path), pipe=other_xl_pipe, progress=False)
    assert other_xl_pipe.unet.config.cross_attention_dim == 24 + 40
    _check_k_statistic(run, other_xl_pipe)
    # With force_zeros_for_empty_prompt off the negative branch is the encoded "" — not zeros, so it counts.
    E = _cfg_encodings(other_xl_pipe, PROMPTS)
    assert float(E[: len(PROMPTS) * 77].norm()) > 0.1 * float(E.norm())
    names = [l["name"] for l in read_manifest(run)["layers"]]
    assert names == [l.name for l in cross_attention_layers(other_xl_pipe.unet)]
    assert any(n.startswith("down_blocks.0.") for n in names)


def test_q_statistic_counts_every_unet_call_of_both_branches(xl_run, xl_pipe):
    """q rows: per timestep, 2 branches × 3 prompts × the layer's latent positions."""
    manifest = read_manifest(xl_run)
    summed = load_summed_statistics(xl_run)
    for layer in manifest["layers"]:
        block, index = layer["name"].split(".")[:2]
        level = {"down_blocks": lambda: int(index), "mid_block": lambda: 2, "up_blocks": lambda: 2 - int(index)}[block]()
        side = 16 >> level  # tiny-sdxl's 16×16 latent, halved per level
        assert summed[(layer["name"], "q")].count == 2 * 2 * len(PROMPTS) * side * side


def test_cli_collect_on_tiny_sdxl(tmp_path, capsys):
    cfg = _config(tmp_path, num_denoising_steps=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    assert main(["collect", "--config", str(path)]) == 0
    runs = [p for p in (tmp_path / "cov").iterdir() if (p / "manifest.json").is_file()]
    assert len(runs) == 1 and read_manifest(runs[0])["status"] == "complete"
    assert read_manifest(runs[0])["identity"]["model"]["text_widths"] == [32, 64]


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_covers_second_encoder_and_its_padding(xl_run, xl_pipe):
    check_model(xl_run, xl_pipe, statistics=False)  # its own model: accepted
    other = build_tiny_pipeline(BUILTIN_MODELS["tiny-sdxl"])
    assert model_fingerprint(other) == model_fingerprint(xl_pipe)
    with torch.no_grad():
        other.text_encoder_2.text_projection.weight[0, 0] += 1e-3
    assert model_fingerprint(other)["weights_sha256"] != model_fingerprint(xl_pipe)["weights_sha256"]
    with pytest.raises(NullBoothError, match="collected on different weights"):
        check_model(xl_run, other, statistics=False)
    repadded = build_tiny_pipeline(BUILTIN_MODELS["tiny-sdxl"])
    repadded.tokenizer_2.pad_token = "<|endoftext|>"  # encodes every prompt's padding differently
    assert model_fingerprint(repadded)["weights_sha256"] != model_fingerprint(xl_pipe)["weights_sha256"]
    fp = model_fingerprint(xl_pipe)
    assert (fp["text_width"], fp["text_widths"]) == (96, [32, 64])


def test_sd_fingerprint_keeps_its_fields(tiny_pipe):
    assert set(model_fingerprint(tiny_pipe)) == {"unet_class", "text_width", "weights_sha256"}


# --------------------------------------------------------------------------- loading and refusing


def _index(folder: Path, index: dict) -> Path:
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_unsupported_families_and_incomplete_sdxl_are_one_line(tmp_path):
    for family in ("StableDiffusion3Pipeline", "FluxPipeline"):
        with pytest.raises(NullBoothError, match=f"holds a {family}.*supports Stable Diffusion 1.x / 2.x and SDXL"):
            load_pipeline(str(_index(tmp_path / family, {"_class_name": family})))
    index = json.loads((materialize_builtin("tiny-sdxl") / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    with pytest.raises(NullBoothError, match="holds a StableDiffusionXLPipeline without text_encoder_2 "):
        check_model_folder(_index(tmp_path / "no_te2", index))
