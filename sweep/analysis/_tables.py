"""The report's tables: ours in the layout of the preset's paper table (``paper_table``), each
cell with the paper's number beside it, plus the long CSV every table is built from."""
from __future__ import annotations

from typing import Any

from sweep.analysis._best_configs import BestConfigs
from sweep.analysis._selection import number
from sweep.config import PaperTable, load_table

NO_DEFENSE = "none"


def _pct(v) -> str:
    f = number(v)
    return "—" if f is None else f"{100 * f:.2f}"


def _ours(metrics: dict, cell: tuple[str, ...]) -> str:
    shown = [_pct(metrics.get(m)) for m in cell]
    return "—" if all(s == "—" for s in shown) else " / ".join(shown)


def _theirs(paper: dict | None, cell: tuple[str, ...]) -> str:
    if paper is None:
        return "—"
    return " / ".join(f"{paper[m]:.2f}" if m in paper else "—" for m in cell)


def points_diff(ours, theirs) -> float | None:
    """Our fraction minus the paper's percentage, in points (None if either is missing)."""
    ours, theirs = number(ours), number(theirs)
    return None if ours is None or theirs is None else round(100 * ours - theirs, 2)


def _diff(metrics: dict, paper: dict | None, cell: tuple[str, ...]) -> str:
    """Ours minus the paper's, in points, per metric of the cell ("" when nothing to compare)."""
    if not paper:
        return ""
    out = []
    for m in cell:
        ours = number(metrics.get(m))
        out.append("—" if ours is None or m not in paper else f"{100 * ours - paper[m]:+.2f}")
    return "" if all(d == "—" for d in out) else "; " + " / ".join(out)


def no_defense_metrics(runs, attack: str) -> dict:
    """The attack stage's own metrics (the backdoored model before any defense); with several
    stages, their means."""
    rows = runs[(runs["role"] == "attack") & (runs["attack"] == attack) & (runs["ray_trial_id"] == "")]
    if rows.empty:
        return {}
    rows = rows.sort_values("start_time")
    latest = rows.groupby("attack_hash").tail(1) if "attack_hash" in rows else rows.tail(1)   # each stage's
    return {m: latest[m].astype(float).mean() if m in latest else None for m in ("asr", "ba", "ra")}


def _md_table(header: list[str], body: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(out) + "\n"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def config_kinds(cfg) -> list[tuple[str, str]]:
    """The configurations the tables show: the selected one (if anything was searched) and the
    paper default, each with its heading."""
    kinds = [("best", "best config by the selection rule")] if any(d.searched for d in cfg.defenses) else []
    return kinds + [("paper_default", "paper-default config")]


def results_long(cfg, runs, best, kinds: list[tuple[str, str]] | None = None):
    """One row per (attack, defense, config kind): our ASR / BA / RA (fractions), the paper's
    ASR / BA (%) and ours minus the paper's (points); the no-defense row is the attack stage.
    ``kinds``: the config kinds of ``best`` to show (default ``config_kinds(cfg)``)."""
    import pandas as pd

    table = load_table(cfg.paper_table) if cfg.paper_table else None

    def paper(a, d):
        return (table.value(a, d) if table else None) or {}

    rows = []
    for a in (x.name for x in cfg.attacks):
        m = no_defense_metrics(runs, a)
        rows.append({"attack": a, "defense": NO_DEFENSE, "config": "-", "run_id": "",
                     **{k: number(m.get(k)) for k in ("asr", "ba", "ra")}})
        for d in cfg.defenses:
            for kind, _ in kinds or config_kinds(cfg):
                e = best.pair(d.name, a).chosen(kind)
                m = e.metrics if e else {}
                spread = {f"{k}_std": number(m.get(f"{k}_std")) for k in ("asr", "ba", "ra")} \
                    if cfg.search.stages > 1 else {}
                rows.append({"attack": a, "defense": d.name, "config": kind, "run_id": e.run_id if e else "",
                             **{k: number(m.get(k)) for k in ("asr", "ba", "ra")}, **spread})
    long = pd.DataFrame(rows)
    for m in ("asr", "ba"):
        long[f"paper_{m}"] = [paper(a, d).get(m) for a, d in zip(long["attack"], long["defense"])]
        long[f"diff_{m}"] = [points_diff(ours, theirs) for ours, theirs in zip(long[m], long[f"paper_{m}"])]
    return long


def layout_tables(cfg, long, cell_text) -> tuple[list[str], dict]:
    """The paper table's layout (or attacks x defenses without one), one table per config kind;
    ``cell_text(rows of one cell, paper dict, cell metrics)`` writes each cell. Returns the
    markdown parts and {csv name: DataFrame}."""
    import pandas as pd

    table = load_table(cfg.paper_table) if cfg.paper_table else None
    cell = table.cell if table else ("asr", "ba")
    attacks = [a.name for a in cfg.attacks]
    defenses = [NO_DEFENSE] + [d.name for d in cfg.defenses]
    names = ["no defense" if x == NO_DEFENSE else x.upper() for x in defenses]
    md, frames = [], {}
    for kind, heading in config_kinds(cfg):
        def text(a, dname):
            sel = long[(long["attack"] == a) & (long["defense"] == dname)]
            sel = sel if dname == NO_DEFENSE else sel[sel["config"] == kind]
            return cell_text(sel, (table.value(a, dname) if table else None), cell)

        if table is None or table.rows == "attacks":
            header = ["attack"] + names
            body = [[a] + [text(a, x) for x in defenses] for a in attacks]
        else:
            header = ["defense"] + attacks
            body = [[name] + [text(a, x) for a in attacks] for name, x in zip(names, defenses)]
        md += [f"\n### {heading}\n", _md_table(header, body)]
        frames[f"table_{kind}"] = pd.DataFrame(body, columns=header)
    return md, frames


def _one_run_cell(rows, paper: dict | None, cell: tuple[str, ...]) -> str:
    r = rows.iloc[0]
    ours = {"asr": r["asr"], "ba": r["ba"]}
    if "asr_std" in r:          # several stages: mean ± std over them
        text = " / ".join(_mean_std({f"{m}_mean": r.get(m), f"{m}_std": r.get(f"{m}_std")}, m) for m in cell)
    else:
        text = _ours(ours, cell)
    return f"{text} ({_theirs(paper, cell)}{_diff(ours, paper, cell)})"


def _layout_intro(cfg, what: str) -> list[str]:
    table = load_table(cfg.paper_table) if cfg.paper_table else None
    unit = table.unit if table else "ASR / BA"
    return [f"\n## Results in the layout of {table.title if table else 'this sweep'}\n",
            f"Cells: {unit} in %, {what}, then in brackets the paper's and ours minus the paper's in points "
            f"({f'{table.title}: {table.setting}' if table else 'no paper table chosen'}; this sweep: "
            f"{cfg.dataset}, {cfg.model}). \"none\" = the backdoored model before any defense.\n"]


def tables_markdown(cfg, runs, best) -> tuple[str, dict]:
    """The papers' layout, ours beside theirs; returns (markdown, {csv name: DataFrame})."""
    if cfg.kind == "attack":
        return _attack_tables(cfg, best)
    long = results_long(cfg, runs, best)
    md, frames = layout_tables(cfg, long, _one_run_cell)
    what = "ours" if cfg.search.stages == 1 else f"ours as mean ± sample std over the {cfg.search.stages} attack stages"
    md = _layout_intro(cfg, what) + md + [_why_md(best), _across_md(cfg, best)]
    return "\n".join(md), {"results_long": long, **frames}


def _why_md(best: BestConfigs) -> str:
    """Why each selected configuration won, in the rule's own terms."""
    lines = ["\n## Why each configuration was selected\n", f"Rule: {best.rule}.\n"]
    for name, attack, result in best.selections():
        label = attack if best.attacks is not None else f"{name} / {attack}"
        chosen = result.best
        lines.append(f"- **{label}**: " + ((chosen.why or "") if chosen else "no fully trained candidate"))
    return "\n".join(lines) + "\n"


def _attack_tables(cfg, best) -> tuple[str, dict]:
    import pandas as pd

    rows, md = [], ["\n## Attack sweep: best configurations\n"]
    metrics = [m for m, _ in cfg.search.objectives]
    for a, result in best.attacks.items():
        e = result.best
        if e is None:
            continue
        rows.append({"attack": a, "run_id": e.run_id, **{m: e.metrics.get(m) for m in metrics},
                     **{f"param.{k}": v for k, v in e.params.items()}})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        header = ["attack"] + [f"{m} (%)" for m in metrics] + ["searched parameters"]
        body = []
        for _, r in frame.iterrows():
            searched = {dist.name for dist in cfg.attack(r["attack"]).space}
            params = best.attacks[r["attack"]].best.params
            body.append([r["attack"]] + [_pct(r[m]) for m in metrics]
                        + [", ".join(f"{k}={_short(v)}" for k, v in params.items() if k in searched) or "defaults"])
        md.append(_md_table(header, body))
        if cfg.paper_table:
            md.append(_paper_lines(load_table(cfg.paper_table), [a.name for a in cfg.attacks]))
    md.append(_why_md(best))
    return "\n".join(md), {"attack_best": frame}


def _paper_lines(table: PaperTable, attacks: list[str]) -> str:
    names = dict(table.labels)
    parts = []
    for a in attacks:
        p = table.value(a, NO_DEFENSE)
        if p:
            parts.append(f"{a}: " + " at ".join(f"{names.get(m, m)} {p[m]:g}%" for m in table.cell if m in p))
    return f"\nPaper ({table.title}, {table.setting}): " + "; ".join(parts) + ".\n" if parts else ""


def _across_md(cfg, best) -> str:
    if len(cfg.attacks) < 2:
        return ""
    lines = ["\n## Best configuration across attacks (worst-case ASR)\n"]
    for d, info in best.defenses.items():
        x = info.across_attacks
        if not x or x.config_key is None:
            lines.append(f"- **{d}**: {(x.note if x else None) or 'no candidate'}")
            continue
        searched = {dist.name for dist in cfg.defense(d).space}
        params = ", ".join(f"{k}={_short(v)}" for k, v in x.params.items() if k in searched) or "paper defaults"
        lines.append(f"- **{d}**: worst-case {cfg.selection.metric} {100 * x.worst_case:.2f}% "
                     f"over {len(x.per_attack)} attacks ({x.n_configs_on_all_attacks} configs measured on all)"
                     + f"  \n  why: {x.why}  \n  `{params}`")
    return "\n".join(lines) + "\n"


def aggregate_seeds(per_seed):
    """``results_long`` frames of one experiment at several seeds (a ``seed`` column) -> one row per
    (attack, defense, config): ``n`` seeds measured, mean and sample std of ASR / BA / RA
    (fractions), the paper's numbers and the mean minus the paper's (points)."""
    import pandas as pd

    rows = []
    for (a, d, kind), g in per_seed.groupby(["attack", "defense", "config"], sort=False):
        row = {"attack": a, "defense": d, "config": kind, "n": int(g["ba"].notna().sum()),
               "seeds": ",".join(str(s) for s in sorted(g.loc[g["ba"].notna(), "seed"]))}
        for m in ("asr", "ba", "ra"):
            vals = g[m].dropna().astype(float)
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else None
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else None
        for m in ("asr", "ba"):
            row[f"paper_{m}"] = g[f"paper_{m}"].iloc[0]
            row[f"diff_{m}"] = points_diff(row[f"{m}_mean"], row[f"paper_{m}"])
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_std(row, m: str) -> str:
    mean, std = number(row.get(f"{m}_mean")), number(row.get(f"{m}_std"))
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _seeds_cell(rows, paper: dict | None, cell: tuple[str, ...]) -> str:
    r = rows.iloc[0]
    ours = " / ".join(_mean_std(r, m) for m in cell)
    means = {m: r.get(f"{m}_mean") for m in cell}
    return f"{ours} ({_theirs(paper, cell)}{_diff(means, paper, cell)})"


def best_against_default(agg) -> list[dict]:
    """Per searched (attack, defense): the selected config's mean BA / ASR against the paper
    default's, and whether the difference exceeds the seed-to-seed spread (the sum of the two
    sample stds, per metric): ``better`` when one metric gains beyond it and the other does not
    lose beyond it, ``worse`` the reverse, else ``within the spread``."""
    out = []
    for (a, d), g in agg[agg["config"].isin(["best", "paper_default"])].groupby(["attack", "defense"], sort=False):
        if set(g["config"]) != {"best", "paper_default"}:
            continue
        b, p = (g[g["config"] == k].iloc[0] for k in ("best", "paper_default"))
        row = {"attack": a, "defense": d, "n_best": int(b["n"]), "n_default": int(p["n"])}
        verdict = None
        gains = {}
        for m, sign in (("ba", 1), ("asr", -1)):     # higher BA, lower ASR is better
            if number(b[f"{m}_mean"]) is None or number(p[f"{m}_mean"]) is None:
                verdict = "not measured"
                continue
            delta = 100 * (float(b[f"{m}_mean"]) - float(p[f"{m}_mean"]))
            stds = [number(b[f"{m}_std"]), number(p[f"{m}_std"])]
            spread = None if None in stds else 100 * sum(stds)
            row[f"delta_{m}"], row[f"spread_{m}"] = round(delta, 2), None if spread is None else round(spread, 2)
            gains[m] = None if spread is None else int(sign * delta > spread) - int(sign * delta < -spread)
        if verdict is None:
            if None in gains.values():
                verdict = "one seed: no spread to compare against"
            elif max(gains.values()) == 1 and min(gains.values()) >= 0:
                verdict = "better"
            elif min(gains.values()) == -1 and max(gains.values()) <= 0:
                verdict = "worse"
            else:
                verdict = "within the spread"
        row["verdict"] = verdict
        out.append(row)
    return out


def estimate_against_held_out(estimate: BestConfigs, held_out_agg) -> list[dict]:
    """Per searched (attack, defense) and config kind (selected, paper default): what the search
    measured on its own stages (mean and, with several stages, sample std over them) beside the
    mean and sample std over the held-out seeds, ASR and BA in points."""
    out = []
    for d, a, result in estimate.selections():
        for kind in ("best", "paper_default"):
            chosen = result.chosen(kind)
            held = held_out_agg[(held_out_agg["attack"] == a) & (held_out_agg["defense"] == d)
                                & (held_out_agg["config"] == kind)]
            if chosen is None or held.empty:
                continue
            h = held.iloc[0]
            row = {"attack": a, "defense": d, "config": kind, "config_key": chosen.config_key,
                   "stages": int(chosen.metrics.get("stages_done", 1) or 1), "n_held_out": int(h["n"])}
            for m in ("asr", "ba"):
                for label, mean, std in (("search", chosen.metrics.get(m), chosen.metrics.get(f"{m}_std")),
                                         ("held_out", h[f"{m}_mean"], h[f"{m}_std"])):
                    row[f"{label}_{m}"] = None if number(mean) is None else round(100 * number(mean), 2)
                    row[f"{label}_{m}_std"] = None if number(std) is None else round(100 * number(std), 2)
            out.append(row)
    return out


def _estimate_md(rows: list[dict], search_seed: int) -> list[str]:
    def shown(r, label, m):
        mean, std = r[f"{label}_{m}"], r[f"{label}_{m}_std"]
        return "—" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")

    body = [[r["attack"], r["defense"], "selected" if r["config"] == "best" else "paper default",
             f"{shown(r, 'search', 'asr')} ({r['stages']} stage(s))", f"{shown(r, 'held_out', 'asr')} ({r['n_held_out']} seed(s))",
             shown(r, "search", "ba"), shown(r, "held_out", "ba")] for r in rows]
    return ["\n## The search's estimate against the held-out seeds\n",
            f"What the search at seed {search_seed} measured on its own attack stages (mean ± sample std over "
            "them) beside the same configuration re-measured at the seeds it did not see (mean ± sample std over "
            "those seeds), in %: whether the search's estimate held.\n",
            _md_table(["attack", "defense", "config", "ASR: search", "ASR: held out", "BA: search", "BA: held out"],
                      body)]


def seeds_markdown(cfg, per_seed, search_seed: int | None = None,
                   estimate: BestConfigs | None = None) -> tuple[str, dict]:
    """The paper's layout over seeds: mean ± sample std per cell, the paper's numbers and the
    mean minus the paper's; then, where a defense was searched, its selected config against its
    paper default on the seeds other than ``search_seed`` (where the selected config won a
    selection on that very measurement), and the search's own estimate (``estimate``, its
    selection) beside those seeds' measurements. Returns (markdown, {csv name: DataFrame})."""
    import pandas as pd

    agg = aggregate_seeds(per_seed)
    md, frames = layout_tables(cfg, agg, _seeds_cell)
    md = _layout_intro(cfg, "ours as mean ± sample std over the seeds") + md
    if search_seed is not None and any(k == "best" for k, _ in config_kinds(cfg)):
        md.insert(2, f"The selected configuration's cells include seed {search_seed}, where the search chose it "
                     f"on that very measurement; the comparison below leaves that seed out.\n")
    held_out = per_seed if search_seed is None else per_seed[per_seed["seed"] != search_seed]
    compared = best_against_default(aggregate_seeds(held_out)) if not held_out.empty else []
    if compared:
        md.append("\n## The selected configuration against the paper default\n")
        seeds = ", ".join(str(x) for x in sorted(set(held_out["seed"])))
        md.append((f"The search ran at seed {search_seed}; its selected configuration is compared here on the "
                   f"other seeds ({seeds}), where it was re-measured, not selected. " if search_seed is not None
                   else "") +
                  f"Mean over {'those' if search_seed is not None else 'the'} seeds, selected minus default, in points; spread = the two configs' sample "
                  "stds added. \"better\": one metric gains beyond its spread and the other loses no more "
                  "than its spread.\n")
        body = [[c["attack"], c["defense"], f"{c['n_best']} / {c['n_default']}",
                 *(f"{c[f'delta_{m}']:+.2f} (spread {c[f'spread_{m}']:.2f})" if c.get(f"spread_{m}") is not None
                   else (f"{c[f'delta_{m}']:+.2f}" if f"delta_{m}" in c else "—") for m in ("ba", "asr")),
                 c["verdict"]] for c in compared]
        md.append(_md_table(["attack", "defense", "seeds (selected / default)", "Δ BA", "Δ ASR", "verdict"], body))
        frames["best_vs_default"] = pd.DataFrame(compared)
    if estimate is not None and search_seed is not None and not held_out.empty:
        rows = estimate_against_held_out(estimate, aggregate_seeds(held_out))
        if rows:
            md += _estimate_md(rows, search_seed)
            frames["estimate_vs_held_out"] = pd.DataFrame(rows)
    return "\n".join(md), {"seeds_long": per_seed, "seeds_summary": agg, **frames}
