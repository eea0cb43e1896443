"""Markdown tables from the run directories ``experiments/cpu_tables.sh`` writes.

    python experiments/collect_tables.py runs/cpu

Prints NBA Table 2's layout (rows: attacked models, columns: no defense and each defense,
cells ASR / BA in %) for every ``<attack run>-<defense>`` directory found, then every attack
run with its BA/ASR/RA, budget and time, then the training-time defenses (DLP, ABL) stage by stage.
A cell is empty when its run has not finished.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

POST_TRAINING = ("ft", "fp", "mcr", "nad", "argd", "nba", "anp")
TRAINING_TIME = ("dlp", "abl")


def load(run: Path) -> dict | None:
    try:
        return {"spec": json.loads((run / "spec.json").read_text()),
                "metrics": json.loads((run / "metrics.json").read_text())}
    except (OSError, json.JSONDecodeError):
        return None


def pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def cell(m: dict | None) -> str:
    return "" if m is None else f"{pct(m['metrics']['asr'])} / {pct(m['metrics']['ba'])}"


def attack_runs(root: Path) -> dict[str, dict]:
    """Run directories of attack stages (no defense), by name."""
    runs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "cache"):
        r = load(d)
        if r is not None and "defense" not in r["spec"]:
            runs[d.name] = r
    return runs


def table2(root: Path, attacks: dict[str, dict]) -> list[str]:
    rows = [n for n in attacks if any((root / f"{n}-{d}").is_dir() for d in POST_TRAINING)]
    out = ["| attacked model | no defense | " + " | ".join(d.upper() for d in POST_TRAINING) + " |",
           "| --- |" + " --- |" * (len(POST_TRAINING) + 1)]
    for n in rows:
        cells = [cell(attacks[n])] + [cell(load(root / f"{n}-{d}")) for d in POST_TRAINING]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    variants = [(n, d, v) for n in rows for d in POST_TRAINING
                for v in sorted(root.glob(f"{n}-{d}-*")) if load(v) is not None]
    if variants:
        out.append("\nVariants (one setting changed from the column's; see the run's spec.json):\n")
    for n, d, v in variants:
        out.append(f"- {v.name}: ASR / BA {cell(load(v))}")
    return out


def attack_table(attacks: dict[str, dict]) -> list[str]:
    out = ["| run | attack | epochs | BA | ASR | RA | extra | minutes |", "| --- |" + " --- |" * 7]
    for n, r in attacks.items():
        s, m = r["spec"], r["metrics"]
        extra = ", ".join(f"{k} {pct(m[k])}" for k in ("student_ba", "student_asr", "student_ra") if k in m)
        minutes = f"{m['seconds'] / 60:.1f}" if m.get("seconds") else ""
        out.append(f"| {n} | {s.get('attack', {}).get('name', '')} | {s.get('train', {}).get('epochs', '')} | "
                   f"{pct(m['ba'])} | {pct(m['asr'])} | {pct(m.get('ra'))} | {extra} | {minutes} |")
    return out


def training_time(root: Path, attacks: dict[str, dict]) -> list[str]:
    out = []
    for n in attacks:
        for d in TRAINING_TIME:
            r = load(root / f"{n}-{d}")
            if r is None:
                continue
            m = r["metrics"]
            out.append(f"\n**{n}-{d}**: after BA {pct(m['ba'])} / ASR {pct(m['asr'])}\n")
            stages: dict[str, list[dict]] = {}
            for h in m.get("history", []):
                stages.setdefault(h.get("stage", "?"), []).append(h)
            for stage, entries in stages.items():   # the filter / isolation entries carry their scores
                h = entries[-1]
                scores = ", ".join(f"{k} {v:.4g}" for k, v in h.items()
                                   if any(w in k for w in ("precision", "recall", "fraction", "filtered", "isolated")))
                test = f"BA {pct(h['ba'])} ASR {pct(h.get('asr'))}" if "ba" in h else ""
                out.append(f"- {stage} (last epoch {h.get('epoch', '-')}): {test} {scores}".rstrip())
                per_epoch = [f"{pct(e['ba'])}/{pct(e.get('asr'))}" for e in entries if "ba" in e]
                if len(per_epoch) > 1:
                    out.append(f"  - BA/ASR per epoch: {', '.join(per_epoch)}")
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu")
    attacks = attack_runs(root)
    for title, lines in (("NBA Table 2 layout (ASR / BA, %)", table2(root, attacks)),
                         ("Attack stages", attack_table(attacks)),
                         ("Training-time defenses", training_time(root, attacks))):
        print(f"## {title}\n")
        print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
