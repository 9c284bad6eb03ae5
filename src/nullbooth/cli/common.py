"""What every verb's parser shares: ``--config``/``--set``/``--model``/``--seed`` and how flags become config overrides.

Only the standard library is imported here; :mod:`nullbooth.cli.flags` generates the flags from the schema.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from nullbooth.errors import NullBoothError

# argparse dest of a flag that sets a config key: every such dest the user gave becomes an override.
CONFIG_DEST = "cfg:"


def config_dest(key: str) -> str:
    """The argparse ``dest`` of a flag that sets the dotted config ``key`` (see :func:`overrides`)."""
    return CONFIG_DEST + key


def _value(key: str, text: str) -> Any:
    """Flag override values are YAML scalars/lists: ``--set nullbooth.cross_attention_layers=[0,2]``."""
    from nullbooth.config import parse_yaml

    return parse_yaml(text, f"the value {text!r} of --set {key.strip()}")


def overrides(args: argparse.Namespace, mapping: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Config overrides: the flags with a :func:`config_dest`, those named in ``mapping`` (``{dest: dotted key}``)
    and, last so they win, ``--set``."""
    out = {key: getattr(args, attr) for attr, key in (mapping or {}).items() if getattr(args, attr, None) is not None}
    out.update({dest.removeprefix(CONFIG_DEST): value for dest, value in vars(args).items()
                if dest.startswith(CONFIG_DEST)})
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise NullBoothError(f"--set expects KEY=VALUE (e.g. nullbooth.num_denoising_steps=25), got {item!r}")
        key, value = item.split("=", 1)
        out[key] = _value(key, value)
    return out


def add_config_source(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set``."""
    p.add_argument("--config", metavar="FILE", help="YAML config file (optional; flags win over it)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (dotted), repeatable")


def add_common(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set``, ``--model`` and ``--seed``."""
    add_config_source(p)
    p.add_argument("--pretrained_model_name_or_path", "--model", dest="model")
    p.add_argument("--seed", type=int)


def add_key_flag(container: Any, name: str, key: str, **kwargs: Any) -> None:
    """A verb's own name for a config key (``--steps`` for ``generate.num_inference_steps``), on a parser or group.

    It shares the key's dest with the generated ``--KEY`` flag and, like it, stores nothing unless given.
    """
    if kwargs.get("action") not in ("store_true", "store_false") and "choices" not in kwargs:
        kwargs.setdefault("metavar", name.lstrip("-").upper())
    container.add_argument(name, dest=config_dest(key), default=argparse.SUPPRESS, **kwargs)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0 1 2"`` → ``[0, 1, 2]`` (an argparse ``type``)."""
    try:
        seeds = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None
    if not seeds or not all(0 <= s < 2**63 for s in seeds):  # torch.Generator.manual_seed's range
        raise argparse.ArgumentTypeError(f"expected one or more seeds in [0, 2**63) like 0,1,2, got {text!r}")
    return seeds
