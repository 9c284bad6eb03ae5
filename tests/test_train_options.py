"""diffusers' DreamBooth training options (issue 17), each checked against what it must change.

- ``snr_gamma``: the step's loss equals Min-SNR-γ computed here in float64 from the recorded timesteps, noise and
  predictions, for ε- and v-prediction, on the instance and the prior term (rtol 1e-5: float32 loop);
- ``noise_offset``: the UNet's ε is shifted per image and channel by ``noise_offset ·`` the loop generator's next
  draw, and the default draws are the ones the loop always drew;
- ``optimizer: prodigy``: trains (its step-size estimate leaves d₀), and a resumed run equals an uninterrupted one
  bit for bit; ``use_8bit_adam`` / a missing prodigyopt fail with one line;
- ``lr_scheduler`` with ``lr_num_cycles`` / ``lr_power``, ``scale_lr``, ``num_train_epochs``, ``allow_tf32``,
  and the new settings a checkpoint refuses to resume under.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import interrupt_after, subject_images
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from nullbooth.config import config_from_dict
from nullbooth.errors import NullBoothError
from nullbooth.models import load_pipeline
from nullbooth.training.checkpoint import RESUME_KEYS, _json, check_resume, setting
from nullbooth.training.loop import accumulate_gradients, train
from nullbooth.training.optim import make_optimizer, resolve_train_steps, steps_from_epochs
from nullbooth.training.setup import Setup, setup

RES = 16  # 4×4 latents: a step is well under a second


@pytest.fixture(scope="module")
def instance(tmp_path_factory) -> Path:
    return subject_images(tmp_path_factory.mktemp("options") / "instance")


def make_cfg(instance: Path, out: Path, **overrides):
    data = {"pretrained_model_name_or_path": "tiny-sd", "resolution": RES, "seed": 3, "method": "dreambooth",
            "instance_data_dir": str(instance), "instance_prompt": "a photo of sks dog", "output_dir": str(out),
            "max_train_steps": 2, "checkpointing_steps": 100, "learning_rate": 1e-3, **overrides}
    return config_from_dict({k: v for k, v in data.items() if v is not None})  # None: leave the key unset


def prepared(cfg) -> Setup:
    ts = setup(cfg, pipe=load_pipeline("tiny-sd"), progress=False)
    if ts.lock is not None:
        ts.lock.release()
    return ts


def recorded_step(ts: Setup, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 0's loss, with what ``add_noise`` received (latents, noise, t) and what the UNet predicted."""
    seen: dict[str, torch.Tensor] = {}
    add_noise = ts.noise_scheduler.add_noise

    def recording(latents, noise, t):
        seen.update(latents=latents.detach().clone(), noise=noise.detach().clone(), t=t.clone())
        return add_noise(latents, noise, t)

    ts.noise_scheduler.add_noise = recording
    hook = ts.unet.register_forward_hook(lambda _m, _a, out: seen.update(pred=out.sample.detach().float().clone()))
    try:
        loss = accumulate_gradients(ts, cfg, 0)
    finally:
        hook.remove()
    return loss, seen


def default_draws(ts: Setup, cfg, offset: bool = False) -> dict[str, torch.Tensor]:
    """The loop generator's draws of step 0, replayed: latent sample, ε, (the offset,) t."""
    g = torch.Generator().manual_seed(cfg.seed * 1000)
    shape = (cfg.train_batch_size, *ts.instance.mean.shape[1:])
    out = {"eps": torch.randn(shape, generator=g), "noise": torch.randn(shape, generator=g)}
    if offset:
        out["offset"] = torch.randn((*shape[:2], 1, 1), generator=g)
    out["t"] = torch.randint(0, ts.noise_scheduler.config.num_train_timesteps, (shape[0],), generator=g)
    return out


# --------------------------------------------------------------------------- snr_gamma, noise_offset


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_the_formula_on_instance_and_prior_terms(instance, tmp_path, prediction):
    gamma, lam = 1.0, 0.5  # γ = 1 clips every t with SNR > 1, so the weights differ from one
    cfg = make_cfg(instance, tmp_path / "snr", snr_gamma=gamma, train_batch_size=2, prior_loss_weight=lam)
    ts = prepared(cfg)
    ts.noise_scheduler = DDPMScheduler.from_config(ts.noise_scheduler.config, prediction_type=prediction)
    # Prior preservation without generating class images: the instance images as "class" examples too (their
    # batches are drawn in another order).
    ts.classes = dataclasses.replace(ts.instance)
    loss, seen = recorded_step(ts, cfg)

    t, pred = seen["t"], seen["pred"].double()  # [2B], [2B, 4, h, w]
    ab = ts.noise_scheduler.alphas_cumprod.double()[t]  # ᾱ_t
    snr = ab / (1 - ab)
    if prediction == "v_prediction":
        a = ab.sqrt()[:, None, None, None]
        target = a * seen["noise"].double() - (1 - a**2).sqrt() * seen["latents"].double()  # v = √ᾱ ε − √(1−ᾱ) z
        w = snr.clamp(max=gamma) / (snr + 1)
    else:
        target, w = seen["noise"].double(), snr.clamp(max=gamma) / snr
    per_example = (pred - target).pow(2).mean(dim=(1, 2, 3))  # [2B]
    expected = (w[:2] * per_example[:2]).mean() + lam * (w[2:] * per_example[2:]).mean()
    unweighted = per_example[:2].mean() + lam * per_example[2:].mean()
    assert float(w.min()) < 0.99  # the weighting does something here
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) != pytest.approx(float(unweighted), rel=1e-3)


def test_default_runs_draw_what_they_always_drew(instance, tmp_path):
    """No offset and no SNR weighting: latent sample, ε and t are the generator's first three draws, and the loss is
    plain MSE (the order and count of draws is what makes earlier runs reproducible)."""
    cfg = make_cfg(instance, tmp_path / "plain")
    ts = prepared(cfg)
    loss, seen = recorded_step(ts, cfg)
    replay = default_draws(ts, cfg)
    assert torch.equal(seen["noise"], replay["noise"]) and torch.equal(seen["t"], replay["t"])
    assert float(loss) == pytest.approx(float((seen["pred"].double() - seen["noise"].double()).pow(2).mean()),
                                        rel=1e-6)


def test_noise_offset_shifts_each_channel_by_the_drawn_offset(instance, tmp_path):
    offset = 0.5
    cfg = make_cfg(instance, tmp_path / "offset", noise_offset=offset, train_batch_size=2)
    ts = prepared(cfg)
    _, seen = recorded_step(ts, cfg)
    replay = default_draws(ts, cfg, offset=True)
    shift = seen["noise"] - replay["noise"]  # [2, 4, h, w]
    assert float(shift.abs().min()) > 0
    assert torch.allclose(shift, (offset * replay["offset"]).expand_as(shift), atol=1e-6)  # constant over h, w
    assert torch.equal(seen["t"], replay["t"])  # the offset is drawn between ε and t


# --------------------------------------------------------------------------- optimizers




def test_prodigy_trains_and_resumes_bit_for_bit(instance, tmp_path):
    # lr 10: on tiny-sd, with clipped gradients, Prodigy's d leaves d₀ at step 3 (at lr 1 only after 8+ steps).
    common = dict(optimizer="prodigy", learning_rate=10.0, checkpointing_steps=1, max_train_steps=4)
    straight = make_cfg(instance, tmp_path / "straight", **common)
    r1 = train(straight, pipe=load_pipeline("tiny-sd"), progress=False)
    killed = make_cfg(instance, tmp_path / "resumed", **common)
    with pytest.raises(KeyboardInterrupt):  # dies in step 4, after checkpoint-3
        train(killed, pipe=interrupt_after(load_pipeline("tiny-sd"), 3), progress=False)
    resumed = make_cfg(instance, tmp_path / "resumed", **common, resume_from_checkpoint="latest")
    r2 = train(resumed, pipe=load_pipeline("tiny-sd"), progress=False)

    state = json.loads((tmp_path / "resumed" / "checkpoint-3" / "trainer_state.json").read_text())
    group = state["optimizer_param_groups"][0]
    assert group["d"] > group["d0"]  # Prodigy's step-size estimate grew from d₀, and the resumed run restored it
    a = load_file(str(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_pipeline("tiny-sd").unet.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed prodigy run differs from the uninterrupted one"
    assert r1["losses"] == r2["losses"] and len(r2["step_seconds"]) == 1
    with pytest.raises(NullBoothError, match="optimizer: 'prodigy' → 'adamw'"):
        check_resume(tmp_path / "straight" / "checkpoint-2", make_cfg(instance, tmp_path / "straight"), 1,
                     torch.device("cpu"))


def two_groups() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 1e-3},
            {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 5e-4}]


def test_prodigy_warns_on_a_low_lr_and_gives_every_group_one_rate(instance, tmp_path, caplog):
    cfg = make_cfg(instance, tmp_path, optimizer="prodigy", learning_rate=1e-3)
    with caplog.at_level(logging.WARNING, logger="nullbooth.training.optim"):
        optimizer, _ = make_optimizer(cfg, two_groups())
    assert "too low" in caplog.text and "first group's lr" in caplog.text
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]
    assert type(optimizer).__name__ == "Prodigy"


def test_missing_optimizer_packages_fail_with_one_line(instance, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    with pytest.raises(NullBoothError, match=r"pip install prodigyopt") as err:
        make_optimizer(make_cfg(instance, tmp_path, optimizer="prodigy"), two_groups())
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(NullBoothError, match=r"pip install bitsandbytes"):
        make_optimizer(make_cfg(instance, tmp_path, use_8bit_adam=True), two_groups())
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=torch.optim.AdamW)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    with pytest.raises(NullBoothError, match=r"CUDA GPU.*use_8bit_adam: false"):  # the parameters are on the CPU
        make_optimizer(make_cfg(instance, tmp_path, use_8bit_adam=True), two_groups())


# --------------------------------------------------------------------------- learning rates and lengths


def rates(cfg, steps: int) -> list[float]:
    optimizer, scheduler = make_optimizer(cfg, two_groups()[:1])
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_with_restarts_goes_back_up_after_each_cycle(instance, tmp_path):
    common = dict(lr_scheduler="cosine_with_restarts", max_train_steps=10)
    two = rates(make_cfg(instance, tmp_path, lr_num_cycles=2, **common), 10)
    one = rates(make_cfg(instance, tmp_path, **common), 10)
    # diffusers' hard restarts: lr₀ · ½(1 + cos(π · ((cycles · k / T) mod 1)))
    assert two == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * ((2 * k / 10) % 1))) for k in range(10)])
    assert two[5] == pytest.approx(1e-3) and two[4] < two[5]  # back up at the start of cycle 2
    assert all(b <= a for a, b in zip(one, one[1:]))  # one cycle only decays


def test_polynomial_power_follows_the_formula(instance, tmp_path):
    cfg = make_cfg(instance, tmp_path, lr_scheduler="polynomial", lr_power=2.0, lr_warmup_steps=2, max_train_steps=10)
    got = rates(cfg, 10)
    end = 1e-7  # diffusers' lr_end
    expected = [1e-3 * k / 2 for k in range(2)] + [(1e-3 - end) * (1 - (k - 2) / 8) ** 2 + end for k in range(2, 10)]
    assert got == pytest.approx(expected, rel=1e-12)
    linear = rates(make_cfg(instance, tmp_path, lr_scheduler="polynomial", lr_warmup_steps=2, max_train_steps=10), 10)
    assert linear[5] > got[5] * 1.5


def test_scale_lr_scales_every_group(instance, tmp_path):
    cfg = make_cfg(instance, tmp_path, scale_lr=True, train_batch_size=2, gradient_accumulation_steps=3)
    optimizer, _ = make_optimizer(cfg, two_groups(), num_processes=2)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * 12, 5e-4 * 12], rel=1e-15)
    optimizer, _ = make_optimizer(make_cfg(instance, tmp_path), two_groups(), num_processes=2)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-4]


def test_num_train_epochs_decides_max_train_steps(instance, tmp_path):
    def steps(n_inst: int, n_cls: int, processes: int = 1, **overrides) -> int:
        data = {"num_train_epochs": 2, **overrides}
        cfg = config_from_dict(data)
        return resolve_train_steps(cfg, n_inst, n_cls, processes).max_train_steps

    assert steps(3, 0) == 6  # 2 epochs × 3 images at batch 1
    assert steps(3, 0, gradient_accumulation_steps=2) == 4  # ⌈3 / 2⌉ optimizer steps per epoch
    assert steps(3, 0, 2, train_batch_size=2) == 2  # ⌈3 / (2 · 2)⌉ = 1
    assert steps(3, 5) == 10  # with prior preservation, the more numerous class images
    assert steps(3, 0, max_train_steps=7) == 7  # a max_train_steps the user set wins
    with pytest.raises(NullBoothError, match="lr_warmup_steps: 9 exceeds max_train_steps 6"):
        steps(3, 0, lr_warmup_steps=9)
    # End to end: set-up resolves it and the loop trains that many steps.
    cfg = make_cfg(instance, tmp_path / "epochs", num_train_epochs=2, max_train_steps=None)
    assert steps_from_epochs(cfg)
    calls = []
    report = train(cfg, pipe=load_pipeline("tiny-sd"), progress=False, on_step=lambda s, _l: calls.append(s))
    assert calls == list(range(1, 7)) and len(report["losses"]) == 6
    saved = json.loads((tmp_path / "epochs" / "train_config.json").read_text())
    assert saved["max_train_steps"] == 6


def test_allow_tf32_is_on_while_training_only(instance, tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        seen = []
        cfg = make_cfg(instance, tmp_path / "tf32", allow_tf32=True, max_train_steps=1)
        train(cfg, pipe=load_pipeline("tiny-sd"), progress=False,
              on_step=lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
        assert seen == [(True, True)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_checkpoint_settings_hold_the_new_keys_as_json(instance, tmp_path):
    cfg = config_from_dict({"subjects": [{"instance_data_dir": str(instance), "instance_prompt": "a sks dog"}],
                            "snr_gamma": 5.0, "optimizer": "prodigy"})
    settings = {k: _json(setting(cfg, k)) for k in RESUME_KEYS}
    assert json.loads(json.dumps(settings)) == settings
    assert settings["subjects"][0]["instance_prompt"] == "a sks dog" and settings["snr_gamma"] == 5.0
    for key in ("snr_gamma", "noise_offset", "optimizer", "scale_lr", "lr_num_cycles", "lr_power", "num_train_epochs",
                "random_flip", "center_crop", "train_text_encoder", "text_encoder_lr", "lora_dropout", "use_dora"):
        assert key in RESUME_KEYS


@pytest.mark.parametrize("method", ["nullbooth", "lora", "perfusion", "dreambooth"])
def test_bf16_mixed_precision_stores_frozen_weights_in_bf16_and_trains_float32(instance, tmp_path, method):
    """diffusers' recipe: with mixed_precision bf16 the weights nobody trains are kept in bf16 (half their memory),
    normalisation layers and everything the optimizer steps stay float32, and the run trains and samples."""
    extra = {"perfusion": {"concept_token": "sksdog", "superclass": "dog"}, "instance_prompt": "a photo of sksdog"} \
        if method == "perfusion" else {}
    if method == "nullbooth":
        (tmp_path / "prior.txt").write_text("a red circle\na blue square on a mat\n")
        extra = {"nullbooth": {"original_knowledge_prompts": str(tmp_path / "prior.txt"), "num_denoising_steps": 2,
                               "cov_matrices_output_dir": str(tmp_path / "cov"), "nullspace_mode": "relative",
                               "nullspace_threshold": 1e-3}}
    cfg = make_cfg(instance, tmp_path / "out", method=method, mixed_precision="bf16", validation_prompt="a dog",
                   num_validation_images=1, validation_steps=2, **extra)
    pipe = load_pipeline("tiny-sd")
    fp32_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    ts = prepared(cfg)
    trained = {id(p) for p in ts.params}
    assert ts.params and all(p.dtype == torch.float32 for p in ts.params)
    networks = {"unet": ts.pipe.unet, "vae": ts.pipe.vae, "text_encoder": ts.pipe.text_encoder}
    for name, network in networks.items():
        for module in network.modules():
            for p in module.parameters(recurse=False):
                if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or id(p) in trained:
                    assert p.dtype == torch.float32, name
                elif method == "dreambooth" and name == "unet":
                    assert p.dtype == torch.float32  # the full fine-tune's UNet is what Adam steps
                elif p.requires_grad is False and module.__class__.__module__.startswith(("diffusers", "transformers")):
                    assert p.dtype == torch.bfloat16, (name, type(module).__name__)
    unet_bytes = sum(p.numel() * p.element_size() for p in ts.pipe.unet.parameters())
    assert (unet_bytes > 0.9 * fp32_bytes) if method == "dreambooth" else (unet_bytes < 0.6 * fp32_bytes)
    losses = train(cfg, pipe=pipe, progress=False)["losses"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert list((tmp_path / "out" / "validation").glob("*.png"))  # sampled under autocast with mixed dtypes


def test_a_half_precision_pipeline_trains_float32_under_its_autocast_and_needs_it(instance, tmp_path):
    cfg = make_cfg(instance, tmp_path / "out", method="dreambooth")
    with pytest.raises(NullBoothError, match="weights are torch.bfloat16, expected mixed_precision 'bf16'"):
        setup(cfg, pipe=load_pipeline("tiny-sd", dtype=torch.bfloat16), progress=False)
    cfg = make_cfg(instance, tmp_path / "out", method="lora", mixed_precision="bf16")
    pipe = load_pipeline("tiny-sd", dtype=torch.bfloat16)
    losses = train(cfg, pipe=pipe, progress=False)["losses"]
    assert all(math.isfinite(x) for x in losses)
    lora = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # upcast: what Adam steps is float32
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
