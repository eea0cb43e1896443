"""Checks shared by the preset builder: typed scalar fields, method names, method parameters and
search spaces. Each failure is one ``ConfigError`` that names the key."""
from __future__ import annotations

import math
from typing import Any

from sweep.errors import ConfigError
from sweep.config._spaces import Dist, SpaceError, load_space, narrow
from trainables.params import ParamError, make_params, plain


def method_class(section: str, name: str, where: str) -> type:
    """The registered class of attack/defense ``name`` (``section`` is attacks or defenses)."""
    from trainables import registry

    known = registry.attacks() if section == "attacks" else registry.defenses()
    if name not in known:
        kind = "attack" if section == "attacks" else "defense"
        raise ConfigError(f"{where}: unknown {kind} {name!r}; known: {', '.join(known)}")
    return known[name]


def typed(key: str, v: Any, kind: type, *, low: float | None = None, high: float | None = None,
          optional: bool = False, choices: tuple | None = None) -> Any:
    """``v`` checked against its type (an int is a float; a bool is neither), choices and range."""
    if v is None and optional:
        return None
    ok = isinstance(v, kind) and not (isinstance(v, bool) and kind is not bool)
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{key}: expected {kind.__name__}{' or null' if optional else ''}, got {v!r}")
    if choices is not None and v not in choices:
        raise ConfigError(f"{key}={v!r} is not one of {list(choices)}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v!r} must be finite")
        if low is not None and v < low:
            raise ConfigError(f"{key}={v!r} is below its minimum {low}")
        if high is not None and v > high:
            raise ConfigError(f"{key}={v!r} is above its maximum {high}")
    return v


def checked_params(cls: type, params: dict, where: str):
    """``make_params`` with its ``ParamError`` turned into a ``ConfigError`` (same message)."""
    try:
        return make_params(cls, params, where=where)
    except ParamError as e:
        raise ConfigError(str(e)) from None


def resolve_space(method: str, cls: type, narrowing: dict, fixed: dict, where: str) -> tuple[Dist, ...]:
    """The method's search space after the preset's narrowing/pinning, checked against both the
    space file and the Params bounds. Parameters fixed by the preset are not searched."""
    try:
        base = load_space(method)
    except SpaceError as e:
        raise ConfigError(str(e)) from None
    fields = set(cls.Params.__dataclass_fields__)
    for pname in narrowing:
        if pname not in base:
            if pname in fields:
                raise ConfigError(f"{where}.space.{pname}: not in search_spaces/{method}.yaml; "
                                  f"pin it under {where}.params instead")
            raise ConfigError(f"{where}.space: unknown parameter {pname!r} of {method}; searchable: "
                              f"{', '.join(base) or 'none'}")
        if pname in fixed:
            raise ConfigError(f"{where}: {pname!r} is set both under params and under space; keep one")
    out = []
    for pname, dist in base.items():
        if pname in fixed:
            continue
        if pname in narrowing:
            try:
                dist = narrow(dist, narrowing[pname], f"{where}.space.")
            except SpaceError as e:
                raise ConfigError(str(e)) from None
        # the range's ends (and every choice) must also pass the method's own bounds
        probes = list(dist.choices) if dist.type == "categorical" else [dist.low, dist.high, dist.default]
        for v in probes:
            checked_params(cls.Params, {**fixed, pname: plain(v)}, f"{where}.space: ")
        out.append(dist)
    return tuple(out)
