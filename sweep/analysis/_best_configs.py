"""``best_configs.yaml`` as typed, frozen data: what selection chose for a sweep, per (attack,
defense) and across attacks, with the MLflow runs that measured it. Built by
``build_best_configs``, read by the tables, plots, ``replicate`` and the Model Registry; this
module alone turns it into the YAML mapping and back."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import yaml


@dataclass(frozen=True)
class Chosen:
    """One trial run in a selection: the selected one, the paper default, a Pareto point."""

    run_id: str
    ray_trial_id: str
    config_key: str
    params: dict[str, Any]
    metrics: dict[str, float]
    why: str | None = None                  # why the rule chose it (the selected one only)

    def to_dict(self) -> dict:
        out = {"run_id": self.run_id, "ray_trial_id": self.ray_trial_id, "config_key": self.config_key,
               "params": dict(self.params), "metrics": dict(self.metrics)}
        return {**out, "why": self.why} if self.why else out

    @classmethod
    def from_dict(cls, d: dict | None) -> "Chosen | None":
        if d is None:
            return None
        return cls(d["run_id"], d["ray_trial_id"], d["config_key"], dict(d.get("params") or {}),
                   dict(d.get("metrics") or {}), d.get("why"))


@dataclass(frozen=True)
class PairResult:
    """Selection on one (attack, defense) pair (attack sweeps: one attack)."""

    best: Chosen | None
    pareto_front: tuple[Chosen, ...]
    n_candidates: int
    paper_default: Chosen | None = None     # defense sweeps: the trial at the paper defaults
    # several stages: the rule's pick against the paper default (``against_default``), when it
    # was another configuration; its verdict says whether it replaced the default
    against_default: dict[str, Any] | None = None

    def chosen(self, kind: str) -> Chosen | None:
        """``best`` or ``paper_default``."""
        return self.best if kind == "best" else self.paper_default

    def to_dict(self, with_default: bool) -> dict:
        out: dict[str, Any] = {"best": self.best.to_dict() if self.best else None}
        if with_default:
            out["paper_default"] = self.paper_default.to_dict() if self.paper_default else None
        if self.against_default is not None:
            out["against_default"] = dict(self.against_default)
        return {**out, "pareto_front": [c.to_dict() for c in self.pareto_front], "n_candidates": self.n_candidates}

    @classmethod
    def from_dict(cls, d: dict) -> "PairResult":
        return cls(Chosen.from_dict(d.get("best")), tuple(Chosen.from_dict(c) for c in d.get("pareto_front") or ()),
                   int(d.get("n_candidates", 0)), Chosen.from_dict(d.get("paper_default")), d.get("against_default"))


@dataclass(frozen=True)
class AcrossAttacks:
    """A defense's configuration best over all attacks, or ``note`` alone when none was measured
    on every attack."""

    note: str | None = None
    config_key: str | None = None
    params: dict[str, Any] | None = None
    metric: str = "asr"                     # the selection metric, taken at its worst case
    worst_case: float | None = None
    ba_metric: str = "ba"                   # the accuracy, averaged over the attacks
    mean_ba: float | None = None
    per_attack: dict[str, dict] | None = None    # attack -> {run_id, <metric>, <ba_metric>}
    n_configs_on_all_attacks: int = 0
    why: str = ""

    def to_dict(self) -> dict:
        if self.config_key is None:
            return {"note": self.note}
        out = {"config_key": self.config_key, "params": dict(self.params or {}),
               f"worst_case_{self.metric}": self.worst_case, f"mean_{self.ba_metric}": self.mean_ba,
               "per_attack": {a: dict(v) for a, v in (self.per_attack or {}).items()},
               "n_configs_on_all_attacks": self.n_configs_on_all_attacks, "why": self.why}
        return {**out, "note": self.note} if self.note else out

    @classmethod
    def from_dict(cls, d: dict | None) -> "AcrossAttacks | None":
        if d is None:
            return None
        if "config_key" not in d:
            return cls(note=d.get("note"))
        (worst_key,) = [k for k in d if k.startswith("worst_case_")]
        (mean_key,) = [k for k in d if k.startswith("mean_")]
        return cls(d.get("note"), d["config_key"], dict(d["params"]), worst_key[len("worst_case_"):], d[worst_key],
                   mean_key[len("mean_"):], d[mean_key], {a: dict(v) for a, v in d["per_attack"].items()},
                   int(d["n_configs_on_all_attacks"]), d.get("why", ""))


@dataclass(frozen=True)
class DefenseResult:
    per_attack: dict[str, PairResult]
    across_attacks: AcrossAttacks | None = None


@dataclass(frozen=True)
class BestConfigs:
    """A sweep's selection (``best_configs.yaml``): ``defenses`` in a defense sweep, ``attacks``
    in an attack sweep; ``registered_models`` the Model Registry aliases at its versions."""

    sweep_id: str
    preset: str
    dataset: str
    model: str
    rule: str
    objectives: tuple[tuple[str, str], ...]
    defenses: dict[str, DefenseResult] | None = None
    attacks: dict[str, PairResult] | None = None
    registered_models: dict[str, dict[str, str]] | None = None

    def pair(self, defense: str, attack: str) -> PairResult:
        return self.defenses[defense].per_attack[attack]

    def selections(self) -> Iterator[tuple[str, str, PairResult]]:
        """(method, attack, result) of every pair: (defense, attack, ...) or (attack, attack, ...)."""
        for name, info in (self.defenses or {}).items():
            for attack, result in info.per_attack.items():
                yield name, attack, result
        for attack, result in (self.attacks or {}).items():
            yield attack, attack, result

    def with_registered(self, models: dict[str, dict[str, str]]) -> "BestConfigs":
        return replace(self, registered_models=models)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"sweep_id": self.sweep_id, "preset": self.preset, "dataset": self.dataset,
                               "model": self.model, "rule": self.rule, "objectives": dict(self.objectives)}
        if self.attacks is not None:
            out["attacks"] = {a: r.to_dict(with_default=False) for a, r in self.attacks.items()}
        if self.defenses is not None:
            out["defenses"] = {d: {"per_attack": {a: r.to_dict(with_default=True) for a, r in info.per_attack.items()},
                                   "across_attacks": info.across_attacks.to_dict() if info.across_attacks else None}
                               for d, info in self.defenses.items()}
        if self.registered_models is not None:
            out["registered_models"] = {n: dict(v) for n, v in self.registered_models.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "BestConfigs":
        defenses = None if "defenses" not in d else {
            name: DefenseResult({a: PairResult.from_dict(r) for a, r in info["per_attack"].items()},
                                AcrossAttacks.from_dict(info.get("across_attacks")))
            for name, info in d["defenses"].items()}
        attacks = None if "attacks" not in d else {a: PairResult.from_dict(r) for a, r in d["attacks"].items()}
        return cls(d["sweep_id"], d["preset"], d["dataset"], d["model"], d["rule"],
                   tuple((m, mode) for m, mode in d["objectives"].items()), defenses, attacks,
                   d.get("registered_models"))

    def dump(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=110))
        return path

    @classmethod
    def load(cls, path: Path) -> "BestConfigs":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))
