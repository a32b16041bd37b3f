"""Errors of a configuration, and turning raw values (flag strings, YAML scalars) into typed ones."""
from __future__ import annotations

from enum import Enum
from typing import Any

class FieldError(ValueError):
    def __init__(self, name: str, value: Any, message: str):
        self.name, self.value, self.message = name, value, message
        super().__init__(f"--{name} {value!r}: {message}")


class ConfigError(ValueError):
    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  {err}" for err in errors))

    @property
    def fields(self) -> list[str]:
        return [e.name for e in self.errors]


_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


def parse_bool(value: Any) -> bool:
    """Real boolean parsing: 'False' is False (never ``bool("False")``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r} (use true/false, 1/0, yes/no)")



def coerce_value(name: str, t: type, optional: bool, value: Any) -> Any:
    """``value`` as type ``t`` (bool, int, float, str or an Enum), or FieldError naming ``name``."""
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise FieldError(name, value, "a value is required")
    try:
        if t is bool:
            return parse_bool(value)
        if isinstance(t, type) and issubclass(t, Enum):
            v = value.value if isinstance(value, Enum) else str(value).strip().lower()
            if name == "optimizer" and v == "adamw8bit".lower():
                v = "adamw8bit"
            if name == "save_precision" and v in ("float", "float32"):
                v = "fp32"  # kohya's spelling of --save_precision fp32
            return t(v)
        if t is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if t is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t is str:
            return str(value)
    except ValueError:
        t_name = t.__name__ if not (isinstance(t, type) and issubclass(t, Enum)) else "one of " + ", ".join(
            m.value for m in t)
        if t is bool:
            t_name = "a boolean (true/false, 1/0, yes/no)"
        raise FieldError(name, value, f"expected {t_name}")
    return value
