"""Presets -> a typed, frozen, validated sweep configuration.

A preset is a YAML file in ``sweep/presets/`` (or any path). ``load_preset(name, overrides)``
reads it, applies ``--set key=value`` overrides (dotted keys, YAML values), fills in the defaults
below, makes relative folders absolute (against the current directory: trials run elsewhere) and
validates everything before any work: method, dataset and model names, every method
parameter (through the method's ``Params`` and ``make_params``), every narrowing of a search
space (inside ``search_spaces/<method>.yaml`` and inside the ``Params`` bounds), the training
budget, the search and selection settings. The first problem found stops it with one
``ConfigError`` whose message names the key.

Preset fields (defaults in brackets; ``sweep.schema.DEFAULTS``)::

    description: free text
    profile: null                      a profile of this preset to apply (``--set profile=cpu``)
    profiles:                          name -> preset fields laid over the preset when selected
      cpu: {budget: {attack: {epochs: 4}}, attacks: {badnets: {budget: {epochs: 12}}}}
                                       (mappings merge key by key, down to one method's entry;
                                       null removes a method; lists and scalars replace)
    kind: defense | attack            [defense] what the trials search: defense or attack parameters
    dataset: cifar10 | cifar100 | gtsrb | synthetic[:n_train:n_test] | imagefolder:<path>  [cifar10]
    data_root: folder of downloaded/ImageFolder data    [null = the loaders' default]
    model: wrn-16-1 (any name of trainables.models)     [wrn-16-1]
    seed: 0                            seed of attack stages, clean subsets, defenses and the sampler
    clean_fraction: 0.05               the defenses' clean subset (fraction of the training set)
    budget:
      attack: {recipe: standard, ...}       the attack stage's SGDConfig fields, or a named recipe
                                            (trainables/recipes.py) with fields over it
      defense_epochs: null             pins every defense's ``epochs`` parameter (unless the preset
                                       sets it for that defense itself)
      epoch_eval_size: 2000            test images measured after every epoch (the final metrics
                                       always use the whole test set)
    attacks:                           a list of names, or name -> {params: {...}, dataset: ...,
      badnets: {params: {poison_rate: 0.1}}          budget: {...} (SGDConfig fields over
                                                     budget.attack for this attack's stage),
                                                     space: {...} (attack sweeps only)}
    defenses:                          a list of names, or name -> {params: {...}, space: {...},
      nba: {space: {lambda1: [0.5, 5], epochs: 10}}  num_samples: n}. narrow: [low, high] /
      fp: {num_samples: 1}                           {low, high, default}; pin: a scalar;
                                                      num_samples (default search.num_samples;
                                                      1 = the paper default only)
      nba: {also_try: [{lambda1: 2.0}]}              also_try: configurations tried right after
                                                      the paper default (searched parameters; the
                                                      rest at the paper default): how ``replicate``
                                                      re-measures a selected config at another seed
    search:
      num_samples: 20                  trials per (attack, defense) pair, the paper default included
      sampler: tpe | nsga2 | random    [tpe]
      objectives: {asr: min, ba: max}  (attack sweeps e.g. {student_asr: max, student_ba: max})
      max_concurrent: 0                trials at a time per Tuner (0: as many as the cluster has
                                       trial slots; a number caps a search's parallelism, which a
                                       sequential sampler like TPE learns from)
      max_tuners: null                 Tuners at a time (null: every Tuner whose inputs exist, so
                                       Ray fills the cluster; 1: one after another)
      early_stopping: {enabled: false, metric: score, mode: max, grace_period: 2, reduction_factor: 3}
                                       ASHA over each defense's own epochs, ranking by ``metric``
                                       (score = BA - ASR on the epoch's test subset); on, it pins
                                       every searched ``epochs``/``*_epochs`` to its maximum
      cross_check: true                evaluate each attack's best config on the other attacks
      stages: 1                        attack stages per attack (stage i at seed + i x 1000000);
                                       each trial defends them all with one configuration and
                                       reports their aggregates (<metric>_mean, _worst, _std: what
                                       objectives and selection may name); with early stopping
                                       on, ASHA cuts at 1, 2, 4... stages instead of epochs
                                       (and no searched schedule is pinned)
    resources: {cpus: 1, gpus: 0, attack_cpus: null, attack_gpus: null}  per trial / attack stage
    max_failures: 0                    Tune's retries of a failed trial, and Ray's of an attack
                                       stage whose node was lost (-1: no limit)
    checkpoint_every: 1                epochs between the checkpoints of a trial's or an attack
                                       stage's training (in the storage): a retry, or a trial a
                                       resumed sweep restarts, goes on from the last one
    paper_table: null                  a paper's table (sweep/paper_tables/<name>.yaml: nba_table2,
                                       dlp_table3, cheatkd_table2) whose layout the report uses
                                       and whose numbers it shows beside ours
    selection: {rule: bound, bound: 10.0, ba_tolerance: 2.0, metric: null, mode: null, ba_metric: null}
      rule bound: the highest ``ba_metric`` among fully trained configs whose ``metric`` (first
      objective) meets ``bound`` % (at most it for a metric to minimise, at least it for one to
      maximise), else the best ``metric``; ba_within: best ``metric`` among configs whose
      ``ba_metric`` is within ``ba_tolerance`` points of the best; best_metric: the best
      ``metric`` regardless of BA; max_der: highest DER.
    ray: {num_cpus: null, num_gpus: null, object_store_mb: 512}   a LOCAL Ray's size
    storage: {uri: null, endpoint: null}   what the nodes share (attack-stage cache, trial
                                       outputs, Ray Tune's state): null = the work directory;
                                       a path every node mounts, or s3://bucket/prefix (endpoint:
                                       a self-hosted S3-compatible store's URL). ``--storage``
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

from sweep.errors import ConfigError
from sweep.config import _schema as schema
from sweep.config._sweep_config import (DEFENSE_METRICS, EPOCH_METRICS, KINDS, RULES, SAMPLERS, STAGE_AGGREGATE_METRICS,
                                        STAGE_SEED_STRIDE, AttackEntry, DefenseEntry, EarlyStopping, RayConfig,
                                        Resources, SearchConfig, Selection, StorageConfig, SweepConfig)
from sweep.config._spaces import Dist, first_trial
from sweep.config._validate import checked_params, method_class, resolve_space, typed
from trainables.params import ParamError, freeze, frozen, plain

PRESETS_DIR = Path(__file__).parents[1] / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"preset file not found: {p}")
        return p
    known = ", ".join(list_presets())
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name_or_path)):
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; known: {known}")
    p = PRESETS_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; known: {known} (or give a path to a .yaml file)")
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
    where = f"preset {path.name}"
    profiles = schema.check_profiles(raw.pop("profiles", None), where)
    schema.check_keys(raw, (), where)
    raw = schema.normalise(raw)
    chosen = _with_overrides(raw, overrides).get("profile")
    resolved = not profiles and chosen == raw.get("profile")    # a printed config records its profile
    if chosen is not None and not resolved:     # the profile first, the overrides over it
        raw = schema.apply_profile({**raw, "profile": chosen}, profiles, where)
    raw = _with_overrides(raw, overrides)
    d = absolute_paths(schema.merge(schema.DEFAULTS, raw), Path.cwd())
    return build_config(path.stem, str(path), d, tuple(overrides))


def _with_overrides(raw: dict, overrides) -> dict:
    for item in overrides:
        raw = schema.normalise(schema.apply_override(raw, item))
    return raw


def absolute_paths(d: dict, cwd: str | Path) -> dict:
    """A preset mapping with its relative folders (``imagefolder:<path>`` datasets, ``data_root``)
    made absolute against ``cwd``: trials run in the working directory Tune gives them, on any
    node, so a path relative to the driver's would name another folder there."""
    from trainables.data import absolute_dataset_name, absolute_path

    d = copy.deepcopy(d)
    d["dataset"] = absolute_dataset_name(d.get("dataset"), cwd)
    if isinstance(d.get("data_root"), str) and d["data_root"]:
        d["data_root"] = absolute_path(d["data_root"], cwd)
    for entry in (d.get("attacks") or {}).values():
        if isinstance(entry, dict) and entry.get("dataset"):
            entry["dataset"] = absolute_dataset_name(entry["dataset"], cwd)
    storage = d.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("uri"), str) and "://" not in storage["uri"]:
        storage["uri"] = absolute_path(storage["uri"], cwd)
    return d


def rebuild_config(name: str, stored: dict, overrides: tuple[str, ...] = (), source: str = "") -> SweepConfig:
    """The config a sweep stored (``SweepConfig.to_dict()``), rebuilt and validated again."""
    return build_config(name, source, schema.merge(schema.DEFAULTS, schema.normalise(stored)), tuple(overrides))


def config_with(cfg: SweepConfig, overrides: list[str] | tuple[str, ...]) -> SweepConfig:
    """``cfg`` with further ``--set`` overrides applied over its normalised preset (validated again;
    its own overrides stay on record before them)."""
    raw = cfg.to_dict()
    for item in overrides:
        raw = schema.apply_override(raw, item)
    return build_config(cfg.name, cfg.source, schema.merge(schema.DEFAULTS, schema.normalise(raw)),
                        (*cfg.overrides, *overrides))


def build_config(name: str, source: str, d: dict, overrides: tuple[str, ...]) -> SweepConfig:
    """A complete preset mapping (defaults merged in) -> the validated ``SweepConfig``."""
    kind = typed("kind", d["kind"], str, choices=KINDS)
    dataset = typed("dataset", d["dataset"], str)
    model = typed("model", d["model"], str)
    seed = typed("seed", d["seed"], int, low=0)
    clean_fraction = float(typed("clean_fraction", d["clean_fraction"], float, low=1e-6, high=1.0))
    budget = d["budget"]
    if not isinstance(budget.get("attack"), dict):
        raise ConfigError(f"budget.attack: expected a mapping of training settings, got {budget.get('attack')!r}")
    defense_epochs = typed("budget.defense_epochs", budget["defense_epochs"], int, low=0, optional=True)
    from trainables.engine import SGDConfig

    attack_train = _with_recipe(budget["attack"], "budget.attack")
    checked_params(SGDConfig, attack_train, "budget.attack: ")
    search = _search(d["search"], kind)
    if search.stages > 1 and seed >= STAGE_SEED_STRIDE:
        raise ConfigError(f"seed={seed}: with search.stages={search.stages} the seed must be below "
                          f"{STAGE_SEED_STRIDE} (stage i trains at seed + i x {STAGE_SEED_STRIDE})")
    selection = _selection(d["selection"], search, kind)
    attacks = _attacks(d["attacks"], kind, dataset, model, attack_train, seed, search.num_samples)
    defenses = _defenses(d["defenses"], kind, defense_epochs, clean_fraction, seed, search.num_samples,
                         pin_schedules=search.early_stopping.enabled and not search.stops_on_stages)
    return SweepConfig(
        name=name, source=source, description=str(d.get("description") or ""), kind=kind, dataset=dataset,
        data_root=typed("data_root", d["data_root"], str, optional=True), model=model, seed=seed,
        clean_fraction=clean_fraction, attack_train=freeze(attack_train), defense_epochs=defense_epochs,
        epoch_eval_size=typed("budget.epoch_eval_size", budget["epoch_eval_size"], int, low=1),
        attacks=attacks, defenses=defenses, search=search, resources=_resources(d["resources"]),
        max_failures=typed("max_failures", d["max_failures"], int, low=-1),
        checkpoint_every=typed("checkpoint_every", d["checkpoint_every"], int, low=1),
        paper_table=_paper_table(d["paper_table"], kind), selection=selection, ray=_ray(d["ray"]),
        storage=_storage(d["storage"]), overrides=overrides, raw=json.dumps(d),
        profile=typed("profile", d["profile"], str, optional=True))


def _search(s: dict, kind: str) -> SearchConfig:
    objectives = s["objectives"]
    if not isinstance(objectives, dict) or not objectives:
        raise ConfigError(f"search.objectives: expected a mapping metric -> min|max, got {objectives!r}")
    stages = typed("search.stages", s["stages"], int, low=1, high=100)
    if stages > 1 and kind == "attack":
        raise ConfigError(f"search.stages={stages}: an attack sweep's trials each train their own attack "
                          "stage; several stages per attack apply to defense sweeps only")
    for metric, mode in objectives.items():
        typed(f"search.objectives.{metric}", mode, str, choices=("min", "max"))
        if kind == "defense":
            _check_defense_metric("search.objectives", metric, stages)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(metric)):
            raise ConfigError(f"search.objectives: {metric!r} is not a metric name")
    es = s["early_stopping"]
    if not isinstance(es, dict):
        raise ConfigError(f"search.early_stopping: expected a mapping, got {es!r}")
    early = EarlyStopping(
        enabled=typed("search.early_stopping.enabled", es["enabled"], bool),
        metric=typed("search.early_stopping.metric", es["metric"], str, choices=EPOCH_METRICS),
        mode=typed("search.early_stopping.mode", es["mode"], str, choices=("max", "min")),
        grace_period=typed("search.early_stopping.grace_period", es["grace_period"], int, low=1),
        reduction_factor=float(typed("search.early_stopping.reduction_factor", es["reduction_factor"], float,
                                     low=1.01)))
    if early.enabled and kind == "attack":
        raise ConfigError("search.early_stopping.enabled: attack trials report once, at the end; "
                          "early stopping applies to defense sweeps only")
    return SearchConfig(
        num_samples=typed("search.num_samples", s["num_samples"], int, low=1),
        sampler=typed("search.sampler", s["sampler"], str, choices=SAMPLERS),
        objectives=tuple((str(m), str(v)) for m, v in objectives.items()),
        max_concurrent=typed("search.max_concurrent", s["max_concurrent"], int, low=0),
        max_tuners=typed("search.max_tuners", s["max_tuners"], int, low=1, optional=True),
        cross_check=typed("search.cross_check", s["cross_check"], bool),
        early_stopping=early, stages=stages)


def _check_defense_metric(where: str, metric: str, stages: int) -> None:
    """A defense sweep's metric: BA/ASR/RA/DER, or (several stages) an aggregate over the stages."""
    if metric in DEFENSE_METRICS or (stages > 1 and metric in STAGE_AGGREGATE_METRICS):
        return
    if metric in STAGE_AGGREGATE_METRICS:
        raise ConfigError(f"{where}: {metric!r} is an aggregate over attack stages: it needs search.stages > 1 "
                          f"(with one stage use {metric.rsplit('_', 1)[0]!r})")
    known = DEFENSE_METRICS + (STAGE_AGGREGATE_METRICS if stages > 1 else ())
    raise ConfigError(f"{where}: unknown metric {metric!r} for a defense sweep; known: {', '.join(known)}")


def _resources(r: dict) -> Resources:
    cpus = float(typed("resources.cpus", r["cpus"], float, low=0.0))
    gpus = float(typed("resources.gpus", r["gpus"], float, low=0.0))
    a_cpus = typed("resources.attack_cpus", r["attack_cpus"], float, low=0.0, optional=True)
    a_gpus = typed("resources.attack_gpus", r["attack_gpus"], float, low=0.0, optional=True)
    if gpus > 1 and not gpus.is_integer():
        raise ConfigError(f"resources.gpus={gpus}: a fraction of a GPU must be below 1")
    if cpus == 0 and gpus == 0:
        raise ConfigError("resources: a trial needs cpus > 0 or gpus > 0")
    return Resources(cpus=cpus, gpus=gpus, attack_cpus=cpus if a_cpus is None else float(a_cpus),
                     attack_gpus=gpus if a_gpus is None else float(a_gpus))


def _selection(sel: dict, search: SearchConfig, kind: str) -> Selection:
    first_metric, first_mode = search.objectives[0]
    metric = typed("selection.metric", sel["metric"], str, optional=True) or first_metric
    mode = typed("selection.mode", sel["mode"], str, optional=True, choices=("min", "max", None)) \
        or dict(search.objectives).get(metric) or first_mode
    ba_metric = typed("selection.ba_metric", sel["ba_metric"], str, optional=True) \
        or next((m for m, _ in search.objectives if m == "ba" or m.endswith("_ba")), "ba")
    selection = Selection(rule=typed("selection.rule", sel["rule"], str, choices=RULES),
                          bound=float(typed("selection.bound", sel["bound"], float, low=0.0, high=100.0)),
                          ba_tolerance=float(typed("selection.ba_tolerance", sel["ba_tolerance"], float,
                                                   low=0.0, high=100.0)),
                          metric=metric, mode=mode, ba_metric=ba_metric)
    if selection.rule == "max_der" and kind == "attack":
        raise ConfigError("selection.rule=max_der applies to defense sweeps only")
    for m in (selection.metric, selection.ba_metric):
        if kind == "defense":
            _check_defense_metric("selection", m, search.stages)
    return selection


def _storage(sc: dict) -> StorageConfig:
    """The URI's form is checked here; whether it answers, at the sweep's start (preflight)."""
    from trainables.storage import StorageError, open_storage

    uri = typed("storage.uri", sc["uri"], str, optional=True)
    endpoint = typed("storage.endpoint", sc["endpoint"], str, optional=True)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"storage.endpoint: expected an http:// or https:// URL, got {endpoint!r}")
    if uri is not None:
        try:
            uri = open_storage(uri, endpoint).uri
        except StorageError as e:
            raise ConfigError(f"storage.uri: {e}") from None
    return StorageConfig(uri=uri, endpoint=endpoint)


def _ray(rc: dict) -> RayConfig:
    return RayConfig(num_cpus=typed("ray.num_cpus", rc["num_cpus"], int, low=1, optional=True),
                     num_gpus=typed("ray.num_gpus", rc["num_gpus"], int, low=0, optional=True),
                     object_store_mb=typed("ray.object_store_mb", rc["object_store_mb"], int, low=80))


def _paper_table(name: Any, kind: str) -> str | None:
    from sweep.config._paper_tables import known_tables, load_table

    name = typed("paper_table", name, str, optional=True)
    if name is None:
        return None
    if name not in known_tables():
        raise ConfigError(f"paper_table={name!r} is not one of {known_tables()}")
    if load_table(name).kind != kind:
        raise ConfigError(f"paper_table={name!r} is a table of {load_table(name).kind} results; "
                          f"this is a {kind} sweep")
    return name


def _split_space(space: tuple[Dist, ...], params: dict) -> tuple[Dist, ...]:
    """Pinned dimensions (a range of one value) join the fixed params; the rest stay searched."""
    params.update({x.name: x.default for x in space if x.pinned})
    return tuple(x for x in space if not x.pinned)


def is_schedule_length(x: Dist) -> bool:
    """A searched number of epochs (``epochs``, ``teacher_epochs``, ...)."""
    return x.type == "int" and (x.name == "epochs" or x.name.endswith("_epochs"))


def _pin_schedules(space: tuple[Dist, ...], params: dict) -> tuple[Dist, ...]:
    """With early stopping on, every trial of a pair runs the same schedule, the longest the
    space allows: the scheduler then compares trials at the same epoch of the same schedule
    and stops the poor ones, instead of the sampler shortening them."""
    params.update({x.name: int(x.high) for x in space if is_schedule_length(x)})
    return tuple(x for x in space if not is_schedule_length(x))


def _with_recipe(train: dict, where: str) -> dict:
    """Training settings with a named ``recipe`` (``trainables.recipes``) expanded into its fields."""
    from trainables.recipes import expand_recipe

    try:
        return expand_recipe(train, where)
    except ParamError as e:
        raise ConfigError(str(e)) from None


def _attacks(entries: dict, kind: str, dataset: str, model: str, train: dict, seed: int,
             num_samples: int) -> tuple[AttackEntry, ...]:
    from trainables.engine import SGDConfig
    from trainables.stages import resolve_attack_stage

    if not entries:
        raise ConfigError("attacks: a sweep needs at least one attack (use 'none' for no attack)")
    out = []
    for name, entry in entries.items():
        where = f"attacks.{name}"
        cls = None if name == "none" else method_class("attacks", name, "attacks")
        a_dataset = typed(f"{where}.dataset", entry.get("dataset") or dataset, str)
        params = dict(entry["params"])
        space: tuple[Dist, ...] = ()
        if entry["space"] and kind != "attack":
            raise ConfigError(f"{where}.space: attack parameters are searched in attack sweeps only "
                              f"(kind: attack); pin them under {where}.params")
        if kind == "attack":
            if cls is None:
                raise ConfigError("attacks.none: an attack sweep needs a real attack")
            checked_params(cls.Params, params, f"{where}.params: ")
            space = _split_space(resolve_space(name, cls, entry["space"], params, where), params)
        if cls is not None:
            checked_params(cls.Params, first_trial(params, space), f"{where}.params: ")
        a_train = {**train, **_with_recipe(entry.get("budget", {}), f"{where}.budget")}
        checked_params(SGDConfig, a_train, f"{where}.budget: ")
        try:
            resolve_attack_stage(a_dataset, model, name, params or None, a_train, seed)
        except (ParamError, ValueError) as e:
            raise ConfigError(_stage_error_key(str(e), where, bool(entry.get("dataset")))) from None
        n = typed(f"{where}.num_samples", entry.get("num_samples"), int, low=1, optional=True) or num_samples
        out.append(AttackEntry(name, a_dataset, freeze(params), space, n if space else 1, freeze(a_train)))
    return tuple(out)


def _stage_error_key(msg: str, where: str, own_dataset: bool) -> str:
    """The preset key an attack-stage error is about (the model, the dataset, or the attack)."""
    for prefix in ("dataset: ", "model: "):
        msg = msg[len(prefix):] if msg.startswith(prefix) else msg
    if msg.startswith("unknown model"):
        key = "model"
    elif "dataset" in msg:
        key = f"{where}.dataset" if own_dataset else "dataset"
    else:
        key = where
    return f"{key}: {msg}"


def _defenses(entries: dict, kind: str, defense_epochs: int | None, clean_fraction: float, seed: int,
              num_samples: int, pin_schedules: bool = False) -> tuple[DefenseEntry, ...]:
    from trainables.stages import resolve_defense

    if kind == "defense" and not entries:
        raise ConfigError("defenses: a defense sweep needs at least one defense")
    if kind == "attack" and entries:
        raise ConfigError("defenses: an attack sweep searches attack parameters; remove the defenses "
                          "(or use kind: defense)")
    out = []
    for name, entry in entries.items():
        where = f"defenses.{name}"
        cls = method_class("defenses", name, "defenses")
        params = dict(entry["params"])
        narrowing = dict(entry["space"])
        if (defense_epochs is not None and "epochs" in cls.Params.__dataclass_fields__
                and "epochs" not in params and "epochs" not in narrowing):
            # the budget fixes ``epochs`` like a preset param would: checked against the method's
            # own bounds, not against the search range (a budget may be shorter than any search)
            params["epochs"] = defense_epochs
        checked_params(cls.Params, params, f"{where}.params: ")
        space = _split_space(resolve_space(name, cls, narrowing, params, where), params)
        if pin_schedules:
            space = _pin_schedules(space, params)
        checked_params(cls.Params, first_trial(params, space), f"{where}.params: ")
        try:
            resolve_defense(name, first_trial(params, space), clean_fraction, seed)
        except (ParamError, ValueError) as e:
            raise ConfigError(str(e)) from None
        n = typed(f"{where}.num_samples", entry.get("num_samples"), int, low=1, optional=True) or num_samples
        also_try = _also_try(entry.get("also_try"), cls, params, space, where)
        if also_try and n < 1 + len(also_try):
            raise ConfigError(f"{where}.num_samples: {n} trial(s) cannot hold the paper default and "
                              f"{len(also_try)} also_try point(s); set it to at least {1 + len(also_try)}")
        out.append(DefenseEntry(name, freeze(params), space, n if space else 1, also_try))
    return tuple(out)


def _also_try(raw: Any, cls, params: dict, space: tuple[Dist, ...], where: str) -> tuple:
    """``also_try``: mappings of searched parameters, each completed with the first trial's
    values and checked like a trial's parameters -> frozen, in the order given."""
    if raw is None:
        return ()
    where = f"{where}.also_try"
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise ConfigError(f"{where}: expected a list of mappings of searched parameters, got {raw!r}")
    dists = {d.name: d for d in space if not d.pinned}
    first = {n: v for n, v in first_trial(params, space).items() if n in dists}
    out = []
    for i, c in enumerate(raw):
        at = f"{where}[{i}]"
        for k, v in c.items():
            if k not in dists:
                raise ConfigError(f"{at}: {k!r} is not a searched parameter here "
                                  f"(searched: {', '.join(dists) or 'none'})")
            if not dists[k].contains(frozen(v)):
                d = dists[k]
                rng = list(plain(d.choices)) if d.type == "categorical" else f"[{d.low}, {d.high}]"
                raise ConfigError(f"{at}.{k}: {v!r} is outside the searched range {rng}")
        values = {**first, **{k: plain(v) for k, v in c.items()}}
        checked_params(cls.Params, {**params, **values}, f"{at}: ")
        out.append(freeze(values))
    return tuple(out)
