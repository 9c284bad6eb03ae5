"""SD 1.5, SD 2.1 and SDXL at their real size: does every verb run, how long, how much memory; FLOPs and memory at 512/1024 px.

Pipelines are built in code from the public configs of ``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-2-1`` and ``stabilityai/stable-diffusion-xl-base-1.0`` (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder*/`` and ``scheduler/`` configs, copied below) with seeded random weights —
nothing is downloaded. Each is written once with ``save_pretrained`` (float16 files, loaded as float32) under
``$NULLBOOTH_CACHE/bench-realsize`` and loaded through :func:`nullbooth.models.load_pipeline` like any folder.
Tokenizers are :func:`nullbooth.models.build_clip_tokenizer` (the real CLIP BPE); the OpenCLIP tokenizers of SD 2.1
and SDXL's second encoder differ from it only in padding with ``!`` (id 0), which is set here. The SD 1.5 / 2.1
safety checker and feature extractor are left out (nullbooth loads without them).

Measured (CPU, low resolution, random weights — the numbers are costs, not quality): every verb in a fresh
subprocess (``os.wait4`` gives that process's own peak RSS, also when it is killed): ``collect`` (with plain
``pipe(...)`` sampling of the same prompts × steps × CFG in the same process first, for the ratio), ``train``
with nullbooth / lora / perfusion, and ``generate`` from each trained result. The ratio is reported as a whole
and split: hooked sampling against plain sampling (the per-prompt cost, what dominates with many prompts) and the
fixed finalize/write time after the last batch.

Analytic (no weights: models built on the meta device): UNet forward FLOPs per image at 512 and 1024 px
(``torch.utils.flop_counter``), the FLOPs of the float64 second moments ``Σ x xᵀ`` of the attn2 ``to_q`` and
``to_out.0`` inputs (2·n·d² per layer and feature, n tokens, d width) as a share of them, the accumulator memory
of a 50-step collection and the model's weight memory.

    python benchmarks/bench_realsize.py [--families sd15,sd21,sdxl] [--resolution 64] [--steps 2] [--prompts 8]

Writes ``benchmarks/results/realsize.json`` and ``realsize.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("nullbooth", "lora", "perfusion")
CONCEPT = "<sks-dog>"  # Perfusion's new token; the other methods train on "sks dog"
WEIGHT_DTYPES = {"float32": (torch.float32, "no"), "bfloat16": (torch.bfloat16, "bf16"), "float16": (torch.float16, "fp16")}
GB = 1e9

# --------------------------------------------------------------------------- the public configs

_SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                "clip_sample": False}
_SD_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
           "layers_per_block": 2, "norm_num_groups": 32}
_SD_UNET = {"act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "flip_sin_to_cos": True, "freq_shift": 0,
            "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": 32}
_CLIP_TEXT = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-05, "attention_dropout": 0.0,
              "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "bos_token_id": 0,
              "eos_token_id": 2, "pad_token_id": 1}
CLIP_L = {**_CLIP_TEXT, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
          "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768}  # OpenAI CLIP ViT-L/14


@dataclass(frozen=True)
class Family:
    """One public pipeline: its configs as published (diffusers/transformers keys) and what the pipeline adds."""

    name: str
    hub_id: str
    pipeline: str  # model_index.json _class_name
    native: int  # px: the unet's sample_size × 8
    unet: dict[str, Any]
    vae: dict[str, Any]
    # (transformers class, config, tokenizer pad token) per text encoder, in the pipeline's order
    text_encoders: tuple[tuple[str, dict[str, Any], str], ...]
    scheduler: tuple[str, dict[str, Any]]
    pipeline_config: dict[str, Any] = field(default_factory=dict)  # registered to model_index.json


FAMILIES: dict[str, Family] = {
    "sd15": Family(
        "sd15", "runwayml/stable-diffusion-v1-5", "StableDiffusionPipeline", 512,
        unet={**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        vae={**_SD_VAE, "sample_size": 512},
        text_encoders=(("CLIPTextModel", CLIP_L, "<|endoftext|>"),),
        scheduler=("PNDMScheduler", _SD_SCHEDULE),
        pipeline_config={"requires_safety_checker": False},
    ),
    "sd21": Family(
        "sd21", "stabilityai/stable-diffusion-2-1", "StableDiffusionPipeline", 768,
        unet={**_SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
              "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
              "only_cross_attention": False, "num_class_embeds": None},
        vae={**_SD_VAE, "sample_size": 768},
        # OpenCLIP ViT-H/14's text tower, its last layer dropped (SD 2.x conditions on the penultimate layer)
        text_encoders=(("CLIPTextModel", {**_CLIP_TEXT, "hidden_act": "gelu", "hidden_size": 1024,
                                          "intermediate_size": 4096, "num_attention_heads": 16,
                                          "num_hidden_layers": 23, "projection_dim": 512}, "!"),),
        scheduler=("DDIMScheduler", {**_SD_SCHEDULE, "prediction_type": "v_prediction"}),
        pipeline_config={"requires_safety_checker": False},
    ),
    "sdxl": Family(
        "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", 1024,
        unet={**{k: v for k, v in _SD_UNET.items() if k not in ("block_out_channels",)},
              "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
              "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
              "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
              "projection_class_embeddings_input_dim": 2816, "mid_block_type": "UNetMidBlock2DCrossAttn",
              "sample_size": 128},
        vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        # CLIP ViT-L/14, then OpenCLIP ViT-bigG/14 with its text projection (the pooled text_embeds, 1280 wide)
        text_encoders=(("CLIPTextModel", CLIP_L, "<|endoftext|>"),
                       ("CLIPTextModelWithProjection", {**_CLIP_TEXT, "hidden_act": "gelu", "hidden_size": 1280,
                                                        "intermediate_size": 5120, "num_attention_heads": 20,
                                                        "num_hidden_layers": 32, "projection_dim": 1280}, "!")),
        scheduler=("EulerDiscreteScheduler", {
            **{k: v for k, v in _SD_SCHEDULE.items() if k not in ("clip_sample", "trained_betas")},
            "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
            "timestep_spacing": "leading", "use_karras_sigmas": False}),
        pipeline_config={"force_zeros_for_empty_prompt": True},
    ),
}

# --------------------------------------------------------------------------- building


def clip_tokenizer(pad_token: str):
    """The CLIP BPE tokenizer, padding with ``pad_token`` (OpenCLIP's tokenizers pad with ``!``, OpenAI's with EOS)."""
    from nullbooth.models import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    tokenizer.pad_token = pad_token
    return tokenizer


def build_pipeline(family: Family, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The family's pipeline with seeded random weights; ``device="meta"`` allocates nothing (shapes only).

    Each part is cast to ``dtype`` as soon as it is built, so building SDXL in float16 peaks near its float32 UNet.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting a freshly built model with .to(dtype) warns about nothing
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**family.unet).to(dtype)
        vae = AutoencoderKL(**family.vae).to(dtype)
        encoders = [getattr(transformers, cls)(transformers.CLIPTextConfig(**cfg)).to(dtype).eval()
                    for cls, cfg, _ in family.text_encoders]
    scheduler_cls, scheduler_cfg = family.scheduler
    parts: dict[str, Any] = {"unet": unet, "vae": vae, "scheduler": getattr(diffusers, scheduler_cls).from_config(scheduler_cfg)}
    for i, (encoder, (_, _, pad)) in enumerate(zip(encoders, family.text_encoders)):
        suffix = "" if i == 0 else f"_{i + 1}"
        parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = encoder, clip_tokenizer(pad)
    if family.pipeline == "StableDiffusionXLPipeline":
        return diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False, **family.pipeline_config)
    return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             **family.pipeline_config)


def materialize(family: Family) -> Path:
    """Write the family's random-weight pipeline once (float16 safetensors) and return its folder."""
    from nullbooth.models import cache_dir

    key = hashlib.sha256(repr(family).encode()).hexdigest()[:12]
    folder = cache_dir() / "bench-realsize" / f"{family.name}-{key}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family.name}-", dir=folder.parent))
    try:
        # float16 files: half the disk; load_pipeline reads them back as float32
        build_pipeline(family, dtype=torch.float16).save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- analytic tables


def attn2_layers(unet) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in unet.named_modules() if name.endswith("attn2")]


def unet_costs(family: Family, px: int) -> dict[str, Any]:
    """FLOPs of one UNet evaluation of one image at ``px`` and of the float64 moments of its attn2 inputs.

    Counted on the meta device. The second moment ``S += xᵀx`` of ``x`` [n, d] costs 2·n·d² FLOPs (a matmul, as
    the flop counter counts them); per evaluation for every attn2 layer's ``to_q`` and ``to_out.0`` inputs (n =
    the layer's h·w tokens), and once per prompt for the text encodings (77 tokens, ``to_k``'s input).
    """
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**family.unet)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    hooks = []
    for name, attn in attn2_layers(unet):
        for feature, module in (("q", attn.to_q), ("out", attn.to_out[0])):
            def hook(_m, inputs, _out, name=name, feature=feature):
                shapes.setdefault(name, {})[feature] = tuple(inputs[0].shape)
            hooks.append(module.register_forward_hook(hook))
    latent, text_width = px // 8, family.unet["cross_attention_dim"]
    kwargs: dict[str, Any] = {}
    if family.unet.get("addition_embed_type") == "text_time":
        pooled = family.text_encoders[-1][1]["projection_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled, device="meta"),
                                       "time_ids": torch.empty(1, 6, device="meta")}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(torch.empty(1, 4, latent, latent, device="meta"), torch.tensor([500], device="meta"),
             torch.empty(1, 77, text_width, device="meta"), **kwargs)
    for h in hooks:
        h.remove()
    moments = sum(2 * s[1] * s[2] ** 2 for layer in shapes.values() for s in layer.values())
    return {"px": px, "unet_flops": counter.get_total_flops(), "moment_flops": moments,
            "text_moment_flops_per_prompt": 2 * 77 * text_width ** 2, "moment_share": moments / counter.get_total_flops(),
            "attn2_layers": len(shapes)}


def accumulator_memory(family: Family, steps: int = 50) -> dict[str, Any]:
    """Bytes of a ``steps``-step collection's sums: per timestep one d×d matrix per attn2 layer for q and one for out,
    one text matrix shared by every k/v (the same encodings feed every layer), and the summed statistic (one q and one
    out matrix per layer, the text one) that training reads — always float64."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**family.unet)
    layers = attn2_layers(unet)
    widths = [(a.to_q.in_features, a.to_out[0].in_features) for _, a in layers]
    per_step = sum(dq * dq + do * do for dq, do in widths)  # matrix entries per timestep
    text = family.unet["cross_attention_dim"] ** 2
    by_width: dict[int, int] = {}
    for dq, _ in widths:
        by_width[dq] = by_width.get(dq, 0) + 1
    return {"steps": steps, "attn2_layers": len(layers), "q_widths": {str(k): v for k, v in sorted(by_width.items())},
            "text_width": family.unet["cross_attention_dim"],
            "per_timestep_float64_bytes": 8 * per_step * steps, "per_timestep_float32_bytes": 4 * per_step * steps,
            "text_float64_bytes": 8 * text, "summed_float64_bytes": 8 * (per_step + text)}


def model_memory(family: Family) -> dict[str, Any]:
    """Parameters per component (counted on the meta device) and their bytes in float32 and float16/bfloat16."""
    pipe = build_pipeline(family, device="meta")
    names = ["unet", "vae"] + ["text_encoder" + ("" if i == 0 else f"_{i + 1}") for i in range(len(family.text_encoders))]
    params = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in names}
    total = sum(params.values())
    return {"params": params, "total_params": total, "float32_bytes": 4 * total, "float16_bytes": 2 * total}


def analytic(family: Family, sizes: tuple[int, ...] = (512, 1024)) -> dict[str, Any]:
    return {"flops": [unet_costs(family, px) for px in sizes], "accumulators": accumulator_memory(family),
            "model": model_memory(family)}


# --------------------------------------------------------------------------- the verbs (one process each)


def make_prompts(n: int) -> list[str]:
    things = ["dog", "cat", "red car", "wooden house", "oak tree", "blue vase", "mountain lake", "city street"]
    styles = ["a photo of", "a painting of", "a sketch of", "a close-up photo of"]
    return [f"{styles[(i // len(things)) % len(styles)]} a {things[i % len(things)]}" for i in range(n)]


def write_inputs(root: Path, args: argparse.Namespace) -> None:
    """Prompt file and a few instance images (a striped square: any picture does for timing)."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("\n".join(make_prompts(args.prompts)) + "\n")
    inst = root / "instance"
    inst.mkdir(exist_ok=True)
    r = args.resolution
    stripes = (np.add.outer(np.arange(r), np.arange(r)) // max(r // 8, 1)) % 2 == 0
    for i in range(3):
        a = np.zeros((r, r, 3), np.uint8)
        a[stripes], a[~stripes] = (0, 160, 160 - 40 * i), (250, 110, 185)
        Image.fromarray(a).save(inst / f"{i}.png")


def make_config(args: argparse.Namespace, root: Path, method: str = "nullbooth", stats_run: str | None = None):
    from nullbooth.config import config_from_dict

    prompt = f"a photo of {CONCEPT}" if method == "perfusion" else "a photo of sks dog"
    return config_from_dict({
        "pretrained_model_name_or_path": str(args.model_dir), "resolution": args.resolution, "seed": 0,
        "method": method, "instance_data_dir": str(root / "instance"), "instance_prompt": prompt,
        "class_prompt": "a photo of a dog", "train_batch_size": 1, "max_train_steps": args.train_steps,
        "checkpointing_steps": 10_000, "mixed_precision": args.mixed_precision, "output_dir": str(root / f"train-{method}"),
        "nullbooth": {"original_knowledge_prompts": str(root / "prompts.txt"), "cov_matrices_output_dir": str(root / "cov"),
                      "num_denoising_steps": args.steps, "collection_batch_size": args.batch,
                      "nullspace_mode": "relative", "nullspace_threshold": 1e-3, "stats_run": stats_run},
        "perfusion": {"concept_token": CONCEPT, "superclass": "dog"},
        "generate": {"prompts": ["a photo of sks dog on a beach" if method != "perfusion" else
                                 f"a photo of {CONCEPT} on a beach"], "seeds": [0], "num_inference_steps": args.steps,
                     "adapter": str(root / f"train-{method}"), "out_dir": str(root / f"generate-{method}")},
    })


def plain_sampling(pipe, prompts: list[str], args: argparse.Namespace, sampler: str) -> tuple[float, float]:
    """Wall and CPU seconds of ``pipe(...)`` over ``prompts`` (CFG 7.5, latents out): what collection hooks into.

    With collection's sampler: the pipeline's own may evaluate the UNet more often for the same steps (SD 1.5's
    PNDM takes steps + 1).
    """
    from nullbooth.runs.plan import make_scheduler

    original, pipe.scheduler = pipe.scheduler, make_scheduler(pipe, sampler)
    try:
        pipe(prompts[:1], height=args.resolution, width=args.resolution, num_inference_steps=1, output_type="latent")
        start, cpu = time.perf_counter(), time.process_time()  # after a warm-up call: first-call costs aren't sampling
        for i in range(0, len(prompts), args.batch):
            chunk = prompts[i:i + args.batch]
            pipe(chunk, height=args.resolution, width=args.resolution, num_inference_steps=args.steps,
                 guidance_scale=7.5, generator=[torch.Generator().manual_seed(i + j) for j in range(len(chunk))],
                 output_type="latent")
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        pipe.scheduler = original


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One verb on one family, in this fresh process; returns what the driver records."""
    from nullbooth.models import load_pipeline

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    start = time.perf_counter()
    pipe = load_pipeline(str(args.model_dir), device=args.device, dtype=WEIGHT_DTYPES[args.dtype][0])
    result: dict[str, Any] = {"load_s": time.perf_counter() - start}
    verb, _, method = args.worker.partition(":")
    start = time.perf_counter()
    if verb == "collect":
        from nullbooth.runs.collect import collect

        cfg = make_config(args, root)
        result["plain_s"], result["plain_cpu_s"] = plain_sampling(pipe, make_prompts(args.prompts), args,
                                                                  cfg.nullbooth.sampler)
        marks: list[tuple[float, float]] = []
        start, cpu = time.perf_counter(), time.process_time()
        run = collect(cfg, pipe=pipe, fresh=True, progress=False,
                      on_batch=lambda _acc, _b: marks.append((time.perf_counter(), time.process_time())))
        last = marks[-1] if marks else (start, cpu)
        result.update(run_dir=str(run), sampling_s=last[0] - start, sampling_cpu_s=last[1] - cpu,
                      collect_cpu_s=time.process_time() - cpu)
    elif verb == "train":
        from nullbooth.training.loop import train

        report = train(make_config(args, root, method, args.stats_run), pipe=pipe, progress=False)
        result["step_seconds"] = report.get("step_seconds")
    elif verb == "generate":
        from nullbooth.generate import generate

        result["files"] = len(generate(make_config(args, root, method), pipe=pipe))
    result["verb_s"] = time.perf_counter() - start
    if args.device.startswith("cuda"):
        result["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
    return result


# --------------------------------------------------------------------------- driver


def one_line(text: str) -> str:
    """The error a failed verb ends with: the last line that is not a blank or a traceback frame."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def run_verb(args: argparse.Namespace, family: Family, verb: str, root: Path, extra: list[str]) -> dict[str, Any]:
    """Run ``verb`` in a fresh process; its wall time and own peak RSS (``os.wait4``), also when it fails."""
    cmd = [sys.executable, __file__, "--worker", verb, "--family", family.name, "--root", str(root),
           "--model-dir", str(args.model_dir), "--threads", str(args.threads), "--resolution", str(args.resolution),
           "--steps", str(args.steps), "--prompts", str(args.prompts), "--batch", str(args.batch),
           "--train-steps", str(args.train_steps), "--device", args.device, "--dtype", args.dtype, "--mixed-precision",
           args.mixed_precision, *extra]
    if available_gb() < args.needed_gb:
        print(f"  {family.name} {verb}: skipped, {available_gb():.0f} GB of memory available", flush=True)
        return {"verb": verb, "works": False, "wall_s": 0.0, "cpu_s": 0.0, "peak_rss_gb": 0.0,
                "error": f"not run: needs ≈ {args.needed_gb:.0f} GB free, {available_gb():.0f} GB available"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        watchdog = threading.Timer(args.verb_timeout, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.kill()
            raise
        finally:
            watchdog.cancel()
        timed_out = time.perf_counter() - start >= args.verb_timeout
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    row: dict[str, Any] = {"verb": verb, "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                           "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 2)}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        row.update(works=True, **json.loads(lines[-1].removeprefix("RESULT ")))
    else:
        why = (f"timed out after {args.verb_timeout:.0f} s" if timed_out else
               f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else one_line(stderr))
        row.update(works=False, error=why or f"exit {proc.returncode}")
    print(f"  {family.name} {verb}: {'works' if row['works'] else 'FAILS'} {row['wall_s']} s ({row['cpu_s']} CPU s), "
          f"{row['peak_rss_gb']} GB{'' if row['works'] else ' — ' + row['error']}", flush=True)
    return row


def available_gb() -> float:
    with open("/proc/meminfo") as fh:
        info = {ln.split(":")[0]: int(ln.split()[1]) for ln in fh}
    return info["MemAvailable"] * 1024 / GB


def measure_family(args: argparse.Namespace, family: Family, work: Path) -> dict[str, Any]:
    """Build (once), then collect → train × methods → generate × methods, each verb in its own process."""
    start = time.perf_counter()
    # built in a child process: the driver would otherwise keep the freed weights' memory (6.9 GB after SDXL)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        args.model_dir = pool.apply(materialize, (family,))
    built_s = time.perf_counter() - start
    root = work / family.name
    write_inputs(root, args)
    # A shared machine: a verb that would not fit is not started. Peak RSS measured on CPU at 64 px, 2 steps: 1.5×
    # the float32 weights for SD 1.5 and 2.1, over 1.63× for SDXL's collect (22.7 GB when stopped, still growing).
    args.needed_gb = 1.7 * model_memory(family)["float32_bytes" if args.dtype == "float32" else "float16_bytes"] / GB
    rows = [run_verb(args, family, "collect", root, [])]
    stats = rows[0].get("run_dir")
    for method in args.methods:
        rows.append(run_verb(args, family, f"train:{method}", root, ["--stats-run", stats] if stats else []))
    for method, trained in zip(args.methods, rows[1:]):
        if trained["works"]:
            rows.append(run_verb(args, family, f"generate:{method}", root, []))
    collect = rows[0]
    ratio = {}
    if collect["works"]:
        ratio = {"plain_s": collect["plain_s"], "collect_s": collect["verb_s"], "sampling_s": collect["sampling_s"],
                 "ratio": collect["verb_s"] / collect["plain_s"],
                 "cpu_ratio": collect["collect_cpu_s"] / collect["plain_cpu_s"],
                 "sampling_ratio": collect["sampling_s"] / collect["plain_s"],
                 "sampling_cpu_ratio": collect["sampling_cpu_s"] / collect["plain_cpu_s"],
                 "finalize_s": collect["verb_s"] - collect["sampling_s"]}
    return {"build_s": round(built_s, 1), "model_dir": str(args.model_dir), "verbs": rows, "collect_vs_plain": ratio}


def gb(n: float) -> str:
    return f"{n / GB:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The results as the short tables of ``benchmarks/results/*.md``."""
    a = result["args"]
    where = "CPU" if result["device"] == "cpu" else "GPU"
    lines = [
        "# Real-size families: SD 1.5, SD 2.1, SDXL", "",
        f"`{result['command']}` — **{where}** ({result['machine']}, {a['threads']} threads, torch {result['torch']}; "
        f"load average {result['load_average']} at the start), random weights from the public configs, "
        f"{a.get('dtype', 'float32')} "
        f"(training autocast: {a['mixed_precision']}), "
        f"{a['resolution']} px, {a['steps']} sampling steps, CFG 7.5, {a['prompts']} prompts in batches of {a['batch']}, "
        f"{a['train_steps']} training step(s) at batch 1. Whole run: {result['total_s'] / 60:.1f} min. "
        "Measured numbers are this device's; the FLOP and memory tables are analytic.", "",
        f"## Does every verb run ({where}, measured)", "",
        "Each verb in a fresh process; wall time includes loading the pipeline; peak RSS is that process's.", "",
        "| family | verb | works | wall (s) | CPU (s) | load (s) | verb (s) | peak RSS (GB) | GPU peak (GB) | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, fam in result["families"].items():
        for r in fam["verbs"]:
            verb_s = f"{r['verb_s']:.1f}" if "verb_s" in r else ""
            load_s = f"{r['load_s']:.1f}" if "load_s" in r else ""
            error = r.get("error", "").replace("|", "\\|")
            lines.append(f"| {name} | {r['verb']} | {'yes' if r['works'] else '**no**'} | {r['wall_s']:.0f} | "
                         f"{r['cpu_s']:.0f} | {load_s} | "
                         f"{verb_s} | {r['peak_rss_gb']:.1f} | {r.get('cuda_peak_gb', '')} | {error} |")
    lines += ["", f"## Collection against plain sampling ({where}, measured, same process)", "",
              f"{a['prompts']} prompts × {a['steps']} steps × 2 CFG branches; plain = `pipe(...)` to latents with collection's "
              "sampler. "
              "Hooked sampling = `collect` up to its last batch; finalize = what follows (null spaces, files).", "",
              "| family | plain (s) | collect (s) | ratio (wall / CPU) | hooked sampling (s) | sampling ratio (wall / CPU) "
              "| finalize (s) |", "|---|---|---|---|---|---|---|"]
    for name, fam in result["families"].items():
        c = fam.get("collect_vs_plain") or {}
        if c:
            lines.append(f"| {name} | {c['plain_s']:.1f} | {c['collect_s']:.1f} | **{c['ratio']:.2f}** / "
                         f"{c['cpu_ratio']:.2f} | {c['sampling_s']:.1f} | {c['sampling_ratio']:.2f} / "
                         f"{c['sampling_cpu_ratio']:.2f} | {c['finalize_s']:.1f} |")
    lines += ["", "## UNet FLOPs per image and the float64 moments' share (analytic)", "",
              "One UNet evaluation of one image (CFG doubles both); moments: 2·n·d² per attn2 layer for the `to_q` and "
              "`to_out.0` inputs (n tokens, d width).", "",
              "| family | px | UNet TFLOP | moments GFLOP | share | attn2 layers |", "|---|---|---|---|---|---|"]
    for name, fam in result["analytic"].items():
        for f in fam["flops"]:
            lines.append(f"| {name} | {f['px']} | {f['unet_flops'] / 1e12:.3f} | {f['moment_flops'] / 1e9:.1f} | "
                         f"{100 * f['moment_share']:.1f} % | {f['attn2_layers']} |")
    lines += ["", "## Memory (analytic, GB)", "",
              "Accumulators of a 50-step collection: per-timestep q and out matrices of every attn2 layer; the text "
              "matrix is shared by every k/v; the summed statistic (training's) is float64 in every design.", "",
              "| family | attn2 q widths (count) | per-timestep float64 | per-timestep float32 | summed float64 | "
              "weights float32 | weights fp16/bf16 |", "|---|---|---|---|---|---|---|"]
    for name, fam in result["analytic"].items():
        acc, model = fam["accumulators"], fam["model"]
        widths = ", ".join(f"{w}×{n}" for w, n in acc["q_widths"].items())
        lines.append(f"| {name} | {widths} | {gb(acc['per_timestep_float64_bytes'])} | "
                     f"{gb(acc['per_timestep_float32_bytes'])} | {gb(acc['summed_float64_bytes'])} | "
                     f"{gb(model['float32_bytes'])} | {gb(model['float16_bytes'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="collection and generation sampling steps")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (then use the native --resolution and bf16)")
    ap.add_argument("--dtype", default="float32", choices=tuple(WEIGHT_DTYPES),
                    help="the weights every verb loads; half precision trains under the same autocast")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"), help="training's autocast")
    ap.add_argument("--verb-timeout", type=float, default=1800.0, help="seconds before a verb is stopped and recorded "
                    "as not working")
    ap.add_argument("--no-measure", action="store_true", help="the analytic tables only")
    ap.add_argument("--out", default=str(RESULTS))
    # worker side
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--family", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--stats-run", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dtype != "float32":  # a half-precision pipeline trains under its own autocast (nullbooth train says so)
        args.mixed_precision = WEIGHT_DTYPES[args.dtype][1]
    args.families = [f for f in args.families.split(",") if f]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [f for f in args.families if f not in FAMILIES] + [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown families/methods {unknown}; families: {', '.join(FAMILIES)}, methods: {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/bench_realsize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": args.device, "machine": (torch.cuda.get_device_name() if args.device.startswith("cuda") else
                                           f"{platform.machine()}, {os.cpu_count()} cores"), "torch": torch.__version__,
        "load_average": round(os.getloadavg()[0], 1),
        "args": {k: getattr(args, k) for k in ("families", "methods", "resolution", "steps", "prompts", "batch",
                                               "train_steps", "threads", "dtype", "mixed_precision")},
        "analytic": {name: analytic(FAMILIES[name]) for name in args.families}, "families": {},
    }
    if not args.no_measure:
        with tempfile.TemporaryDirectory(prefix="bench-realsize-") as work:
            for name in args.families:
                print(f"{name}: building / measuring", flush=True)
                result["families"][name] = measure_family(args, FAMILIES[name], Path(work))
                write_results(result, Path(args.out), time.perf_counter() - start)  # a long run leaves what it has
    print(write_results(result, Path(args.out), time.perf_counter() - start))


def write_results(result: dict[str, Any], out: Path, seconds: float) -> str:
    result["total_s"] = seconds
    out.mkdir(parents=True, exist_ok=True)
    (out / "realsize.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (out / "realsize.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
