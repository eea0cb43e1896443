"""Selection: the sweep's runs read back from MLflow -> Pareto fronts -> the best configurations,
per attack and across attacks. No Ray: the report and the runner's cross-check phase both use it.

* Candidates: trial runs that FINISHED with ``fully_trained=true`` and finite objectives. Trials a
  scheduler stopped early, failed or killed trials never are.
* Pareto front of the objectives (default: ASR min, BA max) per (attack, defense).
* Best configuration per (attack, defense), by the preset's rule (default ``ba_within``: the
  lowest ASR among candidates whose BA is within ``ba_tolerance`` points of the best candidate
  BA; ties go to the higher BA).
* Best configuration across attacks, per defense: among configurations measured on EVERY attack
  (the cross-check phase makes sure each attack's best is), those whose BA is within the
  tolerance of each attack's best BA; of these the lowest worst-case (maximum over attacks) ASR.
  If none keeps BA on every attack, the lowest worst-case ASR of all, with a note saying so.
"""
from __future__ import annotations

import json
import math
from typing import Any

from sweep.tracking import TAG_COLUMNS, config_key, full_defense_params, paper_default_params


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


def report_metrics(cfg) -> tuple[str, ...]:
    """The extra metrics the sweep's attacks say their runs carry (e.g. CheatKD's student's)."""
    from trainables import registry

    names = []
    for a in cfg.attacks:
        if a.name != "none":
            names += getattr(registry.get_attack(a.name), "report_metrics", ())
    return tuple(dict.fromkeys(names))


def finite_rows(df, metrics):
    import numpy as np

    mask = df["candidate"].astype(bool)
    for m in metrics:
        if m not in df:
            return df.iloc[0:0]
        mask &= np.isfinite(df[m].astype(float))
    return df[mask]


def pareto_front(df, objectives: tuple[tuple[str, str], ...]):
    """The candidate rows no other candidate dominates (better or equal on every objective and
    strictly better on one), sorted by the first objective."""
    metrics = [m for m, _ in objectives]
    rows = finite_rows(df, metrics)
    if rows.empty:
        return rows
    signs = [1.0 if mode == "min" else -1.0 for _, mode in objectives]
    vals = [[s * float(r[m]) for m, s in zip(metrics, signs)] for _, r in rows.iterrows()]
    keep = []
    for i, a in enumerate(vals):
        dominated = any(all(b[k] <= a[k] for k in range(len(a))) and any(b[k] < a[k] for k in range(len(a)))
                        for j, b in enumerate(vals) if j != i)
        keep.append(not dominated)
    front = rows[keep]
    return front.sort_values(metrics[0], ascending=signs[0] > 0)


def select_best(df, selection) -> Any:
    """The row the selection rule picks among ``df``'s candidates, or None."""
    metric, mode, ba = selection.metric, selection.mode, selection.ba_metric
    rule = selection.rule
    needed = [metric] + ([ba] if rule == "ba_within" else []) + (["der"] if rule == "max_der" else [])
    rows = finite_rows(df, needed)
    if rows.empty:
        return None
    if rule == "max_der":
        key, ascending = "der", False
    else:
        key, ascending = metric, mode == "min"
    if rule == "ba_within":
        best_ba = rows[ba].max()
        rows = rows[rows[ba] >= best_ba - selection.ba_tolerance / 100.0 - 1e-12]
    order = [key] + ([ba] if ba in rows and ba != key else []) + ["start_time"]
    asc = [ascending] + ([False] if ba in rows and ba != key else []) + [True]
    return rows.sort_values(order, ascending=asc).iloc[0]


def describe_rule(selection) -> str:
    m, mode, ba, tol = selection.metric, selection.mode, selection.ba_metric, selection.ba_tolerance
    word = "lowest" if mode == "min" else "highest"
    if selection.rule == "ba_within":
        return (f"{word} {m} among fully trained configs whose {ba} is within {tol:g} points of the best "
                f"{ba} (ties: higher {ba})")
    if selection.rule == "max_der":
        return "highest DER among fully trained configs"
    return f"{word} {m} among fully trained configs"


def best_across_attacks(df, attacks: list[str], selection) -> dict | None:
    """Per defense, the config best over all attacks (see the module docstring)."""
    metric, mode, ba, tol = selection.metric, selection.mode, selection.ba_metric, selection.ba_tolerance
    rows = finite_rows(df, [metric, ba])
    if rows.empty or not attacks:
        return None
    best_ba = {a: rows[rows["attack"] == a][ba].max() for a in attacks}
    options = []
    for ckey, group in rows.groupby("config_key"):
        per = {}
        for a in attacks:
            g = group[group["attack"] == a]
            if g.empty:
                break
            # repeated measurements of one config on one attack: the latest counts
            r = g.sort_values("start_time").iloc[-1]
            per[a] = r
        if len(per) != len(attacks):
            continue
        vals = [float(per[a][metric]) for a in attacks]
        worst = max(vals) if mode == "min" else min(vals)
        keeps_ba = all(float(per[a][ba]) >= best_ba[a] - tol / 100.0 - 1e-12 for a in attacks)
        mean_ba = sum(float(per[a][ba]) for a in attacks) / len(attacks)
        options.append((ckey, worst, keeps_ba, mean_ba, per))
    if not options:
        return {"note": f"no configuration was measured on all {len(attacks)} attacks "
                        "(enable search.cross_check)"}
    pool = [o for o in options if o[2]]
    note = None
    if not pool:
        pool = options
        note = f"no configuration keeps {ba} within {tol:g} points of the best on every attack"
    sign = 1 if mode == "min" else -1
    ckey, worst, keeps_ba, mean_ba, per = min(pool, key=lambda o: (sign * o[1], -o[3]))
    out = {"config_key": ckey, "params": json.loads(per[attacks[0]]["config_json"]),
           f"worst_case_{metric}": round(worst, 6), f"mean_{ba}": round(mean_ba, 6),
           "per_attack": {a: {"run_id": per[a]["run_id"], metric: number(per[a][metric]), ba: number(per[a][ba])}
                          for a in attacks},
           "n_configs_on_all_attacks": len(options)}
    if note:
        out["note"] = note
    return out


def number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if math.isfinite(f) else None


def build_best_configs(cfg, sweep_id: str, runs) -> dict:
    """``best_configs.yaml``: per (attack, defense) the selected and the paper-default
    configuration with the Pareto front, and per defense the best configuration across attacks."""
    sel = cfg.selection
    doc: dict[str, Any] = {"sweep_id": sweep_id, "preset": cfg.name, "dataset": cfg.dataset,
                           "model": cfg.model, "rule": describe_rule(sel),
                           "objectives": {m: d for m, d in cfg.search.objectives}}
    attacks = [a.name for a in cfg.attacks]
    trials = runs[runs["ray_trial_id"] != ""] if not runs.empty else runs
    if cfg.kind == "attack":
        doc["attacks"] = {}
        for a in attacks:
            rows = trials[trials["attack"] == a]
            doc["attacks"][a] = {"best": _entry(select_best(rows, sel), cfg),
                                 "pareto_front": [_entry(r, cfg) for _, r in pareto_front(rows, cfg.search.objectives).iterrows()],
                                 "n_candidates": int(rows["candidate"].sum()) if not rows.empty else 0}
        return doc
    doc["defenses"] = {}
    for d in cfg.defenses:
        rows = trials[trials["defense"] == d.name]
        per_attack = {}
        for a in attacks:
            ra = rows[rows["attack"] == a]
            per_attack[a] = {"best": _entry(select_best(ra, sel), cfg),
                             "paper_default": _entry(_default_row(ra, d), cfg),
                             "pareto_front": [_entry(r, cfg) for _, r in pareto_front(ra, cfg.search.objectives).iterrows()],
                             "n_candidates": int(ra["candidate"].sum()) if not ra.empty else 0}
        doc["defenses"][d.name] = {"per_attack": per_attack,
                                   "across_attacks": best_across_attacks(rows, attacks, sel) if len(attacks) > 1 else None}
    return doc


def _default_row(rows, dentry):
    """The trial run at the paper defaults (the first point of the search)."""
    key = config_key(full_defense_params(dentry.name, paper_default_params(dentry)))
    hit = rows[(rows["config_key"] == key) & rows["candidate"]] if not rows.empty else rows
    return hit.sort_values("start_time").iloc[0] if not hit.empty else None


def _entry(row, cfg) -> dict | None:
    if row is None:
        return None
    metrics = {}
    for m in ("asr", "ba", "ra", "der", "asr_before", "ba_before", *(m for m, _ in cfg.search.objectives),
              *report_metrics(cfg)):
        if m in row and number(row[m]) is not None:
            metrics[m] = number(row[m])
    params = json.loads(row["config_json"]) if row.get("config_json") else {}
    return {"run_id": row["run_id"], "ray_trial_id": row["ray_trial_id"], "config_key": row["config_key"],
            "params": params, "metrics": metrics}
