"""YAML configs behind typed dataclasses, with ``--set key=value`` overrides.

A config file holds nested mappings whose keys are the dataclass fields; unknown keys are an error
that names the file and the key. Overrides use dotted keys (``optim.lr=0.1``) and YAML values, so
``--set data.size=[64,32]`` and ``--set amp=false`` work as they read.

Fields declare their domain with ``typing.Annotated`` (``lr: Positive``, ``size: list[PositiveInt]``,
``keep_last: Annotated[int, Range(ge=1)]``); a value outside it is a ``ConfigError`` naming the dotted
key and the rule, e.g. ``optim.lr: -0.1 is not > 0`` or ``data.size[1]: 0 is not > 0``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from twinview.errors import DataError
from twinview.files import write_text_atomic

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(DataError):
    """A config file or override that does not fit its dataclass."""


# --------------------------------------------------------------------------- domains of values


@dataclasses.dataclass(frozen=True)
class Range:
    """``Annotated[float, Range(gt=0)]``: the value must lie within the given bounds (and be finite)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        """``> 0``, ``>= 1``, or ``in (0, 1]`` when bounded on both sides."""
        low = f"({self.gt!r}" if self.gt is not None else f"[{self.ge!r}" if self.ge is not None else ""
        high = f"{self.lt!r})" if self.lt is not None else f"{self.le!r}]" if self.le is not None else ""
        if low and high:
            return f"in {low}, {high}"
        bounds = ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
        return " and ".join(f"{op} {b!r}" for op, b in bounds if b is not None)

    def check(self, value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(None, f"{where}: {value!r} is not a finite number")
        ok = ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
              and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))
        if not ok:
            raise ConfigError(None, f"{where}: {value!r} is not {self.describe()}")


@dataclasses.dataclass(frozen=True)
class Multiple:
    """``Annotated[int, Multiple(16)]``: the value (or every item of a list) is divisible by ``n``."""

    n: int

    def check(self, value: Any, where: str) -> None:
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            if v % self.n:
                at = where if i is None else f"{where}[{i}]"
                raise ConfigError(None, f"{at}: {v!r} is not a multiple of {self.n}")


Positive = Annotated[float, Range(gt=0)]  # learning rates, temperatures, sizes in mm
NonNegative = Annotated[float, Range(ge=0)]  # weight decay, clipping norms (0 = off), loss weights
PositiveInt = Annotated[int, Range(gt=0)]  # steps, epochs, batch and layer sizes
NonNegativeInt = Annotated[int, Range(ge=0)]  # counts where 0 means none or off; seeds
Probability = Annotated[float, Range(ge=0, le=1)]  # a probability or share, both ends included
UnitInterval = Annotated[float, Range(ge=0, le=1)]  # a mixing weight or EMA decay in [0, 1]
Fraction = Annotated[float, Range(gt=0, le=1)]  # a share that cannot be empty: (0, 1]
ProperFraction = Annotated[float, Range(ge=0, lt=1)]  # [0, 1): SGD momentum, window overlap, smoothing
Axis = Annotated[int, Range(ge=0, le=2)]  # an axis of a 3D volume


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        inner, *rules = typing.get_args(tp)
        return " ".join([_type_name(inner), *(r.describe() for r in rules if isinstance(r, Range))])
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where YAML is looser (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *rules = typing.get_args(tp)
        value = _coerce(inner, value, where)
        for rule in rules:
            if isinstance(rule, (Range, Multiple)):
                rule.check(value, where)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(None, f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message says what is wrong
            return _coerce(options[0], value, where)
        errors = []
        for arg in options:
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(err.reason)
        names = " | ".join(_type_name(a) for a in args)
        raise ConfigError(None, f"{where}: {value!r} fits none of {names} ({'; '.join(errors)})")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        # by type as well as value, so that true is not taken for 1 nor 2.0 for 2
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(None, f"{where}: {value!r} is not one of {list(choices)}")
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
    hints = typing.get_type_hints(cls, include_extras=True)  # keeps the Annotated domains
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        at = f"{where}: " if where else ""
        raise ConfigError(None, f"{at}unknown key(s) {unknown}; known: {sorted(names)}")
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
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "cannot parse"
            raise ConfigError(None, f"--set {item!r}: the value is not valid YAML ({problem})") from None
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
    except ConfigError as err:  # names the file when there is one; else the message is the reason alone
        raise ConfigError(path, err.reason) from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def run_config(cls: type[T], path: str | os.PathLike[str] | None, resume: str | os.PathLike[str] | None,
               overrides: list[str] = ()) -> T:
    """The config of a command: ``path`` (or, resuming without one, the run's own ``config.yaml``)
    with the overrides applied."""
    if path is None and resume is not None:
        path = Path(resume) / "config.yaml"
        if not path.exists():
            raise ConfigError(resume, "no config.yaml here: not a twinview run folder")
    return load_config(cls, path, overrides)
