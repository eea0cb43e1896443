"""The selected defended models in the MLflow Model Registry, ready to deploy.

For each defense of a sweep, one registered model ``<preset>-<defense>`` holds a version per
selected configuration: the per-attack choice (alias ``best-<attack>``) and the configuration
chosen across attacks on each attack (alias ``best-across-<attack>``). The alias ``best`` points
at the across-attacks choice on the preset's first attack, or, with one attack, at that attack's
choice. Each version's tags carry the configuration, its BA/ASR/RA/DER, the attack and the sweep
id. ``trainables.load_model("models:/<preset>-<defense>@best")`` loads it.

Only a sweep that searched moves the aliases. A sweep that searched nothing (a ``replicate`` at
another seed, a table of paper defaults) re-measures: it registers its versions but sets only the
aliases a model lacks, so ``@best`` stays with the configuration a search chose, not with
whichever re-measured configuration won on a held-out seed.

A version's source is the trial run's ``model/`` artifact folder (the state_dict ``model.pt``,
``spec.json``, ``metrics.json``), made an MLflow model by an ``MLmodel`` file naming the
``backdoor_sweep`` flavour. Nothing in it is pickled code: loading rebuilds the architecture
from ``spec.json`` and reads the weights with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

MODEL_DIR = "model"
FLAVOR = "backdoor_sweep"
# (several stages: BA/ASR/RA/DER are means over the stages, with their spread and worst case)
METRIC_TAGS = ("ba", "asr", "ra", "der", "ba_std", "asr_std", "ba_worst", "asr_worst")


def registered_name(preset: str, defense: str) -> str:
    return f"{preset}-{defense}"


def _mark_as_mlflow_model(tracker, run_id: str) -> bool:
    """Add the ``MLmodel`` file to the run's model folder; False if the run has no model."""
    from mlflow.models import Model

    have = {a.path for a in tracker.client.list_artifacts(run_id, MODEL_DIR)}
    if f"{MODEL_DIR}/model.pt" not in have:
        return False
    if f"{MODEL_DIR}/MLmodel" not in have:
        model = Model(artifact_path=MODEL_DIR, run_id=run_id, flavors={FLAVOR: {
            "state_dict": "model.pt", "spec": "spec.json", "loader": "trainables.load_model"}})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "MLmodel"
            model.save(str(path))
            tracker.client.log_artifact(run_id, str(path), MODEL_DIR)
    return True


def _version(tracker, name: str, run_id: str, tags: dict) -> str | None:
    """The model version of the run ``run_id`` (created once; a second call reuses it)."""
    client = tracker.client
    for v in client.search_model_versions(f"name='{name}'"):
        if v.run_id == run_id:
            return v.version
    if not _mark_as_mlflow_model(tracker, run_id):
        return None
    version = client.create_model_version(name, source=f"runs:/{run_id}/{MODEL_DIR}", run_id=run_id,
                                          tags={k: str(v)[:5000] for k, v in tags.items()})
    return version.version


def register_best(tracker, cfg, sweep_id: str, best, progress=print, move_aliases: bool = True) -> dict:
    """Register the selected models of every defense of ``best`` (a ``BestConfigs``); returns
    name -> {alias: version} of the aliases set. With ``move_aliases`` False, an alias the model
    already has is left as it is."""
    from mlflow.exceptions import MlflowException

    out = {}
    attacks = [a.name for a in cfg.attacks]
    for defense, info in (best.defenses or {}).items():
        name = registered_name(cfg.name, defense)
        try:
            tracker.client.create_registered_model(name, tags={"preset": cfg.name, "defense": defense},
                                                   description=f"{defense} configurations selected by the "
                                                               f"{cfg.name} sweeps ({best.rule})")
        except MlflowException:
            pass                                   # registered by an earlier sweep
        aliases = {}
        for attack in attacks:
            chosen = info.per_attack[attack].best if attack in info.per_attack else None
            if chosen:
                aliases[f"best-{attack}"] = _version(tracker, name, chosen.run_id, _tags(
                    sweep_id, defense, attack, "per_attack", chosen.config_key, chosen.params, chosen.metrics,
                    chosen.why))
        across = info.across_attacks
        for attack, run in ((across.per_attack or {}) if across else {}).items():
            aliases[f"best-across-{attack}"] = _version(tracker, name, run["run_id"], _tags(
                sweep_id, defense, attack, "across_attacks", across.config_key, across.params, run, across.why))
        main = aliases.get(f"best-across-{attacks[0]}") or aliases.get(f"best-{attacks[0]}")
        if main:
            aliases["best"] = main
        versions = sorted({int(v) for v in aliases.values() if v})
        existing = {} if move_aliases else tracker.client.get_registered_model(name).aliases
        kept = sorted(k for k, v in aliases.items() if v and k in existing)
        aliases = {k: v for k, v in aliases.items() if v and k not in existing}
        for alias, version in aliases.items():
            tracker.client.set_registered_model_alias(name, alias, version)
        if aliases:
            out[name] = aliases
        if versions:
            said = [f"@{a} = v{v}" for a, v in sorted(aliases.items())]
            if kept:
                said.append("@" + ", @".join(kept) + " left where an earlier sweep set them")
            progress(f"registered {name}: versions {', '.join(f'v{v}' for v in versions)}; " + "; ".join(said))
    return out


def _tags(sweep_id, defense, attack, scope, config_key, params, metrics, why) -> dict:
    tags = {"sweep_id": sweep_id, "defense": defense, "attack": attack, "scope": scope, "config_key": config_key,
            "config": json.dumps(params, sort_keys=True), "why": why or ""}
    return {**tags, **{m: metrics[m] for m in METRIC_TAGS if metrics.get(m) is not None}}


def registered_aliases(tracker, cfg, sweep_id: str) -> dict[str, dict[str, str]]:
    """Read-only: per registered model of the sweep's defenses, the aliases that now point at a
    version the sweep registered (name -> {alias: version})."""
    from mlflow.exceptions import MlflowException

    out = {}
    for d in cfg.defenses:
        name = registered_name(cfg.name, d.name)
        try:
            aliases = tracker.client.get_registered_model(name).aliases
        except MlflowException:
            continue                               # nothing registered under this name
        mine = {a: v for a, v in aliases.items()
                if tracker.client.get_model_version(name, v).tags.get("sweep_id") == sweep_id}
        if mine:
            out[name] = dict(sorted(mine.items()))
    return out
