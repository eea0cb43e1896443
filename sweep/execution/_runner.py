"""Running a sweep: its state and MLflow parent run, Ray, the attack stages, the schedule of
Tuners, the closing of every run, and (defense sweeps) the selected models registered in the
MLflow Model Registry. The CLI writes the report afterwards (``sweep.analysis``).

Work directory (``--workdir``, default ``./sweep-runs``)::

    mlflow.db                      the default tracking store (SQLite; one writer: this driver)
    mlartifacts/<experiment>/      its artifacts
    optuna.journal                 every study (``optuna-dashboard optuna.journal``)
    cache/<hash>/                  attack-stage artifacts, shared by all sweeps of this workdir
    sweeps/<sweep_id>/sweep.json   the sweep's state (config, parent run, finished Tuners)
    sweeps/<sweep_id>/ray/<key>/   each Tuner's Ray Tune experiment (``Tuner.restore`` on resume)
    sweeps/<sweep_id>/trials/<id>/ each trial's model.pt / spec.json / metrics.json
    sweeps/<sweep_id>/report/      best_configs.yaml, report.md, CSV tables, plots

On a cluster whose nodes share no disk, ``--storage`` (the preset's ``storage.uri``: an
``s3://bucket/prefix``, or a folder every node mounts) holds what the nodes share: the attack-stage
cache (``cache/``, each node keeps a local copy), the Tune experiments and trial outputs
(``sweeps/<id>/ray/``), a mirror of ``sweep.json`` (a driver on another node resumes from it) and
the attack stages' epoch checkpoints (``.checkpoints/``). ``--optuna-storage`` puts the studies in
an RDB (PostgreSQL), and an MLflow tracking server (``--tracking-uri http://...``) keeps the runs
and artifacts: then nothing the sweep needs lives only on the head node. The driver is MLflow's
one writer either way.

How a sweep ends (``SweepResult.status``; sweep.json ``status``; the parent run's ``status`` tag):

* FINISHED: every attack stage and every Tuner's pairs finished (a failed trial among finished
  ones is that trial's failure alone);
* PARTIAL: some attack stage failed, or a Tuner raised, or a pair had no trial that finished.
  The rest ran and is reported. MLflow's run statuses are fixed, so the parent run ends FAILED
  with the tag ``status=partial``; ``--resume`` redoes only what failed;
* KILLED (Ctrl-C, SIGTERM) and FAILED (the driver raised): ``--resume`` continues.

Before any of it, ``preflight`` checks what would otherwise fail later, deep in a worker: the
tracking server answers, the storage and the Optuna RDB open, and every image-folder dataset
exists.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sweep.config import SweepConfig, format_config
from sweep.errors import ConfigError
from sweep.execution import _compat as compat
from sweep.execution._context import SweepContext
from sweep.execution._ray_session import check_resources, interruptible, ray_session, shared_disk_warning
from sweep.execution._schedule import run_schedule
from sweep.planning import make_plan, trial_slots
from sweep.tracking import SweepState, Tracker, check_server, flatten, resolve_tracking_uri


@dataclass
class SweepResult:
    sweep_id: str
    sweep_dir: Path
    workdir: Path
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    status: str                                   # FINISHED | PARTIAL | FAILED | KILLED
    attack_stages: dict[str, str] = field(default_factory=dict)   # attack -> artifact dir
    trained_stages: list[str] = field(default_factory=list)       # hashes trained by this run
    failed_stages: dict[str, str] = field(default_factory=dict)   # attack -> error
    failed_pairs: dict[str, str] = field(default_factory=dict)    # pair (or cross-check) key -> error
    trials: dict[str, int] = field(default_factory=dict)          # MLflow status -> count


def run_sweep(cfg: SweepConfig, *, workdir: str | Path = "sweep-runs", tracking_uri: str | None = None,
              address: str | None = None, resume: bool | str = False, experiment: str | None = None,
              optuna_storage: str | None = None, progress: Callable[[str], None] = print) -> SweepResult:
    """Run (or with ``resume`` continue) the sweep ``cfg`` describes; see the module docstring.
    ``optuna_storage``: an RDB URL for the studies (default: the work directory's journal)."""
    storage = preflight(cfg, tracking_uri, optuna_storage)
    ctx = _open(cfg, Path(workdir).expanduser().resolve(), tracking_uri, resume, experiment, progress,
                storage=storage, optuna_storage=optuna_storage)
    result = SweepResult(ctx.state.sweep_id, ctx.state.dir, ctx.workdir, ctx.tracker.uri, ctx.tracker.experiment_name,
                         ctx.tracker.experiment_id, ctx.parent_run_id, "RUNNING")
    status = "FAILED"
    try:
        if resume:
            # attack-stage runs a crashed driver left open are redone below; trial runs are
            # reattached by their Tuner (restore)
            ctx.tracker.close_open_runs(ctx.state.sweep_id, "KILLED", keep=[ctx.parent_run_id], role="attack")
        with interruptible(), ray_session(cfg, address, progress) as ray:
            check_resources(cfg, local=not (address or os.environ.get("RAY_ADDRESS")), progress=progress)
            _warn_without_storage(ctx)
            ctx.trial_slots = trial_slots(ray.cluster_resources(), cfg.resources.cpus, cfg.resources.gpus)
            stop = threading.Event()
            compat.stop_tuners_on(stop)
            run_schedule(ctx, stop)
        status = outcome(ctx.failed_stages, ctx.state.failures)
    except KeyboardInterrupt:
        status = "KILLED"
        progress(f"sweep {ctx.state.sweep_id} interrupted; continue it with --resume")
        raise
    finally:
        # nothing of this sweep stays open (--resume reattaches trial runs by their ray_trial_id)
        ctx.tracker.close_open_runs(ctx.state.sweep_id, "KILLED", keep=[ctx.parent_run_id])
        result.trained_stages, result.failed_stages = ctx.trained_stages, ctx.failed_stages
        result.failed_pairs = {k: v for what in ctx.state.failures.values() for k, v in what.items()}
        result.attack_stages = {s.attack: ctx.stage_dirs[s.hash] for s in ctx.plan.stages
                                if s.hash in ctx.stage_dirs and s.level == 1 and s.index == 0 and not s.twin}
        result.trials = _count_trials(ctx.tracker, ctx.state.sweep_id)
        _finish(ctx, status, result)
    if cfg.kind == "defense":
        register_selection(ctx)
    return result


def register_selection(ctx: SweepContext) -> dict:
    """The sweep's selected models into the Model Registry (``sweep.tracking.register_best``),
    once its runs are closed. Only a sweep that searched moves the aliases: one that searched
    nothing re-measures, so its versions join and the search's ``@best`` stays. The report reads
    the Registry and never writes it."""
    from sweep.analysis import build_best_configs
    from sweep.tracking import load_runs, register_best

    sweep_id = ctx.state.sweep_id
    best = build_best_configs(ctx.cfg, sweep_id, load_runs(ctx.tracker, sweep_id))
    return register_best(ctx.tracker, ctx.cfg, sweep_id, best, ctx.progress, move_aliases=ctx.cfg.searches)


def _warn_without_storage(ctx: SweepContext) -> None:
    import ray

    warning = shared_disk_warning(sum(1 for n in ray.nodes() if n.get("Alive")), ctx.storage, ctx.workdir)
    if warning:
        ctx.progress(warning)


def preflight(cfg: SweepConfig, tracking_uri: str | None, optuna_storage: str | None = None):
    """What would fail later, deep in a worker or after MLflow's retries, fails now with one
    ``ConfigError`` naming it, before any directory, run or Ray exists. Returns the sweep's
    shared storage (None: the work directory)."""
    from sweep.execution._searchers import check_study_storage
    from trainables.storage import StorageError, open_storage

    check_dataset_folders(cfg)
    check_server(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    check_study_storage(optuna_storage)
    if not cfg.storage.uri:
        return None
    try:
        storage = open_storage(cfg.storage.uri, cfg.storage.endpoint)
        storage.check()
    except StorageError as e:
        raise ConfigError(f"storage.uri: {e}") from None
    return storage


def check_dataset_folders(cfg: SweepConfig) -> None:
    """Every image-folder dataset of the sweep exists (a missing one fails every attack stage)."""
    from trainables.data import DataError, check_dataset_folder

    for a in cfg.attacks:
        key = "dataset" if a.dataset == cfg.dataset else f"attacks.{a.name}.dataset"
        try:
            check_dataset_folder(a.dataset, cfg.data_root)
        except DataError as e:
            raise ConfigError(f"{key}: {e}") from None


def _open(cfg: SweepConfig, workdir: Path, tracking_uri: str | None, resume: bool | str,
          experiment: str | None, progress: Callable[[str], None], storage=None,
          optuna_storage: str | None = None) -> SweepContext:
    """The sweep's state (new, or the one to resume), its tracker and its MLflow parent run."""
    from sweep.execution._searchers import redact
    from trainables.version import code_version

    workdir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(workdir, tracking_uri)
    if storage is not None and resume:
        copied = SweepState.pull(storage, workdir)
        if copied:
            progress(f"copied {copied} sweep state(s) from {storage.url('sweeps')}")
    state = SweepState.to_resume(workdir, cfg, resume) if resume else SweepState.create(cfg, workdir)
    state.storage = storage
    studies = redact(optuna_storage) if optuna_storage else "journal"
    if resume and state.data.get("optuna_storage", "journal") != studies:
        raise ConfigError(f"--optuna-storage: sweep {state.sweep_id} keeps its Optuna studies in "
                          f"{state.data.get('optuna_storage', 'journal')}, not {studies}; resume it with the same "
                          "--optuna-storage (the studies hold what the searches learnt)")
    if storage is not None and not storage.is_local and not uri.startswith(("http://", "https://")):
        progress(f"note: the MLflow store {uri} and its artifacts stay on this node; on a cluster, a tracking "
                 "server (--tracking-uri http://...) keeps them off the head node too")
    experiment = experiment or state.data.get("experiment") or cfg.name
    plan = make_plan(cfg)
    tracker = Tracker(uri, experiment, workdir)
    state.data.update(experiment=experiment, tracking_uri=uri, status="running", optuna_storage=studies)
    state.save()
    base_tags = {"sweep_id": state.sweep_id, "preset": cfg.name, "dataset": cfg.dataset, "model": cfg.model,
                 "seed": cfg.seed, "code_version": code_version()}
    ctx = SweepContext(cfg, plan, state, workdir, tracker, base_tags, progress, storage=storage,
                       optuna_storage=optuna_storage)
    parent = state.data.get("parent_run_id")
    if parent:
        tracker.reopen(parent)
        progress(f"resuming sweep {state.sweep_id} (MLflow run {parent})")
        return ctx
    parent = tracker.create_run(state.sweep_id, {
        **base_tags, "role": "sweep", "attack": ",".join(a.name for a in cfg.attacks),
        "defense": ",".join(d.name for d in cfg.defenses) or "none", "fully_trained": "true",
        "mlflow.note.content": cfg.description}, params=_sweep_params(cfg))
    state.data["parent_run_id"] = parent
    state.save()
    searched = sorted({d.name for e in cfg.searched_entries for d in e.space})
    view = tracker.set_comparison_view("backdoor-sweep", searched)
    progress(f"compare the runs in the MLflow UI: {_ui_hint(uri)}{view}")
    cfg_file = state.dir / "config.yaml"
    cfg_file.write_text(format_config(cfg))
    tracker.log_artifacts(parent, [cfg_file])
    progress(f"sweep {state.sweep_id}: {len(plan.stages)} attack stage(s), {len(plan.pairs)} pair(s), "
             f"{plan.num_trials} trial(s); MLflow {uri} (experiment {experiment}, run {parent})")
    return ctx


def _ui_hint(uri: str) -> str:
    """Where the UI of tracking store ``uri`` is: the server itself, or ``mlflow ui`` on SQLite."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/") + "/"
    return f"`python -m mlflow ui --backend-store-uri {uri} --host 127.0.0.1`, then http://127.0.0.1:5000/"


def outcome(failed_stages: dict, failures: dict) -> str:
    """FINISHED, or PARTIAL when an attack stage or a Tuner's pair failed."""
    return "PARTIAL" if failed_stages or failures else "FINISHED"


def _finish(ctx: SweepContext, status: str, result: SweepResult) -> None:
    tracker, state, run = ctx.tracker, ctx.state, ctx.parent_run_id
    tracker.log_metrics(run, {f"trials_{k.lower()}": v for k, v in result.trials.items()})
    # a resumed sweep that now finished drops the failures its earlier driver tagged
    failed = {"failed_stages": ",".join(result.failed_stages), "failed_pairs": ",".join(result.failed_pairs)}
    tracker.set_tags(run, {k: v for k, v in failed.items() if v})
    tracker.delete_tags(run, [k for k, v in failed.items() if not v])
    # MLflow has no PARTIAL run status: FAILED, with the sweep's own status as a tag
    tracker.set_tags(run, {"status": status.lower()})
    tracker.end(run, "FAILED" if status == "PARTIAL" else status)
    if status in ("FINISHED", "PARTIAL"):       # KILLED/FAILED: --resume restarts trials from them
        ctx.drop_checkpoints()
    state.data["status"] = status.lower()
    state.save()
    result.status = status


def _count_trials(tracker: Tracker, sweep_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in tracker.runs(sweep_id):
        role = r.data.tags.get("role")
        if role == "defense" or (role == "attack" and r.data.tags.get("ray_trial_id")):
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
    return counts


def _sweep_params(cfg: SweepConfig) -> dict:
    d = cfg.to_dict()
    d.pop("description", None)
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(d).items()}
