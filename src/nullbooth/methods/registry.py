"""The training strategies by name: ``method: nullbooth | dreambooth | lora | perfusion``."""

from __future__ import annotations

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.methods.base import DreamBooth, Lora, Method, NullBooth
from nullbooth.methods.perfusion.method import Perfusion

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (NullBooth, DreamBooth, Lora, Perfusion)}


def make_method(cfg: Config) -> Method:
    """The strategy ``cfg.method`` names, built from ``cfg``."""
    if cfg.method not in METHODS:
        raise NullBoothError(
            f"method: {cfg.method!r} is not available in this version (available: {', '.join(sorted(METHODS))}); "
            "choose one of those"
        )
    return METHODS[cfg.method](cfg)
