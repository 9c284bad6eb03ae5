"""Pictures: recorded attention maps, covariance summaries, HTML reports, comparison grids, `visualize` CLI."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPTS, small_config
from PIL import Image

from nullbooth.cli.visualize import register_cli
from nullbooth.errors import NullBoothError
from nullbooth.report.attention import attention_grid, overlay
from nullbooth.report.covariance import plot_covariance_summaries, spectrum_in_mode_units
from nullbooth.report.observers import AttentionMapObserver
from nullbooth.report.run_report import write_run_report
from nullbooth.report.training_report import render_training_report
from nullbooth.runs.attention import (
    PADDING,
    AttentionMaps,
    display_tokens,
    grid_shape,
    record_attention,
    upsample_map,
)
from nullbooth.runs.collect import collect
from nullbooth.runs.layout import load_covariance_data, read_manifest, timestep_dirname
from nullbooth.runs.plan import make_plan
from nullbooth.stats.capture import (
    cross_attention_layers,
    record_inputs,
    record_timestep,
)
from nullbooth.stats.nullspace import null_dimension

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _processors(pipe) -> list:
    return [l.module.processor for l in cross_attention_layers(pipe.unet)]


def _sample(pipe, prompts, plan, observer=None, *, steps=2, capture=None):
    """Latents of ``prompts`` (fixed seeds); with an observer's context around the call, as collect() does."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with record_timestep(pipe.unet) as timestep:
        def sink(layer, feature, x):
            capture.setdefault((layer.name, feature, timestep[0]), x.detach().clone())

        with record_inputs(plan.layers, ["q", "k"] if capture is not None else [], sink):
            ctx = observer.batch(pipe, plan, 0, prompts, timestep) if observer else torch.no_grad()
            with ctx:
                return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=generators,
                            output_type="latent", height=plan.height, width=plan.width).images


# --------------------------------------------------------------------------- recording


@pytest.mark.parametrize("which", ["tiny_pipe", "tiny_pipe2"])
def test_recorded_maps_are_the_softmax_the_layer_applied(which, request, tmp_path):
    """Maps sum to 1 over tokens at every pixel and equal softmax(QKᵀ/√d) recomputed in float64 from the
    inputs to_q/to_k really received; the pipeline output is unchanged; processors are restored."""
    pipe = request.getfixturevalue(which)
    prompts = PROMPTS[:2]
    plan = make_plan(small_config(tmp_path), pipe, prompts)
    before = _processors(pipe)
    plain = _sample(pipe, prompts, plan)
    observer = AttentionMapObserver(1)  # only the first prompt
    captured: dict = {}
    observed = _sample(pipe, prompts, plan, observer, capture=captured)

    assert all(a is b for a, b in zip(_processors(pipe), before))
    # The classic bmm attention vs the fused SDPA kernel: float32 round-off only, through 2 CFG steps.
    assert float((observed - plain).abs().max()) <= 2e-5 * float(plain.abs().max())

    maps = observer.recorded
    assert set(maps.prompts) == {0}
    assert {layer for _, layer, _ in maps.maps} == {l.name for l in plan.layers}
    assert len(maps.timesteps) == 2
    tokens, n_real = display_tokens(pipe.tokenizer, prompts[0])
    assert maps.tokens[0] == tokens and tokens[0] == "<sot>" and tokens[-1] == "<eot>"
    B = len(prompts)
    for (p, name, t), m in maps.maps.items():
        layer = next(l for l in plan.layers if l.name == name)
        attn = layer.module
        assert m.shape[0] == n_real + 1
        assert torch.allclose(m.sum(0), torch.ones(m.shape[1:]), atol=1e-5)  # softmax rows sum to 1
        hidden, text = captured[(name, "q", t)], captured[(name, "k", t)]
        assert hidden.shape[0] == 2 * B  # CFG: [unconditional, conditional]
        with torch.no_grad():
            q = attn.to_q(hidden[B + p]).double()  # conditional row of prompt p: [N, inner]
            k = attn.to_k(text[B + p]).double()  # [T, inner]
        heads = attn.heads
        qh = q.view(q.shape[0], heads, -1).transpose(0, 1)  # [H, N, d]
        kh = k.view(k.shape[0], heads, -1).transpose(0, 1)  # [H, T, d]
        probs = torch.softmax(qh @ kh.transpose(1, 2) / qh.shape[-1] ** 0.5, dim=-1).mean(0)  # [N, T]
        expected = torch.cat([probs[:, :n_real], probs[:, n_real:].sum(-1, keepdim=True)], -1).T
        assert float((m.double().reshape(expected.shape) - expected).abs().max()) < 1e-6  # fp32 vs fp64


def test_processors_restored_on_error(tiny_pipe):
    layers = cross_attention_layers(tiny_pipe.unet)
    before = _processors(tiny_pipe)

    def boom(*_):
        raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"):
        with record_attention(layers, [1], boom, batch_size=2) as recorded:
            assert len(recorded) == len(layers)
            assert all(type(l.module.processor).__name__ == "RecordingAttnProcessor" for l in layers)
            tiny_pipe("x", num_inference_steps=1, output_type="latent")
    assert all(a is b for a, b in zip(_processors(tiny_pipe), before))


def test_grid_shapes_and_upsampling():
    assert grid_shape(32 * 32, (32, 32)) == (32, 32)
    assert grid_shape(16 * 12, (64, 48)) == (16, 12)
    assert grid_shape(5 * 4, (9, 7)) == (5, 4)  # stride-2 convs round up
    with pytest.raises(NullBoothError):
        grid_shape(7, (32, 32))
    m = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    up = upsample_map(m, (8, 8))
    assert up.shape == (1, 8, 8) and np.isclose(up.mean(), m.mean())  # bilinear keeps the mean here
    assert up[0, 0, 0] == 0 and up[0, -1, -1] == 3


# --------------------------------------------------------------------------- a collection run with pictures


@pytest.fixture(scope="module")
def pictured_run(tmp_path_factory, tiny_pipe):
    """3 prompts in batches of 2, 2 steps, maps for the first 2 prompts (both in batch 0)."""
    tmp = tmp_path_factory.mktemp("pictures")
    cfg = small_config(tmp, num_denoising_steps=2, visual_attention_map=True, attention_map_prompts=2)
    observer = AttentionMapObserver.from_config(cfg)
    run = collect(cfg, pipe=tiny_pipe, progress=False, observers=[observer])
    return run, observer


def _valid_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_collection_writes_attention_pictures(pictured_run):
    run, observer = pictured_run
    manifest = read_manifest(run)
    vis = run / "visualizations"
    assert len(manifest["timesteps"]) == 2
    for t in manifest["timesteps"]:
        for layer in manifest["layers"]:
            w, h = _valid_png(vis / timestep_dirname(t) / f"{layer['dir']}.png")
            assert w > 500 and h > 200
    maps = AttentionMaps.load(vis / "attention_maps")
    assert set(maps.prompts) == {0, 1}  # prompt 2 was not chosen
    assert maps.prompts[0] == PROMPTS[0] and maps.images[0].size == (64, 64)
    for key, m in observer.recorded.maps.items():  # saved as float16
        assert torch.allclose(maps.maps[key], m, atol=1e-3)
    index = json.loads((vis / "attention_maps" / "index.json").read_text())
    mass = index["token_mass"][f"000000/{manifest['layers'][0]['name']}/{manifest['timesteps'][0]:04d}"]
    assert abs(sum(mass) - 1) < 1e-3  # the shares of a row sum to 100 %
    for name in ("covariance_statistics.png", "null_space_dim.png", "spectra_by_timestep.png"):
        _valid_png(vis / "covariance_summaries" / name)
    assert (vis / "report.html").is_file()


def test_attention_grid_pixels_follow_the_maps(pictured_run):
    run, observer = pictured_run
    maps = observer.recorded
    layer, t = maps.layers[0], maps.timesteps[-1]
    grid = attention_grid(maps, layer, t, cell=96)
    m = maps.maps[(0, layer, t)].numpy()
    cells = grid.info["cells"]
    assert len([c for (p, c) in cells if p == 0]) == m.shape[0] + 1  # image + tokens + padding
    assert maps.tokens[0][1] == "a" and [*maps.tokens[0], PADDING][-1] == PADDING
    base = np.asarray(maps.images[0].resize((96, 96), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    up = upsample_map(m, (96, 96))
    arr = np.asarray(grid, dtype=np.int16)
    for c in (1, 3, m.shape[0]):  # <sot>, a word, padding
        x0, y0, x1, y1 = cells[(0, c)]
        expected = np.clip(np.rint(overlay(base, up[c - 1]) * 255), 0, 255)
        assert np.abs(arr[y0:y1, x0:x1] - expected).max() <= 1
    x0, y0, x1, y1 = cells[(0, 0)]
    assert np.abs(arr[y0:y1, x0:x1] - np.rint(base * 255)).max() <= 1


@pytest.mark.slow
def test_heatmap_draws_the_stored_null_dims(pictured_run, tiny_pipe, tmp_path):
    run, _ = pictured_run
    summary, drawn = plot_covariance_summaries(run, tmp_path)
    manifest = read_manifest(run)
    assert summary.timesteps == sorted(manifest["timesteps"], reverse=True)
    for f in manifest["features"]:
        expected = np.array([[load_covariance_data(t, layer["name"], f, run)["metadata"]["null_space_dim"]
                              for t in summary.timesteps] for layer in manifest["layers"]])
        np.testing.assert_array_equal(drawn[f"null_space_dim/{f}"], expected)
        np.testing.assert_array_equal(summary.null_dim[f], expected)
    saved = json.loads((tmp_path / "covariance_statistics.json").read_text())
    assert saved["null_space_dim"]["q"] == summary.null_dim["q"].tolist()
    # Sample counts of layer 0 (the first cross-attention, in down block ℓ at (latent / 2^ℓ)² pixels): q rows =
    # 3 prompts × 2 (CFG) × pixels × 2 timesteps; text rows = 3 prompts × 2 × 77 tokens (once, whatever the timesteps).
    level = int(cross_attention_layers(tiny_pipe.unet)[0].name.split(".")[1])
    pixels = (tiny_pipe.unet.config.sample_size // 2**level) ** 2
    assert summary.summed_count["q"][0] == 3 * 2 * pixels * 2
    assert summary.summed_count["k"][0] == summary.summed_count["v"][0] == 3 * 2 * 77
    assert (summary.n_samples["q"][0] == 3 * 2 * pixels).all()


@pytest.mark.parametrize("mode,threshold", [("absolute", 1e-2), ("relative", 1e-3), ("energy", 1e-4),
                                            ("rank", 20), ("percentile", 10.0)])
def test_threshold_line_separates_the_null_space(pictured_run, mode, threshold):
    """In the drawn units, the points beyond the threshold line are exactly the null-space eigenvalues."""
    run, _ = pictured_run
    from nullbooth.runs.layout import load_summed_statistics
    from nullbooth.stats.nullspace import spectrum

    stat = next(iter(load_summed_statistics(run).values()))
    lam = spectrum(stat.moment()).eigenvalues
    k = null_dimension(lam, mode, threshold)
    x, y, _, _, line = spectrum_in_mode_units(lam.numpy()[::-1], mode, threshold)
    if mode in ("rank", "percentile"):
        beyond = int((x > line).sum())
    elif mode == "energy":
        beyond = int((y <= line).sum())
    else:
        beyond = int((y < line).sum())
    if mode == "percentile":  # the quantile interpolates between ranks: within one eigenvalue
        assert abs(beyond - k) <= 1
    else:
        assert beyond == k


# --------------------------------------------------------------------------- CLI and reports


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse_html(path: Path) -> _Images:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    parser = _Images()
    parser.feed(text)
    parser.close()
    assert not parser.stack
    for src in parser.srcs:  # every picture embedded, decodable
        head, data = src.split(",", 1)
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    return parser


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nullbooth")
    register_cli(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.slow
def test_cli_visualize_writes_a_self_contained_report(pictured_run, tmp_path, capsys):
    run, _ = pictured_run
    out = tmp_path / "out"
    assert _cli(["visualize", str(run), "--out", str(out), "--attention-maps"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    manifest = read_manifest(run)
    n_attention = len(manifest["timesteps"]) * len(manifest["layers"])
    assert len(list(out.glob("timestep_*/*.png"))) == n_attention  # re-rendered from the saved maps
    page = _parse_html(out / "report.html")
    assert len(page.srcs) == 3 + n_attention  # 3 covariance pictures + every attention grid
    text = " ".join(page.text)
    for layer in manifest["layers"]:
        assert layer["name"] in text  # the inspect table
    assert "nullbooth.nullspace_threshold" in text and PROMPTS[0] in text
    # Fewer timesteps on request (the report alone; the plots are already there).
    write_run_report(run, out, max_attention_timesteps=1)
    assert len(_parse_html(out / "report.html").srcs) == 3 + len(manifest["layers"])


def test_cli_visualize_needs_a_run(tmp_path, pictured_run):
    with pytest.raises(NullBoothError, match="run directory|manifest"):
        _cli(["visualize", str(tmp_path)])
    run = tmp_path / pictured_run[0].name  # a run collected without attention maps
    shutil.copytree(pictured_run[0], run, ignore=shutil.ignore_patterns("visualizations"))
    with pytest.raises(NullBoothError, match="no saved attention maps"):
        _cli(["visualize", str(run), "--attention-maps"])
    assert not (run / "visualizations").exists()  # refused before writing anything


def test_training_report(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(4)]
    report = {
        "title": "run 7", "method": "nullbooth", "steps": 50, "final_loss": 0.0123,
        "loss": [1.0 / (i + 1) for i in range(50)],
        "leakage": {"down_blocks.0.attentions.0.transformer_blocks.0.attn2": {"to_k": 1e-7, "to_v": 2e-7},
                    "mid_block.attentions.0.transformer_blocks.0.attn2": {"to_k": 0.3, "to_v": 0.25}},
        "evaluation": [{"prompt": "a dog", "clip": 0.31}],
    }
    path = render_training_report(report, tmp_path / "train" / "report.html", [("a sks dog", images[0])])
    page = _parse_html(path)
    assert len(page.srcs) == 3  # loss curve, leakage bars, one validation image
    text = " ".join(page.text)
    assert "run 7" in text and "0.25" in text and "a sks dog" in text and "a dog" in text
