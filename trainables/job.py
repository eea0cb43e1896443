"""What one Ray Tune trial runs: the typed, frozen job a Tuner binds to its trainable.

A Tuner runs either a list of fixed cases (``cases``: the paper-default trials of several pairs,
or the cross-check of one attack's best configuration on the other attacks; Tune's parameter
space is then ``{"case": grid_search(range(len(cases)))}``) or a searcher's proposals on one
(attack, defense) pair (``searched``: the pair, with its fixed parameters; the searcher adds the
searched ones). ``TrialJob.case(config)`` says which, for one trial's config.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from trainables.params import freeze, thaw

CASE_KEY = "case"          # the parameter-space key of a fixed-case Tuner


@dataclass(frozen=True)
class AttackStageRef:
    """One attack stage a defense trial defends: its cache hash, its artifact and its seed."""

    hash: str
    artifact_dir: str
    seed: int


@dataclass(frozen=True)
class TrialCase:
    """One trial's work: a defense configuration on one attack stage (defense sweeps), or an
    attack configuration (attack sweeps; ``defense`` is None)."""

    attack: str
    defense: str | None
    params: tuple[tuple[str, Any], ...]
    purpose: str                            # "search" (the pair's own trials) | "crosscheck"
    attack_hash: str | None = None
    artifact_dir: str | None = None         # the attack stage's cached artifact (defense trials)
    # several attack stages (``search.stages`` > 1): all of them, in order, the first the one above;
    # empty: the one stage above, at the job's seed
    stages: tuple[AttackStageRef, ...] = ()

    @property
    def params_dict(self) -> dict[str, Any]:
        return thaw(self.params)


@dataclass(frozen=True)
class AttackStageSettings:
    """Attack sweeps: what an attack trial needs to build its stage."""

    dataset: str
    model: str
    train: tuple[tuple[str, Any], ...]       # the stage's SGDConfig fields


@dataclass(frozen=True)
class TrialJob:
    role: str                                # "defense" | "attack"
    trials_dir: str                          # each trial writes <trials_dir>/<trial_id>/ (no storage)
    cache_dir: str                           # the attack-stage cache (no storage)
    seed: int
    clean_fraction: float
    data_root: str | None
    epoch_eval_size: int
    cpus: float
    objectives: tuple[str, ...]
    plugins: tuple[str, ...] = ()            # modules every worker imports first (trainables.plugins)
    searched: TrialCase | None = None        # a searcher's Tuner: the pair and its fixed params
    decoders: tuple[tuple[str, tuple[tuple[Any, Any], ...]], ...] = ()   # encoded choice -> value
    cases: tuple[TrialCase, ...] = ()        # a fixed-case Tuner
    attack_stage: AttackStageSettings | None = None
    # the sweep's storage (trainables.storage): when set, the two folders above are the driver's
    # only; a trial reads stages from the storage and returns its outputs as a Tune checkpoint
    storage_uri: str | None = None
    storage_endpoint: str | None = None
    # trial checkpoints (trainables.checkpoint): a folder in the storage, else a local folder
    checkpoint_dir: str = ""
    checkpoint_every: int = 1
    # trials over several stages whose params are one of these defend every stage whatever the
    # early stopping says (the paper default, which selection compares every candidate with)
    rung_exempt: tuple[tuple[tuple[str, Any], ...], ...] = ()

    def case(self, config: dict) -> TrialCase:
        """The case a trial with Tune ``config`` runs."""
        if CASE_KEY in config:
            return self.cases[int(config[CASE_KEY])]
        if self.searched is None:
            raise ValueError(f"this Tuner runs fixed cases; its trial config lacks {CASE_KEY!r}: {config}")
        proposed = decode(config, {k: dict(v) for k, v in self.decoders})
        return replace(self.searched, params=freeze({**self.searched.params_dict, **proposed}))


def decode(config: dict, decoders: dict | None) -> dict:
    """A searcher's flat config -> method parameters (tuple choices, held by Optuna as encoded
    strings, decoded)."""
    out = {}
    for k, v in config.items():
        table = (decoders or {}).get(k)
        out[k] = table[v] if table is not None and v in table else v
    return out
