"""The private APIs of Ray and Optuna that the sweep relies on, in one place.

Each function says what it needs and why no public API gives it. The versions these were
written and tested against are pinned to a minor range in ``pyproject.toml`` (ray 2.60, optuna
5.0, mlflow 3.17); a new minor version means re-running the Ray tier (``pytest -m ray``) and
checking each function below. MLflow is used through its public ``MlflowClient`` only.
"""
from __future__ import annotations


def keep_local_ray_on_loopback() -> None:
    """Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is first imported; a local
    Ray started later in the same process must see the value the sweep set (0: bind 127.0.0.1),
    so the module constant is set too."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def tune_trial_states(grid) -> dict[str, tuple[str, dict, object]]:
    """Trial id -> (Tune status, last result, latest checkpoint or None) of every trial a
    ``ResultGrid`` knows, including trials that never finished (the public ``Result`` list holds
    only trials that reported)."""
    states = {}
    analysis = getattr(grid, "_experiment_analysis", None)
    for trial in getattr(analysis, "trials", None) or []:
        states[trial.trial_id] = (trial.status, trial.last_result or {}, trial.checkpoint)
    for res in grid:   # public fallback: results that carry their trial id
        tid = (res.metrics or {}).get("trial_id")
        if tid and tid not in states:
            states[tid] = ("ERROR" if res.error is not None else "TERMINATED", res.metrics or {}, res.checkpoint)
    return states


def tune_trial_configs(grid) -> list[tuple[str, dict]]:
    """(Tune status, config) of every trial a ``ResultGrid`` knows. The public ``Result`` carries
    a trial's config only in its last report, so a trial that failed before reporting has none."""
    analysis = getattr(grid, "_experiment_analysis", None)
    trials = getattr(analysis, "trials", None)
    if trials is not None:
        return [(trial.status, dict(trial.config or {})) for trial in trials]
    return [("ERROR" if res.error is not None else "TERMINATED", dict(res.config or {})) for res in grid]


def tell_optuna_pruned(searcher, trial_id: str) -> bool:
    """Tell the Optuna study behind Ray's ``OptunaSearch`` that ``trial_id`` was PRUNED (Ray
    itself only ever tells COMPLETE or FAIL). Returns False if the searcher does not hold the
    trial (already told, or unknown)."""
    import optuna

    ot_trials = searcher._ot_trials
    completed = searcher._completed_trials
    if trial_id not in ot_trials or trial_id in completed:
        return False
    searcher._ot_study.tell(ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
    completed.add(trial_id)
    return True


def stop_tuners_on(event) -> None:
    """Make every ``Tuner.fit`` of this process end, as after Ctrl-C, once ``event`` is set.

    A sweep fits its Tuners in threads of the driver. Tune ends a run cleanly (experiment state
    saved, unfinished trials left resumable by ``Tuner.restore``) only when the event that its
    SIGINT handler sets is set, and it creates that event inside ``tune.run`` and installs the
    handler only on the main thread; no public API reaches it. The sweep's own event takes its
    place (``ray.tune.tune._setup_signal_catching``)."""
    import ray.tune.tune as tune_run

    if not callable(getattr(tune_run, "_setup_signal_catching", None)):
        raise RuntimeError("ray.tune.tune._setup_signal_catching is gone: this Ray version is not supported "
                           "(see sweep/execution/_compat.py)")
    tune_run._setup_signal_catching = lambda: event
