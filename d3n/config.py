"""Typed configs: pydantic models, validated on load, errors that name the file and the field.

Each stage defines its own config model next to its code (defaults match the paper and say so);
this module only loads and validates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from d3n.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for d3n configs: unknown keys are an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PLACEMENT = {"placement": True}  # json_schema_extra marking a field that says where a run happens, not what it makes


def placement(default: Any, **kw: Any) -> Any:
    """A field that places a run (device, data-loader workers, inference batch) without changing its
    artifact: it never enters a stage key or a resume check, so a chain moved from CPU to GPU, or
    given more workers, recomputes nothing."""
    return Field(default, json_schema_extra=PLACEMENT, **kw)


ADDED = {"added": True}  # json_schema_extra of a field added after runs existed (see `added`)


def added(default: Any, **kw: Any) -> Any:
    """A field added to a stage config after runs were made with it: at its default it stays out of
    the identity, so those runs keep their keys (nothing reruns on upgrade); set, it enters."""
    return Field(default, json_schema_extra=ADDED, **kw)


def _is_placement(info: Any) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("placement"))


def _placement_exclude(cfg: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        extra = info.json_schema_extra
        if _is_placement(info) or (isinstance(extra, dict) and extra.get("added") and value == info.default):
            out[name] = True
        elif isinstance(value, BaseModel) and (sub := _placement_exclude(value)):
            out[name] = sub
    return out


def identity(cfg: BaseModel, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
    """A config as it defines the artifact: every placement field left out, at any depth. The one
    input of stage keys and resume checks."""
    return cfg.model_dump(mode=mode, exclude=_placement_exclude(cfg))


def identity_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the fields where two identities differ (for a refused resume's message)."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


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


def from_args(model: type[T], args: Any, fields: tuple[str, ...], source: str) -> T:
    """A config from the command-line options that were given (None = not given: the default)."""
    return validate(model, {k: v for k in fields if (v := getattr(args, k, None)) is not None}, source)


def load(model: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    data = load_yaml(path)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate(model, data, str(path))
