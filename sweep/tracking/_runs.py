"""A sweep's MLflow runs read back as one table, what selection, the report and the benchmarks read."""
from __future__ import annotations

from sweep.tracking._mlflow import TAG_COLUMNS


def load_runs(tracker, sweep_id: str):
    """Every run of the sweep as a tidy DataFrame: one row per run with ``run_id``, ``status``,
    ``start_time``, the tags, ``param.<name>`` columns, every latest metric, and ``candidate``
    (may be selected: a finished, fully trained trial)."""
    import pandas as pd

    rows = []
    for run in tracker.runs(sweep_id):
        row = {"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time}
        row.update({t: run.data.tags.get(t, "") for t in TAG_COLUMNS})
        row.update({f"param.{k}": v for k, v in run.data.params.items()})
        row.update(run.data.metrics)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["run_id", "status", "start_time", *TAG_COLUMNS, "candidate"])
    out = pd.DataFrame(rows).sort_values("start_time", kind="stable").reset_index(drop=True)
    is_trial = (out["ray_trial_id"] != "") & out["role"].isin(["defense", "attack"])
    out["candidate"] = is_trial & (out["status"] == "FINISHED") & (out["fully_trained"] == "true")
    return out
