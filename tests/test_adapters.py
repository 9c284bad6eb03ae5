"""Null-space adapters: the layer's algebra, injection, save/load, diffusers LoRA export, projected updates, leakage.

Tolerances: float32 forward comparisons 1e-5 abs (outputs are O(1)); float64 identities 1e-10 relative.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

from nullbooth.errors import NullBoothError
from nullbooth.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_WEIGHTS
from nullbooth.methods.adapter_files import bases_from_run, load_adapter, save_adapter
from nullbooth.methods.adapters import (
    NullSpaceLinear,
    adapter_parameters,
    adapter_targets,
    inject_null_space_adapters,
    merge_adapters,
    null_space_adapters,
    remove_adapters,
    split_target,
    target_name,
)
from nullbooth.methods.leakage import adapter_leakage, leakage_on_features, project_update_, relative_leakage
from nullbooth.methods.lora_export import dense_deltas, export_diffusers_lora, lora_factors
from nullbooth.runs.layout import load_summed_statistics
from nullbooth.stats.capture import cross_attention_layers
from nullbooth.stats.moments import SecondMoment

ATOL = 1e-5


def orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q[:, :k]


def unet_inputs(pipe, seed: int = 0):
    """One fixed UNet call: latents [1,C,16,16] (small, for speed), t = 500, text encodings [1,77,128]."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=g)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
    return latents, torch.tensor([500]), text


def predict(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample


def randomize_adapters(unet, scale: float = 0.5, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def unet(tiny_pipe):
    """A private copy of the session UNet, so injected adapters never leak into other tests."""
    return copy.deepcopy(tiny_pipe.unet)


@pytest.fixture(scope="module")
def run_bases(tiny_run):
    run_dir, _ = tiny_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bases_from_run(run_dir)


# --------------------------------------------------------------------------- the layer


def test_forward_is_base_plus_delta_and_zero_on_protected_span():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    U = orthonormal(16, 5)
    layer = NullSpaceLinear(base, U)
    assert layer.M is not None and torch.count_nonzero(layer.M) == 0  # zero init: starts as the base model
    with torch.no_grad():
        layer.M.copy_(torch.randn(8, 5))
    x = torch.randn(4, 3, 16)
    dW = layer.M.detach().double() @ U.T  # independent ΔW = M Uᵀ in float64
    expected = base(x).double() + x.double() @ dW.T
    assert torch.allclose(layer.get_delta_weight().double(), dW, atol=1e-6)
    assert torch.allclose(layer(x).double(), expected, atol=ATOL)
    # Inputs in the protected span (orthogonal complement of U) see no change at all.
    complement = orthonormal(16, 16)[:, 5:]
    X0 = torch.randn(50, 11, dtype=torch.float64) @ complement.T  # [50, 16] ⊥ U
    assert float((X0 @ dW.T).abs().max()) < 1e-12
    assert torch.allclose(layer(X0.float()), base(X0.float()), atol=ATOL)
    # Only M trains; base weight and bias are frozen.
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["M"]


def test_zero_dim_null_space_is_identity_without_parameters():
    base = nn.Linear(6, 4)
    layer = NullSpaceLinear(base, torch.zeros(6, 0))
    x = torch.randn(3, 6)
    assert list(layer.parameters()) == list(base.parameters()) and layer.M is None
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer.get_delta_weight(), torch.zeros(4, 6))


def test_half_precision_base_keeps_float32_factors():
    base = nn.Linear(8, 4).to(torch.bfloat16)
    layer = NullSpaceLinear(base, orthonormal(8, 3))
    assert layer.basis.dtype == layer.M.dtype == torch.float32  # trainable factors stay fp32 (mixed precision)
    with torch.no_grad():
        layer.M.fill_(0.1)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + x.float() @ layer.get_delta_weight().T
    assert torch.allclose(y.float(), expected, atol=3e-2)  # bf16 output rounding


def test_only_adapter_factors_receive_gradients(unet, run_bases, tiny_pipe):
    bases, _ = run_bases
    unet.requires_grad_(False)
    inject_null_space_adapters(unet, bases)
    params = adapter_parameters(unet)
    assert params and {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    randomize_adapters(unet, scale=0.01)
    latents, t, text = unet_inputs(tiny_pipe)
    unet(latents, t, encoder_hidden_states=text).sample.square().mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


def test_a_shared_basis_is_checked_and_stored_once(unet, run_bases, monkeypatch):
    from nullbooth.methods import adapters

    bases, _ = run_bases
    text = [p for p in bases if p.endswith(("to_k", "to_v"))]
    assert len(text) > 2 and len({id(bases[p]) for p in text}) == 1  # every k and v reads the one text statistic
    calls = []
    monkeypatch.setattr(adapters, "_basis_problem", lambda basis, d: calls.append(id(basis)))
    wrappers = inject_null_space_adapters(unet, bases)
    assert len(calls) == len({id(b) for b in bases.values()})
    assert len({wrappers[p].basis.data_ptr() for p in text}) == 1  # one float32 copy for all of them
    assert torch.equal(wrappers[text[0]].basis, bases[text[0]].float())


def test_merge_unmerge_round_trip(unet, run_bases, tiny_pipe):
    bases, _ = run_bases
    inject_null_space_adapters(unet, bases)
    randomize_adapters(unet)
    inputs = unet_inputs(tiny_pipe)
    wrappers = null_space_adapters(unet)
    before = {p: w.base_layer.weight.detach().clone() for p, w in wrappers.items()}
    y_adapter = predict(unet, inputs)
    for w in wrappers.values():
        w.merge()
    assert all(w.merged for w in wrappers.values())
    assert torch.allclose(predict(unet, inputs), y_adapter, atol=ATOL)
    for p, w in wrappers.items():
        assert torch.allclose(w.base_layer.weight, before[p] + w.get_delta_weight(), atol=1e-6)
        w.unmerge()
        assert torch.allclose(w.base_layer.weight, before[p], atol=1e-6)
    assert torch.allclose(predict(unet, inputs), y_adapter, atol=ATOL)


def test_merge_adapters_bakes_delta_and_removes_wrappers(unet, run_bases, tiny_pipe):
    bases, _ = run_bases
    inject_null_space_adapters(unet, bases)
    randomize_adapters(unet)
    inputs = unet_inputs(tiny_pipe)
    y_adapter = predict(unet, inputs)
    merge_adapters(unet)
    assert not null_space_adapters(unet)
    assert all(type(unet.get_submodule(p)) is nn.Linear for p in bases)
    assert torch.allclose(predict(unet, inputs), y_adapter, atol=ATOL)


# --------------------------------------------------------------------------- selection and injection


def test_adapter_targets_are_structural(unet):
    targets = adapter_targets(unet, None)
    layers = cross_attention_layers(unet)
    assert len(targets) == 4 * len(layers)
    for layer in layers:
        assert targets[f"{layer.name}.to_q"] is layer.module.to_q
        assert targets[f"{layer.name}.to_out.0"] is layer.module.to_out[0]
        assert split_target(target_name(layer.name, "out")) == (layer.name, "out")
    only_kv = adapter_targets(unet, layers[:1], ("k", "v"))
    assert list(only_kv) == [f"{layers[0].name}.to_k", f"{layers[0].name}.to_v"]
    assert all("attn1" not in p for p in targets)  # self-attention is never selected


def test_inject_validates_every_target_before_mutating(unet, run_bases):
    bases, _ = run_bases
    good = next(iter(bases))
    layer = good.rsplit(".", 1)[0]
    in_q = unet.get_submodule(good).in_features
    bad = {
        good: bases[good],
        f"{layer}.to_nothing": bases[good],  # no such module
        layer: bases[good],  # the attn2 module itself is not a Linear
        f"{layer}.to_k": torch.ones(unet.get_submodule(f"{layer}.to_k").in_features, 2),  # not orthonormal
        f"{layer}.to_out.0": orthonormal(in_q + 3, 2),  # wrong width
    }
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    original = unet.get_submodule(good)
    with pytest.raises(NullBoothError) as err:
        inject_null_space_adapters(unet, bad)
    message = str(err.value)
    assert "4 problem(s)" in message
    for path in list(bad)[1:]:
        assert path in message
    assert "orthonormal" in message and "shape" in message
    assert not null_space_adapters(unet) and unet.get_submodule(good) is original
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    # Injecting twice into one target is refused too.
    inject_null_space_adapters(unet, {good: bases[good]})
    with pytest.raises(NullBoothError, match="already has a null-space adapter"):
        inject_null_space_adapters(unet, {good: bases[good]})


def test_remove_restores_exact_objects(unet, run_bases, tiny_pipe):
    bases, _ = run_bases
    originals = adapter_targets(unet, None)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    inputs = unet_inputs(tiny_pipe)
    y0 = predict(unet, inputs)
    wrappers = inject_null_space_adapters(unet, bases)
    assert set(wrappers) == set(bases)
    randomize_adapters(unet)
    assert not torch.allclose(predict(unet, inputs), y0, atol=1e-4)  # the adapters do change the output
    wrappers[next(iter(wrappers))].merge()  # a merged one is unmerged on removal
    remove_adapters(unet)
    assert not null_space_adapters(unet)
    for path, linear in originals.items():
        assert unet.get_submodule(path) is linear
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert torch.allclose(predict(unet, inputs), y0, atol=1e-6)


# --------------------------------------------------------------------------- bases from a run


def test_bases_from_run_shares_kv_and_counts_null_dims(tiny_run, run_bases, tiny_pipe):
    run_dir, cfg = tiny_run
    bases, info = run_bases
    stats = load_summed_statistics(run_dir)
    layers = cross_attention_layers(tiny_pipe.unet)
    assert set(bases) == {target_name(l.name, f) for l in layers for f in ("q", "k", "v", "out")}
    text = [bases[target_name(l.name, f)] for l in layers for f in ("k", "v")]
    assert all(t is text[0] for t in text)  # one eigh for the shared text statistic
    for path, U in bases.items():
        layer, feature = split_target(path)
        lam = torch.linalg.eigvalsh(stats[(layer, feature)].moment()).clamp(min=0)
        k = int((lam < cfg.nullbooth.nullspace_threshold * lam.max()).sum())  # relative mode, independently
        assert U.shape == (lam.numel(), k) == (info[path]["dim"], info[path]["null_dim"])
        assert info[path]["mode"] == "relative" and info[path]["lambda_max_null"] <= 1e-3 * float(lam.max()) + 1e-12
        assert U.dtype == torch.float64


def test_bases_from_run_warns_on_empty_null_space_and_refuses_other_layers(tiny_run, tiny_pipe2):
    run_dir, _ = tiny_run
    with pytest.warns(UserWarning, match="empty null space.*raise nullbooth.nullspace_threshold"):
        bases, info = bases_from_run(run_dir, mode="absolute", threshold=0.0)
    assert all(i["null_dim"] == 0 for i in info.values())
    with pytest.raises(NullBoothError, match="does not match"):
        bases_from_run(run_dir, cross_attention_layers(tiny_pipe2.unet))
    with pytest.raises(NullBoothError, match="nullspace_mode"):
        bases_from_run(run_dir, mode="bogus", threshold=1.0)


def test_leakage_on_preserved_statistic_is_within_threshold_bound(unet, tiny_run, run_bases):
    """‖ΔW X₀‖²/n = tr(ΔW C ΔWᵀ) ≤ ‖ΔW‖²_F λ_max(null) for the adapter; an unconstrained ΔW of equal norm exceeds it."""
    run_dir, _ = tiny_run
    bases, info = run_bases
    stats = load_summed_statistics(run_dir)
    inject_null_space_adapters(unet, bases)
    randomize_adapters(unet)
    leak = adapter_leakage(unet, stats)
    g = torch.Generator().manual_seed(3)
    checked = 0
    for path, w in null_space_adapters(unet).items():
        if w.null_dim == 0:
            continue
        C = stats[split_target(path)].moment()
        dW = w.get_delta_weight().detach().double()
        W = w.base_layer.weight.detach().double()
        bound = (float(dW.square().sum()) * info[path]["lambda_max_null"] / float(((W @ C) * W).sum())) ** 0.5
        assert leak[path] <= bound * (1 + 1e-6) + 1e-12, path
        free = torch.randn(dW.shape, generator=g, dtype=torch.float64)
        free *= dW.norm() / free.norm()
        assert relative_leakage(free, W, C) > bound, path
        checked += 1
    assert checked >= 8


def test_text_leakage_on_the_preserved_prompts_themselves(unet, run_bases, tiny_run, tiny_pipe):
    """The k/v inputs of the collected prompts (and the empty CFG prompt) are a subset of the rows behind C."""
    from conftest import PROMPTS

    run_dir, _ = tiny_run
    bases, info = run_bases
    stat = load_summed_statistics(run_dir)[(next(iter(bases)).rsplit(".", 1)[0], "k")]
    ids = tiny_pipe.tokenizer(PROMPTS + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        X = tiny_pipe.text_encoder(ids)[0].double().reshape(-1, stat.dim)  # [4·77, 128]
    inject_null_space_adapters(unet, bases)
    randomize_adapters(unet)
    g, worst = torch.Generator().manual_seed(4), 0.0
    for path, w in null_space_adapters(unet).items():
        if split_target(path)[1] in ("k", "v"):
            dW = w.get_delta_weight().detach().double()
            rows = float((X @ dW.T).square().sum())
            assert rows <= stat.count * float(dW.square().sum()) * info[path]["lambda_max_null"] * (1 + 1e-6) + 1e-9
            free = torch.randn(dW.shape, generator=g, dtype=torch.float64)
            free *= dW.norm() / free.norm()
            ratio = leakage_on_features(dW, w.base_layer.weight, X) / leakage_on_features(free, w.base_layer.weight, X)
            worst = max(worst, ratio)
    assert 0 < worst < 0.2, worst


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_unet_output(unet, run_bases, tiny_pipe, tmp_path):
    bases, info = run_bases
    inject_null_space_adapters(unet, bases)
    randomize_adapters(unet)
    inputs = unet_inputs(tiny_pipe)
    y = predict(unet, inputs)
    config = {"method": "nullbooth", "pretrained_model_name_or_path": "tiny-sd", "statistics_run": "run_x",
              "nullspace_mode": "relative", "nullspace_threshold": 1e-3}
    save_adapter(tmp_path, unet, config)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["method"] == "nullbooth" and meta["statistics_run"] == "run_x"
    assert meta["null_dims"] == {p: i["null_dim"] for p, i in info.items()}
    assert set(meta["versions"]) == {"nullbooth", "torch", "diffusers"}
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), "pt") as fh:
        keys = list(fh.keys())
        assert all(fh.get_tensor(k).dtype == torch.float32 for k in keys)
    n_layers = len(cross_attention_layers(tiny_pipe.unet))
    assert sum(k.startswith("basis.") for k in keys) == 2 * n_layers + 1  # q, out per layer + one shared text basis

    fresh = copy.deepcopy(tiny_pipe.unet)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded["nullspace_threshold"] == 1e-3
    assert torch.equal(predict(fresh, inputs), y)
    assert not torch.allclose(y, predict(tiny_pipe.unet, inputs), atol=1e-4)


def test_load_refuses_a_model_with_other_layers_or_widths(unet, run_bases, tiny_pipe2, tmp_path):
    bases, _ = run_bases
    inject_null_space_adapters(unet, bases)
    save_adapter(tmp_path, unet, {"pretrained_model_name_or_path": "tiny-sd"})
    other = copy.deepcopy(tiny_pipe2.unet)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(NullBoothError) as err:
        load_adapter(other, tmp_path)
    message = str(err.value)
    assert "does not fit this UNet" in message and "tiny-sd" in message
    assert "the model has [out=" in message or "no such module" in message
    assert not null_space_adapters(other)
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())


# --------------------------------------------------------------------------- diffusers LoRA export


PLAIN_DIFFUSERS = """
import json, sys
sys.modules["nullbooth"] = None  # nullbooth cannot be imported: only diffusers + peft read the files
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
model, inputs_file, out_file, *folders = sys.argv[1:]
x = load_file(inputs_file)
out, ranks = {}, {}
for i, folder in enumerate(folders):
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(folder)
    with torch.no_grad():
        out[str(i)] = pipe.unet(x["latents"], x["t"], encoder_hidden_states=x["text"]).sample
    ranks[str(i)] = {n: [m.r[a], m.scaling[a]] for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)
                     for a in m.r}
save_file(out, out_file, metadata={"ranks": json.dumps(ranks)})
"""


@pytest.fixture(scope="module")
def lora_exports(tiny_pipe, run_bases, tmp_path_factory):
    """Two exports — from NullSpaceLinear adapters and from dense updates — each with nullbooth's own prediction,
    and the predictions of a fresh pipeline that loads them with plain ``load_lora_weights`` in a subprocess."""
    from safetensors.torch import load_file, save_file

    from nullbooth.models import resolve_model_path

    bases, info = run_bases
    tmp = tmp_path_factory.mktemp("lora")
    inputs = unet_inputs(tiny_pipe)
    save_file({"latents": inputs[0], "t": inputs[1], "text": inputs[2]}, str(tmp / "inputs.safetensors"))

    adapted = copy.deepcopy(tiny_pipe.unet)
    inject_null_space_adapters(adapted, bases)
    randomize_adapters(adapted)
    export_diffusers_lora(tmp / "adapter", unet=adapted)

    dense = copy.deepcopy(tiny_pipe.unet)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    projected = {}
    with torch.no_grad():
        for path, linear in adapter_targets(dense, None).items():
            D = torch.randn(linear.weight.shape, generator=g, dtype=torch.float64) * 0.05
            if split_target(path)[1] == "q":  # a projected (rank-deficient) update: zero singular values drop out
                D = D @ (bases[path] @ bases[path].T)
                projected[path] = info[path]["null_dim"]
            linear.weight += D.float()
    deltas = dense_deltas(before, dense)
    export_diffusers_lora(tmp / "dense", deltas)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, resolve_model_path("tiny-sd"), str(tmp / "inputs.safetensors"),
                    str(tmp / "out.safetensors"), str(tmp / "adapter"), str(tmp / "dense")],
                   check=True, env=env, timeout=600)
    loaded = load_file(str(tmp / "out.safetensors"))
    with safe_open(str(tmp / "out.safetensors"), "pt") as fh:
        ranks = json.loads(fh.metadata()["ranks"])
    return {
        "inputs": inputs, "info": info, "folder": tmp / "adapter", "deltas": deltas, "projected": projected,
        "base": predict(tiny_pipe.unet, inputs),
        "adapter": (predict(adapted, inputs), loaded["0"], ranks["0"]),
        "dense": (predict(dense, inputs), loaded["1"], ranks["1"]),
    }


def test_lora_export_of_null_space_adapters_matches_in_plain_diffusers(lora_exports):
    info = lora_exports["info"]
    path = lora_exports["folder"] / LORA_WEIGHTS
    with safe_open(str(path), "pt") as fh:
        assert set(fh.metadata()) == {"format", "lora_adapter_metadata"}
        for target, i in info.items():
            if i["null_dim"]:
                assert fh.get_tensor(f"unet.{target}.lora_A.weight").shape == (i["null_dim"], i["dim"])
    y_nullbooth, y_lora, ranks = lora_exports["adapter"]
    err = float((y_lora - y_nullbooth).abs().max())
    assert err <= ATOL, err
    assert float((y_nullbooth - lora_exports["base"]).abs().max()) > 100 * ATOL  # the adapters matter: the test can fail
    # peft built rank k per module with scale alpha / r = 1, and nothing else.
    assert ranks == {t: [i["null_dim"], 1.0] for t, i in info.items() if i["null_dim"]}


def test_lora_export_of_dense_updates_matches_in_plain_diffusers(lora_exports):
    for path, r in lora_exports["projected"].items():
        assert lora_factors(lora_exports["deltas"][path])[2]["rank"] == r
    y_dense, y_lora, ranks = lora_exports["dense"]
    err = float((y_lora - y_dense).abs().max())
    assert err <= ATOL, err
    assert float((y_dense - lora_exports["base"]).abs().max()) > 100 * ATOL
    assert all(scale == 1.0 for _, scale in ranks.values())
    assert {p: ranks[p][0] for p in lora_exports["projected"]} == lora_exports["projected"]


def test_lora_factors_are_exact_and_export_refuses_nothing(tmp_path):
    g = torch.Generator().manual_seed(0)
    D = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64)
    B, A, report = lora_factors(D)
    assert report["rank"] == 3 and B.shape == (12, 3) and A.shape == (3, 20)
    assert float((B @ A - D).abs().max()) < 1e-12
    with pytest.raises(NullBoothError, match="nothing to export"):
        export_diffusers_lora(tmp_path, {"a.to_q": torch.zeros(4, 4)})
    with pytest.raises(NullBoothError, match="exactly one"):
        export_diffusers_lora(tmp_path)


def test_dense_deltas_of_a_wrapped_model_are_the_adapter_deltas(unet, run_bases):
    bases, _ = run_bases
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    inject_null_space_adapters(unet, bases)
    randomize_adapters(unet)
    deltas = dense_deltas(before, unet)
    for path, w in null_space_adapters(unet).items():
        assert torch.allclose(deltas[path], w.get_delta_weight(), atol=1e-6)
    with torch.no_grad():
        next(w for p, w in null_space_adapters(unet).items() if p.endswith("to_out.0")).base_layer.bias.add_(1.0)
    with pytest.warns(UserWarning, match="bias"):
        dense_deltas(before, unet)


# --------------------------------------------------------------------------- projected full-weight updates


def test_projected_update_keeps_adamw_steps_inside_range_of_P():
    torch.manual_seed(0)
    d_in, d_out, k = 12, 6, 4
    U = orthonormal(d_in, k)
    P = U @ U.T
    leave = torch.eye(d_in, dtype=torch.float64) - P

    def train(how: str, steps: int = 5) -> torch.Tensor:
        torch.manual_seed(1)
        layer = nn.Linear(d_in, d_out, bias=False)
        W0 = layer.weight.detach().clone()
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(steps):
            x = torch.randn(16, d_in)
            loss = (layer(x) - torch.randn(16, d_out)).square().mean()
            opt.zero_grad()
            loss.backward()
            if how == "gradient":  # the wrong way: project the gradient before Adam
                layer.weight.grad @= P.float()
            old = layer.weight.detach().clone()
            opt.step()
            if how == "step":
                project_update_(layer.weight, old, P)
            elif how == "from_W0":
                project_update_(layer.weight, W0, P)
        return (layer.weight.detach() - W0).double()

    delta = train("step")
    assert float(delta.norm()) > 1e-3
    assert float((delta @ leave).norm()) <= 1e-6 * float(delta.norm())
    # Re-projecting the total update from W₀ is the same map (W_old − W₀ already lies in range(P)).
    assert torch.allclose(train("from_W0"), delta, atol=1e-6)
    wrong = train("gradient")
    assert float((wrong @ leave).norm()) > 1e-2 * float(wrong.norm())  # Adam + decay leave the null space


def test_project_update_rejects_wrong_shapes():
    with pytest.raises(NullBoothError, match="projector"):
        project_update_(torch.zeros(3, 4), torch.zeros(3, 4), torch.eye(3))


# --------------------------------------------------------------------------- leakage


def test_relative_leakage_from_second_moment_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 16, generator=g, dtype=torch.float64) * torch.linspace(0.01, 3, 16, dtype=torch.float64)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    dW = torch.randn(8, 16, generator=g, dtype=torch.float64) * 0.1
    stat = SecondMoment(16)
    stat.add(X[:100])
    stat.add(X[100:])
    direct = float((X @ dW.T).norm() / (X @ W.T).norm())  # independent: ‖ΔW X‖_F / ‖W X‖_F
    assert relative_leakage(dW, W, stat) == pytest.approx(direct, rel=1e-10)
    assert leakage_on_features(dW, W, X) == pytest.approx(direct, rel=1e-10)
    assert relative_leakage(torch.zeros_like(W), W, stat) == 0.0
