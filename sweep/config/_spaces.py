"""Search spaces: ``search_spaces/<method>.yaml`` read, narrowed or pinned by a preset, and turned
into Optuna distributions.

A space file names each tunable parameter with its distribution::

    method: nba
    kind: defense
    params:
      lambda1: {type: float, low: 0.1, high: 20.0, log: true}
      epochs: {type: int, low: 5, high: 40}
      udl_samples: {type: categorical, choices: [pseudo, oracle]}

The paper default, the first trial of every search (``points_to_evaluate``), is the default of
the method's ``Params`` field: it lives in one place, and the loader checks that each range holds
it. A method registered by a plugin names its own file with a ``search_space_file`` attribute.

A preset may narrow a parameter (``{low: 1, high: 5}``, ``[1, 5]``, a subset of the choices) or pin
it (a scalar). Narrowing stays inside the file's range; a pinned parameter leaves the search and
becomes a fixed parameter. The paper default must stay inside a narrowed range, or the preset
names another first-trial value with ``default``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from trainables.params import frozen, plain

TYPES = ("float", "int", "categorical")


class SpaceError(ValueError):
    """A search-space file or a preset's narrowing of it is invalid; the message names it."""


@dataclass(frozen=True)
class Dist:
    """One tunable parameter: its distribution and the value of the first (paper-default) trial."""

    name: str
    type: str                        # float | int | categorical
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    @property
    def pinned(self) -> bool:
        """A range of one value: not searched."""
        if self.type == "categorical":
            return len(self.choices) == 1
        return self.low == self.high

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high

    def to_optuna(self):
        import optuna.distributions as od

        if self.type == "float":
            return od.FloatDistribution(float(self.low), float(self.high), log=self.log)
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log)
        return od.CategoricalDistribution([encode(c) for c in self.choices])

    def decoder(self) -> dict | None:
        """Encoded choice -> value, for categoricals whose choices Optuna cannot hold (tuples)."""
        if self.type == "categorical" and any(encode(c) is not c for c in self.choices):
            return {encode(c): plain(c) for c in self.choices}
        return None

    def describe(self) -> str:
        if self.type == "categorical":
            return f"one of {list(self.choices)} (first trial {self.default!r})"
        scale = ", log" if self.log else ""
        return f"{self.type} [{self.low:g}, {self.high:g}{scale}] (first trial {self.default:g})"


def spaces_dir() -> Path:
    """The installed ``search_spaces`` package folder (package data)."""
    import search_spaces

    return Path(search_spaces.DIR)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_dist(name: str, spec: Any, default: Any, where: str) -> Dist:
    """One entry of a space file's ``params``; ``default`` is the Params field's default."""
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}{name}: expected a mapping with type/low/high or type/choices, got {spec!r}")
    if "default" in spec:
        raise SpaceError(f"{where}{name}.default: the paper default is the Params field's default "
                         f"({default!r}); remove it from the space file")
    unknown = sorted(set(spec) - {"type", "low", "high", "log", "choices"})
    if unknown:
        raise SpaceError(f"{where}{name}: unknown field {unknown[0]!r} (type, low, high, log, choices)")
    kind = spec.get("type")
    if kind not in TYPES:
        raise SpaceError(f"{where}{name}.type={kind!r} is not one of {list(TYPES)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}{name}: a categorical parameter needs a non-empty 'choices' list")
        d = Dist(name, kind, frozen(default), choices=tuple(frozen(c) for c in choices))
    else:
        low, high = spec.get("low"), spec.get("high")
        if not (_number(low) and _number(high)) or low > high:
            raise SpaceError(f"{where}{name}: needs numbers low <= high, got low={low!r} high={high!r}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise SpaceError(f"{where}{name}: an int parameter needs integer bounds, got [{low}, {high}]")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise SpaceError(f"{where}{name}: log=true needs low > 0, got {low}")
        cast = int if kind == "int" else float
        if _number(default) and (kind == "float" or float(default).is_integer()):
            default = cast(default)
        d = Dist(name, kind, default, low=cast(low), high=cast(high), log=log)
    if not d.contains(d.default):
        raise SpaceError(f"{where}{name}: the paper default {d.default!r} is outside its range ({_range(d)})")
    return d


@lru_cache(maxsize=None)
def _read(path: str) -> tuple[str, str, tuple[tuple[str, Any], ...]]:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpaceError(f"cannot read search space {p}: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict):
        raise SpaceError(f"{p}: expected 'method', 'kind' and a 'params' mapping")
    return str(raw.get("method", p.stem)), str(raw.get("kind", "")), tuple(raw["params"].items())


def _method(name: str) -> type | None:
    from trainables import registry

    return registry.attacks().get(name) or registry.defenses().get(name)


def space_file(method: str) -> Path | None:
    """The method's space file: its own ``search_space_file``, else ``search_spaces/<method>.yaml``."""
    own = getattr(_method(method), "search_space_file", None)
    path = Path(own) if own else spaces_dir() / f"{method}.yaml"
    return path if path.is_file() else None


def load_space(method: str) -> dict[str, Dist]:
    """The method's search space (name -> Dist, paper defaults from its ``Params``); a method
    without a space file has an empty space (nothing to search, paper defaults only)."""
    path = space_file(method)
    if path is None:
        return {}
    name, _kind, specs = _read(str(path))
    if name != method:
        raise SpaceError(f"{path}: 'method: {name}' does not match the file name")
    cls = _method(method)
    if cls is None:
        raise SpaceError(f"{path}: no registered attack or defense is called {method!r}")
    fields = cls.Params.__dataclass_fields__
    dists = {}
    for pname, spec in specs:
        if pname not in fields:
            raise SpaceError(f"{path.name}: {pname!r} is not a parameter of {method} "
                             f"(known: {', '.join(sorted(fields))})")
        dists[pname] = parse_dist(pname, spec, fields[pname].default, f"{path.name}: params.")
    return dists


def narrow(base: Dist, spec: Any, where: str) -> Dist:
    """Apply a preset's narrowing/pinning ``spec`` to ``base`` (must stay inside it).

    ``spec``: a scalar (pin), ``[low, high]`` (numeric) or a list of choices (categorical), or a
    mapping with any of ``low``, ``high``, ``log``, ``choices``, ``default``.
    """
    name = base.name
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"low", "high", "log", "choices", "default"})
        if unknown:
            raise SpaceError(f"{where}{name}.{unknown[0]}: unknown field (low, high, log, choices, default)")
        fields = dict(spec)
    elif isinstance(spec, list):
        if base.type == "categorical":
            fields = {"choices": spec}
        elif len(spec) == 2:
            fields = {"low": spec[0], "high": spec[1]}
        else:
            raise SpaceError(f"{where}{name}: give [low, high] or a single value, got {spec!r}")
    else:
        if base.type == "categorical":
            fields = {"choices": [spec], "default": spec}
        else:
            fields = {"low": spec, "high": spec, "default": spec}
    if base.type == "categorical":
        if "low" in fields or "high" in fields or "log" in fields:
            raise SpaceError(f"{where}{name}: a categorical parameter is narrowed by 'choices' only")
        choices = fields.get("choices", list(base.choices))
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}{name}.choices: a non-empty list is required")
        choices = tuple(frozen(c) for c in choices)
        bad = [c for c in choices if c not in base.choices]
        if bad:
            raise SpaceError(f"{where}{name}={bad[0]!r} is not one of the search space's choices {list(base.choices)}")
        default = frozen(fields.get("default", base.default if base.default in choices else
                                    (choices[0] if len(choices) == 1 else base.default)))
        out = dataclasses.replace(base, choices=choices, default=default)
    else:
        cast = int if base.type == "int" else float
        low, high = fields.get("low", base.low), fields.get("high", base.high)
        for key, v in (("low", low), ("high", high)):
            if not _number(v) or (base.type == "int" and not float(v).is_integer()):
                raise SpaceError(f"{where}{name}.{key}: expected {'an integer' if base.type == 'int' else 'a number'}, got {v!r}")
        if low > high:
            raise SpaceError(f"{where}{name}: low={low} is above high={high}")
        if low < base.low or high > base.high:
            bad, v = ("low", low) if low < base.low else ("high", high)
            raise SpaceError(f"{where}{name}{'' if low == high else '.' + bad}={v} is outside the search space "
                             f"range [{base.low:g}, {base.high:g}]")
        log = bool(fields.get("log", base.log))
        if log and low <= 0:
            raise SpaceError(f"{where}{name}: log=true needs low > 0")
        default = fields.get("default", base.default)
        if _number(default) and (base.type == "float" or float(default).is_integer()):
            default = cast(default)
        out = dataclasses.replace(base, low=cast(low), high=cast(high), log=log, default=default)
    if not out.contains(out.default):
        raise SpaceError(f"{where}{name}: the first trial's value {out.default!r} (the paper default) is "
                         f"outside the narrowed range ({_range(out)}); add {name}.default=<a value inside> "
                         f"to choose the first trial's value")
    return out


def _range(d: Dist) -> str:
    return f"choices {list(d.choices)}" if d.type == "categorical" else f"[{d.low:g}, {d.high:g}]"


def optuna_space(dists: dict[str, Dist]) -> dict:
    """Name -> Optuna distribution for the searched (not pinned) parameters."""
    return {n: d.to_optuna() for n, d in dists.items() if not d.pinned}


def first_trial(fixed: dict, space: tuple[Dist, ...]) -> dict:
    """The paper-default trial, every search's first: the ``fixed`` parameters plus each searched
    one at its paper default (plain values, as the trial runs them)."""
    return {**fixed, **{d.name: plain(d.default) for d in space}}


def optuna_point(dists: dict[str, Dist], values) -> dict:
    """A point to evaluate (the first trial, an ``also_try`` point): ``values`` of the searched
    parameters (a mapping or ``(name, value)`` pairs), encoded the way Optuna holds them."""
    chosen = dict(values)
    return {n: encode(frozen(chosen[n])) if d.type == "categorical" else chosen[n]
            for n, d in dists.items() if not d.pinned}


def encode(choice: Any) -> Any:
    """Optuna's categorical choices must be None/bool/int/float/str: a tuple choice (e.g. a subset
    of NBA's behaviours) is held as its comma-joined string and decoded in the trial."""
    if isinstance(choice, tuple):
        return ",".join(map(str, choice))
    return choice

