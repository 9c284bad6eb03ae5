"""Every config key is a flag spelled as the key (issue 17): generated from the schema, equal to the YAML, winning
over it, with a did-you-mean for unknown flags and no abbreviations. Parser-level only: nothing is trained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from pydantic import BaseModel

import nullbooth.training.loop
from nullbooth.cli import collect, generate, train
from nullbooth.cli.common import overrides
from nullbooth.cli.flags import block_of
from nullbooth.cli.main import OneLineParser, main
from nullbooth.config import FLAG_GROUPS, Config, GenerateBlock, NullBoothBlock, load_config
from nullbooth.errors import NullBoothError

DATA = ["--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog"]


def verb_parser(module) -> OneLineParser:
    """The verb's parser as ``nullbooth`` builds it (a :class:`OneLineParser` sub-parser)."""
    sub = OneLineParser(prog="nullbooth").add_subparsers(dest="verb")
    module.register_cli(sub)
    return next(iter(sub.choices.values()))


def from_flags(argv: list[str], config=None, module=train) -> Config:
    """The config ``nullbooth <verb> argv`` would run with (what ``cmd_train`` passes to ``train``)."""
    args = verb_parser(module).parse_args([*argv, *(["--config", str(config)] if config else [])])
    return load_config(args.config, overrides(args))


def leaf_keys(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """``{dotted key: field}`` for every value (not block) of ``model``, nested blocks walked."""
    out = {}
    for name, field in model.model_fields.items():
        inner = block_of(field.annotation)
        out.update(leaf_keys(inner, f"{prefix}{name}.") if inner else {f"{prefix}{name}": field})
    return out


def as_flags(keys: dict[str, object], skip_unset: bool = True) -> list[str]:
    """Each key's default written as its flag would be typed: ``--key``/``--no-key``, text verbatim, else JSON."""
    argv = []
    for key, field in keys.items():
        value = field.get_default(call_default_factory=True)
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif value is not None or not skip_unset:
            argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return argv


def test_every_config_key_is_a_train_flag_that_sets_it():
    """Walks Config.model_fields, so a future key without a flag fails here: each flag must reach its key."""
    keys = leaf_keys(Config)
    assert {k.split(".")[0] for k in keys} == set(Config.model_fields)  # blocks included, via their keys
    args = verb_parser(train).parse_args(as_flags(keys, skip_unset=False))
    given = overrides(args)
    assert set(given) == set(keys)
    # every default typed back in gives the default config (None text keys skipped: "null" there is text;
    # subjects: see test_subjects_as_yaml_flag)
    set_keys = {k: f for k, f in keys.items() if f.get_default(call_default_factory=True) is not None
                and k != "subjects"}
    cfg = from_flags(as_flags(set_keys))
    assert cfg == Config() and cfg.model_fields_set >= {"seed", "nullbooth", "generate"}


@pytest.mark.parametrize("module, block, prefix", [(generate, GenerateBlock, "generate"),
                                                   (collect, NullBoothBlock, "nullbooth")])
def test_generate_and_collect_take_their_block_as_flags(module, block, prefix):
    keys = leaf_keys(block, f"{prefix}.")
    args = verb_parser(module).parse_args(as_flags(keys, skip_unset=False))
    assert set(overrides(args)) == set(keys)


def test_bool_switches_both_ways():
    assert from_flags(["--with_prior_preservation"]).with_prior_preservation is True
    cfg = from_flags(["--no-center_crop", "--no_random_flip", "--nullbooth.save_generations"])
    assert (cfg.center_crop, cfg.random_flip, cfg.nullbooth.save_generations) == (False, False, True)
    cfg = from_flags(["--no-nullbooth.collect_features.q_features"])
    assert cfg.nullbooth.collect_features.selected() == ("k", "v", "out")
    assert from_flags(["--random_flip", "--no-random_flip"]).random_flip is False  # the last one wins


def test_flags_equal_the_yaml(tmp_path):
    """A handful of kinds, as flags and as a file: bool on/off, float, int, list, text, a dotted block key, subjects."""
    data = {"with_prior_preservation": True, "center_crop": False, "learning_rate": 2e-4, "max_train_steps": 7,
            "snr_gamma": 5.0, "resolution": None, "mixed_precision": "no", "method": "lora", "lora_rank": 8,
            "lora_targets": "attn2",
            "nullbooth": {"cross_attention_layers": [0, 2], "leakage_budget": 0.1},
            "perfusion": {"concept_token": "<x>", "eigenvalue_floor": "auto"}, "generate": {"seeds": [3, 4]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    argv = ["--with_prior_preservation", "--no-center_crop", "--learning_rate", "2e-4", "--max_train_steps", "7",
            "--snr_gamma", "5", "--resolution", "null", "--mixed_precision", "no", "--method", "lora", "--rank", "8",
            "--lora_targets", "attn2", "--nullbooth.cross_attention_layers", "[0,2]", "--nullbooth.leakage_budget", "0.1",
            "--perfusion.concept_token", "<x>", "--perfusion.eigenvalue_floor", "auto", "--generate.seeds", "[3, 4]"]
    flags, file = from_flags(argv), load_config(path)
    assert flags.model_dump() == file.model_dump() != Config().model_dump()
    assert flags.lora_rank == 8 and flags.nullbooth.cross_attention_layers == [0, 2] and flags.generate.seeds == [3, 4]
    assert flags.mixed_precision == "no" and flags.snr_gamma == 5.0 and flags.resolution is None
    assert flags.lora_targets == "attn2"


def test_baseline_flags_reach_their_keys_and_a_bad_value_is_one_line():
    cfg = from_flags(["--method", "oft", "--oft_block_size", "16"])
    assert (cfg.method, cfg.oft_block_size, cfg.lora_targets) == ("oft", 16, "attention")
    assert from_flags(["--method", "attn2_finetune"]).method == "attn2_finetune"
    with pytest.raises(NullBoothError, match=r"^flags: 1 problem\(s\): lora_targets: Input should be 'attention' or "
                                             r"'attn2' \(got 'attn3'\)$"):
        from_flags(["--method", "lora", "--lora_targets", "attn3"])


def test_subjects_as_yaml_flag(tmp_path):
    subjects = [{"instance_data_dir": "a", "instance_prompt": "a sks x", "class_prompt": "a x"},
                {"instance_data_dir": "b", "instance_prompt": "a zwx y"}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"subjects": subjects}))
    flags = from_flags(["--subjects", "[{instance_data_dir: a, instance_prompt: a sks x, class_prompt: a x}, "
                                      '{"instance_data_dir": "b", "instance_prompt": "a zwx y"}]'])
    assert flags.model_dump() == load_config(path).model_dump() and len(flags.subjects) == 2
    with pytest.raises(NullBoothError, match="subjects.0.instance_prompt: Field required"):
        from_flags(["--subjects", "[{instance_data_dir: a}]"])


def test_text_keys_are_verbatim_not_yaml():
    """A prompt `yes` or `sks: dog` and a revision `1234` stay text (YAML would read true, a mapping, a number)."""
    cfg = from_flags(["--instance_prompt", "sks: dog", "--validation_prompt", "yes", "--revision", "1234",
                      "--perfusion.concept_token", "*", "--model", "tiny-sd"])
    assert (cfg.instance_prompt, cfg.validation_prompt, cfg.revision) == ("sks: dog", "yes", "1234")
    assert cfg.perfusion.concept_token == "*" and cfg.pretrained_model_name_or_path == "tiny-sd"


def test_flags_win_over_the_yaml_and_set_over_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": 1e-3, "with_prior_preservation": True, "seed": 3,
                                    "nullbooth": {"leakage_budget": 0.2, "num_denoising_steps": 4}}))
    cfg = from_flags(["--learning_rate", "2e-4", "--no-with_prior_preservation", "--nullbooth.leakage_budget", "0.05",
                      "--seed", "5", "--set", "seed=6"], config=path)
    assert cfg.learning_rate == 2e-4 and cfg.with_prior_preservation is False and cfg.seed == 6
    assert cfg.nullbooth.leakage_budget == 0.05 and cfg.nullbooth.num_denoising_steps == 4  # the block is merged
    assert from_flags([], config=path).learning_rate == 1e-3  # a flag not given leaves the file's value alone


def test_train_runs_with_the_flags_config(tmp_path, monkeypatch, capsys):
    """End to end through ``main``: the config ``train`` receives has the flags over the file."""
    seen = []
    monkeypatch.setattr(nullbooth.training.loop, "train", lambda cfg: seen.append(cfg) or {})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "lora", "lora_rank": 2, "max_train_steps": 9}))
    assert main(["train", "--config", str(path), *DATA, "--rank", "16", "--snr_gamma", "5.0"]) == 0
    (cfg,) = seen
    assert (cfg.method, cfg.lora_rank, cfg.max_train_steps, cfg.snr_gamma) == ("lora", 16, 9, 5.0)
    assert cfg.instance_prompt == "a photo of sks dog"


def _one_line_exit(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_unknown_flag_gets_did_you_mean(capsys):
    err = _one_line_exit(["train", *DATA, "--lerning_rate", "1e-4"], capsys)
    assert err == ("nullbooth train: error: unrecognized argument --lerning_rate; did you mean --learning_rate? "
                   "see nullbooth train --help\n")
    err = _one_line_exit(["train", "--nullbooth.leakage_budgt=0.1"], capsys)
    assert "unrecognized argument --nullbooth.leakage_budgt; did you mean --nullbooth.leakage_budget?" in err
    err = _one_line_exit(["generate", "--compare_base"], capsys)
    assert err.startswith("nullbooth generate: error: ") and "did you mean --compare-base?" in err
    err = _one_line_exit(["train", "banana"], capsys)
    assert err == "nullbooth train: error: unrecognized argument banana; see nullbooth train --help\n"


def test_abbreviations_are_refused(capsys):
    """argparse would silently take --learning as --learning_rate (or --steps as --steps_x): never."""
    err = _one_line_exit(["train", *DATA, "--learning", "1e-4"], capsys)
    assert "unrecognized argument --learning; did you mean --learning_rate?" in err
    err = _one_line_exit(["collect", "--nullbooth.leakage", "0.1"], capsys)
    assert "unrecognized argument --nullbooth.leakage;" in err


@pytest.mark.parametrize("argv, words", [
    (["--learning_rate", "-1"], ["flags: 1 problem(s): learning_rate", "greater than 0", "got -1"]),
    (["--max_train_steps", "yes"], ["max_train_steps", "expected a number"]),
    (["--seed", "abc"], ["seed", "valid integer", "got 'abc'"]),
    (["--mixed_precision", "fp64"], ["mixed_precision", "'no', 'fp16' or 'bf16'", "got 'fp64'"]),
    (["--nullbooth.cross_attention_layers", "[-1]"], ["nullbooth.cross_attention_layers", "≥ 0"]),
])
def test_a_bad_value_gets_the_configs_one_line_error(argv, words, monkeypatch, capsys):
    monkeypatch.setattr(nullbooth.training.loop, "train", lambda cfg: pytest.fail("trained on a bad config"))
    assert main(["train", *DATA, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nullbooth train: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)


def test_bad_yaml_in_a_flag_is_one_argparse_line(capsys):
    err = _one_line_exit(["train", "--nullbooth.cross_attention_layers", "[0,"], capsys)
    assert err.startswith("nullbooth train: error: argument --nullbooth.cross_attention_layers: '[0,' is not valid "
                          "YAML"), err


def test_help_lists_the_groups_aliases_and_syntax(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    titles = [out.index(f"\n{title}:\n") for title in FLAG_GROUPS]  # each section, in FLAG_GROUPS' order
    assert titles == sorted(titles)
    for text in ("--lora_rank N, --rank N", "--pretrained_model_name_or_path TEXT, --model TEXT",
                 "--with_prior_preservation, --no-with_prior_preservation", "--nullbooth.leakage_budget X",
                 "--mixed_precision {no,fp16,bf16}", "e.g. '[{instance_data_dir: …, instance_prompt: …}]'",
                 "(default: 4)"):
        assert text in out, text
    assert out.index("\n  --nullbooth.leakage_budget X") > out.index("\nnullbooth (null-space) settings:\n")


def test_help_imports_no_torch():
    code = ("import sys\nfrom nullbooth.cli.main import main\n"
            "for verb in ('train', 'generate', 'collect'):\n"
            "    try:\n        main([verb, '--help'])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "--nullbooth.leakage_budget" in out.stdout, out.stderr
