"""Perfusion on SDXL (``tiny-sdxl``: text encoders 32 + 64 wide, ``attn2`` reads their 96-wide concatenation).

What is checked against independent computations:
- ``C`` is ``96 × 96`` and equals the float64 second moment of :func:`nullbooth.conditioning.encode_prompts`' hidden
  states over the prompt list (rtol 1e-12: only the summation order differs); the shipped CLIP ViT-L/14 matrix is
  never used for SDXL; a ``covariance_file`` of another width is one line (expected width 96, got (32, 32));
- ``prepare`` adds the concept token to both tokenizers and both embedding tables, each row the superclass's row of
  that table; ``i*`` is the mean concept encoding of the concatenated hidden states and ``o*_V = W_V e_H`` with
  ``e_H`` the superclass word's concatenated encoding, both recomputed here from the base pipeline (tolerance 1e-6
  relative); the key lock reads exactly that ``e_H``;
- ``encode_prompt`` with the two encoders returns the pooled embedding; one AdamW step through ``pipe.unet`` with
  ``unet_conditioning`` moves every ``o*_V`` and both embedding rows, and nothing else;
- concept files round-trip (both embedding rows, 96-wide ``i*``) and reproduce the trained UNet exactly; an SDXL file
  on an SD pipeline (and the reverse) is one line; ``detach`` restores the base pipeline exactly;
- generation from the files: prompts without the concept token give the base pipeline's latents bit for bit, and
  with it the edit is applied;
- through the training loop (:func:`nullbooth.training.loop.train`, slow): a 4-step run writes an SDXL concept file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import other_sdxl_pipeline, subject_images
from safetensors import safe_open

from nullbooth.conditioning import encode_ids, encode_prompts, text_encoders, tokenize, tokenizers, unet_conditioning
from nullbooth.config import config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.methods.perfusion import covariance as covariance_module
from nullbooth.methods.perfusion.covariance import default_covariance
from nullbooth.methods.perfusion.editor import _INIT_TEMPLATES, PerfusionEditor
from nullbooth.methods.perfusion.files import PerfusionConcept, load_concept, save_concept
from nullbooth.methods.perfusion.generation import perfusion_generation
from nullbooth.methods.perfusion.method import CONCEPT_FILE, Perfusion
from nullbooth.methods.perfusion.wiring import find_cross_attention_layers
from nullbooth.models import load_pipeline

TOKEN, SUPER = "<sks-toy>", "teddy"  # "teddy" is one CLIP token
RES = 16  # 4×4 latents on tiny-sdxl (VAE factor 4)
PROMPTS = [f"a photo of a {w}" for w in ("dog", "cat", "teddy", "car", "tree", "boat")]
PROMPTS += [f"a painting of a {w} in the snow" for w in ("horse", "chair", "river", "robot")]


@pytest.fixture(scope="module")
def base():
    """The pristine tiny-sdxl: every test that attaches an editor detaches it again."""
    return load_pipeline("tiny-sdxl")


@pytest.fixture(scope="module")
def world(tmp_path_factory, base):
    tmp = tmp_path_factory.mktemp("perfusion_sdxl")
    C = default_covariance(base, PROMPTS, cache_dir=tmp / "cache")
    np.save(tmp / "C.npy", C.numpy())
    return {"tmp": tmp, "instance": subject_images(tmp / "instance"), "C": tmp / "C.npy"}


def make_cfg(world, out: str, **overrides):
    data = {"pretrained_model_name_or_path": "tiny-sdxl", "resolution": RES, "seed": 5, "method": "perfusion",
            "instance_data_dir": str(world["instance"]), "instance_prompt": f"a photo of {TOKEN}",
            "output_dir": str(world["tmp"] / out), "max_train_steps": 4, "checkpointing_steps": 2,
            # tiny encoders' untrained final LayerNorms make C singular: regularise explicitly (no warning)
            "perfusion": {"concept_token": TOKEN, "superclass": SUPER, "covariance_file": str(world["C"]),
                          "eigenvalue_floor": 1e-6}}
    data.update(overrides)
    return config_from_dict(data)


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder", "text_encoder_2")
            for k, v in getattr(pipe, part).state_dict().items()}


@torch.no_grad()
def superclass_encoding(pipe, templates=_INIT_TEMPLATES) -> torch.Tensor:
    """Mean over the templates of the superclass word's encoding at its own position (``[96]``, float64)."""
    ids = tokenize(pipe, [t.format(SUPER) for t in templates])
    hidden = encode_ids(text_encoders(pipe), ids).hidden  # [b, 77, 96]
    sup_id = tokenizers(pipe)[0](SUPER, add_special_tokens=False).input_ids[0]
    pos = (ids[0] == sup_id).to(torch.uint8).argmax(1)
    return hidden[torch.arange(len(templates)), pos].double().mean(0)


@torch.no_grad()
def unet_eps(pipe, prompts: list[str], t: int = 500) -> torch.Tensor:
    enc = encode_ids(text_encoders(pipe), tokenize(pipe, prompts))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), 4, RES // 4, RES // 4, generator=g)
    return pipe.unet(x, torch.full((len(prompts),), t), **unet_conditioning(pipe, enc, None, RES)).sample


def latents(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe(prompts, num_inference_steps=2, guidance_scale=2.0, height=RES, width=RES, output_type="latent",
                generator=torch.Generator().manual_seed(1)).images


# --------------------------------------------------------------------------- C


@pytest.mark.parametrize("which", ["tiny-sdxl", "other"])
def test_covariance_is_the_second_moment_of_the_pipelines_own_encodings(which, base, world, tmp_path):
    pipe = base if which == "tiny-sdxl" else other_sdxl_pipeline()  # encoders 32 + 64, or 32 + 48
    width = sum(te.config.hidden_size for te in text_encoders(pipe))
    hidden = encode_prompts(pipe, PROMPTS).hidden.double().reshape(-1, width)  # every position, as attn2 reads them
    expected = hidden.T @ hidden / hidden.shape[0]
    C = default_covariance(pipe, PROMPTS, cache_dir=tmp_path)
    assert C.shape == (width, width) and C.dtype == torch.float64
    torch.testing.assert_close(C, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    assert torch.equal(default_covariance(pipe, PROMPTS, cache_dir=tmp_path), C)  # the cached copy
    if which == "tiny-sdxl":
        assert torch.equal(torch.from_numpy(np.load(world["C"])), C)


def test_the_shipped_clip_covariance_is_never_used_for_sdxl(base, tmp_path, monkeypatch):
    # SDXL base's first encoder *is* CLIP ViT-L/14; pretend tiny-sdxl's is, too: C must still be the 2-encoder one
    monkeypatch.setattr(covariance_module, "_is_clip_l14", lambda encoder: True)
    monkeypatch.setattr(covariance_module, "builtin_covariance_prompts", lambda: PROMPTS)
    C = default_covariance(base, cache_dir=tmp_path)
    assert C.shape == (96, 96)
    torch.testing.assert_close(C, default_covariance(base, PROMPTS, cache_dir=tmp_path / "2"), rtol=0, atol=0)


def test_a_covariance_file_of_another_width_is_one_line(base, world, tmp_path):
    np.save(tmp_path / "C32.npy", np.eye(32))  # the first encoder's width alone
    cfg = make_cfg(world, "wide")
    cfg.perfusion.covariance_file = str(tmp_path / "C32.npy")
    tokenizer = base.tokenizer
    with pytest.raises(NullBoothError, match=r"expected a covariance C of width 96 .* got \(32, 32\)") as err:
        Perfusion(cfg).prepare(base, None)
    assert "\n" not in str(err.value) and base.tokenizer is tokenizer  # refused before the pipeline changes


# --------------------------------------------------------------------------- the method's pieces


def test_prepare_adds_the_token_to_both_encoders_and_locks_keys_to_the_concatenated_superclass(base, world):
    before, e_h = snapshot(base), superclass_encoding(base)  # e_H [96]: both encoders' encodings side by side
    tables = [te.get_input_embeddings().weight.detach().clone() for te in text_encoders(base)]
    originals = list(tokenizers(base))
    method = Perfusion(make_cfg(world, "pieces"))
    groups = method.prepare(base, None)
    editor = method.editor
    try:
        assert [len(g["params"]) for g in groups] == [len(editor.modules), 2]  # o*_V per layer; 2 embedding rows
        ids = tokenize(base, [f"a photo of {TOKEN}"])  # [2, 1, 77]
        for e, (table, concepts) in enumerate(zip(tables, editor.encoder_concepts)):
            assert bool((ids[e] == concepts[0].token_id).any())  # the token is a word of both tokenizers
            sup = tokenizers(base)[e](SUPER, add_special_tokens=False).input_ids
            assert torch.equal(editor.embeddings[e].vectors[0], table[sup[0]])  # initialised from this table's row
        # i*: the concept token's mean encoding in the concatenated hidden states, recomputed without the context
        texts = [t.format(TOKEN) for t in _INIT_TEMPLATES]
        ids = tokenize(base, texts)
        with torch.no_grad():
            hidden = encode_ids(text_encoders(base), ids).hidden
        pos = (ids[0] == editor.concepts[0].token_id).to(torch.uint8).argmax(1)
        i_star = hidden[torch.arange(len(texts)), pos].double().mean(0)
        for key, value in editor.modules.values():
            for module in (key, value):
                assert module.in_features == 96
                torch.testing.assert_close(module.ema_concept_text_encs[0].double(), i_star, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(value.concept_outputs[0].double(), value.weight.double() @ e_h,
                                       rtol=1e-6, atol=1e-7)
        # the key lock reads the superclass word's concatenated encoding of the same prompt, exactly
        with editor.context(), torch.no_grad():
            plan = editor.ctx.plan(encode_ids(text_encoders(base), tokenize(base, ["a photo of a " + TOKEN])).hidden)
        e_h1 = superclass_encoding(base, ["a photo of a {}"]).float()  # the concept token has no effect on it
        assert plan is not None and torch.equal(plan.superclass_enc[0, 0], e_h1)
    finally:
        editor.detach()
    assert list(tokenizers(base)) == originals and all(torch.equal(v, before[k]) for k, v in snapshot(base).items())


def test_one_step_through_the_unet_moves_o_star_and_both_embeddings_only(base, world, tmp_path):
    before = snapshot(base)
    method = Perfusion(make_cfg(world, "step"))
    optimizer = torch.optim.AdamW(method.prepare(base, None))
    editor = method.editor
    start = {n: v.concept_outputs.detach().clone() for n, (_, v) in editor.modules.items()}
    rows = [e.vectors.detach().clone() for e in editor.embeddings]
    try:
        base.unet.train()
        ids = tokenize(base, [f"a photo of {TOKEN}", "a red circle"])  # [E, B, 77]
        with method.context():
            enc = method.encode_prompt(text_encoders(base), ids)
            assert enc.hidden.shape == (2, 77, 96) and enc.pooled.shape == (2, 32) and enc.hidden.requires_grad
            x = torch.randn(2, 4, RES // 4, RES // 4, generator=torch.Generator().manual_seed(3))
            pred = base.unet(x, torch.tensor([100, 700]), **unet_conditioning(base, enc, None, RES)).sample
            method.loss(pred, torch.zeros_like(pred), [0, 1]).backward()
        assert all(float(e.vectors.grad.abs().sum()) > 0 for e in editor.embeddings)  # gradient into both tables
        optimizer.step()
        for name, (_, value) in editor.modules.items():
            assert float((value.concept_outputs.detach() - start[name]).abs().max()) > 1e-3, name
        assert all(not torch.equal(e.vectors, r) for e, r in zip(editor.embeddings, rows))
        state = method.checkpoint_state()  # exact resume needs both rows
        assert sorted(k.split(".")[0] for k in state if k.endswith("token_embedding.vectors")) == [
            "text_encoder", "text_encoder_2"]
        base.unet.eval()
        # the concept file holds both rows and reproduces the trained UNet exactly
        paths = method.save(tmp_path, {"method": "perfusion"})
        concept = load_concept(tmp_path / CONCEPT_FILE)
        assert concept.embedding_widths == (32, 64) and concept.text_dim == 96
        assert torch.equal(concept.token_embedding_2, editor.embeddings[1].vectors[0].detach())
        with safe_open(str(tmp_path / CONCEPT_FILE), framework="pt") as f:
            assert f.metadata()["format_version"] == "2" and "token_embedding_2" in f.keys()
        with editor.context():
            trained_eps = unet_eps(base, [f"a photo of {TOKEN} on a table"])
    finally:
        editor.detach()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(base).items())  # nothing but the edit's own tensors
    C = torch.from_numpy(np.load(world["C"]))
    loaded = PerfusionEditor.load(base, paths[0], C=C, eigenvalue_floor=1e-6)
    try:
        with loaded.context():
            assert torch.equal(unet_eps(base, [f"a photo of {TOKEN} on a table"]), trained_eps)
    finally:
        loaded.detach()


def test_a_concept_file_for_the_other_family_is_one_line(base, tiny_pipe, tmp_path):
    sd = tiny_pipe  # only read: both files are refused before anything is attached
    layers = {n: torch.zeros(8) for n in ("l0",)}
    sdxl_file = tmp_path / "xl.safetensors"
    save_concept(sdxl_file, PerfusionConcept(TOKEN, SUPER, torch.zeros(32), {"l0": torch.zeros(96)}, layers,
                                             token_embedding_2=torch.zeros(64)))
    with pytest.raises(NullBoothError, match="expected an SDXL pipeline") as err:
        PerfusionEditor.load(sd, sdxl_file)
    assert "\n" not in str(err.value)
    sd_file = tmp_path / "sd.safetensors"
    save_concept(sd_file, PerfusionConcept(TOKEN, SUPER, torch.zeros(128), {"l0": torch.zeros(128)}, layers))
    with pytest.raises(NullBoothError, match=r"expected an SD 1\.x/2\.x pipeline") as err:
        perfusion_generation(base, [sd_file])  # refused before any C is computed
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- through the loop, and generation


@pytest.mark.slow
def test_training_on_sdxl_and_generation_from_its_concept_file(base, world):
    from nullbooth.training.loop import train

    cfg = make_cfg(world, "loop")
    train(cfg, pipe=load_pipeline("tiny-sdxl"), progress=False)
    out = Path(cfg.output_dir)
    concept = load_concept(out / CONCEPT_FILE)
    assert concept.embedding_widths == (32, 64) and concept.text_dim == 96
    e_h = superclass_encoding(base)
    for name, attn in find_cross_attention_layers(base.unet).items():  # every o*_V left its start W_V e_H
        assert float((concept.o_star[name].double() - attn.to_v.weight.detach().double() @ e_h).abs().max()) > 1e-3, name
    plain = ["a photo of a dog", "a red circle on the left"]
    reference = latents(base, plain + [f"a photo of {SUPER}"])
    editor = perfusion_generation(base, [out / CONCEPT_FILE])  # C from the run's perfusion_config.json
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="prompts with a Perfusion concept token")  # nothing matched
            with editor.context():
                got = latents(base, plain + [f"a photo of {TOKEN}"])
                matched = editor.ctx._matched
        assert torch.equal(got[:2], reference[:2])  # no concept token: the base pipeline's latents bit for bit
        assert matched > 0 and not torch.equal(got[2], reference[2])  # the edit reached attn2
    finally:
        editor.detach()
