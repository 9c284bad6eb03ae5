"""benchmarks/bench_realsize.py: its pipelines are the public SD 1.5 / SD 2.1 / SDXL architectures, and its analytic
tables hold the hand-computed numbers.

Everything here is built on the meta device (no weights), so it is fast; the measured half of the benchmark
(subprocesses on real-size random-weight models) is its own run, not a test. Counts are exact integers (tolerance 0).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_realsize.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_realsize", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_realsize"] = module
    spec.loader.exec_module(module)
    return module


def attn2(unet) -> list:
    return [m for name, m in unet.named_modules() if name.endswith("attn2")]


def test_sd15_analytic_tables_match_hand_computed(bench):
    """SD 1.5 at 512 px: 64² tokens at 320 wide (5 attn2 layers), 32² at 640 (5), 16² at 1280 (5), 8² (mid, 1)."""
    sd15 = bench.FAMILIES["sd15"]
    cost = bench.unet_costs(sd15, 512)
    per_feature = 5 * 64**2 * 320**2 + 5 * 32**2 * 640**2 + 5 * 16**2 * 1280**2 + 8**2 * 1280**2
    assert cost["moment_flops"] == 2 * 2 * per_feature == 25_585_254_400  # q and out, 2 FLOPs per multiply-add
    assert cost["text_moment_flops_per_prompt"] == 2 * 77 * 768**2
    assert cost["attn2_layers"] == 16
    # The UNet's own count is the flop counter's; SD 1.5 is ≈ 0.8 TFLOP per image at 512 px (≈ 400 G multiply-adds).
    assert 0.78e12 < cost["unet_flops"] < 0.83e12
    assert cost["moment_share"] == pytest.approx(per_feature * 4 / cost["unet_flops"], rel=0)

    acc = bench.accumulator_memory(sd15, steps=50)
    entries = 2 * (5 * 320**2 + 5 * 640**2 + 6 * 1280**2)  # q and out matrices of the 16 layers, one timestep
    assert acc["per_timestep_float64_bytes"] == 8 * entries * 50 == 9_912_320_000
    assert acc["per_timestep_float32_bytes"] == 4 * entries * 50
    assert acc["summed_float64_bytes"] == 8 * (entries + 768**2)
    assert acc["q_widths"] == {"320": 5, "640": 5, "1280": 6}

    model = bench.model_memory(sd15)
    assert model["params"] == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}  # published counts
    assert model["float32_bytes"] == 4 * (859_520_964 + 83_653_863 + 123_060_480)


def test_sd15_pipeline_matches_public_config(bench):
    pipe = bench.build_pipeline(bench.FAMILIES["sd15"], device="meta")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    unet = pipe.unet.config
    assert unet.cross_attention_dim == 768 and tuple(unet.block_out_channels) == (320, 640, 1280, 1280)
    assert unet.attention_head_dim == 8 and not unet.use_linear_projection and unet.sample_size == 64
    assert len(attn2(pipe.unet)) == 16
    text = pipe.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_act) == (768, 12, "quick_gelu")
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and len(pipe.tokenizer) == 49408


def test_sd21_pipeline_matches_public_config(bench):
    pipe = bench.build_pipeline(bench.FAMILIES["sd21"], device="meta")
    unet = pipe.unet.config
    assert unet.cross_attention_dim == 1024 and tuple(unet.attention_head_dim) == (5, 10, 20, 20)
    assert unet.use_linear_projection and unet.upcast_attention and unet.sample_size == 96
    assert len(attn2(pipe.unet)) == 16 and pipe.unet.down_blocks[0].attentions[0].proj_in.__class__.__name__ == "Linear"
    text = pipe.text_encoder.config  # OpenCLIP ViT-H/14's text tower without its last layer
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.hidden_act) == (1024, 23, 16, "gelu")
    assert pipe.scheduler.config.prediction_type == "v_prediction" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0  # OpenCLIP pads with "!"
    assert sum(p.numel() for p in pipe.unet.parameters()) == 865_910_724


def test_sdxl_pipeline_matches_public_config(bench):
    pipe = bench.build_pipeline(bench.FAMILIES["sdxl"], device="meta")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    unet = pipe.unet.config
    assert unet.cross_attention_dim == 2048 and unet.addition_time_embed_dim == 256
    assert tuple(unet.transformer_layers_per_block) == (1, 2, 10) and unet.projection_class_embeddings_input_dim == 2816
    layers = attn2(pipe.unet)
    assert len(layers) == 70 and {m.to_k.in_features for m in layers} == {2048}
    assert sorted({m.to_q.in_features for m in layers}) == [640, 1280]
    assert pipe.text_encoder.config.hidden_size == 768
    two = pipe.text_encoder_2
    assert type(two).__name__ == "CLIPTextModelWithProjection"
    assert (two.config.hidden_size, two.config.num_hidden_layers, two.config.projection_dim) == (1280, 32, 1280)
    # the pooled text_embeds (1280) and six 256-wide size embeddings feed the added time embedding
    assert two.config.projection_dim + 6 * unet.addition_time_embed_dim == unet.projection_class_embeddings_input_dim
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.config.force_zeros_for_empty_prompt
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert sum(p.numel() for p in pipe.unet.parameters()) == 2_567_463_684
    acc = bench.accumulator_memory(bench.FAMILIES["sdxl"], steps=50)
    assert acc["per_timestep_float64_bytes"] == 8 * 50 * 2 * (10 * 640**2 + 60 * 1280**2)  # ≈ 82 GB
