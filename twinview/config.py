"""YAML configs behind typed dataclasses, with ``--set key=value`` overrides.

A config file holds nested mappings whose keys are the dataclass fields; unknown keys are an error
that names the file and the key. Overrides use dotted keys (``optim.lr=0.1``) and YAML values, so
``--set data.size=[64,32]`` and ``--set amp=false`` work as they read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from twinview.data.errors import DataError

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(DataError):
    """A config file or override that does not fit its dataclass."""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where YAML is looser (int -> float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(None, f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(err.reason)
        raise ConfigError(None, f"{where}: {value!r} fits none of {tp} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(None, f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(None, f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(None, f"{where}: expected {len(args)} values, got {list(value)!r}")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(None, f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp is str and isinstance(value, Path):
        return os.fspath(value)
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(None, f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(None, f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build the dataclass ``cls`` from nested mappings, checking keys and types."""
    return _build(cls, data, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-writable mapping of a config dataclass (paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return os.fspath(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested mapping, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(None, f"--set {item!r}: expected key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(None, f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return data


def load_config(cls: type[T], path: str | os.PathLike[str] | None, overrides: list[str] = ()) -> T:
    """Read a YAML config (or start from the dataclass defaults), apply overrides, type-check."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ConfigError(path, f"cannot read config: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(path, f"not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(path, "a config file must hold a mapping at the top level")
        data = loaded or {}
    defaults = to_dict(cls())
    merged = _merge(defaults, data)
    apply_overrides(merged, list(overrides))
    try:
        return from_dict(cls, merged)
    except ConfigError as err:
        raise ConfigError(path if path is not None else "config", err.reason) from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
