"""The Tune callback that writes every trial's MLflow run, on the driver (the one writer).

``TrialLogger`` opens a child run of the sweep's parent run when a trial starts (or reattaches the
run a crashed driver left, found by its ``ray_trial_id`` tag), logs each ``tune.report`` as
per-epoch metrics (step = the defense's epoch counter), and closes the run FINISHED when the trial
ends (tagging ``fully_trained`` and ``ray_node_id``, and logging its outputs as artifacts) or
FAILED when it raises. Only the driver writes to MLflow: the trials' outputs reach it through the
trials folder, or, with a storage, as Tune checkpoints (defense trials) and stored attack stages
(attack trials), wherever the trial ran; one writer keeps the runs consistent with Tune's state
after a crash and needs no tracking credentials on the workers. It is pickled into the Tuner's state
(``Tuner.restore`` brings it back), so it holds only plain settings and opens its MLflow client
lazily.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS

from sweep.config import config_json, config_key, full_attack_params, full_defense_params
from sweep.tracking import Tracker
from trainables.artifacts import cache_for
from trainables.job import TrialJob
from trainables.metrics import is_stage_metric
from trainables.tune_trainable import EPOCH_KEY, STAGE_RUNG_KEY

META_KEYS = {"step", "measured", "fully_trained", "final", "stage", "out_dir", "done", "history",
             "attack_hash", "trial_id", "epoch", "node_id", EPOCH_KEY, STAGE_RUNG_KEY}
MEASURED_ONLY = {"ba", "asr", "ra", "der", "score"}
ARTIFACT_FILES = ("model.pt", "spec.json", "metrics.json")


class TrialLogger(Callback):
    def __init__(self, *, tracking_uri: str, experiment: str, workdir: str, parent_run_id: str,
                 sweep_id: str, base_tags: dict[str, Any], job: TrialJob, pair: str):
        self.tracking_uri, self.experiment, self.workdir = tracking_uri, experiment, workdir
        self.parent_run_id, self.sweep_id = parent_run_id, sweep_id
        self.base_tags, self.job, self.role, self.pair = dict(base_tags), job, job.role, pair
        self._tracker: Tracker | None = None
        self._runs: dict[str, str] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tracker"], state["_runs"] = None, {}
        return state

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.experiment, self.workdir)
        return self._tracker

    # -- the run of a trial ----------------------------------------------------------------
    def _describe(self, trial) -> tuple[dict, dict]:
        """(tags, params) of a trial's run; params complete (every default filled in)."""
        case = self.job.case(trial.config)
        if self.role == "attack":
            params = full_attack_params(case.attack, case.params_dict)
            tags = {"attack": case.attack, "defense": "none", "purpose": case.purpose}
        else:
            params = full_defense_params(case.defense, case.params_dict)
            tags = {"attack": case.attack, "attack_hash": case.attack_hash, "purpose": case.purpose,
                    "defense": case.defense}
        tags.update(config_key=config_key(params), config_json=config_json(params))
        return tags, params

    def run_id(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self.tracker.find_run(self.sweep_id, ray_trial_id=trial.trial_id, pair=self.pair)
        if found is not None:
            # a restored (resumed or retried) trial: reattach its run instead of opening another
            run_id = found.info.run_id
            if found.info.status != "RUNNING":
                self.tracker.reopen(run_id)
            restarts = int(found.data.tags.get("restarts", "0")) + 1
            self.tracker.set_tags(run_id, {"restarts": restarts, "fully_trained": "false"})
        else:
            tags, params = self._describe(trial)
            tags = {**self.base_tags, **tags, "role": self.role, "ray_trial_id": trial.trial_id,
                    "fully_trained": "false", "pair": self.pair}
            name = f"{tags.get('defense', 'none')}/{tags['attack']}/{trial.trial_id}" if self.role == "defense" \
                else f"{tags['attack']}/{trial.trial_id}"
            run_id = self.tracker.create_run(name, tags, self.parent_run_id, params)
        self._runs[trial.trial_id] = run_id
        return run_id

    # -- Tune hooks ------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_id(trial)
        metrics = loggable(result)
        if result.get("attack_hash") and self.role == "attack":
            self.tracker.set_tags(run_id, {"attack_hash": result["attack_hash"]})
        if "history" in result:        # an attack trial reports its epochs at the end
            for entry in result["history"]:
                step = int(entry.get("epoch", 0))
                self.tracker.log_metrics(run_id, {k: v for k, v in entry.items() if k != "epoch"}, step=step)
        self.tracker.log_metrics(run_id, metrics, step=int(result.get("step", 0) or 0))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        last = trial.last_result or {}
        with trial_outputs(self.job, last, trial.checkpoint) as outputs:
            finish_trial_run(self.tracker, run_id, last, outputs)
        self._runs.pop(trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        fail_trial_run(self.tracker, run_id, _error_text(trial))
        self._runs.pop(trial.trial_id, None)

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        self.tracker.set_tags(run_id, {"last_error": _error_text(trial)[:5000]})


def loggable(result: dict) -> dict:
    """The numeric, non-bookkeeping part of a Tune result; epoch-unmeasured metrics dropped, and
    stage metrics a report holds no value of (an epoch's placeholders, one stage's std)."""
    skip = set(AUTO_RESULT_KEYS) | set(DEBUG_METRICS) | META_KEYS
    out = {k: v for k, v in result.items()
           if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
           and not (is_stage_metric(k) and not math.isfinite(v))}
    if not result.get("measured", 1):
        for k in MEASURED_ONLY:
            out.pop(k, None)
    return out


@contextlib.contextmanager
def trial_outputs(job: TrialJob, last: dict, checkpoint) -> Iterator[Path | None]:
    """A folder on the driver holding a finished trial's outputs, or None: the trial's folder
    (one machine, or a shared mount), the stored attack stage (attack trials with a storage), or
    its Tune checkpoint downloaded from the storage."""
    out_dir = last.get("out_dir")
    if job.storage_uri is None or not last.get("final"):
        yield Path(out_dir) if out_dir and Path(out_dir).is_dir() else None
    elif job.role == "attack" and last.get("attack_hash"):
        yield cache_for(job.cache_dir, job.storage_uri, job.storage_endpoint).lookup(str(last["attack_hash"]))
    elif checkpoint is not None:
        with checkpoint.as_directory() as d:
            yield Path(d)
    else:
        yield None


def finish_trial_run(tracker: Tracker, run_id: str, last: dict, outputs: Path | None) -> None:
    """Close a trial's run FINISHED, with ``fully_trained`` from its last result, the node it ran
    on, and its ``outputs`` folder's files as artifacts."""
    fully = bool(last.get("final") and last.get("fully_trained"))
    tags = {"fully_trained": str(fully).lower(), "ray_node_id": last.get("node_id")}
    if not fully:
        tags["stopped_early"] = "true"
    if fully and outputs is None:
        # never silent: the trial's folder is on another node (no --storage and no shared disk)
        tags["outputs_missing"] = "true"
        print(f"warning: trial run {run_id} finished but its outputs ({last.get('out_dir')}) are not on this "
              "node: run with --storage, or a work directory every node mounts")
    tracker.set_tags(run_id, tags)
    if fully and outputs is not None:
        tracker.log_artifacts(run_id, [outputs / f for f in ARTIFACT_FILES], "model")
        tracker.log_artifacts(run_id, [outputs / "samples.png"])
    tracker.end(run_id, "FINISHED")


def fail_trial_run(tracker: Tracker, run_id: str, error: str) -> None:
    tracker.set_tags(run_id, {"fully_trained": "false", "error": error[:5000] or "failed"})
    tracker.end(run_id, "FAILED")


def _error_text(trial) -> str:
    try:
        path = trial.error_file
        if path and Path(path).is_file():
            lines = Path(path).read_text(errors="replace").strip().splitlines()
            tail = [ln for ln in lines if ln.strip()][-3:]
            return " | ".join(tail)
    except Exception:
        pass
    return "trial failed (see the Ray Tune trial directory)"

