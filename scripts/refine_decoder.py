#!/usr/bin/env python
"""Refine the VAE decoder of a saved world model with its encoder frozen: the latents do not move, so the UNet
trained on them stays valid and only what the pipeline decodes gets sharper.

The decoder side (``post_quant_conv`` + ``decoder``) trains on full-size images of the VAE stage's distribution
(``train_world_model.vae_batch``: world renders and broad images) with the VAE stage's reconstruction loss,
L1 + MSE of ``D(z)`` against ``x`` for ``z ~ q(z|x)`` of the frozen encoder, AdamW and a cosine decay to 10 %. The
encoder, ``quant_conv`` (which holds the latent standardisation) and every other component are copied unchanged.
The result is a new model folder; the source is never written.

    python scripts/refine_decoder.py src/nullbooth/data/models/tiny-sd outputs/tiny-sd-refined --steps 5000
    python scripts/vae_gate.py outputs/tiny-sd-refined && python scripts/composition_gate.py outputs/tiny-sd-refined
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger("refine_decoder")
RECORD = "decoder_refinement.json"
# diffusers' SAFETENSORS_WEIGHTS_NAME, spelled out so a refusal needs no diffusers import; read for the stored dtype
WEIGHTS = "diffusion_pytorch_model.safetensors"


def refine_decoder(vae, steps: int, batch: int = 8, lr: float = 2e-4, seed: int = 0) -> dict:
    """Train ``vae``'s decoder side in place for ``steps`` steps of ``batch`` fresh images; return the record."""
    from train_world_model import cosine_to_tenth, reconstruction_loss, vae_batch  # beside this script

    from nullbooth.world.scenes import World, WorldConfig

    res = int(vae.config.sample_size)
    world, pattern_world = World(WorldConfig(resolution=res)), World(WorldConfig(resolution=res, pattern_prob=1.0))
    vae.requires_grad_(False)
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    rng = np.random.default_rng([seed, 7])
    torch.manual_seed(seed)
    vae.train()
    t0, recent = time.process_time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * cosine_to_tenth(step / steps)
        x = vae_batch(world, rng, batch, pattern_world)  # [B, 3, R, R] in [-1, 1]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        x_hat = vae.decode(z).sample
        loss = reconstruction_loss(x_hat, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent.append(float(F.mse_loss(x_hat.detach(), x)))
        if (step + 1) % 200 == 0:
            log.info("decoder step %d  mse %.5f", step + 1, np.mean(recent[-200:]))
    vae.requires_grad_(False)
    vae.eval()
    return {"steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "final_mse": float(np.mean(recent[-200:])) if recent else None,
            "cpu_minutes": round((time.process_time() - t0) / 60, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a saved world model (diffusers folder with vae/)")
    p.add_argument("out", type=Path, help="the refined model's folder (must not exist, unless --overwrite)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    missing = [f"vae/{name}" for name in ("config.json", WEIGHTS) if not (args.model / "vae" / name).is_file()]
    if missing:
        print(f"error: expected a diffusers model folder with vae/config.json and vae/{WEIGHTS} at {args.model}, "
              f"{' and '.join(missing)} missing; pass a folder written by scripts/train_world_model.py",
              file=sys.stderr)
        return 2
    if args.out.resolve() == args.model.resolve() or (args.out.exists() and not args.overwrite):
        print(f"error: expected a new output folder, got {args.out} (the source, or an existing folder); "
              "pass another path, or --overwrite to replace an existing one that is not the source", file=sys.stderr)
        return 2
    if args.steps < 1 or args.batch < 1:
        print(f"error: expected --steps and --batch ≥ 1, got {args.steps} and {args.batch}", file=sys.stderr)
        return 2
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", dtype=torch.float32)
    with safe_open(args.model / "vae" / WEIGHTS, "pt") as f:
        dtype = f.get_tensor(next(iter(f.keys()))).dtype  # save as stored (the shipped model: fp16)
    record = {"source": str(args.model), **refine_decoder(vae, args.steps, args.batch, args.lr, args.seed)}
    log.info("refined: %s", json.dumps(record))
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.model, tmp, ignore=shutil.ignore_patterns("vae", "vae_gate.json", "composition_gate.json",
                                                                   "*_grid.png"))
    vae.to(dtype).save_pretrained(tmp / "vae", safe_serialization=True)
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    log.info("saved %s; gate it with scripts/vae_gate.py and scripts/composition_gate.py", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
