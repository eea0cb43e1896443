"""Selection and report: the runs read back from MLflow -> best configurations, tables, plots.

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
* ``best_configs.yaml`` (with MLflow run ids), Markdown + CSV tables in the layout of NBA Table 2
  (rows attacks, columns defenses, ASR / BA) or DLP Table 3 (rows defenses, columns attacks,
  CA / ASR) with the papers' numbers (SPEC.md "Reference results") beside ours, the Pareto and
  learning-curve plots; all written to ``sweeps/<id>/report/`` and logged to the parent run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

# ============================================================================ reference numbers

NBA_DEFENSES = ("none", "ft", "fp", "mcr", "nad", "argd", "nba")
# NBA Table 2 (CIFAR-10, Refool on GTSRB; WRN-16-1; 5% clean data): (ASR, BA) in %
NBA_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "badnets": {"none": (99.83, 80.02), "ft": (6.46, 79.91), "fp": (82.54, 77.65), "mcr": (2.74, 78.29),
                "nad": (3.55, 80.47), "argd": (1.81, 80.35), "nba": (1.16, 81.59)},
    "trojannn": {"none": (99.85, 79.95), "ft": (5.61, 80.03), "fp": (52.71, 79.96), "mcr": (25.71, 78.68),
                 "nad": (3.26, 79.58), "argd": (2.33, 79.97), "nba": (1.14, 80.42)},
    "blend": {"none": (97.83, 82.36), "ft": (5.23, 79.85), "fp": (89.12, 80.07), "mcr": (68.85, 79.82),
              "nad": (2.77, 81.04), "argd": (1.16, 81.13), "nba": (0.85, 80.13)},
    "cla": {"none": (98.15, 81.14), "ft": (7.32, 80.06), "fp": (35.46, 76.88), "mcr": (17.29, 80.03),
            "nad": (8.55, 79.64), "argd": (5.13, 79.96), "nba": (1.71, 80.24)},
    "sig": {"none": (99.62, 82.63), "ft": (11.29, 80.31), "fp": (65.31, 80.15), "mcr": (1.80, 79.61),
            "nad": (5.69, 80.29), "argd": (2.14, 80.25), "nba": (1.95, 81.71)},
    "refool": {"none": (96.24, 80.37), "ft": (8.78, 80.24), "fp": (59.67, 78.22), "mcr": (8.29, 78.25),
               "nad": (4.27, 80.01), "argd": (4.05, 80.04), "nba": (2.33, 82.72)},
}
DLP_DEFENSES = ("none", "nad", "abl", "anp", "dlp")
DLP_ATTACKS = ("badnets", "trojannn", "blend", "cla", "sig")
# DLP Table 3 (CIFAR-10, WRN-16-1): (CA, ASR) in %, attacks in DLP_ATTACKS order
# (the paper's "Blended" is our blend, its "LCA" our cla)
DLP_TABLE3: dict[str, tuple[tuple[float, float], ...]] = {
    "none": ((91.31, 100.0), (88.62, 100.0), (89.89, 100.0), (87.26, 99.46), (88.54, 99.88)),
    "nad": ((89.64, 1.99), (79.47, 15.99), (84.52, 1.75), (79.87, 18.71), (83.01, 1.98)),
    "abl": ((87.42, 4.13), (88.74, 4.41), (85.62, 16.37), (89.12, 0.0), (89.33, 0.08)),
    "anp": ((90.16, 0.56), (90.95, 0.76), (91.81, 0.53), (91.24, 4.12), (91.45, 0.87)),
    "dlp": ((93.08, 0.24), (92.19, 0.31), (91.93, 0.0), (92.04, 0.21), (92.98, 0.0)),
}
PAPER_SETTING = {"nba": "NBA Table 2: CIFAR-10 (Refool on GTSRB), WRN-16-1, 5% clean data",
                 "dlp": "DLP Table 3: CIFAR-10, WRN-16-1"}


def paper_numbers(layout: str, attack: str, defense: str) -> tuple[float, float] | None:
    """(ASR, BA) in % from the paper whose table ``layout`` follows, or None."""
    if layout == "dlp":
        if defense in DLP_TABLE3 and attack in DLP_ATTACKS:
            ca, asr = DLP_TABLE3[defense][DLP_ATTACKS.index(attack)]
            return asr, ca
        return None
    return NBA_TABLE2.get(attack, {}).get(defense)


# ============================================================================ runs -> pandas

TAG_COLUMNS = ("sweep_id", "preset", "role", "phase", "dataset", "model", "attack", "defense", "seed",
               "attack_hash", "code_version", "ray_trial_id", "fully_trained", "config_key", "config_json",
               "pair", "cached")


def load_runs(tracker, sweep_id: str):
    """Every run of the sweep as a tidy DataFrame (``mlflow.search_runs``): one row per run with
    ``run_id``, ``status``, the tags, ``param.<name>`` columns, every latest metric, and
    ``candidate`` (may be selected: a finished, fully trained trial with finite objectives)."""
    import mlflow
    import pandas as pd

    with _tracking_uri(tracker.uri):
        df = mlflow.search_runs(experiment_ids=[tracker.experiment_id],
                                filter_string=f"tags.sweep_id = '{sweep_id}'", output_format="pandas")
    if df.empty:
        return pd.DataFrame(columns=["run_id", "status", *TAG_COLUMNS, "candidate"])
    out = pd.DataFrame({"run_id": df["run_id"], "status": df["status"]})
    out["start_time"] = df["start_time"]
    for t in TAG_COLUMNS:
        col = f"tags.{t}"
        out[t] = df[col].fillna("") if col in df else ""
    for col in df.columns:
        if col.startswith("metrics."):
            out[col[len("metrics."):]] = pd.to_numeric(df[col], errors="coerce")
        elif col.startswith("params."):
            out["param." + col[len("params."):]] = df[col]
    is_trial = (out["ray_trial_id"] != "") & out["role"].isin(["defense", "attack"])
    out["candidate"] = is_trial & (out["status"] == "FINISHED") & (out["fully_trained"] == "true")
    return out.reset_index(drop=True)


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """``mlflow.search_runs`` reads the global tracking URI, and ``mlflow.set_tracking_uri`` also
    exports it as ``MLFLOW_TRACKING_URI`` to every later subprocess: set it for the call only
    and put both back."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_uri = getattr(utils, "_tracking_uri", None)
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


# ============================================================================ selection

def _finite_rows(df, metrics):
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
    rows = _finite_rows(df, metrics)
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
    rows = _finite_rows(df, needed)
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
    rows = _finite_rows(df, [metric, ba])
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
           "per_attack": {a: {"run_id": per[a]["run_id"], metric: _num(per[a][metric]), ba: _num(per[a][ba])}
                          for a in attacks},
           "n_configs_on_all_attacks": len(options)}
    if note:
        out["note"] = note
    return out


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if math.isfinite(f) else None


# ============================================================================ the report

@dataclass
class Report:
    sweep_id: str
    dir: Path
    best_configs: dict
    files: list[Path] = field(default_factory=list)
    markdown: str = ""

    @property
    def best_configs_file(self) -> Path:
        return self.dir / "best_configs.yaml"

    def __str__(self) -> str:
        lines = [f"sweep {self.sweep_id}: report {self.dir / 'report.md'}", f"best configs: {self.best_configs_file}"]
        for section in ("defenses", "attacks"):
            for name, info in (self.best_configs.get(section) or {}).items():
                per = info.get("per_attack") or {name: info}
                for attack, entry in per.items():
                    best = (entry or {}).get("best")
                    if best:
                        m = best["metrics"]
                        shown = " ".join(f"{k}={100 * v:.2f}%" for k, v in m.items()
                                         if k in ("asr", "ba", "student_asr", "student_ba"))
                        lines.append(f"  {name} / {attack}: {shown} (run {best['run_id']})")
        return "\n".join(lines)


def resolve_sweep(sweep_id_or_preset: str, workdir: str | Path):
    """A sweep id, or a preset name (its newest sweep, finished ones first) -> SweepState."""
    from sweep.runner import SweepError, SweepState

    root = Path(workdir).expanduser().resolve() / "sweeps"
    direct = root / sweep_id_or_preset / "sweep.json"
    if direct.is_file():
        return SweepState.load(direct)
    states = []
    for p in sorted(root.glob("*/sweep.json")) if root.is_dir() else []:
        try:
            st = SweepState.load(p)
        except (OSError, ValueError):
            continue
        if st.data.get("preset") == sweep_id_or_preset:
            states.append(st)
    if not states:
        known = sorted(p.parent.name for p in root.glob("*/sweep.json")) if root.is_dir() else []
        raise SweepError(f"no sweep or preset {sweep_id_or_preset!r} in {root}"
                         + (f"; sweeps there: {', '.join(known)}" if known else ""))
    return max(states, key=lambda s: (s.data.get("status") == "finished", s.data["created"]))


def config_of(state):
    """The sweep's SweepConfig, rebuilt from its stored (normalised) preset."""
    from sweep.config import DEFAULTS, _build, _merge, _normalise

    return _build(state.data["preset"], str(state.dir / "config.yaml"),
                  _merge(DEFAULTS, _normalise(state.data["config"])), tuple(state.data.get("overrides", ())))


def make_report(sweep_id_or_preset: str, workdir: str | Path = "sweep-runs", tracking_uri: str | None = None,
                experiment: str | None = None, progress: Callable[[str], None] = print) -> Report:
    """Select the best configs and write the report of a sweep (at sweep end, or on demand)."""
    from sweep.tracking import Tracker, resolve_tracking_uri

    workdir = Path(workdir).expanduser().resolve()
    state = resolve_sweep(sweep_id_or_preset, workdir)
    uri = tracking_uri or state.data.get("tracking_uri") or resolve_tracking_uri(workdir)
    tracker = Tracker(uri, experiment or state.data.get("experiment") or state.data["preset"], workdir)
    cfg = config_of(state)
    runs = load_runs(tracker, state.sweep_id)
    out = state.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    best = build_best_configs(cfg, state, runs)
    files = [out / "best_configs.yaml"]
    (out / "best_configs.yaml").write_text(yaml.safe_dump(best, sort_keys=False, width=110))
    md, tables = tables_markdown(cfg, runs, best)
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
        files.append(out / f"{name}.csv")
    files += plot_pareto(cfg, runs, best, out)
    files += plot_curves(cfg, runs, best, tracker, out)
    header = [f"# Sweep {state.sweep_id}", "",
              f"preset `{cfg.name}` · dataset `{cfg.dataset}` · model `{cfg.model}` · seed {cfg.seed} · "
              f"MLflow experiment `{tracker.experiment_name}` run `{state.data.get('parent_run_id')}`", "",
              f"Selection rule: {describe_rule(cfg.selection)}.", ""]
    counts = runs[runs["ray_trial_id"] != ""]["status"].value_counts().to_dict() if not runs.empty else {}
    header.append("Trials: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none") + ".")
    header.append("")
    plots = [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"]
    markdown = "\n".join(header) + md + ("\n## Plots\n\n" + "\n\n".join(plots) + "\n" if plots else "")
    (out / "report.md").write_text(markdown)
    files.insert(1, out / "report.md")
    parent = state.data.get("parent_run_id")
    if parent:
        tracker.log_artifacts(parent, files, "report")
    progress(f"report: {out / 'report.md'}; best configs: {out / 'best_configs.yaml'}")
    return Report(state.sweep_id, out, best, files, markdown)


def build_best_configs(cfg, state, runs) -> dict:
    sel = cfg.selection
    doc: dict[str, Any] = {"sweep_id": state.sweep_id, "preset": cfg.name, "dataset": cfg.dataset,
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
    from sweep.callbacks import config_key, full_defense_params
    from sweep.spaces import first_point
    from trainables.tune_trainable import decode

    dists = {x.name: x for x in dentry.space}
    decoders = {n: x.decoder() for n, x in dists.items() if x.decoder()}
    params = full_defense_params(dentry.name, {**dentry.params_dict, **decode(first_point(dists), decoders)})
    key = config_key(params)
    hit = rows[(rows["config_key"] == key) & rows["candidate"]] if not rows.empty else rows
    return hit.sort_values("start_time").iloc[0] if not hit.empty else None


def _entry(row, cfg) -> dict | None:
    if row is None:
        return None
    metrics = {}
    for m in ("asr", "ba", "ra", "der", "asr_before", "ba_before", *(m for m, _ in cfg.search.objectives)):
        if m in row and _num(row[m]) is not None:
            metrics[m] = _num(row[m])
    params = json.loads(row["config_json"]) if row.get("config_json") else {}
    return {"run_id": row["run_id"], "ray_trial_id": row["ray_trial_id"], "config_key": row["config_key"],
            "params": params, "metrics": metrics}


# ============================================================================ tables

def _layout(cfg) -> str:
    names = {d.name for d in cfg.defenses}
    return "dlp" if names & {"dlp", "abl", "anp"} and not names & {"ft", "fp", "mcr", "argd", "nba"} else "nba"


def _pct(v) -> str:
    f = _num(v)
    return "—" if f is None else f"{100 * f:.2f}"


def _cell(asr, ba, order: str) -> str:
    a, b = _pct(asr), _pct(ba)
    if a == "—" and b == "—":
        return "—"
    return f"{a} / {b}" if order == "asr_ba" else f"{b} / {a}"


def _paper_cell(p, order: str) -> str:
    if p is None:
        return "—"
    asr, ba = p
    return f"{asr:.2f} / {ba:.2f}" if order == "asr_ba" else f"{ba:.2f} / {asr:.2f}"


def _no_defense(runs, attack: str) -> tuple[float | None, float | None]:
    rows = runs[(runs["role"] == "attack") & (runs["attack"] == attack) & (runs["ray_trial_id"] == "")]
    if rows.empty:
        return None, None
    r = rows.sort_values("start_time").iloc[-1]
    return r.get("asr"), r.get("ba")


def tables_markdown(cfg, runs, best) -> tuple[str, dict]:
    """The papers' layout, ours beside theirs; returns (markdown, {csv name: DataFrame})."""
    import pandas as pd

    if cfg.kind == "attack":
        return _attack_tables(cfg, runs, best)
    layout = _layout(cfg)
    order = "asr_ba" if layout == "nba" else "ba_asr"
    unit = "ASR / BA" if order == "asr_ba" else "CA / ASR"
    attacks = [a.name for a in cfg.attacks]
    defenses = ["none"] + [d.name for d in cfg.defenses]
    searched = any(d.searched for d in cfg.defenses)
    kinds = [("best", "best config by the selection rule")] if searched else []
    kinds.append(("paper_default", "paper-default config"))
    long_rows = []
    for a in attacks:
        nd_asr, nd_ba = _no_defense(runs, a)
        p = paper_numbers(layout, a, "none")
        long_rows.append({"attack": a, "defense": "none", "config": "-", "asr": _num(nd_asr), "ba": _num(nd_ba),
                          "paper_asr": p[0] if p else None, "paper_ba": p[1] if p else None, "run_id": ""})
        for d in cfg.defenses:
            p = paper_numbers(layout, a, d.name)
            for kind, _ in kinds:
                e = (best["defenses"][d.name]["per_attack"][a] or {}).get(kind)
                m = (e or {}).get("metrics", {})
                long_rows.append({"attack": a, "defense": d.name, "config": kind, "asr": m.get("asr"),
                                  "ba": m.get("ba"), "paper_asr": p[0] if p else None,
                                  "paper_ba": p[1] if p else None, "run_id": (e or {}).get("run_id", "")})
    long = pd.DataFrame(long_rows)
    md = [f"\n## Results in the layout of {PAPER_SETTING[layout].split(':')[0]}\n",
          f"Cells: {unit} in %, ours, then the paper's in brackets ({PAPER_SETTING[layout]}; this sweep: "
          f"{cfg.dataset}, {cfg.model}). \"none\" = the backdoored model before any defense.\n"]
    tables = {"results_long": long}
    for kind, title in kinds:
        def ours(a, dname):
            if dname == "none":
                r = long[(long["attack"] == a) & (long["defense"] == "none")].iloc[0]
            else:
                r = long[(long["attack"] == a) & (long["defense"] == dname) & (long["config"] == kind)].iloc[0]
            return _cell(r["asr"], r["ba"], order)

        def both(a, dname):
            return f"{ours(a, dname)} ({_paper_cell(paper_numbers(layout, a, dname), order)})"

        if layout == "nba":
            header = ["attack"] + [("no defense" if x == "none" else x.upper()) for x in defenses]
            body = [[a] + [both(a, x) for x in defenses] for a in attacks]
        else:
            header = ["defense"] + attacks
            body = [[("no defense" if x == "none" else x.upper())] + [both(a, x) for a in attacks] for x in defenses]
        md.append(f"\n### {title}\n")
        md.append(_md_table(header, body))
        tables[f"table_{kind}"] = pd.DataFrame(body, columns=header)
    md.append(_across_md(cfg, best))
    return "\n".join(md), tables


def _attack_tables(cfg, runs, best) -> tuple[str, dict]:
    import pandas as pd

    rows, md = [], ["\n## Attack sweep: best configurations\n"]
    metrics = [m for m, _ in cfg.search.objectives]
    for a, info in best["attacks"].items():
        e = info["best"]
        if e is None:
            continue
        rows.append({"attack": a, "run_id": e["run_id"], **{m: e["metrics"].get(m) for m in metrics},
                     **{f"param.{k}": v for k, v in e["params"].items()}})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        header = ["attack"] + [f"{m} (%)" for m in metrics] + ["searched parameters"]
        body = []
        for _, r in frame.iterrows():
            searched = {dist.name for dist in cfg.attack(r["attack"]).space}
            params = best["attacks"][r["attack"]]["best"]["params"]
            body.append([r["attack"]] + [_pct(r[m]) for m in metrics]
                        + [", ".join(f"{k}={_short(v)}" for k, v in params.items() if k in searched) or "defaults"])
        md.append(_md_table(header, body))
        md.append("\nPaper (CheatKD Table 2, CIFAR-100, WRN-28-4 → WRN-16-4): student ASR 96.1% at BA 79.4%.\n")
    return "\n".join(md), {"attack_best": frame}


def _across_md(cfg, best) -> str:
    if len(cfg.attacks) < 2:
        return ""
    lines = ["\n## Best configuration across attacks (worst-case ASR)\n"]
    for d, info in best["defenses"].items():
        x = info.get("across_attacks")
        if not x or "config_key" not in x:
            lines.append(f"- **{d}**: {(x or {}).get('note', 'no candidate')}")
            continue
        worst = next(v for k, v in x.items() if k.startswith("worst_case_"))
        searched = {dist.name for dist in cfg.defense(d).space}
        params = ", ".join(f"{k}={_short(v)}" for k, v in x["params"].items() if k in searched) or "paper defaults"
        lines.append(f"- **{d}**: worst-case {cfg.selection.metric} {100 * worst:.2f}% "
                     f"over {len(x['per_attack'])} attacks ({x['n_configs_on_all_attacks']} configs measured on all)"
                     + (f"; note: {x['note']}" if x.get("note") else "") + f"  \n  `{params}`")
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(out) + "\n"


# ============================================================================ plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(cfg, runs, best, out: Path) -> list[Path]:
    """Per defense (or attack sweep): every candidate's objectives, the Pareto front, the paper
    default, the selected best and the undefended model, one panel per attack."""
    plt = _plt()
    (mx, mx_mode), (my, my_mode) = (cfg.search.objectives + (("ba", "max"),))[:2] \
        if len(cfg.search.objectives) >= 2 else (cfg.search.objectives[0], ("ba", "max"))
    groups = [(d.name, "defense") for d in cfg.defenses] if cfg.kind == "defense" else [(None, "attack")]
    files = []
    trials = runs[runs["ray_trial_id"] != ""] if not runs.empty else runs
    for name, _kind in groups:
        attacks = [a.name for a in cfg.attacks]
        fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.8), squeeze=False)
        for ax, a in zip(axes[0], attacks):
            rows = trials[trials["attack"] == a]
            if name is not None:
                rows = rows[rows["defense"] == name]
            cand = _finite_rows(rows, [mx, my])
            if not cand.empty:
                ax.scatter(100 * cand[mx], 100 * cand[my], s=18, c="0.6", label="trials")
                front = pareto_front(rows, ((mx, mx_mode), (my, my_mode)))
                ax.plot(100 * front[mx], 100 * front[my], "-o", c="C0", ms=4, label="Pareto front")
            if name is not None:
                info = best["defenses"][name]["per_attack"][a]
                _mark(ax, info.get("paper_default"), mx, my, "*", "C2", "paper default", 140)
                _mark(ax, info.get("best"), mx, my, "o", "C3", "selected", 70, hollow=True)
                nd_asr, nd_ba = _no_defense(runs, a)
                if _num(nd_asr) is not None and mx == "asr" and my == "ba":
                    ax.scatter([100 * nd_asr], [100 * nd_ba], marker="x", c="k", label="no defense")
            else:
                _mark(ax, best["attacks"][a]["best"], mx, my, "o", "C3", "selected", 70, hollow=True)
            ax.set_xlabel(f"{mx} (%)")
            ax.set_ylabel(f"{my} (%)")
            ax.set_title(f"{a}" + (f" / {name}" if name else ""))
            ax.grid(alpha=0.3)
        files.append(_save_figure(plt, fig, axes, out / f"pareto_{name or 'attack'}.png"))
    return files


def _save_figure(plt, fig, axes, path: Path) -> Path:
    """Legend on the first panel (the others repeat it), write ``path``, free the figure."""
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mark(ax, entry, mx, my, marker, color, label, size, hollow=False):
    if not entry:
        return
    m = entry.get("metrics", {})
    if m.get(mx) is None or m.get(my) is None:
        return
    kw = dict(facecolors="none", edgecolors=color, linewidths=1.5) if hollow else dict(c=color)
    ax.scatter([100 * m[mx]], [100 * m[my]], marker=marker, s=size, label=label, zorder=3, **kw)


def plot_curves(cfg, runs, best, tracker, out: Path) -> list[Path]:
    """Per defense: per-epoch ASR (solid) and BA (dashed) of the paper-default and the selected
    trial of each attack (the per-epoch numbers use the ``epoch_eval_size`` test subset)."""
    if cfg.kind != "defense":
        return []
    plt = _plt()
    files = []
    for d in cfg.defenses:
        attacks = [a.name for a in cfg.attacks]
        fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.4), squeeze=False)
        for ax, a in zip(axes[0], attacks):
            info = best["defenses"][d.name]["per_attack"][a]
            seen = set()
            for kind, color in (("paper_default", "C2"), ("best", "C3")):
                e = info.get(kind)
                if not e or e["run_id"] in seen:
                    continue
                seen.add(e["run_id"])
                for metric, style in (("asr", "-"), ("ba", "--")):
                    hist = tracker.client.get_metric_history(e["run_id"], metric)
                    pts = sorted({h.step: h.value for h in sorted(hist, key=lambda h: h.timestamp)}.items())
                    before = e["metrics"].get(f"{metric}_before")
                    if pts and before is not None:
                        pts = [(0, before)] + pts          # step 0: the backdoored model
                    if pts:
                        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, c=color,
                                label=f"{metric} ({kind.replace('_', ' ')})")
            ax.set_title(f"{a} / {d.name}")
            ax.set_xlabel("epoch (all stages; 0 = before the defense)")
            ax.set_ylabel("%")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        files.append(_save_figure(plt, fig, axes, out / f"curves_{d.name}.png"))
    return files
