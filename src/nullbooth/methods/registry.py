"""The training strategies by name: ``method: nullbooth | dreambooth | attn2_finetune | lora | oft |
perfusion``.

An explicit table: a method exists because it is listed here, never because some module was imported.
"""

from __future__ import annotations

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.methods.base import Method
from nullbooth.methods.baselines import Attn2Finetune, DreamBooth, Lora
from nullbooth.methods.nullbooth import NullBooth
from nullbooth.methods.oft import Oft
from nullbooth.methods.perfusion.method import Perfusion

# name → class, each name spelled once (the class's ``name``, which its outputs record)
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (NullBooth, DreamBooth, Attn2Finetune, Lora, Oft,
                                                            Perfusion)}


def make_method(cfg: Config) -> Method:
    """The strategy ``cfg.method`` names, built from ``cfg``."""
    if cfg.method not in METHODS:
        raise NullBoothError(
            f"method: {cfg.method!r} is not available in this version (available: {', '.join(sorted(METHODS))}); "
            "choose one of those"
        )
    return METHODS[cfg.method](cfg)
