"""Typed configs: pydantic models, validated on load, errors that name the file and the field.

Each stage defines its own config model next to its code (defaults match the paper and say so);
this module only loads and validates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from d3n.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for d3n configs: unknown keys are an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(model: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate `data` against `model`; a failure lists every bad field, prefixed by `source`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid config"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load(model: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    data = load_yaml(path)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate(model, data, str(path))
