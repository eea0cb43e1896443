"""Presets -> a typed, frozen, validated sweep configuration.

A preset is a YAML file in ``sweep/presets/`` (or any path). ``load_preset(name, overrides)``
reads it, applies ``--set key=value`` overrides (dotted keys, YAML values), fills in the defaults
below and validates everything before any work: method, dataset and model names, every method
parameter (through the method's ``Params`` and ``make_params``), every narrowing of a search
space (inside ``search_spaces/<method>.yaml`` and inside the ``Params`` bounds), the training
budget, the search and selection settings. The first problem found stops it with one
``ConfigError`` whose message names the key.

Preset fields (defaults in brackets)::

    description: free text
    kind: defense | attack            [defense] what the trials search: defense or attack parameters
    dataset: cifar10 | cifar100 | gtsrb | synthetic[:n_train:n_test] | imagefolder:<path>  [cifar10]
    data_root: folder of downloaded/ImageFolder data    [null = the loaders' default]
    model: wrn-16-1 (any name of trainables.models)     [wrn-16-1]
    seed: 0                            seed of attack stages, clean subsets, defenses and the sampler
    clean_fraction: 0.05               the defenses' clean subset (fraction of the training set)
    budget:
      attack: {epochs: 100, lr: 0.1, ...}   the attack stage's SGDConfig fields   [SPEC's setting]
      defense_epochs: null             pins every defense's ``epochs`` parameter (unless the preset
                                       sets it for that defense itself)
      epoch_eval_size: 2000            test images measured after every epoch (the final metrics
                                       always use the whole test set)
    attacks:                           a list of names, or name -> {params: {...}, dataset: ...,
      badnets: {params: {poison_rate: 0.1}}          space: {...} (attack sweeps only)}
    defenses:                          a list of names, or name -> {params: {...}, space: {...},
      nba: {space: {lambda1: [0.5, 5], epochs: 10}}  num_samples: n}. narrow: [low, high] /
      fp: {num_samples: 1}                           {low, high, default}; pin: a scalar;
                                                      num_samples (default search.num_samples;
                                                      1 = the paper default only)
    search:
      num_samples: 20                  trials per (attack, defense) pair, the paper default included
      sampler: tpe | nsga2 | random    [tpe]
      objectives: {asr: min, ba: max}  (attack sweeps e.g. {student_asr: max, student_ba: max})
      max_concurrent: 0                trials at a time per pair (0: as many as resources allow)
      early_stopping: {enabled: false, grace_period: 2, reduction_factor: 3}   ASHA on ba - asr
      cross_check: true                evaluate each attack's best config on the other attacks
    resources: {cpus: 1, gpus: 0, attack_cpus: null, attack_gpus: null}  per trial / attack stage
    max_failures: 0                    Tune retries of a failed trial
    selection: {rule: ba_within, ba_tolerance: 2.0, metric: null, mode: null, ba_metric: null}
      rule ba_within: best ``metric`` (first objective) among fully trained configs whose
      ``ba_metric`` is within ``ba_tolerance`` points of the best; best_metric: the best ``metric``
      regardless of BA; max_der: highest DER.
    ray: {num_cpus: null, num_gpus: null, object_store_mb: 512}   a LOCAL Ray's size
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sweep.spaces import Dist, SpaceError, load_space, narrow

PRESETS_DIR = Path(__file__).parent / "presets"

SAMPLERS = ("tpe", "nsga2", "random")
RULES = ("ba_within", "best_metric", "max_der")
DEFENSE_METRICS = ("asr", "ba", "ra", "der")
KINDS = ("defense", "attack")


class ConfigError(ValueError):
    """A preset or an override is invalid; the message names the key and the problem."""


# ============================================================================ the schema

DEFAULTS: dict[str, Any] = {
    "description": "",
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
               "max_concurrent": 0, "cross_check": True,
               "early_stopping": {"enabled": False, "grace_period": 2, "reduction_factor": 3}},
    "resources": {"cpus": 1, "gpus": 0, "attack_cpus": None, "attack_gpus": None},
    "max_failures": 0,
    "selection": {"rule": "ba_within", "ba_tolerance": 2.0, "metric": None, "mode": None, "ba_metric": None},
    "ray": {"num_cpus": None, "num_gpus": None, "object_store_mb": 512},
}

# per-method entry of ``attacks`` / ``defenses``
_ATTACK_ENTRY = {"params": {}, "space": {}, "dataset": None, "num_samples": None}
_DEFENSE_ENTRY = {"params": {}, "space": {}, "num_samples": None}
ANY = object()          # a mapping whose keys are checked later (method params, SGD fields, metrics)


def _schema_children(path: tuple[str, ...]) -> Any:
    """What may appear under ``path``: a dict of known keys, ANY, or None for a leaf."""
    if not path:
        return DEFAULTS
    head = path[0]
    if head in ("attacks", "defenses"):
        if len(path) == 1:
            return ANY                          # method names, checked against the registry
        if len(path) == 2:
            return _ATTACK_ENTRY if head == "attacks" else _DEFENSE_ENTRY
        if path[2] in ("params", "space") and len(path) == 3:
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


# ============================================================================ typed config

@dataclass(frozen=True)
class AttackEntry:
    name: str
    dataset: str
    params: tuple[tuple[str, Any], ...]     # the preset's fixed overrides (paper defaults for the rest)
    space: tuple[Dist, ...] = ()             # searched parameters (attack sweeps only)
    num_samples: int = 1                     # trials of this attack (attack sweeps)

    @property
    def params_dict(self) -> dict[str, Any]:
        return _thaw(self.params)

    @property
    def searched(self) -> bool:
        return bool(self.space) and self.num_samples > 1


@dataclass(frozen=True)
class DefenseEntry:
    name: str
    params: tuple[tuple[str, Any], ...]     # fixed: the preset's params + pinned space params
    space: tuple[Dist, ...]                  # searched parameters (narrowed)
    num_samples: int = 1                     # trials per attack (1: the paper default only)

    @property
    def searched(self) -> bool:
        return bool(self.space) and self.num_samples > 1

    @property
    def params_dict(self) -> dict[str, Any]:
        return _thaw(self.params)


@dataclass(frozen=True)
class EarlyStopping:
    enabled: bool
    grace_period: int
    reduction_factor: float


@dataclass(frozen=True)
class SearchConfig:
    num_samples: int
    sampler: str
    objectives: tuple[tuple[str, str], ...]  # (metric, "min"|"max"), in order
    max_concurrent: int
    cross_check: bool
    early_stopping: EarlyStopping


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float
    attack_cpus: float
    attack_gpus: float


@dataclass(frozen=True)
class Selection:
    rule: str
    ba_tolerance: float        # percentage points
    metric: str                # the metric the rule optimises (first objective by default)
    mode: str                  # its direction
    ba_metric: str             # the accuracy that must stay near its best


@dataclass(frozen=True)
class RayConfig:
    num_cpus: int | None
    num_gpus: int | None
    object_store_mb: int


@dataclass(frozen=True)
class SweepConfig:
    name: str
    source: str
    description: str
    kind: str
    dataset: str
    data_root: str | None
    model: str
    seed: int
    clean_fraction: float
    attack_train: tuple[tuple[str, Any], ...]
    defense_epochs: int | None
    epoch_eval_size: int
    attacks: tuple[AttackEntry, ...]
    defenses: tuple[DefenseEntry, ...]
    search: SearchConfig
    resources: Resources
    max_failures: int
    selection: Selection
    ray: RayConfig
    overrides: tuple[str, ...]
    raw: str                                 # the normalised preset as JSON (see ``to_dict``)

    @property
    def attack_train_dict(self) -> dict[str, Any]:
        return _thaw(self.attack_train)

    def to_dict(self) -> dict[str, Any]:
        """The normalised preset (defaults filled in): loading it back gives this config."""
        return json.loads(self.raw)

    def config_hash(self) -> str:
        """Identifies the experiment (everything but the description): resume matches on it."""
        d = self.to_dict()
        d.pop("description", None)
        blob = json.dumps({"name": self.name, **d}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def attack(self, name: str) -> AttackEntry:
        return next(a for a in self.attacks if a.name == name)

    def defense(self, name: str) -> DefenseEntry:
        return next(d for d in self.defenses if d.name == name)


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, _tupleize(v)) for k, v in d.items()))


def _thaw(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pairs}


def _tupleize(v: Any) -> Any:
    return tuple(_tupleize(x) for x in v) if isinstance(v, list) else v


# ============================================================================ loading

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"preset file not found: {p}")
        return p
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name_or_path)):
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; known: {', '.join(list_presets())}")
    p = PRESETS_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; known: {', '.join(list_presets())} "
                          f"(or give a path to a .yaml file)")
    return p


def load_preset(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read, override, complete and validate a preset. Raises ``ConfigError`` naming the problem."""
    path = preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read preset {path}: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path}: expected a mapping of fields, got {type(raw).__name__}")
    raw.pop("name", None)
    _check_keys(raw, (), f"preset {path.name}")
    raw = _normalise(raw)
    for item in overrides:
        raw = _apply_override(raw, item)
        raw = _normalise(raw)
    merged = _merge(DEFAULTS, raw)
    return _build(path.stem, str(path), merged, tuple(overrides))


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


def _apply_override(raw: dict, item: str) -> dict:
    parts, value = parse_override(item)
    key = ".".join(parts)
    raw = copy.deepcopy(raw)
    node = raw
    for i, part in enumerate(parts):
        here = tuple(parts[:i])
        allowed = _schema_children(here)
        if allowed is None:
            parent = ".".join(here)
            raise ConfigError(f"unknown key {key!r} in --set {item}: {parent!r} takes a value, not sub-keys")
        if allowed is ANY:
            if here in (("attacks",), ("defenses",)):
                _check_method_name(here[0], part, f"--set {item}")
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


def _check_keys(raw: dict, path: tuple[str, ...], where: str) -> None:
    """Every key of a preset file must be a known field (method names checked later)."""
    allowed = _schema_children(path)
    if allowed is ANY or allowed is None:
        return
    for k, v in raw.items():
        if k not in allowed:
            at = ".".join(path + (str(k),))
            known = ", ".join(allowed)
            raise ConfigError(f"{where}: unknown key {at!r} (known{' under ' + '.'.join(path) if path else ''}: {known})")
        if isinstance(v, dict) and isinstance(allowed[k], dict):
            _check_keys(v, path + (k,), where)


def _normalise(raw: dict) -> dict:
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
            out[str(name)] = entry
        raw[section] = out
    return raw


# mappings a preset replaces as a whole (their keys are data, not fields)
_WHOLE = {("attacks",), ("defenses",), ("search", "objectives"), ("budget", "attack")}


def _merge(defaults: dict, raw: dict, path: tuple[str, ...] = ()) -> dict:
    out = copy.deepcopy(defaults)
    for k, v in raw.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and path + (k,) not in _WHOLE:
            out[k] = _merge(out[k], v, path + (k,))
        else:
            out[k] = copy.deepcopy(v)
    return out


# ============================================================================ validation

def _check_method_name(section: str, name: str, where: str) -> type:
    from trainables import registry

    known = registry.attacks() if section == "attacks" else registry.defenses()
    if name not in known:
        kind = "attack" if section == "attacks" else "defense"
        raise ConfigError(f"{where}: unknown {kind} {name!r}; known: {', '.join(known)}")
    return known[name]


def _type(key: str, v: Any, kind: type | tuple, *, low: float | None = None, high: float | None = None,
          optional: bool = False, choices: tuple | None = None) -> Any:
    if v is None and optional:
        return None
    ok = isinstance(v, kind) and not (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)))
    if kind in (float, (int, float)) and isinstance(v, int) and not isinstance(v, bool):
        ok = True
    if not ok:
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConfigError(f"{key}: expected {names}{' or null' if optional else ''}, got {v!r}")
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


def _param_error(e: Exception) -> ConfigError:
    return ConfigError(str(e))


def _build(name: str, source: str, d: dict, overrides: tuple[str, ...]) -> SweepConfig:
    from trainables.engine import SGDConfig
    from trainables.params import ParamError, make_params
    from trainables.stages import resolve_attack_stage, resolve_defense

    kind = _type("kind", d["kind"], str, choices=KINDS)
    dataset = _type("dataset", d["dataset"], str)
    data_root = _type("data_root", d["data_root"], str, optional=True)
    model = _type("model", d["model"], str)
    seed = _type("seed", d["seed"], int, low=0)
    clean_fraction = float(_type("clean_fraction", d["clean_fraction"], float, low=1e-6, high=1.0))
    b = d["budget"]
    if not isinstance(b.get("attack"), dict):
        raise ConfigError(f"budget.attack: expected a mapping of training settings, got {b.get('attack')!r}")
    defense_epochs = _type("budget.defense_epochs", b["defense_epochs"], int, low=0, optional=True)
    eval_size = _type("budget.epoch_eval_size", b["epoch_eval_size"], int, low=1)
    try:
        make_params(SGDConfig, b["attack"], where="budget.attack: ")
    except ParamError as e:
        raise _param_error(e) from None

    # -- search / resources / selection ------------------------------------------------------
    s = d["search"]
    objectives = s["objectives"]
    if not isinstance(objectives, dict) or not objectives:
        raise ConfigError(f"search.objectives: expected a mapping metric -> min|max, got {objectives!r}")
    for metric, mode in objectives.items():
        _type(f"search.objectives.{metric}", mode, str, choices=("min", "max"))
        if kind == "defense" and metric not in DEFENSE_METRICS:
            raise ConfigError(f"search.objectives: unknown metric {metric!r} for a defense sweep; "
                              f"known: {', '.join(DEFENSE_METRICS)}")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(metric)):
            raise ConfigError(f"search.objectives: {metric!r} is not a metric name")
    es = s["early_stopping"]
    if not isinstance(es, dict):
        raise ConfigError(f"search.early_stopping: expected a mapping, got {es!r}")
    early = EarlyStopping(
        enabled=_type("search.early_stopping.enabled", es["enabled"], bool),
        grace_period=_type("search.early_stopping.grace_period", es["grace_period"], int, low=1),
        reduction_factor=float(_type("search.early_stopping.reduction_factor", es["reduction_factor"], float, low=1.01)))
    if early.enabled and kind == "attack":
        raise ConfigError("search.early_stopping.enabled: attack trials report once, at the end; "
                          "early stopping applies to defense sweeps only")
    search = SearchConfig(
        num_samples=_type("search.num_samples", s["num_samples"], int, low=1),
        sampler=_type("search.sampler", s["sampler"], str, choices=SAMPLERS),
        objectives=tuple((str(m), str(v)) for m, v in objectives.items()),
        max_concurrent=_type("search.max_concurrent", s["max_concurrent"], int, low=0),
        cross_check=_type("search.cross_check", s["cross_check"], bool),
        early_stopping=early)
    r = d["resources"]
    cpus = float(_type("resources.cpus", r["cpus"], float, low=0.0))
    gpus = float(_type("resources.gpus", r["gpus"], float, low=0.0))
    a_cpus, a_gpus = r["attack_cpus"], r["attack_gpus"]
    resources = Resources(
        cpus=cpus, gpus=gpus,
        attack_cpus=cpus if a_cpus is None else float(_type("resources.attack_cpus", a_cpus, float, low=0.0)),
        attack_gpus=gpus if a_gpus is None else float(_type("resources.attack_gpus", a_gpus, float, low=0.0)))
    if gpus > 1 and not float(gpus).is_integer():
        raise ConfigError(f"resources.gpus={gpus}: a fraction of a GPU must be below 1")
    if cpus == 0 and gpus == 0:
        raise ConfigError("resources: a trial needs cpus > 0 or gpus > 0")
    max_failures = _type("max_failures", d["max_failures"], int, low=-1)
    sel = d["selection"]
    first_metric, first_mode = search.objectives[0]
    sel_metric = _type("selection.metric", sel["metric"], str, optional=True) or first_metric
    sel_mode = _type("selection.mode", sel["mode"], str, optional=True, choices=("min", "max", None)) \
        or dict(search.objectives).get(sel_metric) or first_mode
    ba_metric = _type("selection.ba_metric", sel["ba_metric"], str, optional=True) or _default_ba_metric(search.objectives)
    selection = Selection(rule=_type("selection.rule", sel["rule"], str, choices=RULES),
                          ba_tolerance=float(_type("selection.ba_tolerance", sel["ba_tolerance"], float, low=0.0, high=100.0)),
                          metric=sel_metric, mode=sel_mode, ba_metric=ba_metric)
    if selection.rule == "max_der" and kind == "attack":
        raise ConfigError("selection.rule=max_der applies to defense sweeps only")
    rc = d["ray"]
    ray_cfg = RayConfig(num_cpus=_type("ray.num_cpus", rc["num_cpus"], int, low=1, optional=True),
                        num_gpus=_type("ray.num_gpus", rc["num_gpus"], int, low=0, optional=True),
                        object_store_mb=_type("ray.object_store_mb", rc["object_store_mb"], int, low=80))

    # -- attacks -----------------------------------------------------------------------------
    if not d["attacks"]:
        raise ConfigError("attacks: a sweep needs at least one attack (use 'none' for no attack)")
    attacks = []
    for aname, entry in d["attacks"].items():
        where = f"attacks.{aname}"
        if aname == "none":
            cls = None
        else:
            cls = _check_method_name("attacks", aname, "attacks")
        a_dataset = _type(f"{where}.dataset", entry.get("dataset") or dataset, str)
        params = dict(entry["params"])
        space: tuple[Dist, ...] = ()
        if entry["space"]:
            if kind != "attack":
                raise ConfigError(f"{where}.space: attack parameters are searched in attack sweeps only "
                                  f"(kind: attack); pin them under {where}.params")
        if kind == "attack":
            if cls is None:
                raise ConfigError("attacks.none: an attack sweep needs a real attack")
            try:
                make_params(cls.Params, params, where=f"{where}.params: ")
            except ParamError as e:
                raise _param_error(e) from None
            space = _resolve_space(aname, cls, entry["space"], params, where)
            params.update({dist.name: dist.default for dist in space if dist.pinned})
            space = tuple(x for x in space if not x.pinned)
        if cls is not None:
            try:
                make_params(cls.Params, {**params, **{x.name: _plain(x.default) for x in space}},
                            where=f"{where}.params: ")
            except ParamError as e:
                raise _param_error(e) from None
        try:
            resolve_attack_stage(a_dataset, model, aname, params or None, b["attack"], seed)
        except (ParamError, ValueError) as e:
            msg = str(e)
            for prefix in ("dataset: ", "model: "):
                msg = msg[len(prefix):] if msg.startswith(prefix) else msg
            key = ("model" if msg.startswith("unknown model") else
                   (f"{where}.dataset" if entry.get("dataset") else "dataset") if "dataset" in msg else where)
            raise ConfigError(f"{key}: {msg}") from None
        n = _type(f"{where}.num_samples", entry.get("num_samples"), int, low=1, optional=True) or search.num_samples
        attacks.append(AttackEntry(aname, a_dataset, _freeze(params), space, n if space else 1))

    # -- defenses ----------------------------------------------------------------------------
    defenses = []
    if kind == "defense" and not d["defenses"]:
        raise ConfigError("defenses: a defense sweep needs at least one defense")
    if kind == "attack" and d["defenses"]:
        raise ConfigError("defenses: an attack sweep searches attack parameters; remove the defenses "
                          "(or use kind: defense)")
    for dname, entry in d["defenses"].items():
        where = f"defenses.{dname}"
        cls = _check_method_name("defenses", dname, "defenses")
        params = dict(entry["params"])
        narrowing = dict(entry["space"])
        if (defense_epochs is not None and "epochs" in cls.Params.__dataclass_fields__
                and "epochs" not in params and "epochs" not in narrowing):
            # the budget fixes ``epochs`` like a preset param would: checked against the method's
            # own bounds, not against the search range (a budget may be shorter than any search)
            params["epochs"] = defense_epochs
        try:
            make_params(cls.Params, params, where=f"{where}.params: ")
        except ParamError as e:
            raise _param_error(e) from None
        space_all = _resolve_space(dname, cls, narrowing, params, where)
        params.update({x.name: x.default for x in space_all if x.pinned})
        space = tuple(x for x in space_all if not x.pinned)
        try:
            make_params(cls.Params, {**params, **{x.name: _plain(x.default) for x in space}},
                        where=f"{where}.params: ")
            resolve_defense(dname, {**params, **{x.name: _plain(x.default) for x in space}}, clean_fraction, seed)
        except (ParamError, ValueError) as e:
            raise _param_error(e) from None
        n = _type(f"{where}.num_samples", entry.get("num_samples"), int, low=1, optional=True) or search.num_samples
        defenses.append(DefenseEntry(dname, _freeze(params), space, n if space else 1))

    for metric in (selection.metric, selection.ba_metric):
        if kind == "defense" and metric not in DEFENSE_METRICS:
            raise ConfigError(f"selection: unknown metric {metric!r}; known: {', '.join(DEFENSE_METRICS)}")

    stored = {k: v for k, v in d.items()}
    return SweepConfig(
        name=name, source=source, description=str(d.get("description") or ""), kind=kind, dataset=dataset,
        data_root=data_root, model=model, seed=seed, clean_fraction=clean_fraction,
        attack_train=_freeze(b["attack"]), defense_epochs=defense_epochs, epoch_eval_size=eval_size,
        attacks=tuple(attacks), defenses=tuple(defenses), search=search, resources=resources,
        max_failures=max_failures, selection=selection, ray=ray_cfg, overrides=overrides,
        raw=json.dumps(stored, default=_json_default))


def _default_ba_metric(objectives: tuple[tuple[str, str], ...]) -> str:
    for m, _ in objectives:
        if m == "ba" or m.endswith("_ba"):
            return m
    return "ba"


def _json_default(o: Any):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {o!r}")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _resolve_space(method: str, cls: type, narrowing: dict, fixed: dict, where: str) -> tuple[Dist, ...]:
    """The method's search space after the preset's narrowing/pinning, checked against both the
    space file and the Params bounds."""
    from trainables.params import ParamError, make_params

    try:
        base = load_space(method)
    except SpaceError as e:
        raise ConfigError(str(e)) from None
    fields = set(cls.Params.__dataclass_fields__)
    for pname in base:
        if pname not in fields:
            raise ConfigError(f"search_spaces/{method}.yaml: {pname!r} is not a parameter of {method} "
                              f"(known: {', '.join(sorted(fields))})")
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
            continue                     # pinned by the preset's params: not searched
        spec = narrowing.get(pname)
        if spec is not None:
            try:
                dist = narrow(dist, spec, f"{where}.space.")
            except SpaceError as e:
                raise ConfigError(str(e)) from None
        # the range's ends (and every choice) must also pass the method's own bounds
        probes = list(dist.choices) if dist.type == "categorical" else [dist.low, dist.high, dist.default]
        for v in probes:
            try:
                make_params(cls.Params, {**fixed, pname: _plain(v)}, where=f"{where}.space: ")
            except ParamError as e:
                raise _param_error(e) from None
        out.append(dist)
    return tuple(out)


# ============================================================================ printing

def format_config(cfg: SweepConfig) -> str:
    """The resolved preset as YAML (loadable again as a preset), then the search spaces."""
    head = [f"# preset {cfg.name} ({cfg.source})"]
    if cfg.overrides:
        head.append("# overrides: " + " ".join(cfg.overrides))
    head.append(f"# config hash {cfg.config_hash()}")
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=110)
    lines = ["", "# resolved search spaces (searched parameters; everything else is fixed):"]
    entries = cfg.defenses if cfg.kind == "defense" else cfg.attacks
    for e in entries:
        lines.append(f"#   {e.name}: " + (f"{e.num_samples} trials" if e.searched else
                                          "1 trial at the paper defaults (nothing searched)"))
        for dist in e.space if e.searched else ():
            lines.append(f"#     {dist.name}: {dist.describe()}")
        if e.params:
            fixed = ", ".join(f"{k}={v!r}" for k, v in e.params)
            lines.append(f"#     fixed: {fixed}")
    return "\n".join(head) + "\n" + body + "\n".join(lines) + "\n"


def dry_run(cfg: SweepConfig, workdir: str | Path | None = None) -> str:
    """The resolved config, the plan (attack stages, Tuners, trials) and a cost estimate
    (``sweep/estimate.py`` says how it is computed); with ``workdir``, which stages are cached."""
    from sweep.estimate import dry_run as _dry_run

    return _dry_run(cfg, workdir)
