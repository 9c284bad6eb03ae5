#!/usr/bin/env python
"""Train the shipped judge (``src/nullbooth/data/judge/``): a small CNN reading the world's attributes.

    python scripts/train_judge.py                 # ≈ 3–5 min on one CPU thread
    python scripts/train_judge.py --out /tmp/j --epochs 1 --n-train 2000   # quick check

It renders fresh ground-truth images (30 % striped/dotted), trains one head per attribute with blur/noise/
colour augmentation, and reports per-attribute accuracy on 4000 renders from a different seed (augmented
the same way, and clean). Fails (exit 1) if any attribute is below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from nullbooth.world.judge import JUDGE_DIR, train_judge

log = logging.getLogger("train_judge")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=JUDGE_DIR)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=None, help="stop training early after this long")
    p.add_argument("--min-accuracy", type=float, default=0.98)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    t0, c0 = time.monotonic(), time.process_time()
    judge, acc = train_judge(n_train=args.n_train, n_test=args.n_test, epochs=args.epochs, batch=args.batch,
                             lr=args.lr, seed=args.seed,
                             max_seconds=None if args.max_minutes is None else args.max_minutes * 60)
    judge.save(args.out)
    size = (args.out / "judge.safetensors").stat().st_size / 1024
    log.info("accuracy %s", json.dumps(judge.config.accuracy))
    log.info("saved %s (%.0f KiB) after %.1f wall-min, %.1f CPU-min", args.out, size,
             (time.monotonic() - t0) / 60, (time.process_time() - c0) / 60)
    bad = {k: v for k, v in acc.items() if v < args.min_accuracy}
    if bad:
        log.error("below %.2f: %s", args.min_accuracy, bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
