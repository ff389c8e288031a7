"""Plain mappings <-> validated config dataclasses, YAML files and --set overrides.

`from_mapping` builds any (nested) frozen config dataclass from a mapping, checking
unknown keys (with a did-you-mean), types, and each dataclass's own validation, and
reports every problem as a `ConfigError` with the dotted field path.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedsec.errors import ConfigError


def from_mapping(cls: type, raw: Any, path: str = ""):
    """Build the dataclass `cls` from a mapping, checking keys, types and values."""
    where = path or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, raw, f"must be a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"known keys: {', '.join(names)}"
            raise ConfigError(_join(path, str(key)), raw[key], f"unknown key; {hint}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], _join(path, name))
    try:
        return cls(**kwargs)
    except ConfigError as err:  # __post_init__ names the field locally
        raise ConfigError(_join(path, err.field), err.value, err.fix) from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(tp: Any, value: Any, path: str):
    if tp is Any:  # free-form (e.g. an aggregator's parameters, validated by their own class)
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, value, "must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, value, "must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, value, "must be a string")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, "must be a list")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, "must be a mapping")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug, not user input


def to_mapping(obj: Any) -> Any:
    """Plain YAML-ready data (tuples become lists, mappings become dicts)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------
# YAML files and --set overrides.


class _Loader(yaml.SafeLoader):
    """YAML as 1.2 reads it: only true and false are booleans. YAML 1.1 (PyYAML's default) also
    reads on, off, yes and no as booleans, so `privacy.mode: off` or `--set privacy.mode=off`
    became False, refused as "must be a string"."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    """YAML text as fedsec reads every config, sweep and --set value (YAML 1.2's booleans)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def apply_override(raw: dict, assignment: str) -> dict:
    """Return a copy of `raw` with `a.b.c=value` applied (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError("--set", assignment, "write it as key.path=value, e.g. training.lr=1e-4")
    key, text = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError("--set", assignment, "the key must be a dotted path, e.g. lora.rank")
    try:
        value = load_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    out = _deep_copy(raw)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(key, child, f"'{part}' is not a section, so it cannot hold '{parts[-1]}'")
        node = child
    node[parts[-1]] = value
    return out


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, Mapping):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", str(path), "no such file; give the path of a YAML experiment")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("config", str(path), "is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError("config", str(path), f"YAML syntax error{where}: {problem}") from None
    if raw is None:  # empty, or only comments: a run of every default is never what was meant
        raise ConfigError("config", str(path), "is empty (or holds only comments); give at least one section, "
                          "e.g. `model: {name: tiny}`, or start from experiments/quickstart.yaml")
    if not isinstance(raw, dict):
        raise ConfigError("config", str(path), "the top level must be a mapping of sections")
    return raw
