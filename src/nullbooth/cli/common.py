"""What every verb's parser shares: ``--config``/``--set``/``--model``/``--seed`` and how flags become config overrides.

Only the standard library is imported here: ``nullbooth --help`` builds every parser and must stay fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from nullbooth.errors import NullBoothError


def _value(key: str, text: str) -> Any:
    """Flag override values are YAML scalars/lists: ``--set nullbooth.cross_attention_layers=[0,2]``."""
    from nullbooth.config import parse_yaml

    return parse_yaml(text, f"the value {text!r} of --set {key.strip()}")


def overrides(args: argparse.Namespace, mapping: Mapping[str, str]) -> dict[str, Any]:
    """Config overrides from the flags named in ``mapping`` (``{argparse dest: dotted config key}``) and ``--set``."""
    out = {key: getattr(args, attr) for attr, key in mapping.items() if getattr(args, attr, None) is not None}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise NullBoothError(f"--set expects KEY=VALUE (e.g. nullbooth.num_denoising_steps=25), got {item!r}")
        key, value = item.split("=", 1)
        out[key] = _value(key, value)
    return out


def add_common(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set``, ``--model`` and ``--seed``."""
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (dotted), repeatable")
    p.add_argument("--pretrained_model_name_or_path", "--model", dest="model")
    p.add_argument("--seed", type=int)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0 1 2"`` → ``[0, 1, 2]`` (an argparse ``type``)."""
    try:
        seeds = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None
    if not seeds or not all(0 <= s < 2**63 for s in seeds):  # torch.Generator.manual_seed's range
        raise argparse.ArgumentTypeError(f"expected one or more seeds in [0, 2**63) like 0,1,2, got {text!r}")
    return seeds
