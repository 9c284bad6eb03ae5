"""Write the quickstart data: the striped-star subject's instance images and the world's prompt lists.

    python scripts/make_example_data.py [--out examples]

Everything is drawn from a seed by ``nullbooth.world.scenes``, so the committed files are reproducible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nullbooth.world.subjects import subject_instances, write_prompt_lists


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "examples"))
    ap.add_argument("--prior", type=int, default=100, help="prior-knowledge prompts")
    ap.add_argument("--eval", type=int, default=24, help="evaluation / held-out prompts")
    args = ap.parse_args()
    out = Path(args.out)
    star = out / "star"
    star.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(subject_instances(5)):
        image.save(star / f"{i:02d}.png", optimize=True)
    for path in write_prompt_lists(out, n_prior=args.prior, n_eval=args.eval):
        print(path)


if __name__ == "__main__":
    main()
