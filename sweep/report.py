"""A sweep's report, written at the end of a sweep by the CLI and on demand by ``python -m sweep
report``: the runs read back from MLflow -> ``best_configs.yaml`` (with MLflow run ids),
Markdown + CSV tables in the layout of the preset's paper table with the paper's numbers beside
ours, Pareto and learning-curve plots; all in ``sweeps/<id>/report/`` and logged to the sweep's
parent run. The selected defended models go to the MLflow Model Registry (``model_registry``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from sweep.model_registry import register_best
from sweep.plots import plot_curves, plot_pareto
from sweep.selection import build_best_configs, describe_rule, load_runs, report_metrics
from sweep.state import SweepState
from sweep.errors import SweepError
from sweep.tables import results_long, seeds_markdown, tables_markdown
from sweep.tracking import Tracker, resolve_tracking_uri


@dataclass
class Report:
    sweep_id: str
    dir: Path
    best_configs: dict
    files: list[Path] = field(default_factory=list)
    markdown: str = ""
    shown_metrics: tuple[str, ...] = ("asr", "ba")     # the metrics the summary prints

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
                        shown = " ".join(f"{k}={100 * v:.2f}%" for k, v in best["metrics"].items()
                                         if k in self.shown_metrics)
                        lines.append(f"  {name} / {attack}: {shown} (run {best['run_id']})")
        return "\n".join(lines)


def layout_section(markdown: str) -> str:
    """The part of a report that holds the tables in the paper's layout (and, over seeds, the
    selected-against-default comparison): what ``python -m sweep report`` prints."""
    lines, keep = [], False
    for line in markdown.splitlines():
        if line.startswith("## "):
            keep = line.startswith(("## Results in the layout", "## The selected configuration"))
        if keep:
            lines.append(line)
    return "\n".join(lines).strip()


def stage_budgets(cfg) -> str:
    """Each attack's stage budget in epochs, grouped: "badnets 12 epochs; blend and sig 4 epochs"."""
    groups: dict[object, list[str]] = {}
    for a in cfg.attacks:
        groups.setdefault(a.train_dict.get("epochs", "default"), []).append(a.name)
    return "; ".join(f"{_listed(names)} {epochs} epochs" for epochs, names in groups.items())


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _setting(cfg) -> str:
    return (f"preset `{cfg.name}`" + (f" (profile `{cfg.profile}`)" if cfg.profile else "")
            + f" · dataset `{cfg.dataset}` · model `{cfg.model}`  \nattack stages: {stage_budgets(cfg)} · "
            f"defenses' clean data: {100 * cfg.clean_fraction:g}% of the training set")


def _open(state: SweepState, workdir: Path, tracking_uri: str | None, experiment: str | None):
    """(tracker, config, runs) of a sweep."""
    uri = tracking_uri or state.data.get("tracking_uri") or resolve_tracking_uri(workdir)
    tracker = Tracker(uri, experiment or state.data.get("experiment") or state.data["preset"], workdir)
    return tracker, state.config(), load_runs(tracker, state.sweep_id)


def make_report(sweep_id_or_preset: str, workdir: str | Path = "sweep-runs", tracking_uri: str | None = None,
                experiment: str | None = None, progress: Callable[[str], None] = print) -> Report:
    """Select the best configs and write the report of a sweep (a sweep id, or a preset's newest)."""
    workdir = Path(workdir).expanduser().resolve()
    state = SweepState.named(sweep_id_or_preset, workdir)
    tracker, cfg, runs = _open(state, workdir, tracking_uri, experiment)
    out = state.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    best = build_best_configs(cfg, state.sweep_id, runs)
    if cfg.kind == "defense":
        best["registered_models"] = register_best(tracker, cfg, state.sweep_id, best, progress)
    files = [out / "best_configs.yaml"]
    (out / "best_configs.yaml").write_text(yaml.safe_dump(best, sort_keys=False, width=110))
    md, tables = tables_markdown(cfg, runs, best)
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
        files.append(out / f"{name}.csv")
    files += plot_pareto(cfg, runs, best, out)
    files += plot_curves(cfg, runs, best, tracker, out)
    header = [f"# Sweep {state.sweep_id}", "",
              f"{_setting(cfg)} · seed {cfg.seed} · "
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
    shown = tuple(dict.fromkeys([m for m, _ in cfg.search.objectives] + list(report_metrics(cfg))))
    return Report(state.sweep_id, out, best, files, markdown, shown)


def make_seeds_report(sweep_id_or_preset: str, workdir: str | Path = "sweep-runs", tracking_uri: str | None = None,
                      progress: Callable[[str], None] = print) -> Path:
    """One experiment over seeds: the sweep named (or the preset's newest) and its repeats at
    other seeds (``SweepState.seed_siblings``), each cell as mean ± sample std. Written to the
    named sweep's ``report/seeds.md`` (+ CSVs); returns that path."""
    import pandas as pd

    workdir = Path(workdir).expanduser().resolve()
    states = SweepState.seed_siblings(sweep_id_or_preset, workdir)
    ref = SweepState.named(sweep_id_or_preset, workdir)
    frames, lines, seeds = [], [], []
    for state in states:
        _, cfg, runs = _open(state, workdir, tracking_uri, None)
        seeds.append(str(cfg.seed))
        if cfg.kind == "attack":
            raise SweepError(f"{state.sweep_id}: a report over seeds covers defense sweeps")
        long = results_long(cfg, runs, build_best_configs(cfg, state.sweep_id, runs))
        frames.append(long.assign(seed=cfg.seed, sweep_id=state.sweep_id))
        lines.append(f"- seed {cfg.seed}: sweep `{state.sweep_id}` ({state.data.get('status')})")
        progress(f"seed {cfg.seed}: {state.sweep_id} ({state.data.get('status')})")
    cfg = ref.config()
    md, tables = seeds_markdown(cfg, pd.concat(frames, ignore_index=True))
    out = ref.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    header = [f"# {cfg.name} over seeds {', '.join(seeds)}", "", _setting(cfg), "",
              f"Selection rule: {describe_rule(cfg.selection)}.", "", "Sweeps:", *lines, ""]
    path = out / "seeds.md"
    path.write_text("\n".join(header) + md)
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    progress(f"report over {len(states)} seed(s): {path}")
    return path
