"""Where option values come from besides flags: presets (``presets/<name>.yaml``, data only) and config files
(YAML/JSON of option: value)."""
from __future__ import annotations

import json
import os
from typing import Any

import yaml

from .coercion import ConfigError, FieldError

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "presets")


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError([FieldError("config", path, "file does not exist")])
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([FieldError("config", path, f"cannot be parsed: {exc}")])
    if not isinstance(data, dict):
        raise ConfigError([FieldError("config", path, "must hold a mapping of option: value")])
    return data


def available_presets() -> list[str]:
    if not os.path.isdir(PRESETS_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(PRESETS_DIR) if f.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset's values (data only: ``presets/<name>.yaml``, key ``values``)."""
    path = os.path.join(PRESETS_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        raise ConfigError([FieldError("preset", name, f"accepted: {', '.join(available_presets())}")])
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    values = dict(data.get("values", {}))
    values.setdefault("concept", data.get("concept", name))
    return values


def preset_info(name: str) -> dict[str, Any]:
    path = os.path.join(PRESETS_DIR, f"{name}.yaml")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}
