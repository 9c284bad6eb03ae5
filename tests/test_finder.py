"""One attn2 finder for every method: the layers are found the same before and after LoRA, NullBooth or Perfusion
wraps their projections, and capture hooks on the found linears still see the inputs the model computes with."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig

from nullbooth.methods.adapters import adapter_targets, inject_null_space_adapters
from nullbooth.methods.perfusion.wiring import make_unet_rank1_edit_modules_
from nullbooth.stats.capture import WEIGHT_OF_FEATURE, cross_attention_layers, record_inputs, unwrap_linear


def _lora(unet):
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def _nullbooth(unet):
    g = torch.Generator().manual_seed(0)
    bases = {path: torch.linalg.qr(torch.randn(linear.in_features, 3, generator=g, dtype=torch.float64))[0]
             for path, linear in adapter_targets(unet).items()}
    inject_null_space_adapters(unet, bases)


def _perfusion(unet):
    d = cross_attention_layers(unet)[0].in_features("k")
    make_unet_rank1_edit_modules_(unet, C=torch.eye(d, dtype=torch.float64))


@pytest.mark.parametrize("inject", [_lora, _nullbooth, _perfusion], ids=["lora", "nullbooth", "perfusion"])
def test_layers_are_found_after_injection(tiny_pipe, inject):
    unet = copy.deepcopy(tiny_pipe.unet)
    before = cross_attention_layers(unet)
    linears = {(l.name, f): l.linear(f) for l in before for f in WEIGHT_OF_FEATURE}
    inject(unet)
    wrapped = [l for l in before for f, path in WEIGHT_OF_FEATURE.items()
               if not isinstance(l.module.get_submodule(path), torch.nn.Linear)]
    assert wrapped, "the injection wrapped nothing: the test would prove nothing"
    after = cross_attention_layers(unet)
    assert [l.name for l in after] == [l.name for l in before]
    for layer in after:
        for feature in WEIGHT_OF_FEATURE:
            if inject is _perfusion and feature in ("q", "out"):
                continue  # Perfusion wraps only to_k/to_v
            assert layer.linear(feature) is linears[(layer.name, feature)]  # the wrapped base layer itself


def test_capture_hooks_see_inputs_through_wrappers(tiny_pipe):
    unet = copy.deepcopy(tiny_pipe.unet)
    _lora(unet)
    layers = cross_attention_layers(unet)
    seen: dict[tuple[str, str], tuple[int, ...]] = {}
    sample = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    text = torch.randn(1, 7, unet.config.cross_attention_dim)
    with record_inputs(layers, ["q", "k", "out"], lambda l, f, x: seen.setdefault((l.name, f), tuple(x.shape))):
        unet(sample, 10, encoder_hidden_states=text)
    assert set(seen) == {(l.name, f) for l in layers for f in ("q", "k", "out")}
    assert all(seen[(l.name, "k")][-2:] == (7, unet.config.cross_attention_dim) for l in layers)


def test_unwrap_linear_follows_base_layer_chains():
    inner = torch.nn.Linear(3, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

    assert unwrap_linear(Wrapper(Wrapper(inner))) is inner
    assert unwrap_linear(torch.nn.Conv2d(1, 1, 1)) is None
