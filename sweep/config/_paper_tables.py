"""The papers' published tables as data (one YAML file each), chosen by a preset's
``paper_table`` field; the report lays out its tables like the chosen one and shows the paper's
number beside each of ours.

A table file holds ``title``, ``setting`` (the paper's dataset/models), ``kind`` (the sweep kind
it compares with: defense or attack), ``rows`` (``attacks`` or ``defenses``), ``cell`` (the
metrics of one cell, in order), ``labels`` (their names in the paper) and ``values``: attack ->
defense (``none`` = no defense) -> metric -> value in %.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

DIR = Path(__file__).parents[1] / "paper_tables"


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    setting: str
    kind: str
    rows: str                                  # "attacks" | "defenses"
    cell: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    values: tuple[tuple[str, tuple[tuple[str, tuple[tuple[str, float], ...]], ...]], ...]

    def value(self, attack: str, defense: str) -> dict[str, float] | None:
        """The paper's metrics (in %) of ``defense`` against ``attack``, or None."""
        per_defense = dict(self.values).get(attack)
        cells = dict(per_defense or ()).get(defense)
        return dict(cells) if cells is not None else None

    @property
    def unit(self) -> str:
        """The cell's heading, e.g. ``ASR / BA``."""
        names = dict(self.labels)
        return " / ".join(names.get(m, m) for m in self.cell)


def known_tables() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def load_table(name: str) -> PaperTable:
    raw = yaml.safe_load((DIR / f"{name}.yaml").read_text())
    values = tuple((a, tuple((d, tuple(sorted(m.items()))) for d, m in per.items()))
                   for a, per in raw["values"].items())
    return PaperTable(name=name, title=raw["title"], setting=raw["setting"], kind=raw["kind"],
                      rows=raw["rows"], cell=tuple(raw["cell"]), labels=tuple(raw["labels"].items()),
                      values=values)
