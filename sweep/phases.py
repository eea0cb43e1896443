"""The phases of a sweep after its attack stages, each a set of Tuners:

1. ``run_default_cases``: the paper-default trial of every (attack, defense) pair with nothing to
   search, all in ONE Tuner of fixed cases, so they run in parallel;
2. ``run_searched_pairs``: one Tuner per searched pair, its own Optuna study (attack sweeps: one
   per attack);
3. ``run_cross_check``: each attack's best configuration evaluated on the attacks it was not
   searched on, one Tuner of fixed cases per defense, so the best-across-attacks choice rests on
   measured numbers.

A Tuner that raises, or a pair none of whose trials finished, is recorded as failed in the
sweep's state and the sweep goes on with the other Tuners (it then ends partial); ``--resume``
runs only what failed again. A trial that fails among others that finish is that trial's
failure alone (Tune records it FAILED).
"""
from __future__ import annotations

import json
import time

from sweep.context import SweepContext
from sweep.plan import PairPlan
from sweep.searchers import make_searcher
from sweep.selection import load_runs, select_best
from sweep.tuners import can_restore, finished_cases, run_tuner
from trainables.job import AttackStageSettings, TrialCase
from trainables.params import freeze

DEFAULTS_KEY = "defaults"


def _runnable(ctx: SweepContext) -> list[PairPlan]:
    out = []
    for pair in ctx.plan.pairs:
        if pair.attack in ctx.failed_stages:
            ctx.progress(f"[{pair.key}] skipped: its attack stage failed ({ctx.failed_stages[pair.attack]})")
        elif ctx.cfg.kind == "attack" and any(s.level == 0 for s in ctx.plan.stages) and not ctx.stage_dirs:
            ctx.progress(f"[{pair.key}] skipped: the clean model it needs failed")
        else:
            out.append(pair)
    return out


def _case(ctx: SweepContext, attack: str, defense: str | None, params: dict, phase: str) -> TrialCase:
    if defense is None:
        return TrialCase(attack=attack, defense=None, params=freeze(params), phase=phase)
    stage = ctx.plan.stage_for(attack)
    return TrialCase(attack=attack, defense=defense, params=freeze(params), phase=phase,
                     attack_hash=stage.hash, artifact_dir=ctx.stage_dirs[stage.hash])


def _attack_stage_settings(ctx: SweepContext, attack: str) -> AttackStageSettings | None:
    if ctx.cfg.kind != "attack":
        return None
    return AttackStageSettings(dataset=ctx.cfg.attack(attack).dataset, model=ctx.cfg.model,
                               train=ctx.cfg.attack_train)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _fit(ctx: SweepContext, key: str, job, groups: dict[str, tuple[int, ...] | None], searcher=None,
         num_samples: int = 1) -> None:
    """Run Tuner ``key``; ``groups`` maps each pair it runs to its case indices (None: any trial).
    A pair none of whose trials finished, or every pair when the Tuner raises, is recorded as
    failed instead of stopping the sweep."""
    try:
        grid = run_tuner(ctx, key, job, searcher, num_samples)
    except Exception as e:      # Ctrl-C is no Exception: it still stops the sweep
        failed = {name: _one_line(e) for name in groups}
    else:
        done = finished_cases(grid)
        failed = {name: "no trial finished (see its FAILED trial runs)" for name, cases in groups.items()
                  if not any(cases is None or c in cases for c in done)}
    if failed:
        ctx.state.set_failed(key, failed)
        for name, why in failed.items():
            ctx.progress(f"[{name}] FAILED: {why}")


def run_default_cases(ctx: SweepContext) -> None:
    """The paper-default trials of every unsearched defense pair, together in one Tuner (after a
    failure, only the pairs that failed)."""
    if ctx.cfg.kind != "defense" or ctx.state.phase(DEFAULTS_KEY) == "done":
        return
    pairs = [p for p in _runnable(ctx) if not p.searched]
    if ctx.state.phase(DEFAULTS_KEY) == "failed":
        pairs = [p for p in pairs if p.key in ctx.state.failures.get(DEFAULTS_KEY, {})]
    if not pairs:
        return
    cases = tuple(_case(ctx, p.attack, p.defense, p.default_params(), "search") for p in pairs)
    ctx.progress(f"[{DEFAULTS_KEY}] {len(cases)} trial(s) at the paper defaults ({', '.join(p.key for p in pairs)})")
    _fit(ctx, DEFAULTS_KEY, ctx.job(cases=cases), {p.key: (i,) for i, p in enumerate(pairs)})


def run_searched_pairs(ctx: SweepContext) -> None:
    """One Tuner per searched pair (and, in attack sweeps, per attack)."""
    pairs = [p for p in _runnable(ctx) if p.searched or ctx.cfg.kind == "attack"]
    for index, pair in enumerate(pairs):
        if ctx.state.phase(pair.key) == "done":
            ctx.progress(f"[{pair.key}] already done")
            continue
        settings = _attack_stage_settings(ctx, pair.attack)
        if not pair.searched:
            ctx.progress(f"[{pair.key}] 1 trial at the paper defaults")
            case = _case(ctx, pair.attack, pair.defense, pair.default_params(), "search")
            _fit(ctx, pair.key, ctx.job(cases=(case,), attack_stage=settings), {pair.key: None})
            continue
        study = f"{ctx.state.sweep_id}:{pair.attack}:{pair.defense or 'attack'}"
        phase = ctx.state.phase(pair.key)
        if phase == "failed" or (phase == "started" and not can_restore(ctx, pair.key)):
            study += f":r{int(time.time())}"      # a fresh start must not reuse a half-written study
        dists = {d.name: d for d in pair.space}
        job = ctx.job(searched=_case(ctx, pair.attack, pair.defense, dict(pair.fixed), "search"),
                      decoders=tuple((n, freeze(d.decoder())) for n, d in dists.items() if d.decoder()),
                      attack_stage=settings)
        ctx.progress(f"[{pair.key}] {pair.num_samples} trials, {ctx.cfg.search.sampler} on "
                     f"{', '.join(dists)} (Optuna study {study!r})")
        _fit(ctx, pair.key, job, {pair.key: None}, make_searcher(ctx.cfg, pair, study, ctx.workdir, index, ctx.optuna_storage),
             pair.num_samples)


def run_cross_check(ctx: SweepContext) -> None:
    """Evaluate each attack's best configuration on the attacks it was not searched on."""
    cfg, state = ctx.cfg, ctx.state
    if cfg.kind != "defense" or not cfg.search.cross_check or len(cfg.attacks) < 2:
        return
    if ctx.failed_stages or any(not k.startswith("crosscheck__") for k in state.failures):
        # it compares every attack's best configuration: chosen once, so not from a partial set
        ctx.progress("[crosscheck] left for --resume: an attack stage or a pair failed")
        return
    for d in cfg.defenses:
        key = f"crosscheck__{d.name}"
        if state.phase(key) in ("done", "skipped"):
            continue
        if not d.searched:
            state.set_phase(key, "skipped")
            continue
        chosen = state.data["crosscheck_cases"].get(d.name)
        if chosen is None:      # chosen once, from the runs of the searched pairs, and kept
            chosen = _crosscheck_cases(ctx, d.name)
            state.data["crosscheck_cases"][d.name] = chosen
            state.save()
        if not chosen:
            ctx.progress(f"[{key}] nothing to cross-check (every best config is measured on every attack)")
            state.set_phase(key, "done")
            continue
        cases = tuple(_case(ctx, c["attack"], d.name, c["params"], "crosscheck") for c in chosen)
        ctx.progress(f"[{key}] evaluating {len(cases)} (best config, other attack) combination(s)")
        _fit(ctx, key, ctx.job(cases=cases), {key: None})


def _crosscheck_cases(ctx: SweepContext, defense: str) -> list[dict]:
    """(attack, params) of each attack's best configuration on every attack it lacks."""
    runs = load_runs(ctx.tracker, ctx.state.sweep_id)
    if runs.empty:
        return []
    runs = runs[(runs["defense"] == defense) & (runs["role"] == "defense")]
    best = {}
    for a in ctx.cfg.attacks:
        row = select_best(runs[runs["attack"] == a.name], ctx.cfg.selection)
        if row is not None:
            best[row["config_key"]] = json.loads(row["config_json"])
    done = {(r["config_key"], r["attack"]) for _, r in runs.iterrows() if r["candidate"]}
    return [{"attack": a.name, "params": params} for ckey, params in best.items() for a in ctx.cfg.attacks
            if (ckey, a.name) not in done and ctx.plan.stage_for(a.name).hash in ctx.stage_dirs]
