"""Typed, frozen method parameters validated at the boundary.

Every attack and defense declares its parameters as a frozen dataclass whose field defaults are
the paper defaults; ``field(metadata={"doc": ..., "low": ..., "high": ..., "choices": ...})`` adds
a one-line description and hard bounds. ``make_params`` turns user overrides (from ``--set``,
presets or Optuna) into an instance, and fails with one message naming the bad key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

import yaml


class ParamError(ValueError):
    """An unknown parameter, a wrong type or a value out of range; the message names it."""


def param(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
          choices: tuple | None = None):
    """A dataclass field with its paper default, a description and optional bounds."""
    meta = {"doc": doc, "low": low, "high": high, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults (params are frozen)")
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """``int | None`` -> (int, allows_none)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def _coerce(name: str, value: Any, tp, where: str):
    if isinstance(value, str) and tp is not str:
        try:
            value = yaml.safe_load(value)   # "0.5", "true", "[1, 2]" from the command line
        except yaml.YAMLError:
            pass
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ParamError(f"{where}{name}: a value is required")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if origin is tuple:
            (inner, *_rest) = typing.get_args(base) or (Any,)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(_coerce(name, v, inner, where) if inner is not Any else v for v in value)
    except (TypeError, ValueError):
        raise ParamError(f"{where}{name}: expected {getattr(base, '__name__', base)}, got {value!r}") from None
    return value


def make_params(cls, overrides: dict[str, Any] | None = None, where: str = ""):
    """Build ``cls`` from its defaults plus ``overrides``; ``where`` prefixes messages
    (e.g. ``"defense.nba: "``)."""
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ParamError(f"{where}unknown parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
    values = {}
    for name, f in known.items():
        if name in overrides:
            v = _coerce(name, overrides[name], hints[name], where)
        elif f.default is not MISSING:
            v = f.default
        else:
            raise ParamError(f"{where}{name}: a value is required")
        check_bounds(name, v, f.metadata, where)
        values[name] = v
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:   # cross-field checks in __post_init__
        raise ParamError(f"{where}{e}") from None


def check_bounds(name: str, v: Any, meta, where: str = "") -> None:
    low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
    if v is None:
        return
    if choices is not None and v not in choices:
        raise ParamError(f"{where}{name}={v!r} is not one of {list(choices)}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if low is not None and v < low:
            raise ParamError(f"{where}{name}={v!r} is below its minimum {low}")
        if high is not None and v > high:
            raise ParamError(f"{where}{name}={v!r} is above its maximum {high}")


def as_dict(params) -> dict[str, Any]:
    """Plain JSON-able dict of a params instance (tuples become lists)."""
    return {k: plain(v) for k, v in dataclasses.asdict(params).items()}


# Frozen configs hold sequences as tuples and mappings as sorted (key, value) pairs; JSON, YAML
# and Optuna hold lists and dicts. These four functions are the only converters between the two.

def frozen(v: Any) -> Any:
    """Lists (at any depth) become tuples: hashable, as frozen dataclasses and Params hold them."""
    return tuple(frozen(x) for x in v) if isinstance(v, (list, tuple)) else v


def plain(v: Any) -> Any:
    """Tuples (at any depth) become lists: what JSON and YAML write."""
    return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A mapping as sorted ``(key, frozen value)`` pairs."""
    return tuple(sorted((k, frozen(v)) for k, v in d.items()))


def thaw(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The inverse of ``freeze``: a plain dict with list values."""
    return {k: plain(v) for k, v in pairs}


def describe(cls) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, doc)`` rows for ``list`` and the docs."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in fields(cls):
        tp = hints[f.name]
        tname = getattr(_base_type(tp)[0], "__name__", str(tp))
        rows.append((f.name, tname, f.default, f.metadata.get("doc", "")))
    return rows
