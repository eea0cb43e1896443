"""MLflow tracking: one parent run per sweep, one child run per attack stage and per trial.

Conventions: one experiment per preset (or ``--experiment``), marked as model training for the
MLflow UI; every run carries the tags in ``TAG_KEYS``; params are the flattened method
parameters; metrics ``ba``/``asr``/``ra`` per epoch (step = epoch) and final, plus ``der``,
``train_seconds`` and ``images_per_second``, each rounded as ``logged_value`` says; artifacts are
the model state_dict, sample PNGs, ``best_configs.yaml``, the report and its plots.

One writer: only the driver process writes (through ``MlflowClient`` with explicit run ids), so the
default SQLite store never sees concurrent writers. Trials report to Tune; a Tune ``Callback`` on
the driver (``TrialLogger``) opens, fills and closes their runs. Runs are never left RUNNING: a
failed trial ends FAILED, and ``reconcile`` (run at resume and after every Tuner) reattaches a
crashed driver's runs by their ``ray_trial_id`` tag and closes whatever is still open.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterable

TAG_KEYS = ("sweep_id", "preset", "role", "dataset", "model", "attack", "defense", "seed", "attack_hash",
            "code_version", "ray_trial_id", "fully_trained")
FINAL_METRICS = ("ba", "asr", "ra", "der", "ba_before", "asr_before", "ra_before", "train_seconds",
                 "images_per_second")
# the tags selection and the report read back (TAG_KEYS plus the trial bookkeeping)
TAG_COLUMNS = TAG_KEYS + ("purpose", "config_key", "config_json", "pair", "cached")
MAX_PARAM_LEN = 6000
# the MLflow UI restores a runs-table view (columns, order) from this experiment tag when its URL
# carries ``viewStateShareKey=<name>`` (MLflow >= 3.15)
SHARED_VIEW_TAG = "mlflow.sharedViewState."
VIEW_METRICS = ("ba", "asr", "ra", "der")
# the MLflow UI (>= 3.x) shows an experiment with this tag as model training (runs, metrics, models)
# rather than in its GenAI mode (traces)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# metrics are logged as the report reads them: accuracies and rates (fractions the report shows in
# % with 2 decimals) to 4 decimals, anything else to 6 significant digits; either way a float32's
# noise (0.7300000190734863) is gone and every reader (selection, report, plots) sees one value
FRACTION_METRIC = re.compile(r"(^|_)(ba|asr|ra|score)(_|$)")


def default_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve()}/mlflow.db"


def resolve_tracking_uri(workdir: str | Path, uri: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else SQLite in the work directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = default_tracking_uri(workdir)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


# bounds MLflow's HTTP client for one probe: by default it retries a dead server for minutes
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def check_server(uri: str | None) -> None:
    """A tracking server (http/https URI) answers one request, or one ``SweepError`` says so.
    Local stores (SQLite, files) are not checked."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    from mlflow import MlflowClient

    from sweep.errors import SweepError

    saved = {k: os.environ.get(k) for k in PROBE_ENV}
    os.environ.update(PROBE_ENV)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        raise SweepError(f"--tracking-uri {uri}: the MLflow tracking server does not answer "
                         f"({_reason(e)})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reason(e: Exception) -> str:
    """The cause at the end of a requests/urllib3 error chain, on one line."""
    text = " ".join(str(e).split())
    m = re.search(r"\[Errno -?\d+\] [^'\"()]+", text)
    return m.group(0).strip() if m else text[:300]


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tuples become their text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _param_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        v = ",".join(map(str, v))
    text = str(v)
    return text if len(text) <= MAX_PARAM_LEN else text[:MAX_PARAM_LEN - 3] + "..."


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def logged_value(name: str, v: float) -> float:
    """The value of metric ``name`` as it is logged (see ``FRACTION_METRIC``)."""
    v = float(v)
    if FRACTION_METRIC.search(name):
        return round(v, 4)
    return v if v.is_integer() else float(f"{v:.6g}")


# a sweep's Tuners run in threads of the driver, each with its trial logger: one lock for all of
# them keeps the driver a single writer (SQLite takes one at a time) and each write whole
_CLIENT_LOCK = threading.RLock()


class _LockedClient:
    """An ``MlflowClient`` whose every call holds the driver's one tracking lock."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with _CLIENT_LOCK:
                return attr(*args, **kwargs)
        return locked


class Tracker:
    """The driver's MLflow writer for one sweep (experiment id, parent run, child runs)."""

    def __init__(self, tracking_uri: str, experiment: str, workdir: str | Path):
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.workdir = Path(workdir).resolve()
        with _CLIENT_LOCK:          # opening a store (SQLite: its engine and schema check) too
            self.client = _LockedClient(MlflowClient(tracking_uri=tracking_uri))
        self.experiment_name = experiment
        self.experiment_id = self._experiment(experiment)
        self._last_ts: dict[str, int] = {}

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        # a local store keeps its artifacts in the work directory (not in ./mlruns of the cwd);
        # a tracking server decides itself (proxied artifact storage)
        location = (self.workdir / "mlartifacts" / name).as_uri() if _is_local_store(self.uri) else None
        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:   # created concurrently by another driver
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def set_comparison_view(self, view: str, params: Iterable[str]) -> str:
        """Store a shared view of the experiment's runs table (MLflow's ``viewStateShareKey``):
        BA, ASR, RA, DER, the searched ``params``, attack and defense as columns, lowest ASR
        first. Returns the UI path that opens it (after the server's address), in the UI's
        model-training mode: MLflow 3.17's UI takes its mode from the link or the browser's last
        choice (GenAI in a fresh one), not from the experiment's kind tag."""
        columns = [f"metrics.`{m}`" for m in VIEW_METRICS] + [f"params.`{p}`" for p in params] \
            + [f"tags.`{t}`" for t in ("attack", "defense", "purpose")]
        state = {"selectedColumns": columns, "orderByKey": "metrics.`asr`", "orderByAsc": True}
        self.client.set_experiment_tag(self.experiment_id, f"{SHARED_VIEW_TAG}{view}", json.dumps(state))
        return f"#/experiments/{self.experiment_id}/runs?viewStateShareKey={view}&workflowType=machine_learning"

    # -- runs ----------------------------------------------------------------------------------
    def create_run(self, name: str, tags: dict[str, Any], parent_id: str | None = None,
                   params: dict[str, Any] | None = None) -> str:
        all_tags = {k: "" for k in TAG_KEYS}
        all_tags.update({k: str(v) for k, v in tags.items() if v is not None})
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, _param_text(v)) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])

    def delete_tags(self, run_id: str, keys: Iterable[str]) -> None:
        """Remove the tags ``keys`` that the run has (MLflow refuses to delete a missing one)."""
        have = self.client.get_run(run_id).data.tags
        for k in keys:
            if k in have:
                self.client.delete_tag(run_id, k)

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        """Finite numbers only, each as ``logged_value`` gives it; timestamps strictly increase per
        run, so a value logged later at the same step becomes the run's latest (final metrics after
        the last epoch's)."""
        from mlflow.entities import Metric

        ts = max(int(time.time() * 1000), self._last_ts.get(run_id, 0) + 1)
        self._last_ts[run_id] = ts
        items = [Metric(k, logged_value(k, v), ts, int(step)) for k, v in metrics.items() if _finite(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])

    def log_artifacts(self, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for p in paths:
            p = Path(p)
            if p.is_file():
                self.client.log_artifact(run_id, str(p), artifact_path)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    # -- queries -------------------------------------------------------------------------------
    def runs(self, sweep_id: str, **tags: str) -> list:
        """Every run of the sweep (all pages), optionally filtered by more tags."""
        filt = " and ".join([f"tags.sweep_id = '{sweep_id}'"] + [f"tags.{k} = '{v}'" for k, v in tags.items()])
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filt, max_results=1000,
                                           page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def find_run(self, sweep_id: str, **tags: str):
        """The newest run of the sweep with these tags, or None."""
        runs = self.runs(sweep_id, **tags)
        return max(runs, key=lambda r: r.info.start_time) if runs else None

    def close_open_runs(self, sweep_id: str, status: str = "KILLED", keep: Iterable[str] = (),
                        **tags: str) -> list[str]:
        """End every RUNNING run of the sweep with these tags (except ``keep``) with ``status``."""
        keep = set(keep)
        closed = []
        for r in self.runs(sweep_id, **tags):
            if r.info.status == "RUNNING" and r.info.run_id not in keep:
                self.end(r.info.run_id, status)
                closed.append(r.info.run_id)
        return closed
