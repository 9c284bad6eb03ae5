"""Reading a config: strict YAML, dotted ``--set`` overrides, validation errors as one line naming every field.

Unknown keys are errors (a typo must not silently fall back to a default) and get a "did you mean"; every
problem in a file is reported at once, each with its dotted field name.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from nullbooth.config.blocks import _describe
from nullbooth.config.schema import Config
from nullbooth.errors import NullBoothError
from nullbooth.text import read_user_text


def _known_keys(loc: tuple) -> list[str]:
    """The field names valid next to the unknown key at ``loc`` (for a "did you mean" hint)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of blocks (subjects.0.…)
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(map(_name, e["loc"])) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "finite_number":
            msg = "expected a finite number, not NaN or infinity; write a number"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _known_keys(e["loc"]), n=1)
            msg = "unknown key" + (f"; did you mean {'.'.join([*map(_name, e['loc'][:-1]), close[0]])}?" if close else "")
        got = e.get("input")
        said = "got " in msg  # our own validators already name the value
        got_txt = "" if isinstance(got, dict) or got is None or said else f" (got {_short(got)})"
        lines.append(f"{where}: {msg}{got_txt}".replace("\n", " "))
    return f"{source}: {len(lines)} problem(s): " + "; ".join(lines)


def _name(part: Any) -> str:
    """A key as the one-line message shows it: quoted when empty, long or holding control characters."""
    text = str(part)
    return text if text and text.isprintable() and len(text) <= 60 else _short(part, 60)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def config_from_dict(data: dict[str, Any], source: str = "config", cls: type[Config] = Config) -> Config:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise NullBoothError(_format_errors(err, source)) from None


def _dotted_parts(dotted: str) -> list[str]:
    parts = [part.strip() for part in str(dotted).split(".")]
    if not all(parts) or not all(part.isprintable() for part in parts):
        got = "an empty name" + (" between dots" if any(parts) else "") if not all(parts) else "control characters"
        raise NullBoothError(f"config override {dotted!r}: expected a dotted key like nullbooth.num_denoising_steps, "
                             f"got {got}; write KEY=VALUE")
    return parts


def _merge(node: dict[str, Any], leaf: str, value: Any) -> None:
    """``node[leaf] = value``, except that a mapping merges into a mapping (other keys of the block stay)."""
    old = node.get(leaf)
    if isinstance(old, dict) and isinstance(value, dict):
        for key, sub in value.items():
            _merge(old, key, sub)
    else:
        node[leaf] = value


def set_dotted(data: dict[str, Any], overrides: Mapping[str, Any], cls: type[BaseModel] = Config) -> dict[str, Any]:
    """Apply ``{"nullbooth.num_denoising_steps": 25, …}`` to the nested mapping ``data`` in place (and return it).

    A key that walks into a value (``seed.x``) or a value given for a whole block (``nullbooth=3``) is an error
    naming both; a mapping given for a block merges into it. Unknown keys are left for validation to report.
    """
    for dotted, value in overrides.items():
        *parents, leaf = parts = _dotted_parts(dotted)
        node, model = data, cls
        for depth, key in enumerate(parents):
            field = model.model_fields.get(key) if model else None
            child = node.get(key, {})
            kind = _describe(field.annotation) if field else None
            what = kind if kind not in (None, "a block") else None if isinstance(child, dict) else _describe(type(child))
            if what:
                where = ".".join(parts[: depth + 1])
                raise NullBoothError(f"config override {dotted}: {where} is {what}, not a block; set {where}=VALUE, "
                                     "or a key inside a block, e.g. nullbooth.num_denoising_steps=25")
            node, model = node.setdefault(key, child), field.annotation if field else None
        field = model.model_fields.get(leaf) if model else None
        if field and _describe(field.annotation) == "a block" and not isinstance(value, dict):
            raise NullBoothError(f"config override {dotted}={_short(value)}: {dotted} is a block of settings, not a "
                                 f"value; set one of its keys, e.g. {dotted}.{next(iter(field.annotation.model_fields))}"
                                 "=VALUE")
        _merge(node, leaf, value)
    return data


MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what would silently change a config or blow up on load.

    Duplicate keys (YAML keeps the last one) are errors naming both lines. Aliases (``*name``) are refused
    outright — not bounded — since a config has no use for them and a few of them nest into an exponential
    "billion laughs" tree; nesting deeper than ``MAX_YAML_DEPTH`` is refused before it reaches recursion limits.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"an alias (*{event.anchor}) — aliases are not allowed in "
                                              "a config; write the value out", event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels",
                                              event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable: SafeConstructor reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {_short(key)} is given twice (lines {first.start_mark.line + 1} and "
                        f"{key_node.start_mark.line + 1}); YAML would silently keep the last — delete one",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.reader.ReaderError):
        return f"character {chr(err.character)!r} at character offset {err.position} is not allowed in YAML; remove it"
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def parse_yaml(text: str, source: str) -> Any:
    """``text`` as YAML through :class:`StrictLoader`; any problem is one ``NullBoothError`` naming ``source``."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as err:
        raise NullBoothError(f"{source} is not valid YAML — {_yaml_problem(err)}") from None
    except (ValueError, OverflowError) as err:  # a tagged scalar SafeConstructor cannot build (!!timestamp 2001-13-45)
        raise NullBoothError(f"{source} is not valid YAML — a value cannot be read ({err}); fix or quote it") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (UTF-8, at most 1 MiB); every problem is one ``NullBoothError``."""
    p = Path(path)
    text = read_user_text(p, "--config", "a YAML config file", MAX_CONFIG_BYTES)
    loaded = parse_yaml(text, str(p))
    if loaded is not None and not isinstance(loaded, dict):
        raise NullBoothError(f"expected a mapping (KEY: VALUE lines) at the top of {p}, got {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None, cls: type[Config] = Config) -> Config:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``nullbooth.num_denoising_steps``)."""
    data = read_config_file(path) if path is not None else {}
    set_dotted(data, overrides or {}, cls)
    return config_from_dict(data, str(path or "flags"), cls)
