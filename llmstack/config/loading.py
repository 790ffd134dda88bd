"""Loading, validating and saving configurations: YAML files plus dotted `key=value` overrides, checked
against the dataclass schemas (types, `Literal` choices, numeric bounds in each field's `option`, and each
section's own `validate`)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value is not acceptable; the message says which and what is allowed."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A config field with its documentation and numeric bounds (ge: >=, gt: >, le: <=, lt: <)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------
# Loading and validation


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from a YAML file (optional) and `key=value` overrides; raise ConfigError on any problem."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    _check_keys(cls, data, "", source)
    for item in overrides or []:
        _apply_override(cls, data, item)
    return _build(cls, data, "")


def _apply_override(cls: type, data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command-line override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
    parts = key.split(".")
    _check_keys(cls, _nest(parts, None), "", f"command-line override {item!r}")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _one_level_down(cls: type, hints: dict, key: str, prefix: str) -> list[str]:
    """`sft.max_steps` for `sft.train.max_steps`: the key exists in exactly one section just below."""
    found = [f"{prefix}{f.name}.{key}" for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
             and key in {g.name for g in dataclasses.fields(hints[f.name])}]
    return found if len(found) == 1 else []


def _check_keys(cls: type, data: dict, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names and key in getattr(cls, "MOVED", {}):
            parent = prefix[:-1].rpartition(".")[0]
            raise ConfigError(f"config key '{dotted}' in {source} has moved: it is now "
                              f"'{parent + '.' if parent else ''}{cls.MOVED[key]}'")
        if key not in names:
            known = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6) or _one_level_down(cls, hints, key, prefix)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            where = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{dotted}' in {source}.{hint} "
                              f"Keys allowed at {where}: {', '.join(names)}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            _check_keys(sub, value, f"{dotted}.", source)


def _build(cls: type, data: dict, prefix: str, base=None):
    """`base` (default: `cls()`) with the keys of `data` replaced; sections keep their stage's defaults."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, value, typ = f"{prefix}{f.name}", data[f.name], hints[f.name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}': expected a section of keys, got {value!r}")
            kwargs[f.name] = _build(typ, value, f"{key}.", getattr(base, f.name))
        else:
            kwargs[f.name] = _coerce(key, value, typ)
    obj = dataclasses.replace(base, **kwargs)
    if not prefix:
        _validate(obj, "")
    return obj


def _validate(obj, prefix: str) -> None:
    """Bounds of every number and each section's own `validate`, defaults included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, f"{prefix}{f.name}.")
        else:
            _check_bounds(f"{prefix}{f.name}", value, f.metadata)
    if hasattr(obj, "validate"):
        obj.validate(prefix[:-1] if prefix else "config")


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    if typing.get_origin(typ) is list:
        return f"a list of {_type_name(typing.get_args(typ)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(typ, str(typ))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Return `value` as `typ`, or raise ConfigError naming key, value and the expected type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(typ):
            return None
        for arg in (a for a in typing.get_args(typ) if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    elif origin is Literal:
        allowed = typing.get_args(typ)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key '{key}': {value!r} is not allowed; allowed: "
                          f"{', '.join(repr(a) for a in allowed)}.{hint}")
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_type,) = typing.get_args(typ)
            return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    elif typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept any finite numeral.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': expected {_type_name(typ)}, got {value!r} ({type(value).__name__})")


def _check_bounds(key: str, value: Any, meta: Any) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    checks = (("ge", ">=", lambda v, lim: v >= lim), ("gt", ">", lambda v, lim: v > lim),
              ("le", "<=", lambda v, lim: v <= lim), ("lt", "<", lambda v, lim: v < lim))
    for name, word, holds in checks:
        limit = meta.get(name)
        if limit is not None and not holds(value, limit):
            raise ConfigError(f"config key '{key}': {value!r} is out of range; allowed: {word} {limit}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Saving and describing


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key: dotted name, type, default and help; for `--help`."""
    lines = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        typ, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(typ):
            lines += describe(typ, f"{key}.")
            continue
        lines.append(f"  {key} = {getattr(defaults, f.name)!r}  ({_type_name(typ)})  {f.metadata.get('help', '')}")
    return lines
