"""Several subjects in one run: Perfusion's one concept per subject, the report, the card and per-subject fidelity.

What is checked against independent computations:
- two Perfusion concepts trained side by side in one editor: a step on subject 0's prompt moves concept 0's
  ``o*_V``, embedding and ``i*`` and leaves concept 1's bit for bit (Adam with zero gradient and zero moments);
  then subject 1's step moves concept 1; save → two concept files that load together, each prompt giving the
  trained pipeline's output (float32 round-off, 1e-5 of the largest value);
- per-subject config problems in one line, named ``subjects.<i>.…``; masks per subject (ones where a subject has
  none);
- ``nullbooth evaluate`` on a two-subject output scores each subject's prompt against its own images (the base
  model's entries recomputed here, 1e-9; the other subject's images give another score), and ``subject`` is
  their mean (1e-12);
- the training header lists every subject; the model card lists both subjects with their triggers and, after
  ``evaluate``, their fidelity.

The end-to-end training runs (``train`` with ``subjects``) need the training set-up to load every subject's
instance images (training/setup.py, training/prior.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_adapter, subject_images
from PIL import Image
from safetensors.torch import load_file

from nullbooth import conditioning
from nullbooth.cli import main
from nullbooth.conditioning import text_encoders
from nullbooth.config import config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.filenames import MODEL_CARD, PERFUSION_CONFIG
from nullbooth.methods.perfusion.compat import calculate_input_covariance
from nullbooth.methods.perfusion.generation import find_concept_files, load_perfusion_personalization
from nullbooth.methods.perfusion.masks import subject_masks
from nullbooth.methods.perfusion.method import Perfusion
from nullbooth.methods.perfusion.subjects import concept_specs
from nullbooth.methods.registry import make_method
from nullbooth.models import load_pipeline
from nullbooth.report.model_card import model_card
from nullbooth.training.report import output_info

RES = 16
TOKENS, SUPERS = ("<sks-toy>", "<sks-pup>"), ("teddy", "dog")
EXACT = 1e-5  # float32 round-off of the same ops in another order


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("subjects")
    striped = subject_images(tmp / "striped")
    plain = tmp / "plain"  # a second subject that looks nothing like the first: flat orange squares
    plain.mkdir()
    for i, size in enumerate((20, 24, 28)):
        Image.new("RGB", (size, size), (240, 140, 20)).save(plain / f"plain_{i}.png")
    prompts = [f"a photo of a {w}" for w in ("dog", "cat", "teddy", "teddy bear", "car", "tree", "boat", "bird")]
    prompts += [f"a painting of a {w} in the snow" for w in ("horse", "chair", "river", "robot", "flower", "lamp")]
    np.save(tmp / "C.npy", calculate_input_covariance(load_pipeline("tiny-sd"), prompts).numpy())
    return {"tmp": tmp, "dirs": (striped, plain), "C": tmp / "C.npy"}


def subjects(world, **extra) -> list[dict]:
    return [{"instance_data_dir": str(d), "instance_prompt": f"a photo of {t}", "class_prompt": f"a photo of a {s}",
             "concept_token": t, "superclass": s, **extra} for d, t, s in zip(world["dirs"], TOKENS, SUPERS)]


def perfusion_cfg(world, out: str, subject_list: list[dict] | None = None, **top):
    return config_from_dict({
        "pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": 3, "method": "perfusion",
        "output_dir": str(world["tmp"] / out), "max_train_steps": 3,
        "subjects": subject_list if subject_list is not None else subjects(world),
        # the tiny text encoder's C is rank d-1: regularise explicitly (as tests/test_perfusion_train.py does)
        "perfusion": {"covariance_file": str(world["C"]), "eigenvalue_floor": 1e-6},
        **top,
    })


@torch.no_grad()
def unet_eps(pipe, prompts: list[str], t: int = 500) -> torch.Tensor:
    enc = pipe.text_encoder(conditioning.tokenize(pipe, prompts)[0])[0]  # [b, 77, d]
    shape = (len(prompts), pipe.unet.config.in_channels, RES // 2, RES // 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return pipe.unet(x, torch.full((len(prompts),), t), enc).sample


def step(method: Perfusion, pipe, optimizer, prompt: str, seed: int) -> None:
    """One optimizer step of the instance loss on ``prompt`` (what the loop does, without its data)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, pipe.unet.config.in_channels, RES // 2, RES // 2)
    x, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    enc = method.encode_prompt(text_encoders(pipe), conditioning.tokenize(pipe, [prompt])).hidden
    method.loss(pipe.unet(x, torch.tensor([700]), enc).sample, noise, [0]).backward()
    optimizer.step()
    optimizer.zero_grad()


def concept_state(method: Perfusion) -> dict[str, torch.Tensor]:
    values = [v for _, v in method.editor.modules.values()]
    return {"o_star": torch.stack([v.concept_outputs.detach().clone() for v in values]),  # [L, K, o]
            "i_star": torch.stack([v.ema_concept_text_encs.detach().clone() for v in values]),  # [L, K, i]
            "embedding": method.editor.embedding.vectors.detach().clone()}  # [K, d]


# --------------------------------------------------------------------------- Perfusion: one concept per subject


@pytest.fixture(scope="module")
def two_concepts(world):
    """Concept 0 trained two steps on its prompt, then concept 1 two steps on its own; saved."""
    method = make_method(perfusion_cfg(world, "unit"))
    pipe = load_pipeline("tiny-sd")
    optimizer = torch.optim.AdamW(method.prepare(pipe, None))
    start = concept_state(method)
    pipe.unet.train()
    with method.context():
        for seed in range(2):
            step(method, pipe, optimizer, f"a photo of {TOKENS[0]}", seed)
        after0 = concept_state(method)
        for seed in range(2):
            step(method, pipe, optimizer, f"a photo of {TOKENS[1]}", seed)
    pipe.unet.eval()
    out = world["tmp"] / "unit"
    files = method.save(out, {"method": "perfusion", "pretrained_model_name_or_path": "tiny-sd"})
    return {"method": method, "pipe": pipe, "start": start, "after0": after0, "out": out, "files": files}


def test_each_subject_trains_its_own_concept(two_concepts):
    method, start, after0 = two_concepts["method"], two_concepts["start"], two_concepts["after0"]
    assert [c.token for c in method.editor.concepts] == list(TOKENS)
    assert [c.superclass for c in method.editor.concepts] == list(SUPERS)
    for key in ("o_star", "i_star"):
        assert not torch.equal(after0[key][:, 0], start[key][:, 0]), f"concept 0's {key} did not move"
        assert torch.equal(after0[key][:, 1], start[key][:, 1]), f"subject 0's steps moved concept 1's {key}"
    assert not torch.equal(after0["embedding"][0], start["embedding"][0])
    assert torch.equal(after0["embedding"][1], start["embedding"][1])
    now = concept_state(method)
    assert not torch.equal(now["o_star"][:, 1], after0["o_star"][:, 1]) and not torch.equal(now["embedding"][1],
                                                                                          after0["embedding"][1])
    changes = method.changes()["concepts"]
    assert set(changes) == set(TOKENS)
    for token in TOKENS:
        assert min(v["o_star_change_rel"] for v in changes[token]["layers"].values()) > 0
    row = next(r for name, r in method.report().items() if name.endswith("to_v"))
    assert row[f"o_star_change_rel[{TOKENS[1]}]"] > 0
    locked = next(r for name, r in method.report().items() if name.endswith("to_k"))["locked_to"]
    assert locked == f"teddy ({TOKENS[0]}), dog ({TOKENS[1]})"


def test_two_concept_files_load_together_and_reproduce_the_trained_pipeline(two_concepts):
    out = two_concepts["out"]
    files = [out / "perfusion_concept_0.safetensors", out / "perfusion_concept_1.safetensors"]
    assert two_concepts["files"] == [*files, out / PERFUSION_CONFIG] and find_concept_files(out) == files
    info = json.loads((out / PERFUSION_CONFIG).read_text())
    assert info["concept_files"] == [f.name for f in files]
    assert [c["concept_token"] for c in info["concepts"]] == list(TOKENS)
    trained = two_concepts["pipe"]
    tensors = [load_file(str(f)) for f in files]
    values = [v for _, v in two_concepts["method"].editor.modules.values()]
    name = next(iter(two_concepts["method"].editor.modules))
    for k in range(2):  # file k holds concept k's o*_V
        assert torch.equal(tensors[k][f"o_star.{name}"], values[0].concept_outputs[k].detach().float())

    fresh = load_pipeline("tiny-sd")
    editor = load_perfusion_personalization(fresh, out)  # what `nullbooth generate --adapter out` attaches
    assert [c.token for c in editor.concepts] == list(TOKENS)
    prompts = [f"a photo of {TOKENS[0]}", f"a photo of {TOKENS[1]}"]
    want, got = unet_eps(trained, prompts), unet_eps(fresh, prompts)
    assert float((got - want).abs().max()) <= EXACT * float(want.abs().max())
    assert not torch.allclose(got[0], got[1])
    editor.detach()


def test_generate_samples_both_concepts_of_a_two_subject_output(two_concepts, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["generate", "--adapter", str(two_concepts["out"]), "--prompt", f"a {TOKENS[0]} next to a {TOKENS[1]}",
                 "--prompt", f"a photo of {TOKENS[1]}", "--seeds", "0", "--steps", "2", "--out", str(out),
                 "--set", f"resolution={RES}"]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split() if line.endswith(".png")]
    assert len(written) == 2 and all(Image.open(p).size == (RES, RES) for p in written)


def test_subject_problems_name_the_subject_in_one_line(world):
    bad = subjects(world)
    bad[1] = {**bad[1], "concept_token": None, "superclass": None}
    with pytest.raises(NullBoothError) as err:
        make_method(perfusion_cfg(world, "x", bad))
    msg = str(err.value)
    assert "\n" not in msg and "2 problem(s)" in msg
    assert "subjects.1.concept_token: expected the new token" in msg and "subjects.1.superclass:" in msg

    bad = subjects(world)
    bad[1] = {**bad[1], "concept_token": TOKENS[0], "instance_prompt": f"a photo of {TOKENS[0]} and a dog"}
    with pytest.raises(NullBoothError) as err:
        make_method(perfusion_cfg(world, "x", bad))
    msg = str(err.value)
    assert "\n" not in msg and f"subjects.1.concept_token: '{TOKENS[0]}' is also subjects.0's token" in msg

    bad = subjects(world)
    bad[0] = {**bad[0], "instance_prompt": f"a {TOKENS[0]} with a {TOKENS[1]}"}
    bad[1] = {**bad[1], "instance_prompt": "a photo of a pup"}
    with pytest.raises(NullBoothError) as err:
        make_method(perfusion_cfg(world, "x", bad, with_prior_preservation=True))
    msg = str(err.value)
    assert f"subjects.0.instance_prompt: 'a {TOKENS[0]} with a {TOKENS[1]}' contains subjects.1's concept" in msg
    assert "subjects.1.instance_prompt: 'a photo of a pup' does not contain subjects.1.concept_token" in msg

    with pytest.raises(NullBoothError, match=r"perfusion.concept_token: with several subjects"):
        make_method(config_from_dict({"method": "perfusion", "subjects": subjects(world),
                                      "perfusion": {"concept_token": "<shared>"}}))
    # one subjects entry may still take the top-level token and superclass
    lone = [{"instance_data_dir": str(world["dirs"][0]), "instance_prompt": "a photo of <t>"}]
    cfg = config_from_dict({"method": "perfusion", "subjects": lone,
                            "perfusion": {"concept_token": "<t>", "superclass": "dog"}})
    assert isinstance(make_method(cfg), Perfusion)
    assert [(s.token, s.superclass, s.where) for s in concept_specs(cfg)] == [("<t>", "dog", "subjects.0.")]


def test_masks_per_subject(world, tmp_path):
    striped = world["dirs"][0]
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in sorted(striped.glob("*.png")):
        w, h = Image.open(path).size
        m = np.zeros((h, w), np.uint8)
        m[:, : w // 2] = 255  # left half
        Image.fromarray(m).save(masks / path.name)
    with_masks = subjects(world)
    with_masks[0]["mask_dir"] = str(masks)
    got = subject_masks(concept_specs(perfusion_cfg(world, "x", with_masks)), RES, RES // 2)  # [6, 8, 8]
    assert got.shape == (6, 8, 8)
    assert float(got[:3, :, :3].min()) > 0.99 and float(got[:3, :, 5:].max()) < 0.01
    assert torch.equal(got[3:], torch.ones(3, 8, 8))  # subject 1 has no masks: every pixel weighs 1
    assert subject_masks(concept_specs(perfusion_cfg(world, "x")), RES, RES // 2) is None
    with pytest.raises(NullBoothError, match=r"subjects.0.mask_dir: masks follow the centre crop"):
        make_method(perfusion_cfg(world, "x", with_masks, random_flip=True))
    with_masks[1]["mask_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(NullBoothError, match=r"subjects.1.mask_dir: .*nowhere does not exist"):
        make_method(perfusion_cfg(world, "x", with_masks))


# --------------------------------------------------------------------------- report, card, evaluation


def test_the_header_lists_every_subject(world):
    cfg = perfusion_cfg(world, "x")
    info = output_info(cfg, make_method(cfg), None)
    assert info["instance_prompt"] is None and [s["concept_token"] for s in info["subjects"]] == list(TOKENS)
    assert [s["instance_data_dir"] for s in info["subjects"]] == [str(d) for d in world["dirs"]]
    one = config_from_dict({"method": "lora", "instance_data_dir": str(world["dirs"][0]),
                            "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"})
    info = output_info(one, make_method(one), None)
    assert info["instance_prompt"] == "a photo of sks dog" and info["class_prompt"] == "a photo of dog"
    assert info["subjects"] == [{"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
                                 "instance_data_dir": str(world["dirs"][0])}]


@pytest.fixture(scope="module")
def lora_like_output(world, tmp_path_factory):
    """A nullbooth adapter (random ΔW) recorded as a two-subject training output: config, report, card."""
    folder = tmp_path_factory.mktemp("two_subject_output")
    random_adapter(folder, scale=0.5)
    entries = [{"instance_data_dir": str(d), "instance_prompt": p, "class_prompt": "a photo of a square"}
               for d, p in zip(world["dirs"], ("a photo of sks square", "a photo of zwx square"))]
    (folder / "train_config.json").write_text(json.dumps({"pretrained_model_name_or_path": "tiny-sd",
                                                           "method": "nullbooth", "subjects": entries}))
    report = {"method": "nullbooth", "pretrained_model_name_or_path": "tiny-sd", "instance_prompt": None,
              "class_prompt": None, "subjects": entries, "steps": 2, "summary": {"final_loss": 0.1}, "weights": []}
    (folder / "train_report.json").write_text(json.dumps(report))
    return folder, entries


def test_the_card_lists_both_subjects(lora_like_output):
    folder, entries = lora_like_output
    report = json.loads((folder / "train_report.json").read_text())
    card = model_card(folder, report, {"max_train_steps": 2})
    assert "on 2 subjects" in card and "instance_prompt: null" in card
    for e in entries:
        assert f"| `{e['instance_prompt']}` | `a photo of a square` | `{e['instance_prompt']}` |" in card
    perfusion = {**report, "method": "perfusion",
                 "subjects": [{**e, "concept_token": t} for e, t in zip(entries, TOKENS)]}
    card = model_card(folder, perfusion, {})
    assert all(f"| `{t}` |" in card for t in TOKENS)


def evaluate_entries(folder: Path, output: Path | None = None) -> dict:
    args = ["evaluate", str(folder), "--prompt", "a red circle", "--seeds", "0,1", "--steps", "2", "--resolution",
            str(RES), "--k", "1", "--features", "judge", "--no-attributes"]
    assert main(args + (["--output", str(output)] if output else [])) == 0
    return json.loads(((output or folder / "evaluation") / "evaluation.json").read_text())


def test_evaluate_scores_each_subject_against_its_own_images(lora_like_output):
    folder, entries = lora_like_output
    report = evaluate_entries(folder)  # default output: the card is refreshed
    got = report["subjects"]
    assert [e["instance_prompt"] for e in got] == [e["instance_prompt"] for e in entries]
    assert [e["prompts"] for e in got] == [[e["instance_prompt"]] for e in entries]
    assert [e["personalized"]["instances"] for e in got] == [3, 3] and report["subject"]["subjects"] == 2
    for who in ("base", "personalized"):
        mean = np.mean([e[who]["fidelity"] for e in got])
        assert report["subject"][who]["fidelity"] == pytest.approx(mean, abs=1e-12)
    card = (folder / MODEL_CARD).read_text(encoding="utf-8")
    assert "subject fidelity (mean over subjects)" in card
    assert all(f"subject fidelity of `{e['instance_prompt']}`" in card for e in entries)
    md = (folder / "evaluation" / "evaluation.md").read_text()
    assert "mean over 2 subjects" in md and all(f"| {e['instance_prompt']} | 3 |" in md for e in entries)

    # Recomputed here: the base model's renders of each subject's prompt (the same seeds, one call as evaluate
    # makes), scored against that subject's own images -- and not against the other subject's.
    from nullbooth.dataset import read_image_folder
    from nullbooth.eval.evaluate import Sampling, render, split_rendered
    from nullbooth.eval.metrics import subject_fidelity
    from nullbooth.world.judge import load_feature_extractor

    judge = load_feature_extractor("judge")
    rendered = render(load_pipeline("tiny-sd"), [e["instance_prompt"] for e in entries],
                      Sampling(seeds=(0, 1), steps=2, resolution=RES))
    generated = [judge(r.flat()) for r in split_rendered(rendered, [1, 1])]
    own = [judge([im for _, im in read_image_folder(e["instance_data_dir"], "test")]) for e in entries]
    for k, entry in enumerate(got):
        assert entry["base"]["fidelity"] == pytest.approx(subject_fidelity(generated[k], own[k]), abs=1e-9)
        assert abs(entry["base"]["fidelity"] - subject_fidelity(generated[k], own[1 - k])) > 1e-3


def test_subject_prompts_without_an_instance_folder_are_refused_for_several_subjects(lora_like_output, capsys):
    folder, _ = lora_like_output
    assert main(["evaluate", str(folder), "--prompt", "a red circle", "--prompt", "a star", "--subject-prompt",
                 "a photo of sks square", "--steps", "2", "--resolution", str(RES), "--k", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on 2 subjects" in err[0]


# --------------------------------------------------------------------------- end to end (needs the set-up change)


def test_a_two_subject_perfusion_run_end_to_end(world):
    """``train`` with two subjects: two concept files, both concepts trained, the header and card list both."""
    from nullbooth.training.loop import train

    cfg = perfusion_cfg(world, "e2e", max_train_steps=4, train_batch_size=2)
    report = train(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
    out = Path(cfg.output_dir)
    assert [s["concept_token"] for s in report["subjects"]] == list(TOKENS)
    assert [p.name for p in find_concept_files(out)] == ["perfusion_concept_0.safetensors",
                                                          "perfusion_concept_1.safetensors"]
    changes = json.loads((out / PERFUSION_CONFIG).read_text())["changes"]["concepts"]
    for token in TOKENS:  # every example of a batch trains its own subject's concept
        assert min(v["o_star_change_rel"] for v in changes[token]["layers"].values()) > 0, token
    card = (out / MODEL_CARD).read_text(encoding="utf-8")
    assert all(f"| `{t}` |" in card for t in TOKENS) and "perfusion_concept_1.safetensors" in card
