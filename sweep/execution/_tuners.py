"""One Ray Tune ``Tuner``: fit it (or restore it if a previous driver started it), then reconcile
its MLflow runs with Tune's final state so that nothing stays RUNNING.

A Tuner runs a ``TrialJob``: its fixed cases (a grid over their indices) or its searcher's
proposals. Its Ray Tune experiment lives in ``sweeps/<id>/ray/<key>`` (in the work directory,
or in the storage) and its status in the
sweep's state (started, then done; the schedule marks it failed), which is what ``--resume``
reads. A failed Tuner is started afresh, its old directory set aside as ``<key>.failed-<time>``.
"""
from __future__ import annotations

import threading
import time

from sweep.execution import _compat as compat
from sweep.execution._callbacks import fail_trial_run, finish_trial_run, loggable, trial_outputs
from sweep.execution._context import SweepContext
from trainables.job import CASE_KEY, TrialJob
from trainables.tune_trainable import EPOCH_KEY, STAGE_RUNG_KEY


# Tune's trainable registry is a process-wide dict that registering iterates over: Tuners that
# start at once in threads of the driver must not register at the same moment
_REGISTRY_LOCK = threading.Lock()


def _trainable(ctx: SweepContext, key: str, job: TrialJob) -> str:
    """The name of the Tuner's trainable, registered here under a name of its own: Tune looks
    trainables up by name when it starts a trial, and the sweep's Tuners, running at once, each
    bind another job. Given the name, ``Tuner.fit`` registers nothing itself."""
    from ray import tune
    from ray.tune.registry import register_trainable

    from trainables.tune_trainable import attack_trial, defense_trial

    fn = defense_trial if job.role == "defense" else attack_trial

    def trial(config: dict, job: TrialJob) -> None:
        fn(config, job)

    name = f"{fn.__name__}-{key}"
    trial.__name__ = trial.__qualname__ = name
    trainable = tune.with_resources(tune.with_parameters(trial, job=job),
                                    {"cpu": ctx.cfg.resources.cpus, "gpu": ctx.cfg.resources.gpus})
    with _REGISTRY_LOCK:
        register_trainable(name, trainable, warn=False)
    return name


def _new_tuner(ctx: SweepContext, key: str, job: TrialJob, searcher, num_samples: int):
    from ray import tune

    cfg = ctx.cfg
    scheduler = None
    es = cfg.search.early_stopping
    if cfg.search.stops_on_stages and searcher is not None:
        from ray.tune.schedulers import ASHAScheduler

        # time = the attack stages a trial has defended (rungs at 1, 2, 4... stages, below the
        # last: the final report carries no rung); fixed cases (paper defaults, cross-checks)
        # measure rather than search and are never stopped
        scheduler = ASHAScheduler(time_attr=STAGE_RUNG_KEY, metric=es.metric, mode=es.mode, grace_period=1,
                                  reduction_factor=2, max_t=cfg.search.stages)
    elif es.enabled and not cfg.search.stops_on_stages:
        from ray.tune.schedulers import ASHAScheduler

        # time = the defense's own epoch counter, reported with measured epochs only (a trial's
        # schedule is pinned to its longest: trials meet the rungs at the same point); max_t is
        # beyond any schedule, so that only the rungs stop trials
        scheduler = ASHAScheduler(time_attr=EPOCH_KEY, metric=es.metric, mode=es.mode,
                                  grace_period=es.grace_period, reduction_factor=es.reduction_factor,
                                  max_t=10 ** 6)
    if job.cases:
        param_space, num_samples = {CASE_KEY: tune.grid_search(list(range(len(job.cases))))}, 1
    else:
        param_space = {}
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                  max_concurrent_trials=cfg.search.max_concurrent or ctx.trial_slots,
                                  reuse_actors=False)
    storage_path, storage_fs = ctx.tune_storage()
    run_config = tune.RunConfig(name=key, storage_path=storage_path, storage_filesystem=storage_fs,
                                callbacks=[ctx.trial_logger(job, key, **_tags(job))],
                                failure_config=tune.FailureConfig(max_failures=cfg.max_failures, fail_fast=False),
                                verbose=1)
    return tune.Tuner(_trainable(ctx, key, job), param_space=param_space, tune_config=tune_config, run_config=run_config)


def _tags(job: TrialJob) -> dict:
    """Tags a Tuner's runs share: the defense, where all its trials run one."""
    defenses = {c.defense for c in job.cases} | ({job.searched.defense} if job.searched else set())
    return {"defense": defenses.pop() or "none"} if len(defenses) == 1 else {}


def run_tuner(ctx: SweepContext, key: str, job: TrialJob, searcher=None, num_samples: int = 1):
    """Fit the Tuner ``key`` (restoring it if an earlier driver started it); then reconcile."""
    from ray import tune

    state = ctx.state
    exp_dir, fs = ctx.tune_experiment(key)
    if state.tuner_status(key) == "failed":
        _set_aside(exp_dir, fs)
    if state.tuner_status(key) == "started" and tune.Tuner.can_restore(exp_dir, storage_filesystem=fs):
        ctx.progress(f"[{key}] resuming the interrupted Tuner from {exp_dir}")
        tuner = tune.Tuner.restore(exp_dir, trainable=_trainable(ctx, key, job), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False, storage_filesystem=fs)
    else:
        if state.tuner_status(key) == "started":
            ctx.progress(f"[{key}] the interrupted Tuner saved no state yet: starting it again")
            ctx.tracker.close_open_runs(state.sweep_id, "KILLED", pair=key)
        tuner = _new_tuner(ctx, key, job, searcher, num_samples)
        state.set_tuner_status(key, "started")
    grid = tuner.fit()
    if reconcile(ctx, key, grid, job):
        # Tune returns normally when interrupted (Ctrl-C): stop the sweep, resumable
        raise KeyboardInterrupt(f"[{key}] interrupted; continue with --resume")
    state.set_tuner_status(key, "done")
    return grid


def _set_aside(exp_dir: str, fs) -> None:
    """A failed Tuner is run afresh; its Tune directory stays beside, for its error files."""
    import pyarrow.fs

    fs = fs or pyarrow.fs.LocalFileSystem()
    if fs.get_file_info(exp_dir).type != pyarrow.fs.FileType.NotFound:
        fs.move(exp_dir, f"{exp_dir}.failed-{time.strftime('%Y%m%d-%H%M%S')}")


def finished_cases(grid) -> list[int | None]:
    """The case index (None for a searcher's trial) of every trial of ``grid`` that finished."""
    return [None if CASE_KEY not in config else int(config[CASE_KEY])
            for status, config in compat.tune_trial_configs(grid) if status == "TERMINATED"]


def can_restore(ctx: SweepContext, key: str) -> bool:
    from ray import tune

    exp_dir, fs = ctx.tune_experiment(key)
    return tune.Tuner.can_restore(exp_dir, storage_filesystem=fs)


def reconcile(ctx: SweepContext, key: str, grid, job: TrialJob) -> int:
    """Every run of the Tuner's trials closed to match Tune's final state: a crashed driver's
    trial that finished unseen gets FINISHED and its final metrics, one that errored FAILED; runs
    of trials that did not finish (an interrupted Tuner) or that Tune no longer knows are KILLED.
    Returns the number of unfinished trials."""
    tracker = ctx.tracker
    by_trial = compat.tune_trial_states(grid)
    unfinished = sum(1 for status, _, _ in by_trial.values() if status not in ("TERMINATED", "ERROR"))
    for run in tracker.runs(ctx.state.sweep_id, pair=key):
        if run.info.status != "RUNNING":
            continue
        status, last, checkpoint = by_trial.get(run.data.tags.get("ray_trial_id"), (None, {}, None))
        if status == "ERROR":
            fail_trial_run(tracker, run.info.run_id, "trial failed (see its Ray Tune trial directory)")
        elif status == "TERMINATED":
            if last.get("final"):
                tracker.log_metrics(run.info.run_id, loggable(last), step=int(last.get("step", 0) or 0))
            with trial_outputs(job, last, checkpoint) as outputs:
                finish_trial_run(tracker, run.info.run_id, last, outputs)
        else:
            tracker.end(run.info.run_id, "KILLED")
    return unfinished
