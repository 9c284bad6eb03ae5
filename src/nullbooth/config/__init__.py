"""Typed configuration: one YAML file (or the same keys as flags), validated as a whole before any model is loaded.

Top-level keys follow the flag names of diffusers' DreamBooth scripts (:mod:`nullbooth.config.schema`); the
``nullbooth:`` block carries the seed's keys verbatim plus documented additions, ``perfusion:`` and ``generate:``
their verbs' settings (:mod:`nullbooth.config.blocks`). Reading, overrides and the one-line errors are in
:mod:`nullbooth.config.loading`; the problems only ``train`` cares about (a missing instance folder, say) come
from :func:`training_problems`, all at once.
"""

from nullbooth.config.blocks import (
    FEATURES,
    INT_LIMIT,
    MAX_RESOLUTION,
    MAX_STEPS,
    SEED_LIMIT,
    CollectFeatures,
    GenerateBlock,
    MethodName,
    NullBoothBlock,
    NullspaceMode,
    PerfusionBlock,
    SubjectBlock,
    check_threshold,
)
from nullbooth.config.loading import (
    MAX_CONFIG_BYTES,
    MAX_YAML_DEPTH,
    StrictLoader,
    config_from_dict,
    load_config,
    parse_yaml,
    read_config_file,
    set_dotted,
)
from nullbooth.config.schema import FLAG_GROUPS, Config, check_training, training_problems

__all__ = [
    "FEATURES", "FLAG_GROUPS", "INT_LIMIT", "MAX_CONFIG_BYTES", "MAX_RESOLUTION", "MAX_STEPS", "MAX_YAML_DEPTH",
    "SEED_LIMIT", "CollectFeatures", "Config", "GenerateBlock", "MethodName", "NullBoothBlock", "NullspaceMode",
    "PerfusionBlock", "StrictLoader", "SubjectBlock", "check_threshold", "check_training", "config_from_dict",
    "load_config", "parse_yaml", "read_config_file", "set_dotted", "training_problems",
]
