"""The report's tables: ours in the layout of the preset's paper table (``paper_table``), each
cell with the paper's number beside it, plus the long CSV every table is built from."""
from __future__ import annotations

from typing import Any

from sweep.paper_tables import PaperTable, load_table
from sweep.selection import number

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
    """The attack stage's own metrics (the backdoored model before any defense)."""
    rows = runs[(runs["role"] == "attack") & (runs["attack"] == attack) & (runs["ray_trial_id"] == "")]
    if rows.empty:
        return {}
    r = rows.sort_values("start_time").iloc[-1]
    return {m: r.get(m) for m in ("asr", "ba", "ra")}


def _md_table(header: list[str], body: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(out) + "\n"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def tables_markdown(cfg, runs, best) -> tuple[str, dict]:
    """The papers' layout, ours beside theirs; returns (markdown, {csv name: DataFrame})."""
    if cfg.kind == "attack":
        return _attack_tables(cfg, best)
    import pandas as pd

    table = load_table(cfg.paper_table) if cfg.paper_table else None
    cell = table.cell if table else ("asr", "ba")
    unit = table.unit if table else "ASR / BA"
    attacks = [a.name for a in cfg.attacks]
    defenses = [NO_DEFENSE] + [d.name for d in cfg.defenses]
    kinds = [("best", "best config by the selection rule")] if any(d.searched for d in cfg.defenses) else []
    kinds.append(("paper_default", "paper-default config"))

    def paper(a, d):
        return table.value(a, d) if table else None

    long_rows = []
    for a in attacks:
        p = paper(a, NO_DEFENSE) or {}
        m = no_defense_metrics(runs, a)
        long_rows.append({"attack": a, "defense": NO_DEFENSE, "config": "-", "asr": number(m.get("asr")),
                          "ba": number(m.get("ba")), "ra": number(m.get("ra")), "paper_asr": p.get("asr"),
                          "paper_ba": p.get("ba"), "run_id": ""})
        for d in cfg.defenses:
            p = paper(a, d.name) or {}
            for kind, _ in kinds:
                e = (best["defenses"][d.name]["per_attack"][a] or {}).get(kind) or {}
                m = e.get("metrics", {})
                long_rows.append({"attack": a, "defense": d.name, "config": kind, "asr": m.get("asr"),
                                  "ba": m.get("ba"), "ra": m.get("ra"), "paper_asr": p.get("asr"),
                                  "paper_ba": p.get("ba"), "run_id": e.get("run_id", "")})
    long = pd.DataFrame(long_rows)
    for m in ("asr", "ba"):        # ours minus the paper's, in points
        long[f"diff_{m}"] = [None if ours is None or theirs is None or theirs != theirs else round(100 * ours - theirs, 2)
                             for ours, theirs in zip(long[m].map(number), long[f"paper_{m}"])]
    title = table.title if table else "this sweep"
    md = [f"\n## Results in the layout of {title}\n",
          f"Cells: {unit} in %, ours, then in brackets the paper's and ours minus the paper's in points "
          f"({f'{table.title}: {table.setting}' if table else 'no paper table chosen'}; this sweep: "
          f"{cfg.dataset}, {cfg.model}). \"none\" = the backdoored model before any defense.\n"]
    tables = {"results_long": long}
    for kind, heading in kinds:
        def both(a, dname):
            sel = long[(long["attack"] == a) & (long["defense"] == dname)]
            r = sel.iloc[0] if dname == NO_DEFENSE else sel[sel["config"] == kind].iloc[0]
            ours = {'asr': r['asr'], 'ba': r['ba']}
            return f"{_ours(ours, cell)} ({_theirs(paper(a, dname), cell)}{_diff(ours, paper(a, dname), cell)})"

        names = ["no defense" if x == NO_DEFENSE else x.upper() for x in defenses]
        if table is None or table.rows == "attacks":
            header = ["attack"] + names
            body = [[a] + [both(a, x) for x in defenses] for a in attacks]
        else:
            header = ["defense"] + attacks
            body = [[name] + [both(a, x) for a in attacks] for name, x in zip(names, defenses)]
        md.append(f"\n### {heading}\n")
        md.append(_md_table(header, body))
        tables[f"table_{kind}"] = pd.DataFrame(body, columns=header)
    md.append(_why_md(best, "defenses"))
    md.append(_across_md(cfg, best))
    return "\n".join(md), tables


def _why_md(best: dict, section: str) -> str:
    """Why each selected configuration won, in the rule's own terms."""
    lines = ["\n## Why each configuration was selected\n", f"Rule: {best['rule']}.\n"]
    for name, info in (best.get(section) or {}).items():
        per = info.get("per_attack") or {name: info}
        for attack, entry in per.items():
            chosen = (entry or {}).get("best")
            label = f"{name} / {attack}" if section == "defenses" else attack
            lines.append(f"- **{label}**: " + (chosen.get("why", "") if chosen else "no fully trained candidate"))
    return "\n".join(lines) + "\n"


def _attack_tables(cfg, best) -> tuple[str, dict]:
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
        if cfg.paper_table:
            md.append(_paper_lines(load_table(cfg.paper_table), [a.name for a in cfg.attacks]))
    md.append(_why_md(best, "attacks"))
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
                     + f"  \n  why: {x['why']}  \n  `{params}`")
    return "\n".join(lines) + "\n"
