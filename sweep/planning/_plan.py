"""The plan of a sweep: its distinct attack stages (by content hash) and its Tuners.

Trials per (attack x defense): ONE TUNER PER (attack, defense) PAIR, each with its own Optuna
study (``<sweep_id>:<attack>:<defense>``). The Pareto front and the best configuration are
per-attack quantities, and one attack's optimum says little about another's, so each pair gets
its own search; the Tuners run at once, each as soon as its inputs exist (``sweep.execution``'s schedule), with
as many concurrent trials as the cluster (and ``search.max_concurrent``) allow. An attack's pairs
with nothing to search run their paper-default trials together, in one Tuner of fixed cases. The
configuration that is best ACROSS attacks is
then chosen on measured numbers: the cross-check Tuners evaluate every attack's best
configuration on every other attack (one extra trial per missing (configuration, attack) cell),
so that the worst-case ASR of each candidate is known rather than guessed.

With ``search.stages: K`` each attack has K stages (stage i at seed ``stage_seed(seed, i)``),
each trained once, and every defense trial defends all K in order.

Attack sweeps (``kind: attack``) have one Tuner per attack, whose trials each run an attack stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from sweep.config import Dist, SweepConfig, first_trial
from trainables.params import thaw


@dataclass(frozen=True)
class StagePlan:
    attack: str                    # the attack entry ("none" for the clean model TrojanNN/CLA fit on)
    spec: object                   # trainables.stages.AttackStageSpec
    hash: str
    level: int                     # 0: clean models other stages need; 1: the attack stages
    index: int = 0                 # which of the attack's ``search.stages`` stages (its seed: stage_seed)
    twin: bool = False             # stage ``index``'s twin (``AttackStageSpec.twin``), which MCR may ask for


@dataclass(frozen=True)
class PairPlan:
    key: str                       # "<attack>__<defense>": the Tuner's directory name
    attack: str
    defense: str | None            # None in attack sweeps
    space: tuple[Dist, ...]
    fixed: tuple[tuple[str, object], ...]
    num_samples: int               # trials (1 when nothing is searched)
    also_try: tuple = ()         # searched values tried right after the paper default (DefenseEntry)

    @property
    def searched(self) -> bool:
        return bool(self.space) and self.num_samples > 1

    def first_trial(self) -> dict:
        """The pair's paper-default trial (``sweep.config.first_trial``)."""
        return first_trial(thaw(self.fixed), self.space)


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    pairs: tuple[PairPlan, ...]

    def stage_for(self, attack: str) -> StagePlan:
        """The attack's first stage (the sweep's own seed)."""
        return self.stages_for(attack)[0]

    def stages_for(self, attack: str) -> tuple[StagePlan, ...]:
        """The attack's stages, in order (``search.stages`` of them)."""
        return tuple(sorted((s for s in self.stages if s.attack == attack and s.level == 1 and not s.twin),
                            key=lambda s: s.index))

    @property
    def num_trials(self) -> int:
        return sum(p.num_samples for p in self.pairs)


def make_plan(cfg: SweepConfig) -> Plan:
    from trainables import registry
    from trainables.stages import resolve_attack_stage

    stages: dict[str, StagePlan] = {}
    pairs = []
    for a in cfg.attacks:
        train = a.train_dict
        if cfg.kind == "defense":
            for index, seed in enumerate(cfg.stage_seeds):
                spec = resolve_attack_stage(a.dataset, cfg.model, a.name, a.params_dict or None, train, seed)
                if a.name != "none" and getattr(registry.get_attack(a.name), "needs_clean_model", False):
                    clean = spec.clean()
                    stages.setdefault(clean.hash(), StagePlan("none", clean, clean.hash(), 0, index))
                stages.setdefault(spec.hash(), StagePlan(a.name, spec, spec.hash(), 1, index))
                if a.name != "none" and any(registry.get_defense(d.name).needs_twin_stage(d.params_dict)
                                            for d in cfg.defenses):
                    twin = spec.twin()
                    stages.setdefault(twin.hash(), StagePlan(a.name, twin, twin.hash(), 1, index, twin=True))
            for d in cfg.defenses:
                n = d.num_samples if d.space else 1
                pairs.append(PairPlan(f"{a.name}__{d.name}", a.name, d.name, d.space, d.params, n, d.also_try))
        else:
            cls = registry.get_attack(a.name)
            if getattr(cls, "needs_clean_model", False):
                clean = resolve_attack_stage(a.dataset, cfg.model, "none", None, train, cfg.seed)
                stages.setdefault(clean.hash(), StagePlan("none", clean, clean.hash(), 0))
            n = a.num_samples if a.space else 1
            pairs.append(PairPlan(a.name, a.name, None, a.space, a.params, n))
    ordered = sorted(stages.values(), key=lambda s: s.level)
    return Plan(tuple(ordered), tuple(pairs))


@dataclass(frozen=True)
class TunerPlan:
    """One Tuner of the sweep: its key, the pairs it runs, and the pair it waits for (a
    cross-check waits for its pair's search)."""

    key: str
    kind: str                      # "defaults" | "pair" | "crosscheck"
    pairs: tuple[PairPlan, ...]
    after: str | None = None


def tuner_plans(cfg: SweepConfig, plan: Plan) -> list[TunerPlan]:
    """The sweep's Tuners, in the order a one-at-a-time schedule runs them: each attack's
    unsearched pairs together (defense sweeps), each searched pair (attack sweeps: each attack),
    then each searched pair's cross-check."""
    out = []
    if cfg.kind == "defense":
        for attack in dict.fromkeys(p.attack for p in plan.pairs):
            fixed = tuple(p for p in plan.pairs if p.attack == attack and not p.searched)
            if fixed:
                out.append(TunerPlan(f"defaults__{attack}", "defaults", fixed))
    out += [TunerPlan(p.key, "pair", (p,)) for p in plan.pairs if p.searched or cfg.kind == "attack"]
    if cfg.kind == "defense" and cfg.search.cross_check and len(cfg.attacks) > 1:
        out += [TunerPlan(f"crosscheck__{p.defense}__{p.attack}", "crosscheck", (p,), p.key)
                for p in plan.pairs if p.searched]
    return out
