"""A sweep's MLflow runs read back as one table, what selection, the report and the benchmarks read."""
from __future__ import annotations

import re

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
    return with_stage_aggregates(out)


def with_stage_aggregates(runs):
    """``runs`` with each several-stage trial's aggregates (``<m>_mean``, ``_worst``, ``_std``)
    recomputed from its per-stage metrics (``<m>_stage<i>``) as MLflow holds them, its BA,
    ASR, RA and DER set to their means over the stages and ``stages_done`` to their number: what selection ranks is what the
    per-stage record says, whatever else was logged."""
    from trainables.metrics import STAGE_METRICS, stage_aggregates, stage_key

    found = [int(m.group(1)) for c in runs.columns if (m := re.fullmatch(r"(?:ba|asr|ra|der)_stage(\d+)", str(c)))]
    if not found:
        return runs
    runs = runs.copy()
    for idx, row in runs.iterrows():
        per_stage = [{m: row.get(stage_key(m, i)) for m in STAGE_METRICS} for i in range(max(found) + 1)]
        agg = stage_aggregates(per_stage)            # skips the stages a stopped trial never reached
        agg.update({m: agg[f"{m}_mean"] for m in STAGE_METRICS if f"{m}_mean" in agg})
        agg["stages_done"] = len({key.rsplit("_stage", 1)[1] for key in agg if "_stage" in key})
        for key, value in agg.items():
            runs.loc[idx, key] = value
    return runs
