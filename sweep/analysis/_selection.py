"""Selection: the sweep's runs read back from MLflow -> Pareto fronts -> the best configurations,
per attack and across attacks. No Ray: the report and the cross-checks of a running sweep both use it.

* Candidates: trial runs that FINISHED with ``fully_trained=true`` and finite objectives. Trials a
  scheduler stopped early, failed or killed trials never are.
* Pareto front of the objectives (default: ASR min, BA max) per (attack, defense).
* Best configuration per (attack, defense), by the preset's rule. The default, ``bound``, puts a
  defense's first duty first: among candidates whose ASR is at most ``bound`` % (default 10),
  the highest BA; if none removes the backdoor that far, the lowest ASR. (``ba_within``, the
  lowest ASR among candidates within ``ba_tolerance`` BA points of the best BA, rewards configs
  that leave the model alone: the most accurate model is often the untouched backdoored one.)
  Every choice comes with the reason it won, written to ``best_configs.yaml`` and the report.
* With several attack stages (``search.stages`` K > 1) every trial's BA/ASR/RA/DER are its means
  over the K stages (recomputed from its per-stage metrics, ``sweep.tracking.load_runs``), so the
  rule ranks K-stage aggregates; the objectives may name others (``asr_worst``, ``ba_mean``...).
  The rule's pick then replaces the paper default only if it beats it beyond the spread on the
  search's own stages (``against_default``: a paired comparison over the K stages); otherwise
  the default is kept, and ``why`` says so.
* Best configuration across attacks, per defense, among configurations measured on EVERY attack
  (the cross-check Tuners make sure each attack's best is): under ``bound``, of those whose
  worst-case ASR meets the bound, the highest mean BA; under ``ba_within``, of those whose BA is
  within the tolerance of each attack's best, the lowest worst-case ASR. If none qualifies, the
  lowest worst-case ASR of all, with a note saying so.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

from sweep.analysis._best_configs import AcrossAttacks, BestConfigs, Chosen, DefenseResult, PairResult
from sweep.config import config_key, full_defense_params
from trainables.metrics import AGGREGATES, STAGE_METRICS


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


def _meets(value: float, selection) -> bool:
    """Whether ``value`` of the selection metric meets the rule's bound (at or below it for a
    metric to minimise, at or above for one to maximise)."""
    b = selection.bound / 100.0
    return value <= b + 1e-12 if selection.mode == "min" else value >= b - 1e-12


def _pct(v: float) -> str:
    return f"{100 * float(v):.2f}%"


def choose(df, selection) -> tuple[Any, str]:
    """The row the selection rule picks among ``df``'s candidates (or None) and why it won."""
    metric, mode, ba = selection.metric, selection.mode, selection.ba_metric
    rule = selection.rule
    needed = [metric] + ([ba] if rule in ("ba_within", "bound") else []) + (["der"] if rule == "max_der" else [])
    rows = finite_rows(df, needed)
    if rows.empty:
        return None, "no fully trained candidate"
    n = len(rows)
    ascending = mode == "min"
    if rule == "bound":
        ok = rows[[_meets(v, selection) for v in rows[metric].astype(float)]]
        if not ok.empty:
            row = ok.sort_values([ba, metric, "start_time"], ascending=[False, ascending, True]).iloc[0]
            return row, (f"{metric} {_pct(row[metric])} meets the bound ({'≤' if ascending else '≥'} "
                         f"{selection.bound:g}%) and its {ba} {_pct(row[ba])} is the highest of the {len(ok)} "
                         f"of {n} candidates that do")
        row = rows.sort_values([metric, ba, "start_time"], ascending=[ascending, False, True]).iloc[0]
        return row, (f"no candidate of {n} reaches {metric} {'≤' if ascending else '≥'} {selection.bound:g}%; "
                     f"{'lowest' if ascending else 'highest'} {metric}: {_pct(row[metric])} ({ba} {_pct(row[ba])})")
    if rule == "max_der":
        row = rows.sort_values(["der", "start_time"], ascending=[False, True]).iloc[0]
        return row, f"highest DER ({float(row['der']):.3f}) of {n} candidates"
    if rule == "ba_within":
        best_ba = rows[ba].max()
        rows = rows[rows[ba] >= best_ba - selection.ba_tolerance / 100.0 - 1e-12]
    order = [metric] + ([ba] if ba in rows and ba != metric else []) + ["start_time"]
    asc = [ascending] + ([False] if ba in rows and ba != metric else []) + [True]
    row = rows.sort_values(order, ascending=asc).iloc[0]
    word = "lowest" if ascending else "highest"
    if rule == "ba_within":
        return row, (f"{word} {metric} ({_pct(row[metric])}) of the {len(rows)} of {n} candidates whose {ba} is "
                     f"within {selection.ba_tolerance:g} points of the best ({_pct(best_ba)})")
    return row, f"{word} {metric} ({_pct(row[metric])}) of {n} candidates"


def against_default(row, default, stages: int) -> dict:
    """The rule's pick against the paper default over the K stages both defended, paired: per
    metric (ASR, BA) the per-stage differences d_i = pick_i - default_i, their mean (``delta``)
    and sample std (``spread``), in points. A metric gains beyond the spread when its mean moves
    the better way (ASR down, BA up) by more than the spread, and loses beyond it when it moves
    the worse way by more. ``verdict``: ``better`` when one metric gains beyond the spread and
    the other loses no more than its spread, ``worse`` the reverse, else ``within the spread``;
    ``not measured`` when either lacks a stage's value."""
    from trainables.metrics import stage_key

    out: dict[str, Any] = {"config_key": row["config_key"], "run_id": row["run_id"], "stages": stages}
    moves = []
    for m, sign in (("asr", -1), ("ba", 1)):
        pairs = [(number(row.get(stage_key(m, i))), number(default.get(stage_key(m, i)))) for i in range(stages)]
        if any(a is None or b is None for a, b in pairs):
            return {**out, "verdict": "not measured"}
        d = [100 * (a - b) for a, b in pairs]
        mean = sum(d) / len(d)
        spread = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
        out[f"delta_{m}"], out[f"spread_{m}"] = round(mean, 2), round(spread, 2)
        moves.append(int(sign * mean > spread) - int(sign * mean < -spread))
    out["verdict"] = ("better" if max(moves) == 1 and min(moves) >= 0 else
                      "worse" if min(moves) == -1 and max(moves) <= 0 else "within the spread")
    return out


def _kept_default_why(c: dict) -> str:
    return (f"the paper default, kept: the rule's pick (config {c['config_key']}) is {c['verdict']} over "
            f"{c['stages']} stages, not better beyond the spread (ASR {c.get('delta_asr', 0):+.2f} ± "
            f"{c.get('spread_asr', 0):.2f}, BA {c.get('delta_ba', 0):+.2f} ± {c.get('spread_ba', 0):.2f} points, "
            "pick minus default, mean ± std of the per-stage differences)")


def select_best(df, selection) -> Any:
    """The row the selection rule picks among ``df``'s candidates, or None."""
    return choose(df, selection)[0]


def describe_rule(selection) -> str:
    m, mode, ba, tol = selection.metric, selection.mode, selection.ba_metric, selection.ba_tolerance
    word = "lowest" if mode == "min" else "highest"
    if selection.rule == "bound":
        return (f"highest {ba} among fully trained configs whose {m} is {'at most' if mode == 'min' else 'at least'} "
                f"{selection.bound:g}% (a defense must first remove the backdoor); if none is, the {word} {m}")
    if selection.rule == "ba_within":
        return (f"{word} {m} among fully trained configs whose {ba} is within {tol:g} points of the best "
                f"{ba} (ties: higher {ba})")
    if selection.rule == "max_der":
        return "highest DER among fully trained configs"
    return f"{word} {m} among fully trained configs"


def best_across_attacks(df, attacks: list[str], selection) -> AcrossAttacks | None:
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
        return AcrossAttacks(note=f"no configuration was measured on all {len(attacks)} attacks "
                                  "(enable search.cross_check)")
    sign = 1 if mode == "min" else -1
    note = None
    word = "lowest" if mode == "min" else "highest"
    if selection.rule == "bound":
        pool = [o for o in options if _meets(o[1], selection)]
        if pool:       # every attack's backdoor removed: the highest mean BA wins
            ckey, worst, keeps_ba, mean_ba, per = max(pool, key=lambda o: (o[3], -sign * o[1]))
            why = (f"worst-case {metric} {_pct(worst)} meets the bound on all {len(attacks)} attacks; highest "
                   f"mean {ba} ({_pct(mean_ba)}) of the {len(pool)} configs that do")
        else:
            note = f"no configuration reaches {metric} {'≤' if mode == 'min' else '≥'} {selection.bound:g}% on every attack"
            ckey, worst, keeps_ba, mean_ba, per = min(options, key=lambda o: (sign * o[1], -o[3]))
            why = f"{note}; {word} worst-case {metric}: {_pct(worst)}"
    else:
        pool = [o for o in options if o[2]]
        if not pool:
            pool = options
            note = f"no configuration keeps {ba} within {tol:g} points of the best on every attack"
        ckey, worst, keeps_ba, mean_ba, per = min(pool, key=lambda o: (sign * o[1], -o[3]))
        why = f"{word} worst-case {metric} ({_pct(worst)}) of {len(pool)} configs" + (f" ({note})" if note else "")
    return AcrossAttacks(note, ckey, json.loads(per[attacks[0]]["config_json"]), metric, round(worst, 6), ba,
                         round(mean_ba, 6), {a: {"run_id": per[a]["run_id"], metric: number(per[a][metric]),
                                                 ba: number(per[a][ba])} for a in attacks}, len(options), why)


def number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if math.isfinite(f) else None


def build_best_configs(cfg, sweep_id: str, runs) -> BestConfigs:
    """Per (attack, defense) the selected and the paper-default configuration with the Pareto
    front, and per defense the best configuration across attacks."""
    sel = cfg.selection
    attacks = [a.name for a in cfg.attacks]
    trials = runs[runs["ray_trial_id"] != ""] if not runs.empty else runs

    def result(rows, dentry=None) -> PairResult:
        row, why = choose(rows, sel)
        default = _default_row(rows, dentry) if dentry else None
        comparison = None
        if cfg.search.stages > 1 and row is not None and default is not None \
                and row["config_key"] != default["config_key"]:
            comparison = against_default(row, default, cfg.search.stages)
            if comparison["verdict"] != "better":
                row, why = default, _kept_default_why(comparison)
            else:
                why += (f"; better than the paper default beyond the spread over {comparison['stages']} stages "
                        f"(ASR {comparison['delta_asr']:+.2f} ± {comparison['spread_asr']:.2f}, BA "
                        f"{comparison['delta_ba']:+.2f} ± {comparison['spread_ba']:.2f} points)")
        return PairResult(best=_entry(row, cfg, why),
                          pareto_front=tuple(_entry(r, cfg) for _, r in pareto_front(rows, cfg.search.objectives).iterrows()),
                          n_candidates=int(rows["candidate"].sum()) if not rows.empty else 0,
                          paper_default=_entry(default, cfg) if dentry else None, against_default=comparison)

    head = dict(sweep_id=sweep_id, preset=cfg.name, dataset=cfg.dataset, model=cfg.model, rule=describe_rule(sel),
                objectives=tuple(cfg.search.objectives))
    if cfg.kind == "attack":
        return BestConfigs(**head, attacks={a: result(trials[trials["attack"] == a]) for a in attacks})
    defenses = {}
    for d in cfg.defenses:
        rows = trials[trials["defense"] == d.name]
        defenses[d.name] = DefenseResult({a: result(rows[rows["attack"] == a], d) for a in attacks},
                                         best_across_attacks(rows, attacks, sel) if len(attacks) > 1 else None)
    return BestConfigs(**head, defenses=defenses)


def _default_row(rows, dentry):
    """The trial run at the paper defaults (the first point of the search)."""
    return keyed_row(rows, config_key(full_defense_params(dentry.name, dentry.first_trial())))


def keyed_row(rows, key: str):
    """The first finished, fully trained trial among ``rows`` run with the config ``key``."""
    hit = rows[(rows["config_key"] == key) & rows["candidate"]] if not rows.empty else rows
    return hit.sort_values("start_time").iloc[0] if not hit.empty else None


def remeasured(cfg, runs, best: BestConfigs, selected: BestConfigs) -> BestConfigs:
    """``best`` (``build_best_configs`` of a sweep at another seed) with each pair's ``best``
    replaced by that sweep's trial of the configuration ``selected`` (the searching sweep's
    selection) chose for the pair: the selected config re-measured, not re-selected."""
    trials = runs[runs["ray_trial_id"] != ""] if not runs.empty else runs
    defenses = {}
    for d, info in best.defenses.items():
        chosen = (selected.defenses or {}).get(d)
        per_attack = {}
        for a, result in info.per_attack.items():
            pick = chosen.per_attack[a].best if chosen and a in chosen.per_attack else None
            rows = trials[(trials["defense"] == d) & (trials["attack"] == a)] if not trials.empty else trials
            per_attack[a] = replace(result, best=_entry(keyed_row(rows, pick.config_key), cfg) if pick else None)
        defenses[d] = replace(info, per_attack=per_attack)
    return replace(best, defenses=defenses)


def _entry(row, cfg, why: str | None = None) -> Chosen | None:
    if row is None:
        return None
    metrics = {}
    for m in ("asr", "ba", "ra", "der", "asr_before", "ba_before", *(m for m, _ in cfg.search.objectives),
              *report_metrics(cfg), *(f"{m}_{a}" for m in STAGE_METRICS for a in AGGREGATES), "stages_done"):
        if m in row and number(row[m]) is not None:
            metrics[m] = number(row[m])
    params = json.loads(row["config_json"]) if row.get("config_json") else {}
    return Chosen(row["run_id"], row["ray_trial_id"], row["config_key"], params, metrics, why or None)
