"""Config keys as command-line flags, generated from the schema: ``--learning_rate``, ``--nullbooth.leakage_budget``.

Each flag is spelled as its key (diffusers' ``train_dreambooth.py`` names for the top level, dotted for a block's
keys), so a key added to :mod:`nullbooth.config` is a flag without touching the CLI. A flag stores nothing unless
given (``default=SUPPRESS``): only what the user typed becomes an override, on top of the YAML file. Values are
read as the config file reads them and validated by the config, so a bad one gets the config's one-line error:

- true/false keys are switches, ``--key`` on and ``--no-key`` (or ``--no_key``) off (diffusers' ``store_true``
  plus a way off);
- text keys (``str``, a choice of words) take the text verbatim, so a prompt ``yes`` or ``a: b`` stays text;
- everything else is one YAML value: ``--learning_rate 1e-4``, ``--resolution null``,
  ``--nullbooth.cross_attention_layers [0,2]``, ``--subjects '[{instance_data_dir: a, instance_prompt: sks x}]'``.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from nullbooth.cli.common import config_dest
from nullbooth.config import parse_yaml
from nullbooth.errors import NullBoothError


def _options(annotation: Any) -> list[Any]:
    """The alternatives of an annotation, ``None`` dropped: ``float | Literal['auto'] | None`` → [float, Literal]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [o for a in typing.get_args(annotation) for o in _options(a)]
    return [] if annotation is type(None) else [annotation]


def block_of(annotation: Any) -> type[BaseModel] | None:
    """The settings block a field holds (``nullbooth: NullBoothBlock``), or ``None`` for a value."""
    options = _options(annotation)
    if len(options) == 1 and isinstance(options[0], type) and issubclass(options[0], BaseModel):
        return options[0]
    return None


def _words(option: Any) -> tuple[str, ...] | None:
    """The words a text option allows: ``()`` for any ``str``, the values of a ``Literal`` of strings, else ``None``."""
    if option is str:
        return ()
    args = typing.get_args(option)
    if typing.get_origin(option) is typing.Literal and all(isinstance(a, str) for a in args):
        return args
    return None


def _metavar(options: list[Any]) -> str:
    """How the value reads in ``--help``: ``N``, ``X``, ``{a,b}``, ``X|auto``, ``[…]``, ``[{…}]``."""
    parts = []
    for option in options:
        words, origin = _words(option), typing.get_origin(option)
        if origin is list:
            item = typing.get_args(option)[0]
            part = "[{…}]" if block_of(item) else "[…]"
        elif words:
            part = "{" + ",".join(words) + "}" if len(options) == 1 else "|".join(words)
        else:
            part = {int: "N", float: "X", str: "TEXT"}.get(option, "VALUE")
        if part not in parts:
            parts.append(part)
    return "|".join(parts)


def _shown(value: Any) -> str:
    """A default as YAML writes it: ``true``, ``[0, 1]``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value)) + "]"
    return str(value)


def _help(field: FieldInfo, options: list[Any]) -> str:
    """The field's description, its default when the description does not already name one, and list syntax."""
    text = field.description or ""
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if default is not None and "default" not in text:  # an unset default goes without saying
        text = f"{text} (default: {_shown(default)})" if text else f"default: {_shown(default)}"
    item = next((typing.get_args(o)[0] for o in options if typing.get_origin(o) is list), None)
    if item is not None and (block := block_of(item)):
        keys = ", ".join(f"{k}: …" for k, f in block.model_fields.items() if f.is_required())
        text += f"; YAML on the command line, e.g. '[{{{keys}}}]'"
    return text.replace("%", "%%")  # argparse %-formats help


def _yaml_value(text: str) -> Any:
    """An argparse ``type``: the text as one YAML value (bad YAML is argparse's one-line error naming the flag)."""
    try:
        return parse_yaml(text, repr(text))
    except NullBoothError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_field_flag(container: Any, key: str, field: FieldInfo, aliases: Iterable[str] = ()) -> None:
    """``--KEY`` (plus ``aliases``) for the config value at dotted ``key``, on a parser or an argument group."""
    options = _options(field.annotation)
    flags = [f"--{key}", *aliases]
    common = {"dest": config_dest(key), "default": argparse.SUPPRESS}
    if options == [bool]:
        container.add_argument(*flags, action=argparse.BooleanOptionalAction, help=_help(field, options), **common)
        container.add_argument(f"--no_{key}", action="store_false", help=argparse.SUPPRESS, **common)
    elif all(_words(o) is not None for o in options):
        container.add_argument(*flags, metavar=_metavar(options), help=_help(field, options), **common)
    else:
        container.add_argument(*flags, type=_yaml_value, metavar=_metavar(options),
                               help=_help(field, options), **common)


def add_block_flags(container: Any, block: type[BaseModel], prefix: str) -> None:
    """``--PREFIX.KEY`` for every key of ``block`` (a block inside it: ``--PREFIX.KEY.SUBKEY``)."""
    for name, field in block.model_fields.items():
        inner = block_of(field.annotation)
        if inner is not None:
            add_block_flags(container, inner, f"{prefix}.{name}")
        else:
            add_field_flag(container, f"{prefix}.{name}", field)


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel], groups: Mapping[str, Iterable[str]],
                     aliases: Mapping[str, Iterable[str]] | None = None) -> None:
    """A flag for every key of ``model``, in ``--help`` sections ``{title: top-level keys}``; a block's keys dotted.

    A key no section names still gets its flag, under "other settings", so a new key is never left without one.
    """
    named = {key for keys in groups.values() for key in keys}
    sections = [*groups.items(), ("other settings", [k for k in model.model_fields if k not in named])]
    for title, keys in sections:
        if not keys:
            continue
        group = parser.add_argument_group(title)
        for key in keys:
            field = model.model_fields[key]
            block = block_of(field.annotation)
            if block is not None:
                group.description = f"the {key}: block of a config file, one --{key}.KEY flag per key"
                add_block_flags(group, block, key)
            else:
                add_field_flag(group, key, field, (aliases or {}).get(key, ()))
