#!/usr/bin/env python
"""Train the shipped judge (``src/nullbooth/data/judge/``): a small CNN reading world attributes and open-palette
subjects.

    python scripts/train_judge.py                 # ≈ 28 CPU-min on one thread
    python scripts/train_judge.py --out /tmp/j --epochs 1 --n-world 2000 --n-subjects 2000   # quick check

It renders fresh ground-truth images (world renders, 30 % striped/dotted, and random subjects of a training
family), trains every head with blur/noise/small colour-drift augmentation (``--max-shift N``: also translations by
up to N pixels; ``--stem C``: a stride-1 first layer of width C on the full-resolution pixels; both off for the
shipped judge), and records in ``judge.json`` the world accuracy on 2000 world renders of another seed (augmented
and clean), the training time, and the open-palette errors on 2000 subjects of the held-out family
``subjects.HELDOUT_SEED``. Fails (exit 1) if a world attribute is below ``--min-accuracy`` or
held-out shape / pattern-kind accuracy is below ``--min-heldout``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from nullbooth.world.judge import JUDGE_DIR
from nullbooth.world.judge_train import train_judge

log = logging.getLogger("train_judge")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=JUDGE_DIR)
    p.add_argument("--n-world", type=int, default=16000)
    p.add_argument("--n-subjects", type=int, default=40000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-shift", type=int, default=0, help="translate training images by up to this many pixels")
    p.add_argument("--stem", type=int, default=0,
                   help="width of a stride-1 conv on the full-resolution pixels (0: none)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training early after this long")
    p.add_argument("--min-accuracy", type=float, default=0.98)
    p.add_argument("--min-heldout", type=float, default=0.9)
    args = p.parse_args(argv)
    if args.stem < 0 or args.max_shift < 0:
        p.error(f"expected --stem and --max-shift ≥ 0, got {args.stem} and {args.max_shift}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    t0, c0 = time.monotonic(), time.process_time()
    judge, acc = train_judge(n_world=args.n_world, n_subjects=args.n_subjects, n_test=args.n_test,
                             epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed,
                             max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
                             max_shift=args.max_shift, stem=args.stem)
    judge.config.training["cpu_seconds"] = round(time.process_time() - c0, 1)  # what the one-thread budget counts
    judge.save(args.out)
    size = (args.out / "judge.safetensors").stat().st_size / 1024
    log.info("world accuracy %s", json.dumps(judge.config.accuracy))
    log.info("held-out subjects %s", json.dumps(judge.config.heldout))
    log.info("saved %s (%.0f KiB) after %.1f wall-min, %.1f CPU-min", args.out, size,
             (time.monotonic() - t0) / 60, (time.process_time() - c0) / 60)
    bad = {k: v for k, v in acc.items() if v < args.min_accuracy}
    bad.update({k: judge.config.heldout[k] for k in ("shape", "pattern_kind")
                if judge.config.heldout[k] < args.min_heldout})
    if bad:
        log.error("below the bar: %s", bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
