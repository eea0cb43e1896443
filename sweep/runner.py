"""Running a sweep: Ray, the cached attack stages, one Tuner per (attack, defense) pair, the
cross-check phase, MLflow tracking and the final report.

Work directory (``--workdir``, default ``./sweep-runs``)::

    mlflow.db                      the default tracking store (SQLite; one writer: this driver)
    mlartifacts/<experiment>/      its artifacts
    optuna.journal                 every study (``optuna-dashboard optuna.journal``)
    cache/<hash>/                  attack-stage artifacts, shared by all sweeps of this workdir
    sweeps/<sweep_id>/sweep.json   the sweep's state (config, parent run, finished Tuners)
    sweeps/<sweep_id>/ray/<pair>/  each Tuner's Ray Tune experiment (``Tuner.restore`` on resume)
    sweeps/<sweep_id>/trials/<id>/ each trial's model.pt / spec.json / metrics.json
    sweeps/<sweep_id>/report/      best_configs.yaml, report.md, CSV tables, plots

On a cluster the work directory must be on storage every node sees (NFS), or the cache and the
trial outputs will not be found by the driver and the other workers.

Ray: ``address`` (``--address``) or ``RAY_ADDRESS`` joins an existing cluster; otherwise a LOCAL
Ray is started explicitly (``address="local"``: a stale ``ray_current_cluster`` file left by a
crashed run can never make it join a dead cluster), without the dashboard, bound to 127.0.0.1
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` unless the environment sets it).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sweep.config import ConfigError, SweepConfig
from sweep.plan import PairPlan, Plan, make_plan
from sweep.spaces import first_point, optuna_space
from sweep.tracking import Tracker, flatten, resolve_tracking_uri

LOCAL_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a sweep: its open runs are closed KILLED; ``--resume`` continues."""


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C (and SIGTERM) stop the sweep at once. Ray Tune would otherwise catch the first
    Ctrl-C, end the current Tuner quietly and let the sweep go on with the next one."""
    import signal
    import threading

    old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    old_term = None
    main = threading.current_thread() is threading.main_thread()
    if main:
        def on_term(sig, frame):
            raise SweepInterrupted("SIGTERM")
        old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env
        if main:
            signal.signal(signal.SIGTERM, old_term)


class SweepError(ConfigError):
    """The sweep cannot start or continue (nothing to resume, resources the cluster lacks); the
    message says why. A ``ConfigError``: it is bad input, reported before any work."""


@dataclass
class SweepResult:
    sweep_id: str
    sweep_dir: Path
    workdir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    status: str                                   # FINISHED | FAILED | KILLED
    attack_stages: dict[str, str] = field(default_factory=dict)   # attack -> artifact dir
    trained_stages: list[str] = field(default_factory=list)       # hashes trained by this run
    failed_stages: dict[str, str] = field(default_factory=dict)   # attack -> error
    trials: dict[str, int] = field(default_factory=dict)          # MLflow status -> count
    report: Any = None                                            # sweep.report.Report


# ============================================================================ sweep state

class SweepState:
    """``sweeps/<sweep_id>/sweep.json``: what a resume needs (written atomically)."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @property
    def sweep_id(self) -> str:
        return self.data["sweep_id"]

    @property
    def dir(self) -> Path:
        return self.path.parent

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def phase(self, key: str) -> str | None:
        return self.data["phases"].get(key)

    def set_phase(self, key: str, status: str) -> None:
        self.data["phases"][key] = status
        self.save()

    @classmethod
    def create(cls, cfg: SweepConfig, workdir: Path) -> "SweepState":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"{cfg.name}-{stamp}-{cfg.config_hash()[:6]}"
        sweep_id, n = base, 1
        while (workdir / "sweeps" / sweep_id).exists():
            n += 1
            sweep_id = f"{base}-{n}"
        d = workdir / "sweeps" / sweep_id
        d.mkdir(parents=True)
        state = cls(d / "sweep.json", {
            "sweep_id": sweep_id, "preset": cfg.name, "config_hash": cfg.config_hash(),
            "config": cfg.to_dict(), "overrides": list(cfg.overrides), "status": "running",
            "created": time.time(), "phases": {}, "parent_run_id": None, "crosscheck_cases": {}})
        state.save()
        return state

    @classmethod
    def load(cls, path: Path) -> "SweepState":
        return cls(path, json.loads(path.read_text()))

    @classmethod
    def find(cls, workdir: Path, cfg: SweepConfig | None, resume: bool | str) -> "SweepState":
        """The sweep to resume: ``resume`` names it, or the newest unfinished sweep of ``cfg``."""
        root = workdir / "sweeps"
        if isinstance(resume, str):
            p = root / resume / "sweep.json"
            if not p.is_file():
                raise SweepError(f"no sweep {resume!r} in {root}")
            state = cls.load(p)
            if cfg is not None and state.data["config_hash"] != cfg.config_hash():
                raise SweepError(f"sweep {resume} was started with another configuration "
                                 f"(hash {state.data['config_hash']}, now {cfg.config_hash()}); resume it "
                                 f"with the same preset and --set overrides: {' '.join(state.data['overrides'])}")
            return state
        candidates = []
        for p in sorted(root.glob("*/sweep.json")) if root.is_dir() else []:
            try:
                st = cls.load(p)
            except (OSError, ValueError):
                continue
            if st.data.get("status") != "finished" and (cfg is None or (
                    st.data.get("preset") == cfg.name and st.data.get("config_hash") == cfg.config_hash())):
                candidates.append(st)
        if not candidates:
            what = f"preset {cfg.name} with this configuration (hash {cfg.config_hash()})" if cfg else "any preset"
            raise SweepError(f"nothing to resume: no unfinished sweep of {what} in {root}; run without --resume")
        return max(candidates, key=lambda s: s.data["created"])


# ============================================================================ Ray

@contextlib.contextmanager
def ray_session(cfg: SweepConfig, address: str | None = None, progress: Callable[[str], None] = print):
    """Join ``address``/``RAY_ADDRESS``, or start (and later stop) a local loopback Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        os.environ.setdefault(LOCAL_RAY_ENV, "0")
    import ray
    from ray._private import ray_constants

    if not address and os.environ[LOCAL_RAY_ENV] == "0":
        # ray read the variable when it was first imported; keep both in step
        ray_constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        yield ray
        return
    if address:
        progress(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True)
    else:
        kwargs = dict(address="local", include_dashboard=False, configure_logging=True,
                      object_store_memory=cfg.ray.object_store_mb * 2 ** 20, log_to_driver=True)
        if cfg.ray.num_cpus is not None:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.num_gpus is not None:
            kwargs["num_gpus"] = cfg.ray.num_gpus
        progress("starting a local Ray (loopback only, no dashboard)")
        ray.init(**kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_resources(cfg: SweepConfig, local: bool, progress: Callable[[str], None]) -> None:
    """A trial that asks for more than the cluster has would wait forever: on a local Ray that
    is an error; on a cluster (which an autoscaler may grow) a warning."""
    import ray

    have = ray.cluster_resources()
    for what, cpus, gpus in (("resources.cpus/gpus", cfg.resources.cpus, cfg.resources.gpus),
                             ("resources.attack_cpus/attack_gpus", cfg.resources.attack_cpus, cfg.resources.attack_gpus)):
        problem = None
        if gpus > have.get("GPU", 0):
            problem = (f"{what}: a trial asks for {gpus:g} GPU but the Ray cluster has {have.get('GPU', 0):g}; "
                       f"--set resources.gpus=0 --set resources.attack_gpus=0 runs on CPUs")
        elif cpus > have.get("CPU", 0):
            problem = f"{what}: a trial asks for {cpus:g} CPUs but the Ray cluster has {have.get('CPU', 0):g}"
        if problem and local:
            raise SweepError(problem)
        if problem:
            progress(f"warning: {problem} (now; trials wait until the cluster grows)")


# ============================================================================ attack stages

def _attack_stage_task(spec_key: dict, cache_dir: str, data_root: str | None, epoch_eval_size: int,
                       cpus: float) -> dict:
    """A Ray task: one attack stage (trains it unless the cache holds it)."""
    import torch

    from trainables.artifacts import ArtifactCache
    from trainables.stages import AttackStageSpec, run_attack_stage

    torch.set_num_threads(max(1, int(cpus or 1)))
    spec = AttackStageSpec(**{k: v for k, v in spec_key.items() if k != "stage"})
    cached = ArtifactCache(cache_dir).lookup(spec.hash()) is not None
    path = run_attack_stage(spec, cache_dir, data_root=data_root, epoch_eval_size=epoch_eval_size)
    return {"path": str(path), "trained": not cached}


def run_attack_stages(plan: Plan, cfg: SweepConfig, cache_dir: Path, tracker: Tracker, state: SweepState,
                      base_tags: dict, progress: Callable[[str], None]) -> tuple[dict, list, dict]:
    """Every distinct stage once, as Ray tasks (clean models first, then the attacks in
    parallel); each gets an MLflow child run. Returns (hash -> dir, hashes trained, attack -> error)."""
    import ray

    from trainables.artifacts import ArtifactCache

    task = ray.remote(_attack_stage_task)
    cache = ArtifactCache(cache_dir)
    paths, trained, failed = {}, [], {}
    for level in (0, 1):
        wave = [s for s in plan.stages if s.level == level]
        refs = {}
        for s in wave:
            hit = cache.lookup(s.hash)      # verified entry: no task (and no worker) needed
            if hit is not None:
                paths[s.hash] = str(hit)
                progress(f"attack stage {s.attack} ({s.hash[:8]}) cached: {hit}")
                _log_stage_run(tracker, state, s, Path(hit), base_tags, trained=False)
                continue
            refs[s.hash] = task.options(num_cpus=cfg.resources.attack_cpus, num_gpus=cfg.resources.attack_gpus,
                                        name=f"attack-stage-{s.attack}-{s.hash[:8]}", max_retries=0).remote(
                s.spec.key(), str(cache_dir), cfg.data_root, cfg.epoch_eval_size, cfg.resources.attack_cpus)
        if refs:
            progress(f"attack stages: {len(refs)} to run "
                     f"({', '.join(s.attack for s in wave if s.hash in refs)})")
        pending = dict(refs)
        while pending:
            done, _ = ray.wait(list(pending.values()), num_returns=1)
            h = next(k for k, v in pending.items() if v == done[0])
            del pending[h]
            s = next(x for x in wave if x.hash == h)
            try:
                out = ray.get(done[0])
            except Exception as e:   # one attack stage failing must not stop the others
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                failed[s.attack] = msg
                progress(f"attack stage {s.attack} ({h[:8]}) FAILED: {msg}")
                _log_stage_run(tracker, state, s, None, base_tags, error=msg)
                continue
            paths[h] = out["path"]
            if out["trained"]:
                trained.append(h)
            progress(f"attack stage {s.attack} ({h[:8]}) {'trained' if out['trained'] else 'cached'}: {out['path']}")
            _log_stage_run(tracker, state, s, Path(out["path"]), base_tags, trained=out["trained"])
        if level == 0 and failed:
            break
    return paths, trained, failed


def _log_stage_run(tracker: Tracker, state: SweepState, s, path: Path | None, base_tags: dict,
                   trained: bool = False, error: str | None = None) -> None:
    """One attack child run per distinct stage and sweep (reattached on resume)."""
    existing = tracker.find_run(state.sweep_id, role="attack", attack_hash=s.hash)
    if existing is not None and existing.info.status == "FINISHED":
        return
    spec = s.spec
    tags = {**base_tags, "role": "attack", "attack": s.attack, "defense": "none", "attack_hash": s.hash,
            "dataset": spec.dataset, "cached": str(not trained).lower(), "fully_trained": "true"}
    if existing is not None:
        run_id = existing.info.run_id
        tracker.set_tags(run_id, tags)
    else:
        params = {**spec.attack_params, **{f"train.{k}": v for k, v in spec.train.items()}}
        run_id = tracker.create_run(f"attack/{s.attack}/{s.hash[:8]}", tags, state.data["parent_run_id"], params)
    if error is not None:
        tracker.set_tags(run_id, {"error": error[:5000], "fully_trained": "false"})
        tracker.end(run_id, "FAILED")
        return
    metrics = json.loads((path / "metrics.json").read_text())
    for entry in metrics.get("history") or []:
        tracker.log_metrics(run_id, {k: v for k, v in entry.items() if k != "epoch"}, step=int(entry.get("epoch", 0)))
    final = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics(run_id, final, step=len(metrics.get("history") or []))
    tracker.log_artifacts(run_id, [path / f for f in ("model.pt", "spec.json", "metrics.json", "attack_state.pt")], "model")
    tracker.log_artifacts(run_id, [path / "samples.png"])
    tracker.set_tags(run_id, {"artifact_dir": str(path)})
    tracker.end(run_id, "FINISHED")


# ============================================================================ Tuners

def _sampler(cfg: SweepConfig, index: int, num_samples: int):
    import optuna

    seed = cfg.seed + index
    if cfg.search.sampler == "nsga2":
        # a population of ~1/4 of the budget gives NSGA-II a few generations to evolve
        pop = max(4, min(50, num_samples // 4))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _journal(workdir: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(workdir / "optuna.journal")
    # the open-lock works on network filesystems too (a cluster's shared workdir)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def make_searcher(cfg: SweepConfig, pair: PairPlan, study_name: str, workdir: Path, index: int):
    """OptunaSearch on the pair's space: both objectives, the paper default first, a named study
    in the workdir's journal. Trials stopped early are told to Optuna as PRUNED (not COMPLETE with
    their partial metrics), so they never enter the sampler's Pareto model."""
    metrics = [m for m, _ in cfg.search.objectives]
    modes = [d for _, d in cfg.search.objectives]
    from sweep.search import FullyTrainedOptunaSearch

    dists = {d.name: d for d in pair.space}
    return FullyTrainedOptunaSearch(
        space=optuna_space(dists), metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0], points_to_evaluate=[first_point(dists)],
        sampler=_sampler(cfg, index, pair.num_samples), study_name=study_name, storage=_journal(workdir))


def _job(cfg: SweepConfig, pair: PairPlan | None, state: SweepState, workdir: Path, stage_dir: str | None,
         stage_hash: str | None, defense: str | None, cases: list | None = None) -> dict:
    dists = {d.name: d for d in (pair.space if pair else ())}
    decoders = {n: d.decoder() for n, d in dists.items() if d.decoder()}
    job = {"defense": defense, "attack": pair.attack if pair else None, "attack_hash": stage_hash,
           "artifact_dir": stage_dir, "fixed": dict(pair.fixed) if pair else {}, "decoders": decoders,
           "clean_fraction": cfg.clean_fraction, "seed": cfg.seed, "data_root": cfg.data_root,
           "trials_dir": str(state.dir / "trials"), "epoch_eval_size": cfg.epoch_eval_size,
           "cpus": cfg.resources.cpus, "objectives": [m for m, _ in cfg.search.objectives],
           "fail_if": os.environ.get("SWEEP_TEST_FAIL_TRIAL") or None}
    if pair is not None:
        job["fixed"] = _plain_params(pair.fixed)
    if cases is not None:
        job["cases"] = cases
    if cfg.kind == "attack" and pair is not None:
        a = cfg.attack(pair.attack)
        job.update(dataset=a.dataset, model=cfg.model, train=cfg.attack_train_dict,
                   cache_dir=str(workdir / "cache"))
    return job


def _run_config(cfg: SweepConfig, storage: Path, name: str, callback):
    from ray import tune

    return tune.RunConfig(name=name, storage_path=str(storage), callbacks=[callback],
                          failure_config=tune.FailureConfig(max_failures=cfg.max_failures, fail_fast=False),
                          verbose=1)


def run_tuner(cfg: SweepConfig, *, key: str, trainable, job: dict, searcher, param_space: dict,
              num_samples: int, callback, state: SweepState, tracker: Tracker,
              progress: Callable[[str], None]):
    """Fit one Tuner, or restore it if a previous driver started it; then reconcile its runs."""
    from ray import tune

    storage = state.dir / "ray"
    exp_dir = storage / key
    fn = tune.with_resources(tune.with_parameters(trainable, job=job),
                             {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus})
    if state.phase(key) == "started" and tune.Tuner.can_restore(str(exp_dir)):
        progress(f"[{key}] resuming the interrupted Tuner from {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=fn, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        if state.phase(key) == "started":
            progress(f"[{key}] the interrupted Tuner saved no state yet: starting it again")
            tracker.close_open_runs(state.sweep_id, "KILLED", pair=key)
        scheduler = None
        es = cfg.search.early_stopping
        if es.enabled:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(metric="score", mode="max", grace_period=es.grace_period,
                                      reduction_factor=es.reduction_factor, max_t=100_000)
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                      max_concurrent_trials=cfg.search.max_concurrent or None,
                                      reuse_actors=False)
        tuner = tune.Tuner(fn, param_space=param_space, tune_config=tune_config,
                           run_config=_run_config(cfg, storage, key, callback))
        state.set_phase(key, "started")
    grid = tuner.fit()
    if reconcile(tracker, state.sweep_id, key, grid, callback):
        # Tune returns normally when interrupted (Ctrl-C): stop the sweep, resumable
        raise KeyboardInterrupt(f"[{key}] interrupted; continue with --resume")
    state.set_phase(key, "done")
    return grid


def reconcile(tracker: Tracker, sweep_id: str, key: str, grid, callback) -> int:
    """After a Tuner: every run of its trials closed to match Tune's final state (a crashed
    driver's trial that finished unseen gets FINISHED + its final metrics; one that errored,
    FAILED); runs of trials that did not finish (an interrupted Tuner) or that Tune no longer
    knows are KILLED. Nothing stays RUNNING. Returns the number of unfinished trials."""
    from sweep.callbacks import fail_trial_run, finish_trial_run, loggable

    by_trial = {}
    analysis = getattr(grid, "_experiment_analysis", None)
    for trial in getattr(analysis, "trials", None) or []:
        by_trial[trial.trial_id] = (trial.status, trial.last_result or {})
    for res in grid:   # public fallback: results that carry their trial id
        tid = (res.metrics or {}).get("trial_id")
        if tid and tid not in by_trial:
            by_trial[tid] = ("ERROR" if res.error is not None else "TERMINATED", res.metrics or {})
    unfinished = sum(1 for status, _ in by_trial.values() if status not in ("TERMINATED", "ERROR"))
    for run in tracker.runs(sweep_id, pair=key):
        if run.info.status != "RUNNING":
            continue
        status, last = by_trial.get(run.data.tags.get("ray_trial_id"), (None, {}))
        if status == "ERROR":
            fail_trial_run(tracker, run.info.run_id, "trial failed (see its Ray Tune trial directory)")
        elif status == "TERMINATED":
            if last.get("final"):
                tracker.log_metrics(run.info.run_id, loggable(last), step=int(last.get("step", 0) or 0))
            finish_trial_run(tracker, run.info.run_id, last, callback.log_models)
        else:
            tracker.end(run.info.run_id, "KILLED")
    return unfinished


# ============================================================================ the sweep

def run_sweep(cfg: SweepConfig, *, workdir: str | Path = "sweep-runs", tracking_uri: str | None = None,
              address: str | None = None, resume: bool | str = False, experiment: str | None = None,
              progress: Callable[[str], None] = print, report: bool = True) -> SweepResult:
    """Run (or with ``resume`` continue) the sweep ``cfg`` describes; see the module docstring."""
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(workdir, tracking_uri)
    state = SweepState.find(workdir, cfg, resume) if resume else SweepState.create(cfg, workdir)
    experiment = experiment or state.data.get("experiment") or cfg.name
    plan = make_plan(cfg)
    tracker = Tracker(uri, experiment, workdir)
    state.data.update(experiment=experiment, tracking_uri=uri, status="running")
    state.save()
    from trainables.version import code_version

    base_tags = {"sweep_id": state.sweep_id, "preset": cfg.name, "dataset": cfg.dataset, "model": cfg.model,
                 "seed": cfg.seed, "code_version": code_version()}
    parent = state.data.get("parent_run_id")
    if parent:
        tracker.reopen(parent)
        progress(f"resuming sweep {state.sweep_id} (MLflow run {parent})")
    else:
        parent = tracker.create_run(state.sweep_id, {
            **base_tags, "role": "sweep", "attack": ",".join(a.name for a in cfg.attacks),
            "defense": ",".join(d.name for d in cfg.defenses) or "none", "fully_trained": "true",
            "mlflow.note.content": cfg.description}, params=_sweep_params(cfg))
        state.data["parent_run_id"] = parent
        state.save()
        from sweep.config import format_config

        cfg_file = state.dir / "config.yaml"
        cfg_file.write_text(format_config(cfg))
        tracker.log_artifacts(parent, [cfg_file])
        progress(f"sweep {state.sweep_id}: {len(plan.stages)} attack stage(s), {len(plan.pairs)} Tuner(s), "
                 f"{plan.num_trials} trial(s); MLflow {uri} (experiment {experiment}, run {parent})")
    result = SweepResult(state.sweep_id, state.dir, workdir, uri, tracker.experiment_id, parent, "RUNNING")
    status = "FAILED"
    try:
        # runs a crashed driver left open: trial runs are reattached by their Tuner (restore);
        # attack-stage runs are redone below; anything else stale is closed now
        if resume:
            tracker.close_open_runs(state.sweep_id, "KILLED", keep=[parent], role="attack")
        with _interruptible(), ray_session(cfg, address, progress):
            _check_resources(cfg, local=not (address or os.environ.get("RAY_ADDRESS")), progress=progress)
            cache_dir = workdir / "cache"
            paths, trained, failed = run_attack_stages(plan, cfg, cache_dir, tracker, state, base_tags, progress)
            result.trained_stages, result.failed_stages = trained, failed
            result.attack_stages = {s.attack: paths[s.hash] for s in plan.stages if s.hash in paths and s.level == 1}
            _run_pairs(cfg, plan, state, workdir, tracker, base_tags, paths, failed, progress)
            if cfg.kind == "defense" and cfg.search.cross_check and len(cfg.attacks) > 1:
                _cross_check(cfg, plan, state, workdir, tracker, base_tags, paths, progress)
        # nothing of this sweep may stay open
        tracker.close_open_runs(state.sweep_id, "KILLED", keep=[parent])
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        progress(f"sweep {state.sweep_id} interrupted; continue it with --resume")
        raise
    finally:
        if status != "FINISHED":
            # a crash or an interruption of the driver itself: no run of this sweep stays open
            # (--resume reattaches the trial runs by their ray_trial_id tag)
            tracker.close_open_runs(state.sweep_id, "KILLED", keep=[parent])
        result.trials = _count_trials(tracker, state.sweep_id)
        if status == "FINISHED" and report:
            from sweep.report import make_report

            try:
                result.report = make_report(state.sweep_id, workdir=workdir, tracking_uri=uri,
                                            experiment=experiment, progress=progress)
            except Exception as e:   # the sweep's runs are safe in MLflow; say what failed
                progress(f"report failed: {type(e).__name__}: {e}")
                raise
            finally:
                _finish(tracker, parent, state, status, result)
        else:
            _finish(tracker, parent, state, status, result)
    return result


def _finish(tracker: Tracker, parent: str, state: SweepState, status: str, result: SweepResult) -> None:
    counts = result.trials
    tracker.log_metrics(parent, {f"trials_{k.lower()}": v for k, v in counts.items()})
    if result.failed_stages:
        tracker.set_tags(parent, {"failed_stages": ",".join(result.failed_stages)})
    tracker.end(parent, status)
    state.data["status"] = "finished" if status == "FINISHED" else status.lower()
    state.save()
    result.status = status


def _count_trials(tracker: Tracker, sweep_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in tracker.runs(sweep_id):
        if r.data.tags.get("role") in ("defense",) or (r.data.tags.get("role") == "attack" and r.data.tags.get("ray_trial_id")):
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
    return counts


def _sweep_params(cfg: SweepConfig) -> dict:
    d = cfg.to_dict()
    d.pop("description", None)
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(d).items()}


def _run_pairs(cfg, plan: Plan, state: SweepState, workdir: Path, tracker: Tracker, base_tags: dict,
               paths: dict, failed: dict, progress) -> None:
    """The paper-default trials of every unsearched (attack, defense) pair together in ONE Tuner
    (a grid over the pairs, so they run in parallel), then one Tuner per searched pair."""
    from sweep.callbacks import TrialLogger
    from trainables.tune_trainable import attack_trial, defense_trial

    runnable = []
    for pair in plan.pairs:
        if pair.attack in failed:
            progress(f"[{pair.key}] skipped: its attack stage failed ({failed[pair.attack]})")
        elif cfg.kind == "attack" and any(s.level == 0 for s in plan.stages) and not paths:
            progress(f"[{pair.key}] skipped: the clean model it needs failed")
        else:
            runnable.append(pair)
    if cfg.kind == "defense":
        fixed_pairs = [p for p in runnable if not p.searched]
        if fixed_pairs and state.phase("defaults") != "done":
            cases = []
            for pair in fixed_pairs:
                stage = plan.stage_for(pair.attack)
                dists = {d.name: d for d in pair.space}
                decoders = {n: d.decoder() for n, d in dists.items() if d.decoder()}
                from trainables.tune_trainable import decode

                params = {**_plain_params(pair.fixed), **decode(first_point(dists), decoders)}
                cases.append({"attack": pair.attack, "attack_hash": stage.hash, "artifact_dir": paths[stage.hash],
                              "defense": pair.defense, "params": params, "phase": "search"})
            progress(f"[defaults] {len(cases)} trial(s) at the paper defaults "
                     f"({', '.join(p.key for p in fixed_pairs)})")
            job = _job(cfg, None, state, workdir, None, None, None, cases=cases)
            callback = TrialLogger(tracking_uri=tracker.uri, experiment=tracker.experiment_name,
                                   workdir=str(workdir), parent_run_id=state.data["parent_run_id"],
                                   sweep_id=state.sweep_id, base_tags=base_tags, job=job, role="defense",
                                   pair="defaults")
            from ray import tune

            run_tuner(cfg, key="defaults", trainable=defense_trial, job=job, searcher=None,
                      param_space={"xcheck": tune.grid_search(list(range(len(cases))))}, num_samples=1,
                      callback=callback, state=state, tracker=tracker, progress=progress)
        runnable = [p for p in runnable if p.searched]
    for index, pair in enumerate(runnable):
        if state.phase(pair.key) == "done":
            progress(f"[{pair.key}] already done")
            continue
        if cfg.kind == "defense":
            stage = plan.stage_for(pair.attack)
            stage_dir, stage_hash, trainable, role = paths[stage.hash], stage.hash, defense_trial, "defense"
        else:
            stage_dir, stage_hash, trainable, role = None, None, attack_trial, "attack"
        job = _job(cfg, pair, state, workdir, stage_dir, stage_hash, pair.defense)
        tags = {**base_tags, "defense": pair.defense or "none"}
        callback = TrialLogger(tracking_uri=tracker.uri, experiment=tracker.experiment_name, workdir=str(workdir),
                               parent_run_id=state.data["parent_run_id"], sweep_id=state.sweep_id,
                               base_tags=tags, job=job, role=role, pair=pair.key)
        if pair.searched:
            study = f"{state.sweep_id}:{pair.attack}:{pair.defense or 'attack'}"
            if state.phase(pair.key) == "started" and not _can_restore(state, pair.key):
                study += f":r{int(time.time())}"      # a fresh start must not reuse a half-written study
            searcher = make_searcher(cfg, pair, study, workdir, index)
            param_space, n = {}, pair.num_samples
            progress(f"[{pair.key}] {n} trials, {cfg.search.sampler} on {', '.join(d.name for d in pair.space)} "
                     f"(Optuna study {study!r})")
        else:
            searcher, n = None, 1
            param_space = first_point({d.name: d for d in pair.space})
            progress(f"[{pair.key}] 1 trial at the paper defaults")
        run_tuner(cfg, key=pair.key, trainable=trainable, job=job, searcher=searcher, param_space=param_space,
                  num_samples=n, callback=callback, state=state, tracker=tracker, progress=progress)


def _plain_params(pairs) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pairs}


def _can_restore(state: SweepState, key: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(str(state.dir / "ray" / key))


def _cross_check(cfg, plan: Plan, state: SweepState, workdir: Path, tracker: Tracker, base_tags: dict,
                 paths: dict, progress) -> None:
    """Evaluate each attack's best configuration on the attacks it was not searched on."""
    from sweep.callbacks import TrialLogger
    from sweep.report import load_runs, select_best
    from trainables.tune_trainable import defense_trial

    for d in cfg.defenses:
        key = f"crosscheck__{d.name}"
        if state.phase(key) in ("done", "skipped"):
            continue
        if not d.searched:
            state.set_phase(key, "skipped")
            continue
        cases = state.data["crosscheck_cases"].get(d.name)
        if cases is None:
            runs = load_runs(tracker, state.sweep_id)
            cases = _crosscheck_cases(cfg, plan, runs, d.name, paths, select_best)
            state.data["crosscheck_cases"][d.name] = cases
            state.save()
        if not cases:
            progress(f"[{key}] nothing to cross-check (every best config is measured on every attack)")
            state.set_phase(key, "done")
            continue
        progress(f"[{key}] evaluating {len(cases)} (best config, other attack) combination(s)")
        job = _job(cfg, None, state, workdir, None, None, d.name, cases=cases)
        callback = TrialLogger(tracking_uri=tracker.uri, experiment=tracker.experiment_name, workdir=str(workdir),
                               parent_run_id=state.data["parent_run_id"], sweep_id=state.sweep_id,
                               base_tags={**base_tags, "defense": d.name}, job=job, role="defense", pair=key)
        from ray import tune

        run_tuner(cfg, key=key, trainable=defense_trial, job=job, searcher=None,
                  param_space={"xcheck": tune.grid_search(list(range(len(cases))))}, num_samples=1,
                  callback=callback, state=state, tracker=tracker, progress=progress)


def _crosscheck_cases(cfg, plan: Plan, runs, defense: str, paths: dict, select_best) -> list[dict]:
    if runs.empty:
        return []
    runs = runs[(runs["defense"] == defense) & (runs["role"] == "defense")]
    best = {}
    for attack in [a.name for a in cfg.attacks]:
        row = select_best(runs[runs["attack"] == attack], cfg.selection)
        if row is not None:
            best[row["config_key"]] = json.loads(row["config_json"])
    done = {(r["config_key"], r["attack"]) for _, r in runs.iterrows() if r["candidate"]}
    cases = []
    for ckey, params in best.items():
        for a in cfg.attacks:
            if (ckey, a.name) in done:
                continue
            stage = plan.stage_for(a.name)
            if stage.hash not in paths:
                continue
            cases.append({"attack": a.name, "attack_hash": stage.hash, "artifact_dir": paths[stage.hash],
                          "params": params, "phase": "crosscheck"})
    return cases
