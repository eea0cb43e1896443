"""The preset schema at the level of plain YAML data: the fields and their defaults, and the
steps that turn a preset file plus ``--set`` overrides into one complete mapping (check the keys,
normalise the method lists, apply each override, merge over the defaults). ``sweep.preset`` then
validates that mapping and builds the typed config from it."""
from __future__ import annotations

import copy
from typing import Any

import yaml

from sweep.errors import ConfigError
from sweep.config._validate import method_class

DEFAULTS: dict[str, Any] = {
    "description": "",
    "profile": None,
    "kind": "defense",
    "dataset": "cifar10",
    "data_root": None,
    "model": "wrn-16-1",
    "seed": 0,
    "clean_fraction": 0.05,
    "budget": {"attack": {}, "defense_epochs": None, "epoch_eval_size": 2000},
    "attacks": {},
    "defenses": {},
    "search": {"num_samples": 20, "sampler": "tpe", "objectives": {"asr": "min", "ba": "max"},
               "max_concurrent": 0, "max_tuners": None, "cross_check": True, "stages": 1,
               "early_stopping": {"enabled": False, "metric": "score", "mode": "max", "grace_period": 2,
                                  "reduction_factor": 3}},
    "resources": {"cpus": 1, "gpus": 0, "attack_cpus": None, "attack_gpus": None},
    "max_failures": 0,
    "checkpoint_every": 1,
    "paper_table": None,
    "selection": {"rule": "bound", "bound": 10.0, "ba_tolerance": 2.0, "metric": None, "mode": None,
                  "ba_metric": None},
    "ray": {"num_cpus": None, "num_gpus": None, "object_store_mb": 512},
    "storage": {"uri": None, "endpoint": None},
}

# per-method entry of ``attacks`` / ``defenses``
_ATTACK_ENTRY = {"params": {}, "space": {}, "dataset": None, "num_samples": None, "budget": {}}
_DEFENSE_ENTRY = {"params": {}, "space": {}, "num_samples": None, "also_try": None}
ANY = object()          # a mapping whose keys are checked later (method params, SGD fields, metrics)


def schema_children(path: tuple[str, ...]) -> Any:
    """What may appear under ``path``: a dict of known keys, ANY, or None for a leaf."""
    if not path:
        return DEFAULTS
    head = path[0]
    if head in ("attacks", "defenses"):
        if len(path) == 1:
            return ANY                          # method names, checked against the registry
        if len(path) == 2:
            return _ATTACK_ENTRY if head == "attacks" else _DEFENSE_ENTRY
        if path[2] in ("params", "space", "budget") and len(path) == 3:
            return ANY
        if path[2] == "space" and len(path) == 4:
            return {"low": None, "high": None, "log": None, "choices": None, "default": None}
        return None
    node: Any = DEFAULTS
    for i, part in enumerate(path):
        if node is ANY:
            return None
        node = node[part]
        if path[: i + 1] in (("budget", "attack"), ("search", "objectives")):
            node = ANY
    return node if isinstance(node, dict) or node is ANY else None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. search.num_samples=50)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_override(raw: dict, item: str) -> dict:
    parts, value = parse_override(item)
    key = ".".join(parts)
    raw = copy.deepcopy(raw)
    node = raw
    for i, part in enumerate(parts):
        here = tuple(parts[:i])
        allowed = schema_children(here)
        if allowed is None:
            parent = ".".join(here)
            raise ConfigError(f"unknown key {key!r} in --set {item}: {parent!r} takes a value, not sub-keys")
        if allowed is ANY:
            if here in (("attacks",), ("defenses",)):
                method_class(here[0], part, f"--set {item}")
        elif part not in allowed:
            known = ", ".join(k for k in allowed)
            where = f"under {'.'.join(here)!r}" if here else "at the top level"
            raise ConfigError(f"unknown key {key!r} in --set {item}: {part!r} is not a field {where} (known: {known})")
        last = i == len(parts) - 1
        if last:
            if value is None and here in (("attacks",), ("defenses",)):
                node.pop(part, None)        # --set attacks.blend=null drops a method
            else:
                node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
    return raw


def check_keys(raw: dict, path: tuple[str, ...], where: str) -> None:
    """Every key of a preset file must be a known field (method names checked later)."""
    allowed = schema_children(path)
    if allowed is ANY or allowed is None:
        return
    for k, v in raw.items():
        if k not in allowed:
            at = ".".join(path + (str(k),))
            known = ", ".join(allowed)
            raise ConfigError(f"{where}: unknown key {at!r} (known{' under ' + '.'.join(path) if path else ''}: {known})")
        if isinstance(v, dict) and isinstance(allowed[k], dict):
            check_keys(v, path + (k,), where)


def normalise(raw: dict) -> dict:
    """``attacks``/``defenses`` lists -> mappings; ``None`` entries -> ``{}``."""
    raw = dict(raw)
    for section in ("attacks", "defenses"):
        v = raw.get(section)
        if v is None:
            raw[section] = {}
        elif isinstance(v, str):
            raw[section] = {v: {}}
        elif isinstance(v, list):
            if not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{section}: expected a list of method names or a mapping, got {v!r}")
            raw[section] = {x: {} for x in v}
        elif not isinstance(v, dict):
            raise ConfigError(f"{section}: expected a list of method names or a mapping, got {v!r}")
        out = {}
        for name, entry in raw[section].items():
            entry = {} if entry is None else entry
            if not isinstance(entry, dict):
                raise ConfigError(f"{section}.{name}: expected a mapping with params/space, got {entry!r}")
            allowed = _ATTACK_ENTRY if section == "attacks" else _DEFENSE_ENTRY
            bad = sorted(set(entry) - set(allowed))
            if bad:
                raise ConfigError(f"unknown key '{section}.{name}.{bad[0]}' (known: {', '.join(allowed)})")
            for sub in ("params", "space"):
                if entry.get(sub) is None:
                    entry = {**entry, sub: {}}
                elif not isinstance(entry[sub], dict):
                    raise ConfigError(f"{section}.{name}.{sub}: expected a mapping, got {entry[sub]!r}")
            if "budget" in entry and not entry["budget"]:
                entry = {k: v for k, v in entry.items() if k != "budget"}      # absent = budget.attack's
            elif "budget" in entry and not isinstance(entry["budget"], dict):
                raise ConfigError(f"{section}.{name}.budget: expected a mapping of training settings, "
                                  f"got {entry['budget']!r}")
            out[str(name)] = entry
        raw[section] = out
    return raw


# mappings a preset replaces as a whole (their keys are data, not fields)
_WHOLE = {("attacks",), ("defenses",), ("search", "objectives"), ("budget", "attack")}


def merge(defaults: dict, raw: dict, path: tuple[str, ...] = ()) -> dict:
    out = copy.deepcopy(defaults)
    for k, v in raw.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and path + (k,) not in _WHOLE:
            out[k] = merge(out[k], v, path + (k,))
        else:
            out[k] = copy.deepcopy(v)
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def check_profiles(profiles: Any, where: str) -> dict:
    """A preset's ``profiles``: name -> a mapping of preset fields (checked like the preset's own)."""
    if profiles is None:
        return {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{where}: profiles: expected a mapping name -> preset fields, got {profiles!r}")
    for name, body in profiles.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: profiles.{name}: expected a mapping of preset fields, got {body!r}")
        if "profile" in body or "profiles" in body:
            raise ConfigError(f"{where}: profiles.{name}: a profile cannot name or hold profiles")
        check_keys(body, (), f"{where}, profiles.{name}")
    return profiles


def apply_profile(raw: dict, profiles: dict, where: str) -> dict:
    """The preset with its selected profile (``profile: NAME``) laid over it. Mappings merge key by
    key, down to one attack's or defense's entry (``attacks: {badnets: {budget: {epochs: 12}}}``
    changes BadNets' budget alone; ``null`` removes a method); lists and scalars replace, so
    ``attacks: [badnets, sig]`` replaces the preset's attacks."""
    name = raw.get("profile")
    if name is None:
        return raw
    if name not in profiles:
        known = ", ".join(map(str, profiles)) or "none"
        raise ConfigError(f"profile={name!r}: {where} has no such profile (its profiles: {known})")
    out = copy.deepcopy(raw)
    for k, v in profiles[name].items():
        if k in ("attacks", "defenses") and isinstance(v, dict):
            section = dict(out.get(k) or {})
            for method, entry in v.items():
                if entry is None:
                    section.pop(method, None)
                else:
                    section[method] = _deep_merge(section.get(method) or {}, entry)
            out[k] = section
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return normalise(out)
