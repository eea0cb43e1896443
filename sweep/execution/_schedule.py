"""The Tuners of a sweep, and when each runs: as soon as its inputs exist.

The units of work and what each waits for:

* the attack stages (``_attack_stages``), in a thread of their own; a stage is available
  the moment its Ray task ends;
* ``defaults__<attack>``: the paper-default trial of every (attack, defense) pair with nothing
  to search, together in one Tuner of fixed cases; waits for the attack's stage;
* ``<attack>__<defense>``: a searched pair, its own Optuna study (attack sweeps: one Tuner per
  attack); waits for the attack's stage (attack sweeps: for the clean models);
  with ``search.stages`` > 1 every Tuner's trials defend all of the attack's stages, and each
  waits for all of them;
* ``crosscheck__<defense>__<attack>``: the attack's best configuration of the defense evaluated
  on every other attack, so that the best-across-attacks choice rests on measured numbers;
  waits for that pair's Tuner and for every attack stage.

Every unit whose inputs exist starts at once, each Tuner fitted in its own thread of the driver
(at most ``search.max_tuners`` at a time; 1 runs them one after another, in the order above).
Ray's scheduler then fills the cluster's trial slots with the trials of every running Tuner,
each Tuner running up to ``search.max_concurrent`` trials at once (0: as many as the cluster has
slots). The driver stays MLflow's one writer: the trial loggers of all Tuners run in its threads,
behind one lock (``sweep.tracking``).

A Tuner that raises, or a pair none of whose trials finished, is recorded as failed in the
sweep's state and the other Tuners go on (the sweep then ends partial); ``--resume`` runs only
what failed again. A trial that fails among others that finish is that trial's failure alone
(Tune records it FAILED). Ctrl-C or SIGTERM sets the sweep's stop event: every Tuner ends as Tune
ends one after Ctrl-C (its state saved, unfinished trials resumable) and the sweep stops KILLED.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from sweep.analysis import build_best_configs
from sweep.execution._attack_stages import run_attack_stages
from sweep.execution._context import SweepContext
from sweep.execution._searchers import fail_orphaned_trials, make_searcher
from sweep.execution._tuners import can_restore, finished_cases, run_tuner
from sweep.planning import PairPlan, tuner_plans
from sweep.tracking import load_runs
from trainables.job import AttackStageRef, AttackStageSettings, TrialCase
from trainables.params import freeze

DEFAULTS_KEY = "defaults"
WAIT, READY, SKIP = "wait", "ready", "skip"


@dataclass
class Unit:
    """One Tuner of the sweep: ``check(stages_settled)`` says whether it can start now (READY),
    must wait (WAIT) or will not run in this driver (SKIP, with the reason)."""

    key: str
    check: Callable[[bool], tuple[str, str]]
    run: Callable[[], None]


def run_schedule(ctx: SweepContext, stop: threading.Event) -> None:
    """The attack stages and every Tuner of the sweep, each started once its inputs exist."""
    units = tuner_units(ctx)
    cap = ctx.cfg.search.max_tuners or max(1, len(units))
    pool = ThreadPoolExecutor(max_workers=cap + 1, thread_name_prefix="sweep")
    stages = pool.submit(run_attack_stages, ctx, stop)
    pending, running = list(units), {}
    try:
        while True:
            settled = stages.done()
            if settled:
                stages.result()                 # the stages' thread raised: the sweep fails
            for unit in list(pending):
                verdict, why = unit.check(settled)
                if verdict == WAIT:
                    continue
                if verdict == READY and len(running) >= cap:
                    break                       # one at a time keeps the order above
                pending.remove(unit)
                if verdict == SKIP:
                    ctx.progress(f"[{unit.key}] {why}")
                else:
                    running[pool.submit(unit.run)] = unit
            if settled and not pending and not running:
                return
            done, _ = wait([*running, *([] if settled else [stages])], timeout=1.0, return_when=FIRST_COMPLETED)
            for f in done:
                if f in running:
                    del running[f]
                    f.result()                  # an interrupted Tuner raises KeyboardInterrupt here
    except BaseException:
        stop.set()                              # the other Tuners save their state and return
        wait([*running, stages])
        raise
    finally:
        pool.shutdown(wait=True)


def tuner_units(ctx: SweepContext) -> list[Unit]:
    """The sweep's Tuners (``sweep.planning.tuner_plans``) in the order a one-at-a-time schedule
    runs them."""
    units, searched = [], 0
    for t in tuner_plans(ctx.cfg, ctx.plan):
        if t.kind == "defaults":
            units.append(_defaults_unit(ctx, t.pairs[0].attack, list(t.pairs)))
        elif t.kind == "pair":
            units.append(_pair_unit(ctx, t.pairs[0], searched))     # its index seeds its sampler
            searched += 1
        else:
            units.append(_crosscheck_unit(ctx, t.pairs[0]))
    return units


# --------------------------------------------------------------------------- what a unit waits for

def _stage_ready(ctx: SweepContext, attack: str, settled: bool) -> tuple[str, str]:
    """A Tuner on ``attack``'s stage: READY once it exists, SKIP if it failed or never ran."""
    if attack in ctx.failed_stages:
        return SKIP, f"skipped: its attack stage failed ({ctx.failed_stages[attack]})"
    if ctx.cfg.kind == "attack":            # its trials train the stage; only clean models come first
        if not settled:
            return WAIT, ""
        if any(s.level == 0 for s in ctx.plan.stages) and not ctx.stage_dirs:
            return SKIP, "skipped: the clean model it needs failed"
        return READY, ""
    if _has_stages(ctx, attack):
        return READY, ""
    return (SKIP, "skipped: its attack stage did not run (a clean model it needs failed)") if settled else (WAIT, "")


def _has_stages(ctx: SweepContext, attack: str) -> bool:
    """Whether every attack stage of ``attack`` is available."""
    return all(s.hash in ctx.stage_dirs for s in ctx.plan.stages_for(attack))


def _not_done(ctx: SweepContext, key: str, check: Callable[[bool], tuple[str, str]]):
    def checked(settled: bool) -> tuple[str, str]:
        if ctx.state.tuner_status(key) in ("done", "skipped"):
            return SKIP, "already done"
        return check(settled)
    return checked


# --------------------------------------------------------------------------------- the Tuners

def _case(ctx: SweepContext, attack: str, defense: str | None, params: dict, purpose: str) -> TrialCase:
    if defense is None:
        return TrialCase(attack=attack, defense=None, params=freeze(params), purpose=purpose)
    stages = tuple(AttackStageRef(s.hash, ctx.stage_dirs[s.hash], s.spec.seed) for s in ctx.plan.stages_for(attack))
    return TrialCase(attack=attack, defense=defense, params=freeze(params), purpose=purpose,
                     attack_hash=stages[0].hash, artifact_dir=stages[0].artifact_dir,
                     stages=stages if len(stages) > 1 else ())


def _attack_stage_settings(ctx: SweepContext, attack: str) -> AttackStageSettings | None:
    if ctx.cfg.kind != "attack":
        return None
    return AttackStageSettings(dataset=ctx.cfg.attack(attack).dataset, model=ctx.cfg.model,
                               train=ctx.cfg.attack(attack).train)


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


def _defaults_unit(ctx: SweepContext, attack: str, pairs: list[PairPlan]) -> Unit:
    """The paper-default trials of the attack's unsearched pairs, together in one Tuner (after a
    failure, only the pairs that failed)."""
    key = f"{DEFAULTS_KEY}__{attack}"

    def run() -> None:
        todo = pairs
        if ctx.state.tuner_status(key) == "failed":
            todo = [p for p in pairs if p.key in ctx.state.failures.get(key, {})]
        cases = tuple(_case(ctx, p.attack, p.defense, p.first_trial(), "search") for p in todo)
        ctx.progress(f"[{key}] {len(cases)} trial(s) at the paper defaults ({', '.join(p.key for p in todo)})")
        _fit(ctx, key, ctx.job(cases=cases), {p.key: (i,) for i, p in enumerate(todo)})

    return Unit(key, _not_done(ctx, key, lambda settled: _stage_ready(ctx, attack, settled)), run)


def _pair_unit(ctx: SweepContext, pair: PairPlan, index: int) -> Unit:
    """A searched pair's Tuner (an attack sweep's unsearched attack: its one trial)."""
    def run() -> None:
        settings = _attack_stage_settings(ctx, pair.attack)
        if not pair.searched:
            ctx.progress(f"[{pair.key}] 1 trial at the paper defaults")
            case = _case(ctx, pair.attack, pair.defense, pair.first_trial(), "search")
            _fit(ctx, pair.key, ctx.job(cases=(case,), attack_stage=settings), {pair.key: None})
            return
        study = f"{ctx.state.sweep_id}:{pair.attack}:{pair.defense or 'attack'}"
        status = ctx.state.tuner_status(pair.key)
        if status == "failed" or (status == "started" and not can_restore(ctx, pair.key)):
            study += f":r{int(time.time())}"      # a fresh start must not reuse a half-written study
        dists = {d.name: d for d in pair.space}
        job = ctx.job(searched=_case(ctx, pair.attack, pair.defense, dict(pair.fixed), "search"),
                      decoders=tuple((n, freeze(d.decoder())) for n, d in dists.items() if d.decoder()),
                      attack_stage=settings, rung_exempt=(freeze(pair.first_trial()),))
        ctx.progress(f"[{pair.key}] {pair.num_samples} trials, {ctx.cfg.search.sampler} on "
                     f"{', '.join(dists)} (Optuna study {study!r})")
        _fit(ctx, pair.key, job, {pair.key: None},
             make_searcher(ctx.cfg, pair, study, ctx.workdir, index, ctx.optuna_storage), pair.num_samples)
        try:            # the Tuner has ended: no trial of its study runs any more
            orphans = fail_orphaned_trials(study, ctx.workdir, ctx.optuna_storage)
        except Exception as e:      # bookkeeping of the study only: never the pair's failure
            ctx.progress(f"[{pair.key}] could not close the study's orphaned trials: {_one_line(e)}")
        else:
            if orphans:
                ctx.progress(f"[{pair.key}] {orphans} Optuna trial(s) an interrupted driver asked for and never "
                             "ran: marked FAIL")

    return Unit(pair.key, _not_done(ctx, pair.key, lambda settled: _stage_ready(ctx, pair.attack, settled)), run)


def _crosscheck_unit(ctx: SweepContext, pair: PairPlan) -> Unit:
    """``pair.attack``'s best configuration of ``pair.defense`` on the attacks it was not
    searched on: chosen once, from the pair's own search, and kept in the sweep's state."""
    key = f"crosscheck__{pair.defense}__{pair.attack}"

    def check(settled: bool) -> tuple[str, str]:
        if not settled:
            return WAIT, ""
        if ctx.failed_stages:
            # it compares best configurations across attacks: not on a partial set of stages
            return SKIP, "left for --resume: an attack stage failed"
        status = ctx.state.tuner_status(pair.key)
        if status == "failed":
            return SKIP, f"left for --resume: {pair.key} failed"
        return (READY, "") if status == "done" else (WAIT, "")

    def run() -> None:
        chosen = ctx.state.data["crosscheck_cases"].get(key)
        if chosen is None:
            chosen = _crosscheck_cases(ctx, pair)
            with ctx.state.lock:
                ctx.state.data["crosscheck_cases"][key] = chosen
                ctx.state.save()
        if not chosen:
            ctx.progress(f"[{key}] nothing to cross-check (the best config is measured on every attack)")
            ctx.state.set_tuner_status(key, "done")
            return
        cases = tuple(_case(ctx, c["attack"], pair.defense, c["params"], "crosscheck") for c in chosen)
        ctx.progress(f"[{key}] {pair.attack}'s best config on {len(cases)} other attack(s)")
        _fit(ctx, key, ctx.job(cases=cases), {key: None})

    return Unit(key, _not_done(ctx, key, check), run)


def _crosscheck_cases(ctx: SweepContext, pair: PairPlan) -> list[dict]:
    """(attack, params) of the pair's best configuration on every attack it lacks."""
    runs = load_runs(ctx.tracker, ctx.state.sweep_id)
    if runs.empty:
        return []
    runs = runs[(runs["defense"] == pair.defense) & (runs["role"] == "defense")]
    # the pair's selection (with several stages it may keep the paper default)
    best = build_best_configs(ctx.cfg, ctx.state.sweep_id, runs[runs["pair"] == pair.key]).pair(
        pair.defense, pair.attack).best
    if best is None:
        return []
    params = best.params
    measured = {r["attack"] for _, r in runs.iterrows() if r["candidate"] and r["config_key"] == best.config_key}
    return [{"attack": a.name, "params": params} for a in ctx.cfg.attacks
            if a.name not in measured and _has_stages(ctx, a.name)]
