"""The typed, frozen sweep configuration that ``sweep.config.load_preset`` builds and validates.

Every field has been checked when a ``SweepConfig`` exists; the rest of the sweep layer reads it
and never re-validates. Mappings are held as sorted ``(key, value)`` pairs (``trainables.params
.freeze``) so that configs are hashable and compare by content.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from sweep.config._spaces import Dist, first_trial
from trainables.params import thaw

SAMPLERS = ("tpe", "nsga2", "random")
RULES = ("bound", "ba_within", "best_metric", "max_der")
DEFENSE_METRICS = ("asr", "ba", "ra", "der")
# with search.stages > 1: each metric's aggregate over the attack stages (trainables.metrics)
STAGE_AGGREGATE_METRICS = tuple(f"{m}_{a}" for m in DEFENSE_METRICS for a in ("mean", "worst", "std"))
# stage i of a sweep at seed s trains (and is defended) at seed s + i x this: stage 0 is the sweep's
# own seed, and the other stages' seeds lie beyond every seed a sweep or ``replicate`` may take
# (seeds of a sweep with several stages are below it), so no two sweeps share a stage by accident
STAGE_SEED_STRIDE = 1_000_000
EPOCH_METRICS = ("score", "ba", "asr", "ra")     # what a defense trial reports every epoch
KINDS = ("defense", "attack")


@dataclass(frozen=True)
class AttackEntry:
    name: str
    dataset: str
    params: tuple[tuple[str, Any], ...]     # the preset's fixed overrides (paper defaults for the rest)
    space: tuple[Dist, ...] = ()             # searched parameters (attack sweeps only)
    num_samples: int = 1                     # trials of this attack (attack sweeps)
    train: tuple[tuple[str, Any], ...] = ()  # its stage's SGDConfig fields: budget.attack + its own budget

    @property
    def params_dict(self) -> dict[str, Any]:
        return thaw(self.params)

    @property
    def train_dict(self) -> dict[str, Any]:
        return thaw(self.train)

    @property
    def searched(self) -> bool:
        return bool(self.space) and self.num_samples > 1

    def first_trial(self) -> dict[str, Any]:
        """The paper-default trial (``sweep.config.first_trial``)."""
        return first_trial(self.params_dict, self.space)


@dataclass(frozen=True)
class DefenseEntry:
    name: str
    params: tuple[tuple[str, Any], ...]     # fixed: the preset's params + pinned space params
    space: tuple[Dist, ...]                  # searched parameters (narrowed)
    num_samples: int = 1                     # trials per attack (1: the paper default only)
    # configurations tried right after the paper default (e.g. another seed's selected config):
    # each every searched parameter's value, as sorted pairs
    also_try: tuple[tuple[tuple[str, Any], ...], ...] = ()

    @property
    def searched(self) -> bool:
        return bool(self.space) and self.num_samples > 1

    @property
    def params_dict(self) -> dict[str, Any]:
        return thaw(self.params)

    def first_trial(self) -> dict[str, Any]:
        """The paper-default trial (``sweep.config.first_trial``)."""
        return first_trial(self.params_dict, self.space)


@dataclass(frozen=True)
class EarlyStopping:
    """ASHA over each defense's own epochs (``defense_epoch``), ranking trials by ``metric``."""

    enabled: bool
    metric: str                # score (= BA - ASR), ba, asr or ra, measured on the epoch's test subset
    mode: str                  # max | min
    grace_period: int          # epochs before the first cut
    reduction_factor: float


@dataclass(frozen=True)
class SearchConfig:
    num_samples: int
    sampler: str
    objectives: tuple[tuple[str, str], ...]  # (metric, "min"|"max"), in order
    max_concurrent: int                      # trials at once per Tuner (0: the cluster's trial slots)
    max_tuners: int | None                   # Tuners at once (None: every Tuner whose inputs exist)
    cross_check: bool
    early_stopping: EarlyStopping
    stages: int = 1                          # attack stages per attack, each trial defends them all

    @property
    def stops_on_stages(self) -> bool:
        """Whether ASHA's fidelity is the number of stages defended (else the defense's epochs)."""
        return self.early_stopping.enabled and self.stages > 1


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float
    attack_cpus: float
    attack_gpus: float


@dataclass(frozen=True)
class Selection:
    rule: str
    bound: float               # percent: the metric's bound under rule "bound" (ASR <= 10 by default)
    ba_tolerance: float        # percentage points (rule "ba_within")
    metric: str                # the metric the rule optimises (first objective by default)
    mode: str                  # its direction
    ba_metric: str             # the accuracy that must stay near its best


@dataclass(frozen=True)
class StorageConfig:
    """Where a sweep keeps what its nodes share (``trainables.storage``): None = the work
    directory (one machine, or a mount every node sees)."""

    uri: str | None            # a path, or s3://bucket/prefix
    endpoint: str | None       # a self-hosted S3-compatible store's URL (default: AWS_ENDPOINT_URL)


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
    attack_train: tuple[tuple[str, Any], ...]   # budget.attack (each AttackEntry.train adds its own budget)
    defense_epochs: int | None
    epoch_eval_size: int
    attacks: tuple[AttackEntry, ...]
    defenses: tuple[DefenseEntry, ...]
    search: SearchConfig
    resources: Resources
    max_failures: int
    checkpoint_every: int                    # epochs between a trial's / attack stage's checkpoints
    paper_table: str | None                  # sweep/paper_tables/<name>.yaml, shown beside ours
    selection: Selection
    ray: RayConfig
    storage: StorageConfig
    overrides: tuple[str, ...]
    raw: str                                 # the normalised preset as JSON (see ``to_dict``)
    profile: str | None = None               # the preset's profile applied (``profiles``), if any

    def to_dict(self) -> dict[str, Any]:
        """The normalised preset (defaults filled in): loading it back gives this config."""
        return json.loads(self.raw)

    def config_hash(self) -> str:
        """Identifies the experiment (everything but the description, where it is stored and how
        often it checkpoints): resume matches on it."""
        return _hash(self.name, self._experiment_dict())

    def seed_free_hash(self, attacks: tuple[str, ...] | None = None) -> str:
        """What a report over seeds groups by: the config but its seed and its search (how many
        trials, what else it tries, cross-checks), over ``attacks`` alone if given. Two sweeps equal
        in it measure the same cells (the same attack stages, defenses and selection rule) at
        their own seeds, one perhaps of fewer rows or re-measuring chosen configs only."""
        d = self._experiment_dict()
        d.pop("seed", None)
        d.pop("search", None)
        for entry in d.get("defenses", {}).values():
            entry.pop("num_samples", None)
            entry.pop("also_try", None)
        if attacks is not None:
            d["attacks"] = {a: e for a, e in d.get("attacks", {}).items() if a in attacks}
        return _hash(self.name, d)

    def _experiment_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        d.pop("description", None)
        if d.get("profile") is None:
            d.pop("profile", None)           # absent before profiles existed: older sweeps resume
        for entry in d.get("defenses", {}).values():
            if not entry.get("also_try"):
                entry.pop("also_try", None)    # absent before also_try existed: older sweeps resume
        d.pop("storage", None)
        if d.get("search", {}).get("stages") == 1:
            d["search"].pop("stages")          # absent before stages existed: older sweeps resume
        d.pop("checkpoint_every", None)      # how often state is saved changes no result
        d.get("search", {}).pop("max_tuners", None)     # nor how many Tuners run at once
        return d

    @property
    def searches(self) -> bool:
        """Whether the trials sample configurations (beyond each paper default and ``also_try``)."""
        return any(d.searched and d.num_samples > 1 + len(d.also_try) for d in self.defenses)

    @property
    def stage_seeds(self) -> tuple[int, ...]:
        """The seed of each attack stage of every attack (``stage_seed``)."""
        return tuple(stage_seed(self.seed, i) for i in range(self.search.stages))

    def attack(self, name: str) -> AttackEntry:
        return next(a for a in self.attacks if a.name == name)

    def defense(self, name: str) -> DefenseEntry:
        return next(d for d in self.defenses if d.name == name)

    @property
    def searched_entries(self) -> tuple:
        """The entries whose parameters the trials search: defenses, or attacks in attack sweeps."""
        return self.defenses if self.kind == "defense" else self.attacks


def stage_seed(seed: int, index: int) -> int:
    """The seed of attack stage ``index`` (poison draw, initialisation, batch order, and its
    defense's clean subset) of a sweep at ``seed``: stage 0 is the sweep's own seed, stage i
    ``seed + i x STAGE_SEED_STRIDE``."""
    return seed + index * STAGE_SEED_STRIDE


def _hash(name: str, d: dict) -> str:
    blob = json.dumps({"name": name, **d}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def format_config(cfg: SweepConfig) -> str:
    """The resolved preset as YAML (loadable again as a preset), then the search spaces."""
    head = [f"# preset {cfg.name} ({cfg.source})"]
    if cfg.overrides:
        head.append("# overrides: " + " ".join(cfg.overrides))
    head.append(f"# config hash {cfg.config_hash()}")
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=110)
    lines = ["", "# resolved search spaces (searched parameters; everything else is fixed):"]
    for e in cfg.searched_entries:
        lines.append(f"#   {e.name}: " + (f"{e.num_samples} trials" if e.searched else
                                          "1 trial at the paper defaults (nothing searched)"))
        for dist in e.space if e.searched else ():
            lines.append(f"#     {dist.name}: {dist.describe()}")
        if e.params:
            fixed = ", ".join(f"{k}={v!r}" for k, v in e.params)
            lines.append(f"#     fixed: {fixed}")
    return "\n".join(head) + "\n" + body + "\n".join(lines) + "\n"
