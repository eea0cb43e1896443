"""Ray Tune function trainables: one defense trial, or one attack trial of an attack sweep.

Both are plain functions ``fn(config, job)``: ``config`` is what Tune passes (a searcher's
proposal, or ``{"case": i}`` in a fixed-case Tuner), ``job`` the frozen ``TrialJob`` the sweep
binds with ``tune.with_parameters``; ``job.case(config)`` is the work.

A defense trial loads its attack-stage artifact, runs the defense, ``tune.report``s every epoch
(``step``, ``stage``, the loss terms, and ``ba``/``asr``/``ra`` where measured, NaN where not,
with ``measured`` saying which, and ``defense_epoch``, early stopping's time unit, on measured
epochs only) and reports the final metrics once more with
``fully_trained=True``; a trial a scheduler stops early never sends that last report. A trial
over several attack stages (``search.stages``) defends each in turn (``staged_defense_trial``),
its epochs numbered on across the stages, and reports after each stage; its final BA/ASR/RA/DER
are the means over the stages. Outputs go
to ``<trials_dir>/<trial_id>/`` (the standard model.pt/spec.json/metrics.json). Its training
phases save checkpoints every ``job.checkpoint_every`` epochs (``trainables.checkpoint``, under
``job.checkpoint_dir``): a trial Tune retries, or one a resumed sweep restarts, goes on from the
last one (and reports ``resumed=1``); they are deleted when the trial has finished.

With a storage (``job.storage_uri``: nodes that share no disk) the driver's folders exist on the
driver only: a trial reads its attack stage from the storage through a node-local copy
(``stage_cache``), writes its outputs to a temporary folder and reports them as a Tune
checkpoint, which Tune uploads to the storage and the driver's callback logs to MLflow.
Nothing here imports ``sweep``: the trainable runs on any Ray worker that has ``trainables``
installed.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from trainables import plugins
from trainables.job import TrialCase, TrialJob

NAN = float("nan")
# the defense's epoch counter (over all its phases), in the reports whose BA/ASR were measured:
# early stopping's time unit
EPOCH_KEY = "defense_epoch"
# trials over several attack stages: the stages defended so far, in every stage's report ...
STAGES_KEY = "stages_done"
# ... and again, as early stopping's time unit, in the reports a trial may be stopped at
STAGE_RUNG_KEY = "stage_rung"


def _numeric(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _release_memory() -> None:
    """Fractional GPUs share one device's memory: give it back when the trial ends."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:   # releasing memory must never turn a finished trial into a failed one
        pass


def stage_cache(cache_dir: str, storage_uri: str | None, storage_endpoint: str | None):
    """The attack-stage cache as this node sees it: the sweep's folder (one machine, or a mount
    every node sees), or a node-local copy of the storage's (``SWEEP_LOCAL_CACHE``, by default a
    folder in the node's temp dir: never the driver's path, which other nodes lack)."""
    from trainables.artifacts import cache_for

    local = cache_dir if storage_uri is None else (
        os.environ.get("SWEEP_LOCAL_CACHE") or os.path.join(tempfile.gettempdir(), "backdoor-sweep-cache"))
    return cache_for(local, storage_uri, storage_endpoint)


def trial_checkpoints(job: TrialJob, trial_id: str):
    """Where trial ``trial_id`` keeps its training checkpoints (``trainables.checkpoint``): in
    the storage, where a retry on any node finds them, or in the sweep's folder. Tune retries a
    failed trial (and a resumed sweep restarts an unfinished one) under the same trial id."""
    from trainables.checkpoint import PhaseCheckpoints
    from trainables.storage import open_storage

    if job.storage_uri is not None:
        return PhaseCheckpoints(open_storage(job.storage_uri, job.storage_endpoint),
                                f"{job.checkpoint_dir}/{trial_id}", job.checkpoint_every)
    return PhaseCheckpoints(open_storage(job.checkpoint_dir), trial_id, job.checkpoint_every)


def _out_dir(job: TrialJob, trial_id: str) -> Path:
    """Where a trial writes its outputs: the sweep's trials folder, or (with a storage) a
    temporary folder that becomes the trial's Tune checkpoint."""
    if job.storage_uri is None:
        return Path(job.trials_dir) / trial_id
    return Path(tempfile.mkdtemp(prefix=f"trial-{trial_id}-"))


def _final_report(job: TrialJob, metrics: dict, out_dir: Path) -> None:
    """The trial's last report; with a storage its outputs travel with it as a checkpoint."""
    from ray import tune

    metrics["node_id"] = _node_id()
    if job.storage_uri is None:
        tune.report(metrics)
        return
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(out_dir)))
    shutil.rmtree(out_dir, ignore_errors=True)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _start(job: TrialJob, case: TrialCase, out_dir: Path) -> None:
    """Plugins (and their trial hooks) first, then the thread count Ray granted."""
    import torch

    plugins.load(job.plugins)
    plugins.run_trial_hooks(case, out_dir)
    torch.set_num_threads(max(1, int(job.cpus or 1)))


def _score(ba: float, asr: float) -> float:
    """The scalar that early stopping ranks trials by (higher is better)."""
    return ba - asr if math.isfinite(ba) and math.isfinite(asr) else NAN


def _cache(job: TrialJob):
    """The sweep's attack-stage cache as this node sees it (a defense's twin stage comes from it)."""
    return stage_cache(job.cache_dir, job.storage_uri, job.storage_endpoint)


def _stage_artifact(job: TrialJob, attack_hash: str | None, artifact_dir: str | None) -> str | None:
    """The attack stage's artifact folder on this node (with a storage: its node-local copy)."""
    if job.storage_uri is None:
        return artifact_dir
    found = _cache(job).lookup(attack_hash)
    if found is None:
        raise FileNotFoundError(f"attack stage {attack_hash} is not in the storage {job.storage_uri}")
    return found


def _epoch_reporter(job: TrialJob, offset: int = 0):
    """``tune.report`` of each epoch a defense logs; its step counts on from ``offset`` (the
    epochs of the stages defended before it). Every objective is in every report (Tune checks),
    NaN where the epoch does not measure it."""
    from ray import tune

    def report(entry: dict) -> None:
        measured = "ba" in entry and "asr" in entry
        metrics = _numeric(entry)
        for m in ("ba", "asr", "ra", "der", *job.objectives):
            metrics.setdefault(m, NAN)
        metrics.update(step=offset + int(entry.get("step", 0)), stage=str(entry.get("stage", "")),
                       measured=int(measured), fully_trained=False, final=False,
                       score=_score(metrics["ba"], metrics["asr"]))
        if measured:
            metrics[EPOCH_KEY] = metrics["step"]
        tune.report(metrics)

    return report


@contextlib.contextmanager
def _defending(job: TrialJob, out_dir: Path):
    """Around a trial's defense: its memory given back at the end; on a failure, with a storage,
    its temporary output folder deleted (nothing will read it now)."""
    try:
        yield
    except BaseException:
        if job.storage_uri is not None:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        _release_memory()


def _stage_outcome(result: dict) -> dict:
    """One defended stage's final metrics (``run_defense_stage``'s result)."""
    after, before = result["after"], result["before"]
    ips = [h["images_per_second"] for h in result["history"] if isinstance(h.get("images_per_second"), (int, float))]
    out = {**_numeric(after),
           **{f"{k}_before": v for k, v in _numeric(before).items()},
           "der": result["der"] if result["der"] is not None else NAN,
           "train_seconds": float(result["seconds"]),
           "images_per_second": sum(ips) / len(ips) if ips else NAN,
           "step": int(result["history"][-1]["step"]) if result["history"] else 0}
    for m in ("ba", "asr", "ra"):
        out.setdefault(m, NAN)
    return out


def defense_trial(config: dict, job: TrialJob) -> None:
    """One defense configuration on one attack-stage artifact (or on each of several, in
    order: ``staged_defense_trial``), reported to Tune per epoch."""
    from ray import tune

    from trainables.checkpoint import checkpointing
    from trainables.stages import resolve_defense, run_defense_stage

    case = job.case(config)
    trial_id = tune.get_context().get_trial_id()
    out_dir = _out_dir(job, trial_id)
    _start(job, case, out_dir)
    if len(case.stages) > 1:
        return staged_defense_trial(job, case, trial_id, out_dir)
    dspec = resolve_defense(case.defense, case.params_dict, job.clean_fraction, job.seed)
    checkpoints = trial_checkpoints(job, trial_id)
    if checkpoints.resume_phase >= 0:
        print(f"trial {trial_id}: resuming from its checkpoint (training phase {checkpoints.resume_phase})")
    with _defending(job, out_dir), checkpointing(checkpoints):
        result = run_defense_stage(_stage_artifact(job, case.attack_hash, case.artifact_dir), dspec, out_dir,
                                   data_root=job.data_root, report=_epoch_reporter(job),
                                   epoch_eval_size=job.epoch_eval_size, cache=_cache(job))
    final = {**_stage_outcome(result), "measured": 1, "fully_trained": True, "final": True, "stage": "final",
             "out_dir": str(out_dir)}
    final["score"] = _score(final["ba"], final["asr"])
    final["resumed"] = int(checkpoints.resume_phase >= 0)
    _final_report(job, final, out_dir)
    checkpoints.clear()


def staged_defense_trial(job: TrialJob, case: TrialCase, trial_id: str, out_dir: Path) -> None:
    """One defense configuration on each of the case's attack stages, in order, each with the
    stage's seed. After every stage but the last it reports the stage's metrics and the running
    aggregates (``stages_summary``, with ``stage_rung`` for early stopping unless the case is
    exempt); the last report is the final one. Each finished stage's metrics and outputs are
    kept in the trial's checkpoint folder (``stage-<i>/``), where its training phases checkpoint
    too: a retried or restarted trial goes on at its first unfinished stage. Stage 0's outputs
    are the trial's (``out_dir``), stage i's are in ``out_dir/stage-<i>``."""
    from ray import tune

    from trainables.checkpoint import PhaseCheckpoints, checkpointing
    from trainables.stages import resolve_defense, run_defense_stage

    trial = trial_checkpoints(job, trial_id)
    exempt = case.params in job.rung_exempt
    outcomes, step, kept, resumed_phase = [], 0, 0, False
    with _defending(job, out_dir):
        for i, ref in enumerate(case.stages):
            stage_dir, where = out_dir if i == 0 else out_dir / f"stage-{i}", f"{trial.prefix}/stage-{i}"
            outcome = _kept_stage(trial.storage, where, stage_dir)
            if outcome is None:
                phases = PhaseCheckpoints(trial.storage, where, job.checkpoint_every)
                resumed_phase |= phases.resume_phase >= 0
                dspec = resolve_defense(case.defense, case.params_dict, job.clean_fraction, ref.seed)
                with checkpointing(phases):
                    result = run_defense_stage(_stage_artifact(job, ref.hash, ref.artifact_dir), dspec, stage_dir,
                                               data_root=job.data_root, report=_epoch_reporter(job, step),
                                               epoch_eval_size=job.epoch_eval_size, cache=_cache(job))
                outcome = _stage_outcome(result)
                _keep_stage(trial.storage, where, stage_dir, outcome)
                _release_memory()
            else:
                kept += 1
                print(f"trial {trial_id}: stage {i} was defended before the trial restarted: kept")
            outcomes.append(outcome)
            step += int(outcome["step"])
            if i < len(case.stages) - 1 and kept <= i:      # a kept stage was reported then
                report = {**stages_summary(outcomes), "step": step, "stage": f"stage-{i}", "measured": 0,
                          "fully_trained": False, "final": False}
                if not exempt:
                    report[STAGE_RUNG_KEY] = i + 1
                tune.report(report)
    final = {**stages_summary(outcomes), "step": step, "measured": 1, "fully_trained": True, "final": True,
             "stage": "final", "out_dir": str(out_dir), "resumed_stages": kept,
             "resumed": int(kept > 0 or resumed_phase)}
    _final_report(job, final, out_dir)
    trial.clear()


def stages_summary(outcomes: list[dict]) -> dict:
    """The stages defended so far: each one's BA/ASR/RA/DER (``<m>_stage<i>``) and their
    aggregates (``trainables.metrics.stage_aggregates``), ``stages_done``, and BA/ASR/RA/DER,
    the figures before the defense and the score as means over the stages."""
    from trainables.metrics import STAGE_METRICS, stage_aggregates

    out = {**stage_aggregates(outcomes), STAGES_KEY: len(outcomes),
           "train_seconds": sum(o["train_seconds"] for o in outcomes)}
    for m in (*STAGE_METRICS, "ba_before", "asr_before", "ra_before", "images_per_second"):
        values = [o[m] for o in outcomes if isinstance(o.get(m), (int, float)) and math.isfinite(o[m])]
        out[m] = sum(values) / len(values) if values else NAN
    out["score"] = _score(out["ba"], out["asr"])
    return out


def _kept_stage(storage, where: str, stage_dir: Path) -> dict | None:
    """A stage an earlier attempt of the trial finished: its outcome, with its outputs copied
    back into ``stage_dir``; None if no attempt finished it."""
    if not storage.exists(f"{where}/result.json"):
        return None
    storage.download_dir(f"{where}/outputs", stage_dir)
    return json.loads(storage.read_text(f"{where}/result.json"))


def _keep_stage(storage, where: str, stage_dir: Path, outcome: dict) -> None:
    """A finished stage's outputs, then its outcome (which marks it finished)."""
    from trainables.stages import STANDARD_FILES

    for name in STANDARD_FILES:
        storage.upload_file(stage_dir / name, f"{where}/outputs/{name}")
    storage.write_text(f"{where}/result.json", json.dumps(outcome))


def attack_trial(config: dict, job: TrialJob) -> None:
    """One attack configuration (attack sweeps): train its attack stage (cached by hash) and
    report its metrics (and the attack's own report metrics, e.g. CheatKD's student's)."""
    from ray import tune

    from trainables.stages import resolve_attack_stage, run_attack_stage

    case = job.case(config)
    stage = job.attack_stage
    _start(job, case, Path(job.trials_dir) / tune.get_context().get_trial_id())
    cache = stage_cache(job.cache_dir, job.storage_uri, job.storage_endpoint)
    spec = resolve_attack_stage(stage.dataset, stage.model, case.attack, case.params_dict, dict(stage.train),
                                job.seed)
    try:
        path = run_attack_stage(spec, cache, data_root=job.data_root, epoch_eval_size=job.epoch_eval_size,
                                checkpoint_every=job.checkpoint_every)
    finally:
        _release_memory()
    metrics = json.loads((path / "metrics.json").read_text())
    missing = [m for m in job.objectives if not isinstance(metrics.get(m), (int, float))]
    if missing:
        raise ValueError(f"objective {missing[0]!r} is not among the attack stage's metrics "
                         f"({', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))})")
    history = metrics.get("history") or []
    final = {**_numeric({k: v for k, v in metrics.items() if k != "history"}),
             "history": [_numeric(h) for h in history],
             "step": len(history), "measured": 1, "fully_trained": True, "final": True, "stage": "final",
             "attack_hash": spec.hash(), "out_dir": str(path), "node_id": _node_id()}
    tune.report(final)          # the outputs are the stage's cache entry (in the storage, if any)
