"""Perfusion (key-locked gated rank-1 edits): math against float64 references, wiring, files, errors.

Tolerances: float32 module vs float64 reference 1e-5 (relative to output scale); float64 module vs
float64 reference 1e-10; "exact" means torch.equal.
"""

from __future__ import annotations

import copy
import json
import types
import warnings

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from nullbooth.errors import NullBoothError
from nullbooth.methods.perfusion.compat import (
    calculate_input_covariance,
    loss_fn_weighted_by_mask,
    make_key_value_proj_rank1_edit_modules_,
    merge_rank1_edit_modules,
)
from nullbooth.methods.perfusion.concept import add_concept_token_
from nullbooth.methods.perfusion.context import PerfusionContext
from nullbooth.methods.perfusion.covariance import default_covariance, inverse_covariance
from nullbooth.methods.perfusion.editor import PerfusionEditor
from nullbooth.methods.perfusion.files import (
    SD15_ATTN2_VALUE_WIDTHS,
    PerfusionConcept,
    concept_file_bytes,
    load_concept,
    save_concept,
)
from nullbooth.methods.perfusion.module import Rank1EditModule
from nullbooth.methods.perfusion.wiring import find_cross_attention_layers

TOKEN, SUPER = "<my-teddy>", "teddy bear"  # a two-token superclass on purpose
FLOOR = 1e-6  # the tiny text encoder's untrained final LayerNorm makes C rank d-1 (see inverse_covariance)


# ---------------------------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="module")
def base_pipe():
    from nullbooth.models import load_pipeline

    return load_pipeline("tiny-sd")


@pytest.fixture()
def pipe(base_pipe):
    return copy.deepcopy(base_pipe)


@pytest.fixture(scope="module")
def tiny_C(base_pipe):
    prompts = [f"a photo of a {w}" for w in ("dog", "cat", "car", "tree", "house", "boat", "bird", "cup")]
    prompts += [f"a painting of a {w} in the snow" for w in ("horse", "chair", "river", "robot", "flower", "lamp")]
    return calculate_input_covariance(base_pipe, prompts)


def _spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def _encode(pipe, prompts):
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return ids, pipe.text_encoder(ids)[0]


def _reference(e, W, C, i, o, beta, tau):
    """out = W e − s W i* + σ((s−β)/τ) o*, s = i*ᵀC⁻¹e / i*ᵀC⁻¹i*, all float64 via a linear solve."""
    e, W, C, i, o = (t.double() for t in (e, W, C, i, o))
    Ci = torch.linalg.solve(C, i)  # C⁻¹ i*
    s = (e @ Ci) / (i @ Ci)  # [..., n]
    return e @ W.T - s[..., None] * (W @ i) + torch.sigmoid((s - beta) / tau)[..., None] * o


# ---------------------------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("training", [False, True])
def test_value_module_matches_float64_formula(training):
    torch.manual_seed(0)
    d_in, d_out, n = 16, 8, 5
    C = _spd(d_in)
    lin = nn.Linear(d_in, d_out, bias=False)
    m = Rank1EditModule(lin, C=C, input_decay=0.0)  # decay 0: i* = this batch's concept encoding
    e = torch.randn(3, n, d_in)
    idx = torch.tensor([1, 0, 3])
    m.train()
    m(e, concept_indices=idx, text_enc_with_superclass=torch.randn(3, n, d_in))  # initialise i*, o*
    with torch.no_grad():
        m.concept_outputs.copy_(torch.randn(1, d_out))
        m.ema_concept_text_encs.copy_(torch.randn(1, d_in))
    m.train(training)
    i, o = m.ema_concept_text_encs[0].clone(), m.concept_outputs[0].detach().clone()
    if training:  # the forward first folds this batch into the EMA; with decay 0, i* = the batch mean
        i = e[torch.arange(3), idx].mean(0)
    beta, tau = (m.train_beta, m.train_temperature) if training else (m.eval_beta, m.eval_temperature)
    out = m(e, concept_indices=idx)
    ref = _reference(e, lin.weight.detach(), C, i, o, beta, tau)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)

    m64 = copy.deepcopy(m).double().eval()
    out64 = m64(e.double(), concept_indices=idx)
    ref64 = _reference(e, lin.weight.detach(), C, m64.ema_concept_text_encs[0], o, m.eval_beta, m.eval_temperature)
    torch.testing.assert_close(out64, ref64, atol=1e-10, rtol=0)


def test_concept_token_scope_edits_only_the_concept_positions():
    """``gate_scope="concept_token"``: eq. 3 at the concept's own position, W e exactly everywhere else — also on a
    later token that carries i* (what a causal text encoder does), where the paper's scope opens the gate."""
    torch.manual_seed(3)
    d_in, d_out, n = 16, 8, 6
    C = _spd(d_in, seed=3)
    lin = nn.Linear(d_in, d_out, bias=False)
    e = torch.randn(2, n, d_in)
    idx = torch.tensor([1, 2])
    e[:, 4] = e[torch.arange(2), idx] + 0.01 * torch.randn(2, d_in)  # token 4 carries the concept
    scoped = {}
    for scope in ("all_tokens", "concept_token"):
        m = Rank1EditModule(lin, C=C, input_decay=0.0, gate_scope=scope).train()
        m(e, concept_indices=idx)  # i* := this batch's concept encodings (decay 0)
        with torch.no_grad():
            m.concept_outputs.copy_(torch.randn(1, d_out, generator=torch.Generator().manual_seed(4)))
        scoped[scope] = m.eval()(e, concept_indices=idx).detach()
    i, o = m.ema_concept_text_encs[0], m.concept_outputs[0].detach()
    ref = _reference(e, lin.weight.detach(), C, i, o, m.eval_beta, m.eval_temperature)
    base = (e @ lin.weight.T).detach()
    torch.testing.assert_close(scoped["all_tokens"].double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    own = torch.zeros(2, n, dtype=torch.bool)
    own[torch.arange(2), idx] = True
    out = scoped["concept_token"]
    assert torch.equal(out[~own], base[~own])  # every other token: exactly the frozen projection
    torch.testing.assert_close(out[own].double(), ref[own], atol=1e-5 * ref.abs().max().item(), rtol=0)
    assert (scoped["all_tokens"][:, 4] - base[:, 4]).norm() > 0.5 * o.norm()  # the paper's scope edits token 4
    assert i.shape == (d_in,)
    with pytest.raises(NullBoothError, match="gate_scope"):
        Rank1EditModule(lin, C=C, gate_scope="everything")


def test_key_module_locks_output_to_superclass_encoding():
    torch.manual_seed(1)
    d_in, d_out, n = 12, 6, 4
    C = _spd(d_in, seed=1)
    lin = nn.Linear(d_in, d_out, bias=False)
    key = Rank1EditModule(lin, C=C, is_key_proj=True)
    assert [p for p in key.parameters() if p.requires_grad] == [lin.weight]  # W only; keys have no o*
    assert key.trainable_parameters() == []
    e, e_sup = torch.randn(2, n, d_in), torch.randn(2, n, d_in)
    idx = torch.tensor([2, 1])
    key.train()
    key(e, concept_indices=idx, text_enc_with_superclass=e_sup)
    key.eval()
    out = key(e, concept_indices=idx, text_enc_with_superclass=e_sup)
    i = key.ema_concept_text_encs[0]
    for b in range(2):  # o*_K = W · e_H at the concept position, per prompt
        o = lin.weight.detach() @ e_sup[b, idx[b]]
        ref = _reference(e[b], lin.weight.detach(), C, i, o, key.eval_beta, key.eval_temperature)
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    with pytest.raises(NullBoothError, match="superclass"):
        key(e, concept_indices=idx)


def test_ema_of_i_star_and_value_init():
    torch.manual_seed(2)
    lin = nn.Linear(10, 4, bias=False)
    m = Rank1EditModule(lin, C=_spd(10, 2), input_decay=0.9)
    m.train()
    e1, e2, sup = torch.randn(2, 5, 10), torch.randn(2, 5, 10), torch.randn(2, 5, 10)
    idx = torch.tensor([0, 4])
    m(e1, concept_indices=idx, text_enc_with_superclass=sup)
    first = e1[torch.arange(2), idx].mean(0)
    torch.testing.assert_close(m.ema_concept_text_encs[0], first)
    torch.testing.assert_close(m.concept_outputs[0].detach(), lin.weight.detach() @ sup[torch.arange(2), idx].mean(0))
    m(e2, concept_indices=idx)
    torch.testing.assert_close(m.ema_concept_text_encs[0], 0.9 * first + 0.1 * e2[torch.arange(2), idx].mean(0))
    # gradient checkpointing re-runs the forward inside backward: the EMA must move once per step
    e3 = torch.randn(2, 5, 10, requires_grad=True)
    expected = 0.9 * m.ema_concept_text_encs[0] + 0.1 * e3.detach()[torch.arange(2), idx].mean(0)
    out = torch.utils.checkpoint.checkpoint(lambda x: m(x, concept_indices=idx), e3, use_reentrant=False)
    out.sum().backward()
    assert e3.grad is not None and m.concept_outputs.grad is not None
    torch.testing.assert_close(m.ema_concept_text_encs[0], expected)
    m.eval()
    before = m.ema_concept_text_encs.clone()
    m(e2, concept_indices=idx)
    assert torch.equal(before, m.ema_concept_text_encs)  # no EMA update at inference


def test_rows_without_concept_are_exact_base_outputs():
    lin = nn.Linear(12, 6, bias=False)
    m = Rank1EditModule(lin, C=_spd(12), context=PerfusionContext([]))
    e = torch.randn(3, 7, 12)
    assert torch.equal(m(e), lin(e))
    assert torch.equal(Rank1EditModule(lin, C=_spd(12))(e), lin(e))  # no context at all


# ---------------------------------------------------------------------------------------------- merging


def _c_orthogonal_pair(C: torch.Tensor, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    i1, i2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    Ci = torch.linalg.inv(C)
    i2 = i2 - (i1 @ Ci @ i2) / (i1 @ Ci @ i1) * i1  # Gram-Schmidt in the C⁻¹ metric
    return i1, i2


def _trained_value_module(lin, C, i, o, **kw):
    m = Rank1EditModule(lin, C=C, **kw)
    m.set_concept(0, i.float(), o.float())
    return m.eval()


def test_merge_keeps_each_concept_on_its_own_i_star():
    torch.manual_seed(3)
    d, o_dim = 16, 8
    C = _spd(d, 3)
    lin = nn.Linear(d, o_dim, bias=False)
    i1, i2 = _c_orthogonal_pair(C, d, 3)
    o1, o2 = torch.randn(o_dim), torch.randn(o_dim)
    gate = dict(eval_beta=0.7, eval_temperature=0.01)  # σ(−β/τ) ≈ 4e-31: a C⁻¹-orthogonal concept gates off
    m1, m2 = _trained_value_module(lin, C, i1, o1, **gate), _trained_value_module(lin, C, i2, o2, **gate)
    for use_cholesky in (False, True):
        merged = merge_rank1_edit_modules(m1, m2, use_cholesky=use_cholesky).eval()
        assert merged.num_concepts == 2
        e = torch.stack([i1.float(), i2.float(), torch.randn(d)])[None]  # [1, 3, d]: i*_1 at 0, i*_2 at 1
        both = merged(e, concept_indices=torch.tensor([[0, 1]]), concept_id=(0, 1))
        single1 = m1(e, concept_indices=torch.tensor([0]))
        single2 = m2(e, concept_indices=torch.tensor([1]))
        torch.testing.assert_close(both[0, 0], single1[0, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[0, 1], single2[0, 1], atol=1e-5, rtol=0)
        # at its own i*, each concept outputs its gated o* (W e − W i* = 0)
        torch.testing.assert_close(both[0, 0], torch.sigmoid(torch.tensor((1 - 0.7) / 0.01)) * o1, atol=1e-5, rtol=0)
        # a row holding only concept 1 is exactly the single-concept edit
        only1 = merged(e, concept_indices=torch.tensor([0]), concept_id=0)
        torch.testing.assert_close(only1, single1, atol=1e-6, rtol=0)


def test_merge_cholesky_is_the_exact_c_inverse_projection():
    torch.manual_seed(4)
    d, o_dim = 16, 8
    C = _spd(d, 4)
    lin = nn.Linear(d, o_dim, bias=False)
    g = torch.Generator().manual_seed(4)
    i1, i2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    o1, o2 = torch.randn(o_dim), torch.randn(o_dim)
    m1, m2 = _trained_value_module(lin, C, i1, o1), _trained_value_module(lin, C, i2, o2)
    merged = merge_rank1_edit_modules(m1, m2, use_cholesky=True).eval()
    e = torch.randn(1, 4, d, dtype=torch.float64)
    e[0, 0] = 0.3 * i1 - 1.7 * i2  # inside span{i*}: its orthogonal part vanishes
    out = merged(e.float(), concept_indices=torch.tensor([[1, 2]]), concept_id=(0, 1)).double()
    # independent reference: Π = I (Iᵀ C⁻¹ I)⁻¹ Iᵀ C⁻¹ via solves, gates per concept
    I = torch.stack([i1, i2], 1)  # [d, 2]
    CiI = torch.linalg.solve(C, I)  # C⁻¹ I
    proj = e @ CiI @ torch.linalg.solve(I.T @ CiI, I.T)  # [1, 4, d]
    s = (e @ CiI) / (I * CiI).sum(0)  # [1, 4, 2]
    W = lin.weight.detach().double()
    ref = (e - proj) @ W.T + torch.sigmoid((s - 0.7) / 0.15) @ torch.stack([o1, o2]).double()
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close((e - proj)[0, 0], torch.zeros(d, dtype=torch.float64), atol=1e-12, rtol=0)


def test_merge_refuses_mixed_modules():
    lin = nn.Linear(8, 4, bias=False)
    C = _spd(8)
    v = _trained_value_module(lin, C, torch.randn(8), torch.randn(4))
    k = Rank1EditModule(lin, C=C, is_key_proj=True)
    k.set_concept(0, torch.randn(8))
    with pytest.raises(NullBoothError, match="key and value"):
        merge_rank1_edit_modules(v, k)
    with pytest.raises(NullBoothError, match="initialised"):
        merge_rank1_edit_modules(v, Rank1EditModule(lin, C=C))
    with pytest.raises(NullBoothError, match="different projection"):
        merge_rank1_edit_modules(v, _trained_value_module(nn.Linear(8, 4, bias=False), C, torch.randn(8), torch.randn(4)))


# ---------------------------------------------------------------------------------------------- on a real tiny pipeline


def _wired(pipe) -> bool:
    return any(isinstance(a.to_k, Rank1EditModule) for a in find_cross_attention_layers(pipe.unet).values())


def _attach(pipe, C, **kw):
    return PerfusionEditor.attach(pipe, TOKEN, SUPER, C=C, eigenvalue_floor=FLOOR, **kw)


def _perturb(editor, seed=0):
    """Stand-in for training: move o*_V and the concept embedding away from their superclass init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, v in editor.modules.values():
            v.concept_outputs.add_(torch.randn(v.concept_outputs.shape, generator=g))
        editor.embedding.vectors.add_(0.05 * torch.randn(editor.embedding.vectors.shape, generator=g))


def test_multi_token_superclass_initialises_the_token_embedding(pipe):
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = pipe.tokenizer(SUPER, add_special_tokens=False).input_ids
    assert len(ids) == 2
    tok = copy.deepcopy(pipe.tokenizer)
    concept = add_concept_token_(tok, pipe.text_encoder, TOKEN, SUPER)
    assert concept.superclass_ids == tuple(ids) and concept.token_id == len(before)
    emb = pipe.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(emb[concept.token_id], before[ids].mean(0))
    assert torch.equal(emb[: len(before)], before)
    assert tok(f"a {TOKEN}", add_special_tokens=False).input_ids[-1] == concept.token_id


def test_prompts_without_concept_give_the_base_pipeline_output_exactly(pipe, tiny_C):
    # CFG on: the empty-prompt branch goes through the edited layers too; 8×8 latents keep it fast
    kw = dict(num_inference_steps=2, output_type="latent", guidance_scale=7.5, height=16, width=16)
    plain_base = pipe(["a cat on a beach"], generator=torch.Generator().manual_seed(0), **kw).images
    mixed_base = pipe(["a photo of a teddy bear", "a cat on a beach"], generator=torch.Generator().manual_seed(0), **kw).images
    editor = _attach(pipe, tiny_C)
    _perturb(editor)
    with editor.context():
        plain_edited = pipe(["a cat on a beach"], generator=torch.Generator().manual_seed(0), **kw).images
        mixed = pipe([f"a photo of a {TOKEN}", "a cat on a beach"], generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(plain_edited, plain_base)
    assert torch.equal(mixed[1], mixed_base[1])  # the plain row of a batch that also holds the concept
    assert not torch.allclose(mixed[0], mixed_base[0], atol=1e-3)  # the concept row is edited
    # without a `with` block the hook still applies the concept (plain pipe call)
    plain = pipe([f"a photo of a {TOKEN}", "a cat on a beach"], generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(plain, mixed)
    editor.detach()


def test_key_output_at_concept_token_equals_superclass_key(pipe, tiny_C):
    editor = _attach(pipe, tiny_C)
    with torch.no_grad():  # a concept embedding unlike the superclass: key locking must still give the superclass key
        editor.embedding.vectors.copy_(torch.randn(editor.embedding.vectors.shape))
    editor.initialize(["a photo of a {} on the grass"])  # i* := this prompt's concept encoding
    name, (key, value) = next(iter(editor.modules.items()))
    with torch.no_grad(), editor.context(beta=0.5, tau=1e-3):  # gate = σ(500) = 1 at s = 1
        ids, enc = _encode(pipe, [f"a photo of a {TOKEN} on the grass"])
        k_out, v_out = key(enc), value(enc)
    pos = (ids[0] == editor.concepts[0].token_id).nonzero().item()
    with torch.no_grad():  # independent: the superclass prompt through the text encoder, last superclass token
        sup_ids, sup_enc = _encode(pipe, [f"a photo of a {SUPER} on the grass"])
    last_sup = (sup_ids[0] == editor.concepts[0].superclass_ids[-1]).nonzero().item()
    assert last_sup == pos + 1  # two superclass tokens replace one concept token
    W = key.weight.detach()
    expected = W @ sup_enc[0, last_sup]
    torch.testing.assert_close(k_out[0, pos], expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    assert not torch.allclose(k_out[0, pos], W @ enc[0, pos], atol=1e-2)
    # the value at the same position is the (gated) learned o*, not the superclass value
    torch.testing.assert_close(v_out[0, pos], value.concept_outputs[0].detach(), atol=1e-4, rtol=0)
    editor.detach()


def _train_step(pipe, prompts=(f"a photo of a {TOKEN}", "a photo of a dog")):
    ids, enc = _encode(pipe, list(prompts))  # one text-encoder call: a concept row and a prior row
    x = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    pred = pipe.unet(x, torch.tensor([10, 500]), enc).sample
    pred.pow(2).mean().backward()
    return enc, pred.detach()


def test_exactly_value_outputs_and_concept_embedding_get_gradients(pipe, tiny_C):
    editor = _attach(pipe, tiny_C)
    groups = editor.trainable_parameters()
    assert [g["name"] for g in groups] == ["perfusion_values", "concept_embedding"]
    trainable = {id(p) for g in groups for p in g["params"]}
    assert len(trainable) == len(editor.modules) + 1
    i_before = {n: v.ema_concept_text_encs.clone() for n, (_, v) in editor.modules.items()}
    pipe.unet.train()
    enc, pred = _train_step(pipe)
    assert editor.ctx.plan(enc).rows.tolist() == [0]  # the prior row is not edited
    checked = 0
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        for name, p in part.named_parameters():
            checked += 1
            if id(p) in trainable:
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert not p.requires_grad and p.grad is None, name
    assert checked > 50
    for n, (k, v) in editor.modules.items():
        assert k.trainable_parameters() == [] and not hasattr(k, "concept_outputs")
        assert not torch.equal(i_before[n], v.ema_concept_text_encs)  # the EMA of i* moved
        assert torch.equal(k.ema_concept_text_encs, v.ema_concept_text_encs)
    grads = (editor.embedding.vectors.grad.clone(), [v.concept_outputs.grad.clone() for _, v in editor.modules.values()])
    editor.detach()
    _, base_pred = _train_step(pipe, ("a photo of a teddy bear", "a photo of a dog"))
    assert torch.equal(pred[1], base_pred[1])  # the prior-preservation row: exactly the base UNet

    # frac_gradient_concept_embed scales exactly the gradient into the concept embedding
    editor = _attach(pipe, tiny_C, frac_gradient_concept_embed=1.0)
    pipe.unet.train()
    _train_step(pipe)
    torch.testing.assert_close(grads[0], 0.1 * editor.embedding.vectors.grad, rtol=1e-4, atol=1e-10)
    for g, (_, v) in zip(grads[1], editor.modules.values()):
        torch.testing.assert_close(g, v.concept_outputs.grad, rtol=1e-5, atol=1e-9)
    editor.detach()


def test_detach_is_an_exact_undo(pipe, tiny_C):
    tok, emb = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    linears = {n: (a.to_k, a.to_v) for n, a in find_cross_attention_layers(pipe.unet).items()}
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    editor = _attach(pipe, tiny_C)
    assert pipe.tokenizer is not tok and len(pipe.tokenizer) == len(tok) + 1
    editor.detach()
    assert pipe.tokenizer is tok and len(tok) == 49408
    assert pipe.text_encoder.get_input_embeddings() is emb and pipe.text_encoder.config.vocab_size == 49408
    for n, a in find_cross_attention_layers(pipe.unet).items():
        assert a.to_k is linears[n][0] and a.to_v is linears[n][1]
    after = pipe.unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert flags == [p.requires_grad for p in pipe.unet.parameters()]
    PerfusionEditor.attach(pipe, TOKEN, SUPER, C=tiny_C, eigenvalue_floor=FLOOR).detach()  # attachable again


def test_save_load_roundtrip_and_multi_concept(pipe, tiny_C, tmp_path):
    editor = _attach(pipe, tiny_C)
    _perturb(editor, seed=1)
    path = tmp_path / "teddy.safetensors"
    written = editor.save(path)
    assert written == path.stat().st_size
    widths = {n: v.out_features for n, (_, v) in editor.modules.items()}
    assert abs(written - concept_file_bytes(widths, 128)) <= 16  # differs only by the token strings (header padding)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {"token_embedding"} | {f"{p}.{n}" for p in ("i_star", "o_star") for n in widths}  # no C⁻¹
    assert meta["token"] == TOKEN and meta["superclass"] == SUPER and json.loads(meta["layers"]) == [[n, w] for n, w in widths.items()]
    with torch.no_grad(), editor.context():
        ids, enc = _encode(pipe, [f"a {TOKEN} in a box"])
        x = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
        ref = pipe.unet(x, torch.tensor([300]), enc).sample
    state = editor.concept_state()
    editor.detach()

    loaded = load_concept(path)
    assert loaded.token == TOKEN and loaded.superclass == SUPER and loaded.gate_scope == "all_tokens"
    assert torch.equal(loaded.token_embedding, state.token_embedding)
    assert all(torch.equal(loaded.o_star[n], state.o_star[n]) and torch.equal(loaded.i_star[n], state.i_star[n]) for n in widths)

    editor = PerfusionEditor.load(pipe, path, C=tiny_C, eigenvalue_floor=FLOOR)
    with torch.no_grad(), editor.context():
        _, enc2 = _encode(pipe, [f"a {TOKEN} in a box"])
        out = pipe.unet(x, torch.tensor([300]), enc2).sample
    assert torch.equal(enc2, enc) and torch.equal(out, ref)
    editor.detach()

    # a second concept: each prompt with one concept gives the single-concept result
    other = PerfusionConcept("<my-cat>", "cat", torch.randn(128), {n: torch.randn(128) for n in widths},
                             {n: torch.randn(w) for n, w in widths.items()})
    save_concept(tmp_path / "cat.safetensors", other)
    editor = PerfusionEditor.load(pipe, path, tmp_path / "cat.safetensors", C=tiny_C, eigenvalue_floor=FLOOR)
    assert [c.token for c in editor.concepts] == [TOKEN, "<my-cat>"]
    with torch.no_grad(), editor.context():
        _, enc3 = _encode(pipe, [f"a {TOKEN} in a box"])
        out_multi = pipe.unet(x, torch.tensor([300]), enc3).sample
        _, both = _encode(pipe, [f"a {TOKEN} next to a <my-cat>"])
        out_both = pipe.unet(x, torch.tensor([300]), both).sample
    # Equal up to float32 round-off of the two-concept solve, relative to the output's scale (measured ≤ 1e-5).
    torch.testing.assert_close(out_multi, ref, atol=2e-5 * float(ref.abs().max()), rtol=0)
    assert torch.isfinite(out_both).all() and not torch.allclose(out_both, ref, atol=1e-3)
    editor.detach()


def test_gate_scope_is_stored_in_the_concept_file_and_used_when_loaded(pipe, tiny_C, tmp_path):
    editor = _attach(pipe, tiny_C, gate_scope="concept_token")
    _perturb(editor, seed=5)
    editor.save(tmp_path / "c.safetensors")
    prompt = f"a {TOKEN} in a box"
    with torch.no_grad(), editor.context():
        ids, enc = _encode(pipe, [prompt])
        _, value = next(iter(editor.modules.values()))
        ref = value(enc)
    editor.detach()
    assert load_concept(tmp_path / "c.safetensors").gate_scope == "concept_token"
    editor = PerfusionEditor.load(pipe, tmp_path / "c.safetensors", C=tiny_C, eigenvalue_floor=FLOOR)
    _, value = next(iter(editor.modules.values()))
    assert all(v.gate_scope == "concept_token" for _, v in editor.modules.values())
    with torch.no_grad(), editor.context():
        _, enc2 = _encode(pipe, [prompt])
        out = value(enc2)
    concept_at = int((ids[0] == pipe.tokenizer.convert_tokens_to_ids(TOKEN)).nonzero()[0, 0])
    others = torch.arange(ids.shape[1]) != concept_at
    assert torch.equal(out, ref)
    assert torch.equal(out[0, others], (enc2 @ value.weight.T)[0, others])  # only the concept's own token is edited
    editor.detach()


def test_loading_onto_a_different_model_is_refused(pipe, tiny_C, tmp_path):
    editor = _attach(pipe, tiny_C)
    editor.save(tmp_path / "c.safetensors")
    editor.detach()
    from nullbooth.models import load_pipeline

    other = load_pipeline("tiny-sd2")  # text width 96, 11 attn2 layers
    with pytest.raises(NullBoothError, match="text width 128"):
        PerfusionEditor.load(other, tmp_path / "c.safetensors")
    c = load_concept(tmp_path / "c.safetensors")
    name = next(iter(c.o_star))
    c.o_star[name] = torch.zeros(c.o_star[name].shape[0] + 1)
    save_concept(tmp_path / "wide.safetensors", c)
    with pytest.raises(NullBoothError, match="value width"):
        PerfusionEditor.load(pipe, tmp_path / "wide.safetensors", C=tiny_C, eigenvalue_floor=FLOOR)
    c.o_star = {n.replace("attn2", "attnX"): t for n, t in c.o_star.items()}
    c.i_star = {n.replace("attn2", "attnX"): t for n, t in c.i_star.items()}
    save_concept(tmp_path / "names.safetensors", c)
    with pytest.raises(NullBoothError, match="layers that differ"):
        PerfusionEditor.load(pipe, tmp_path / "names.safetensors", C=tiny_C, eigenvalue_floor=FLOOR)
    assert len(pipe.tokenizer) == 49408 and not _wired(pipe)  # refused before any mutation


def test_clip_skip_encodings_and_unmatched_warning(pipe, tiny_C):
    """An SD pipeline with clip_skip feeds final_layer_norm(hidden_states[-2]); it must be recognised."""
    editor = _attach(pipe, tiny_C)
    _perturb(editor)
    te, x, t = pipe.text_encoder, torch.randn(1, pipe.unet.config.in_channels, 8, 8), torch.tensor([5])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "nothing matched" warning
        with editor.context():
            ids, _ = _encode(pipe, [f"a {TOKEN}"])
            skip = te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
            edited = pipe.unet(x, t, skip).sample
    editor.detach()
    with torch.no_grad():
        base = pipe.unet(x, t, skip).sample  # the same encoding through the unedited UNet
    assert not torch.allclose(edited, base, atol=1e-4)
    editor = _attach(pipe, tiny_C)
    with pytest.warns(UserWarning, match="no cross-attention input matched"), torch.no_grad(), editor.context():
        _, enc = _encode(pipe, [f"a {TOKEN}"])
        pipe.unet(x, t, enc * 1.001)
    editor.detach()


# ---------------------------------------------------------------------------------------------- covariance


def test_calculate_input_covariance_matches_manual_second_moment(base_pipe):
    prompts = ["a dog", "a red car on a road", "a photo"]
    with torch.no_grad():
        tok = base_pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        enc = base_pipe.text_encoder(tok.input_ids)[0].double()
    C_all = calculate_input_covariance(base_pipe, prompts, batch_size=2)
    X = enc.reshape(-1, enc.shape[-1])
    torch.testing.assert_close(C_all, X.T @ X / X.shape[0], atol=1e-10, rtol=1e-10)
    C_real = calculate_input_covariance((base_pipe.text_encoder, base_pipe.tokenizer), prompts, tokens="real")
    R = enc[tok.attention_mask.bool()]
    assert R.shape[0] == int(tok.attention_mask.sum()) < X.shape[0]
    torch.testing.assert_close(C_real, R.T @ R / R.shape[0], atol=1e-10, rtol=1e-10)
    assert C_all.dtype == torch.float64


def test_default_covariance_shipped_and_cached(base_pipe, tmp_path):
    stub_te = types.SimpleNamespace(config=types.SimpleNamespace(model_type="clip_text_model", hidden_size=768, vocab_size=49408))
    C = default_covariance(types.SimpleNamespace(text_encoder=stub_te, tokenizer=object()))
    assert C.shape == (768, 768) and C.dtype == torch.float64
    assert abs(torch.linalg.eigvalsh(C)[0].item() - 1.13) < 0.01
    prompts = ["a dog", "a cat", "a tree in the snow"]
    C1 = default_covariance(base_pipe, prompts, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    C2 = default_covariance(base_pipe, prompts, cache_dir=tmp_path)
    assert torch.equal(C1, C2) and len(list(tmp_path.glob("*.safetensors"))) == 1
    default_covariance(base_pipe, prompts[:2], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # the key hashes the prompts


# ---------------------------------------------------------------------------------------------- errors


def test_covariance_errors():
    lin = nn.Linear(6, 3, bias=False)
    with pytest.raises(NullBoothError, match="width 6"):
        Rank1EditModule(lin, C=_spd(5))
    with pytest.raises(NullBoothError, match="no shipped covariance fits text width 6"):
        Rank1EditModule(lin)
    v = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(NullBoothError, match="singular"):
        Rank1EditModule(lin, C=v @ v.T)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    with pytest.raises(NullBoothError, match="not positive semi-definite"):
        Rank1EditModule(lin, C=Q @ torch.diag(torch.tensor([-1.0, 1, 2, 3, 4, 5], dtype=torch.float64)) @ Q.T)
    with pytest.raises(NullBoothError, match="symmetric"):
        inverse_covariance(torch.randn(6, 6))
    with pytest.raises(NullBoothError, match="NaN"):
        inverse_covariance(torch.full((6, 6), float("nan")))
    with pytest.raises(NullBoothError, match="bias-free"):
        Rank1EditModule(nn.Linear(6, 3), C=_spd(6))
    # documented regularisation: a relative eigenvalue floor makes a singular C usable
    C_inv = inverse_covariance(v @ v.T, eigenvalue_floor=1e-6)
    assert torch.isfinite(C_inv).all()
    with pytest.warns(UserWarning, match="regularising"):
        inverse_covariance(np.asarray(v @ v.T), eigenvalue_floor="auto")


def test_editor_input_errors(pipe, tiny_C):
    with pytest.raises(NullBoothError, match="already exists"):
        PerfusionEditor.attach(pipe, "dog", "animal", C=tiny_C, eigenvalue_floor=FLOOR)
    with pytest.raises(NullBoothError, match="width 128"):
        PerfusionEditor.attach(pipe, TOKEN, SUPER, C=_spd(64), eigenvalue_floor=FLOOR)
    with pytest.raises(NullBoothError, match="singular"):
        PerfusionEditor.attach(pipe, TOKEN, SUPER, C=tiny_C, eigenvalue_floor=None)  # rank d−1 (see FLOOR)
    with pytest.raises(NullBoothError, match="superclass"):
        PerfusionEditor.attach(pipe, TOKEN, "  ", C=tiny_C, eigenvalue_floor=FLOOR)
    assert len(pipe.tokenizer) == 49408 and not _wired(pipe)  # every refusal came before any mutation
    editor = _attach(pipe, tiny_C)
    with pytest.raises(NullBoothError, match="already has a Perfusion editor"):
        _attach(pipe, tiny_C)
    with pytest.raises(NullBoothError, match="already exists"):
        add_concept_token_(pipe.tokenizer, pipe.text_encoder, TOKEN, SUPER)
    with pytest.raises(NullBoothError, match="already a Rank1EditModule"):
        make_key_value_proj_rank1_edit_modules_(next(iter(find_cross_attention_layers(pipe.unet).values())), C=tiny_C)
    editor.detach()


def test_loss_weighted_by_mask():
    torch.manual_seed(5)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.rand(2, 1, 8, 8) * 3
    loss = loss_fn_weighted_by_mask(pred, target, mask, normalized_mask_min_value=0.2)
    w = (mask[:, 0] / mask[:, 0].amax(dim=(-2, -1), keepdim=True)).clamp(min=0.2)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(1).mul(w).mean())
    with pytest.raises(NullBoothError, match="spatial size"):
        loss_fn_weighted_by_mask(pred, target, torch.rand(2, 64, 64))
    with pytest.raises(NullBoothError, match="one mask per sample"):
        loss_fn_weighted_by_mask(pred, target, torch.rand(3, 8, 8))
    with pytest.raises(NullBoothError, match=">= 0"):
        loss_fn_weighted_by_mask(pred, target, -torch.rand(2, 8, 8))


def test_concept_file_size_for_sd15():
    assert len(SD15_ATTN2_VALUE_WIDTHS) == 16 and sum(SD15_ATTN2_VALUE_WIDTHS.values()) == 12480
    payload32 = (12480 + 17 * 768) * 4  # o*_V per layer, i* per layer, token embedding
    n32 = concept_file_bytes(SD15_ATTN2_VALUE_WIDTHS, 768, torch.float32)
    n16 = concept_file_bytes(SD15_ATTN2_VALUE_WIDTHS, 768, torch.float16)
    assert payload32 < n32 <= 120_000 and 0 < n32 - payload32 < 8_000
    assert payload32 // 2 < n16 < n32
