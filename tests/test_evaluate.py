"""``nullbooth evaluate``: scores on ground-truth renders, the CLI end to end, bad input; the benchmark's CI slice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import random_adapter

from nullbooth.cli import main
from nullbooth.errors import NullBoothError
from nullbooth.eval.evaluate import Rendered, compare, subject_scores
from nullbooth.models import materialize_builtin
from nullbooth.world.judge import load_judge
from nullbooth.world.scenes import COLOURS, World
from nullbooth.world.subjects import subject_instances

REPO = Path(__file__).resolve().parents[1]
EVAL = ["--steps", "2", "--resolution", "16", "--seeds", "0,1,2"]


def world_set(prompts_attrs, world: World) -> Rendered:
    """Ground-truth renders: prompt ``i``'s images are exactly what it states."""
    return Rendered([p for p, _ in prompts_attrs], [[world.render(a)] for _, a in prompts_attrs])


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def truth():
    world = World()
    return world, [world.prompt(5, i, "train", shape="circle") for i in range(12)]


def test_identical_sets_score_as_unchanged(judge, truth):
    world, pa = truth
    base = world_set(pa, world)
    r = compare(base, world_set(pa, world), judge, judge)
    assert r["paired"]["rmse"] == 0.0
    assert r["distribution"]["mmd2"] <= 1e-12  # the unbiased estimate of MMD² is ≤ 0 for two equal sets
    assert r["distribution"]["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert all(v == 1.0 for v in r["attributes"]["agreement"].values())
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in r["attributes"]["jsd"].values())
    # The judge reads ground-truth renders right (its held-out accuracy is ≥ 99.8 %).
    assert r["attributes"]["base"]["all"] >= 0.95
    # Blue squares from other seeds: pairing circle i with square i (same seed: same colour, place, background)
    # would make each one the other's nearest neighbour and 1-NN accuracy ≈ 0, which is right but not the point.
    squares = world_set([world.prompt(6, i, "train", shape="square", colour="blue") for i in range(12)], world)
    other = compare(base, Rendered(base.prompts, squares.images), judge, judge)["distribution"]
    assert other["mmd2"] > 0.05 and other["frechet_distance"] > 1.0 and other["one_nn_accuracy"] > 0.6  # 0.5 = indistinguishable


def test_changed_colours_lower_accuracy_and_agreement(judge, truth):
    from dataclasses import replace

    world, pa = truth
    others = list(COLOURS)
    shifted = [(p, replace(a, colour=others[(others.index(a.colour) + 1) % len(others)])) for p, a in pa]
    r = compare(world_set(pa, world), world_set(shifted, world), judge, judge)
    a = r["attributes"]
    assert a["personalized"]["colour"] <= 0.1 and a["base"]["colour"] >= 0.9
    assert a["agreement"]["colour"] <= 0.1 and a["agreement"]["shape"] >= 0.9
    assert a["jsd"]["colour"] > 0.1
    assert r["paired"]["rmse"] > 0.05
    assert all(row["personalized_accuracy"] < row["base_accuracy"] for row in r["per_prompt"])


def test_subject_scores_prefer_the_subject(judge):
    instances = subject_instances(3)
    views = Rendered(["a sks star"], [subject_instances(5)[3:]])  # two other views of the same star
    world = World()
    circles = Rendered(["a red circle"], [[world.sample(0, i, shape="circle", colour="red").image for i in range(2)]])
    s, c = subject_scores(views, instances, judge, judge), subject_scores(circles, instances, judge, judge)
    assert s["fidelity"] > c["fidelity"]  # the legacy embedding cosine
    # The reference is what the judge reads off the instance images (no Subject given, as in the CLI).
    assert s["instance_source"] == "instances" and s["instance_pattern"] == "stripes" and s["instance_shape"] == "star"
    assert s["subject_match"] == 1.0 and s["pattern_match"] == 1.0 and s["shape_match"] == 1.0
    assert c["subject_match"] == 0.0 and c["shape_match"] == 0.0
    assert s["identity_similarity"] > 0.5 > 0.05 > c["identity_similarity"]


def test_too_few_images_is_an_error_not_nan(judge, truth):
    world, pa = truth
    few = world_set(pa[:3], world)
    with pytest.raises(NullBoothError, match=r"at least 6 images per model .*got 3"):
        compare(few, few, judge, judge)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A nullbooth adapter with random null spaces and a large ΔW (changes images), recording its base."""
    folder = tmp_path_factory.mktemp("adapter")
    random_adapter(folder, scale=1.0)
    (folder / "train_config.json").write_text(json.dumps({"pretrained_model_name_or_path": "tiny-sd"}))
    return folder


def test_cli_writes_reports(adapter_dir, tmp_path, capsys):
    inst = tmp_path / "inst"
    inst.mkdir()
    for i, im in enumerate(subject_instances(2)):
        im.save(inst / f"{i}.png")
    out = tmp_path / "report"
    rc = main(["evaluate", str(adapter_dir), "--prompt", "a red circle on the left", "--prompt", "a blue square",
               "--subject-prompt", "a sks star", "--instance-dir", str(inst), "--attributes", "--output", str(out),
               *EVAL])
    assert rc == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["method"] == "nullbooth" and report["images_per_model"] == 6
    assert report["paired"]["rmse"] > 0  # ΔW is large: the images moved
    assert set(report["distribution"]) >= {"mmd2", "frechet_distance", "precision", "recall", "density", "coverage",
                                            "one_nn_accuracy"}
    assert {"base", "personalized", "agreement", "jsd"} <= set(report["attributes"])
    assert [r["prompt"] for r in report["per_prompt"]] == ["a red circle on the left", "a blue square"]
    assert 0 <= report["per_prompt"][0]["base_accuracy"] <= 1
    assert report["subject"]["personalized"]["images"] == 3 and report["subject"]["base"]["instances"] == 2
    assert 0 <= report["subject"]["personalized"]["subject_match"] <= 1
    assert report["subject"]["personalized"]["instance_shape"] == "star"  # read off the two instance images
    md = (out / "evaluation.md").read_text()
    assert "| mmd2 |" in md and "Subject fidelity" in md and "a blue square" in md
    assert "| subject match | identity similarity |" in md and "embedding cosine (legacy)" in md
    assert (out / "samples.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_a_model_against_itself_is_unchanged(tmp_path):
    """Same seeds for both models: the base folder as "personalised" model gives the base's own pixels."""
    folder = materialize_builtin("tiny-sd")
    out = tmp_path / "same"
    assert main(["evaluate", str(folder), "--base", "tiny-sd", "--prompt", "a red circle", "--prompt", "a star",
                 "--no-attributes", "--output", str(out), *EVAL]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["paired"]["rmse"] == 0.0 and "attributes" not in report
    assert report["distribution"]["mmd2"] <= 1e-12


@pytest.mark.parametrize("case, needle", [
    ("architecture", "different architectures"),
    ("no_prompts", "empty prompt list"),
    ("blank_file", "holds no prompt"),
    ("missing_features", "does not exist"),
    ("wrong_features", "holds a 'bert' model"),
    ("few_images", "need at least 6 images per model"),
    ("missing_model", "found nothing"),
])
def test_bad_input_is_one_clear_line(case, needle, adapter_dir, tmp_path, capsys):
    args = ["evaluate", str(adapter_dir), "--prompt", "a red circle", "--prompt", "a star", *EVAL]
    if case == "architecture":
        args = ["evaluate", str(materialize_builtin("tiny-sd2")), "--base", "tiny-sd", "--prompt", "a star", "--prompt", "a red circle", *EVAL]
    elif case == "no_prompts":
        args = ["evaluate", str(adapter_dir), *EVAL]
    elif case == "blank_file":
        (tmp_path / "p.txt").write_text("\n  \n")
        args = ["evaluate", str(adapter_dir), "--prompts", str(tmp_path / "p.txt"), *EVAL]
    elif case == "missing_features":
        args += ["--features", str(tmp_path / "nowhere")]
    elif case == "wrong_features":
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        args += ["--features", str(tmp_path / "bert")]
    elif case == "few_images":
        args = ["evaluate", str(adapter_dir), "--prompt", "a star", "--steps", "2", "--seeds", "0,1"]
    elif case == "missing_model":
        args = ["evaluate", str(tmp_path / "no_run"), "--base", "tiny-sd", "--prompt", "a star", "--prompt", "a red circle", *EVAL]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
