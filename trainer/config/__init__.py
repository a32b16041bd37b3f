"""The typed, validated training configuration: ``schema`` (TrainConfig), ``rules`` (validation and warnings),
``coercion`` (raw values -> typed values, the error types), ``files`` (presets and config files), ``enums``."""
from .coercion import ConfigError, FieldError, parse_bool
from .enums import LRScheduler, MixedPrecision, ModelFamilyName, Optimizer, ReportTo, SavePrecision
from .files import PRESETS_DIR, available_presets, load_config_file, load_preset, preset_info
from .schema import TrainConfig, coerce_field, field_type

__all__ = ["TrainConfig", "ConfigError", "FieldError", "parse_bool", "coerce_field", "field_type", "Optimizer",
           "LRScheduler", "MixedPrecision", "ModelFamilyName", "ReportTo", "SavePrecision", "PRESETS_DIR",
           "available_presets", "load_config_file", "load_preset", "preset_info"]
