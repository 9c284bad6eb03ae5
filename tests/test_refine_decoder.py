"""``scripts/refine_decoder.py``: the decoder learns, the latents (and so the UNet) do not move, the source is kept."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nullbooth.models import resolve_model_path


@pytest.fixture(scope="module")
def script(scripts_importable):
    import refine_decoder

    return refine_decoder


def _digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_refining_moves_only_the_decoder_and_writes_a_new_folder(script, tmp_path):
    src = Path(resolve_model_path("tiny-sd"))
    before = _digest(src)
    out = tmp_path / "refined"
    assert script.main([str(src), str(out), "--steps", "2", "--batch", "2"]) == 0
    assert _digest(src) == before  # the source is never written
    old = load_file(src / "vae" / "diffusion_pytorch_model.safetensors")
    new = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert old.keys() == new.keys() and all(new[k].dtype == old[k].dtype for k in old)
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in old if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(frozen) + len(trained) == len(old)
    assert all((new[k] == old[k]).all() for k in frozen)  # same latents: the UNet stays valid
    assert any(not (new[k] == old[k]).all() for k in trained)
    assert _digest(out / "unet") == _digest(src / "unet")
    assert not (out / "vae_gate.json").exists() and not (out / "composition_gate.json").exists()  # stale gates
    record = json.loads((out / script.RECORD).read_text())
    assert record["steps"] == 2 and record["batch"] == 2 and record["source"] == str(src)


def test_refusals_name_the_problem_and_write_nothing(script, tmp_path, capsys):
    src = Path(resolve_model_path("tiny-sd"))
    assert script.main([str(src), str(src)]) == 2
    assert "expected a new output folder" in capsys.readouterr().err
    assert script.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "vae/config.json" in capsys.readouterr().err
    (tmp_path / "bin" / "vae").mkdir(parents=True)  # a VAE saved without safetensors
    (tmp_path / "bin" / "vae" / "config.json").write_text("{}")
    assert script.main([str(tmp_path / "bin"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vae/diffusion_pytorch_model.safetensors missing" in err
    (tmp_path / "taken").mkdir()
    assert script.main([str(src), str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert script.main([str(src), str(tmp_path / "out"), "--steps", "0"]) == 2
    assert not (tmp_path / "out").exists()
