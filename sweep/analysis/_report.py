"""A sweep's report, written at the end of a sweep by the CLI and on demand by ``python -m sweep
report``: the runs read back from MLflow -> ``best_configs.yaml`` (with MLflow run ids),
Markdown + CSV tables in the layout of the preset's paper table with the paper's numbers beside
ours, Pareto and learning-curve plots; all in ``sweeps/<id>/report/`` and logged to the sweep's
parent run. It reads the Model Registry (which aliases point at the sweep's models) and never
writes it: the sweep itself registers its selection when it ends."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sweep.analysis._best_configs import BestConfigs
from sweep.analysis._plots import plot_curves, plot_pareto
from sweep.analysis._selection import build_best_configs, describe_rule, remeasured, report_metrics
from sweep.analysis._tables import config_kinds, results_long, seeds_markdown, tables_markdown
from sweep.errors import SweepError
from sweep.tracking import SweepState, Tracker, load_runs, registered_aliases, resolve_tracking_uri


@dataclass
class Report:
    sweep_id: str
    dir: Path
    best_configs: BestConfigs
    files: list[Path] = field(default_factory=list)
    markdown: str = ""
    shown_metrics: tuple[str, ...] = ("asr", "ba")     # the metrics the summary prints

    @property
    def best_configs_file(self) -> Path:
        return self.dir / "best_configs.yaml"

    def __str__(self) -> str:
        lines = [f"sweep {self.sweep_id}: report {self.dir / 'report.md'}", f"best configs: {self.best_configs_file}"]
        for name, attack, result in self.best_configs.selections():
            best = result.best
            if best:
                shown = " ".join(f"{k}={100 * v:.2f}%" for k, v in best.metrics.items() if k in self.shown_metrics)
                lines.append(f"  {name} / {attack}: {shown} (run {best.run_id})")
        return "\n".join(lines)


def layout_section(markdown: str) -> str:
    """The part of a report that holds the tables in the paper's layout (and, over seeds, the
    selected-against-default comparison and the search's estimate beside the held-out seeds):
    what ``python -m sweep report`` prints."""
    lines, keep = [], False
    for line in markdown.splitlines():
        if line.startswith("## "):
            keep = line.startswith(("## Results in the layout", "## The selected configuration",
                                    "## The search's estimate"))
        if keep:
            lines.append(line)
    return "\n".join(lines).strip()


def stage_budgets(cfg) -> str:
    """Each attack's stage budget in epochs, grouped: "badnets 12 epochs; blend and sig 4 epochs"."""
    groups: dict[object, list[str]] = {}
    for a in cfg.attacks:
        groups.setdefault(a.train_dict.get("epochs", "default"), []).append(a.name)
    return "; ".join(f"{_listed(names)} {epochs} epochs" for epochs, names in groups.items())


def poisoned_counts(runs) -> str:
    """How many training images each attack stage poisoned, from the stages' runs: "badnets 5000;
    sig 412" (empty when no stage run holds the count)."""
    if runs.empty or "n_poisoned" not in runs:
        return ""
    stages = runs[(runs["role"] == "attack") & (runs["ray_trial_id"] == "") & runs["n_poisoned"].notna()]
    counts = {f"{row.attack} ({row.attack_hash[:8]})" if (stages["attack"] == row.attack).sum() > 1 else row.attack:
              int(row.n_poisoned) for row in stages.itertuples() if row.attack != "none"}
    return "; ".join(f"{name} {n}" for name, n in counts.items())


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _setting(cfg) -> str:
    return (f"preset `{cfg.name}`" + (f" (profile `{cfg.profile}`)" if cfg.profile else "")
            + f" · dataset `{cfg.dataset}` · model `{cfg.model}`  \nattack stages: {stage_budgets(cfg)} · "
            f"defenses' clean data: {100 * cfg.clean_fraction:g}% of the training set")


def open_sweep(state: SweepState, workdir: Path, tracking_uri: str | None, experiment: str | None):
    """(tracker, config, runs) of a sweep."""
    uri = tracking_uri or state.data.get("tracking_uri") or resolve_tracking_uri(workdir)
    tracker = Tracker(uri, experiment or state.data.get("experiment") or state.data["preset"], workdir)
    return tracker, state.config(), load_runs(tracker, state.sweep_id)


def make_report(sweep_id_or_preset: str, workdir: str | Path = "sweep-runs", tracking_uri: str | None = None,
                experiment: str | None = None, progress: Callable[[str], None] = print) -> Report:
    """Select the best configs and write the report of a sweep (a sweep id, or a preset's newest)."""
    workdir = Path(workdir).expanduser().resolve()
    state = SweepState.named(sweep_id_or_preset, workdir)
    tracker, cfg, runs = open_sweep(state, workdir, tracking_uri, experiment)
    out = state.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    best = build_best_configs(cfg, state.sweep_id, runs)
    if cfg.kind == "defense":
        best = best.with_registered(registered_aliases(tracker, cfg, state.sweep_id))
    files = [best.dump(out / "best_configs.yaml")]
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
    poisoned = poisoned_counts(runs)
    if poisoned:
        header += [f"Poisoned training images per attack stage: {poisoned}.", ""]
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
    """One experiment over seeds (``SweepState.seed_siblings``: the reference and its repeats at
    other seeds), each cell as mean ± sample std. A searched defense's selected configuration is
    the one the searching sweep chose, re-measured at the other seeds (``replicate``), and it is
    compared with the paper default on those other seeds alone: on its own seed it won a
    selection, which flatters it. Written to the reference's ``report/seeds.md`` (+ CSVs);
    returns that path."""
    import pandas as pd

    workdir = Path(workdir).expanduser().resolve()
    ref, states = SweepState.seed_siblings(sweep_id_or_preset, workdir)
    opened = [(state, *open_sweep(state, workdir, tracking_uri, None)[1:]) for state in states]
    if any(cfg.kind == "attack" for _, cfg, _ in opened):
        raise SweepError(f"{ref.sweep_id}: a report over seeds covers defense sweeps")
    ref_cfg = next(cfg for st, cfg, _ in opened if st.sweep_id == ref.sweep_id)
    # whose selection the others re-measure: the reference if it searched, else the first that did
    searching = sorted((o for o in opened if o[1].searches), key=lambda o: o[0].sweep_id != ref.sweep_id)
    searcher, selected, search_seed = None, None, None
    if searching:
        searcher, cfg, runs = searching[0]
        selected, search_seed = build_best_configs(cfg, searcher.sweep_id, runs), cfg.seed
    kinds = config_kinds(ref_cfg)
    frames, lines, seeds = [], [], []
    for state, cfg, runs in opened:
        best = build_best_configs(cfg, state.sweep_id, runs)
        if state is not searcher and selected is not None:
            best = remeasured(cfg, runs, best, selected)
        frames.append(results_long(cfg, runs, best, kinds).assign(seed=cfg.seed, sweep_id=state.sweep_id))
        role = (" (the search)" if state is searcher else " (re-measures the search's selection)"
                if selected is not None and any(d.also_try for d in cfg.defenses) else "")
        lines.append(f"- seed {cfg.seed}: sweep `{state.sweep_id}` ({state.data.get('status')}; "
                     f"{_listed([a.name for a in cfg.attacks])}){role}")
        seeds.append(str(cfg.seed))
        progress(f"seed {cfg.seed}: {state.sweep_id} ({state.data.get('status')})")
    md, tables = seeds_markdown(ref_cfg, pd.concat(frames, ignore_index=True), search_seed, selected)
    out = ref.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    header = [f"# {ref_cfg.name} over seeds {', '.join(seeds)}", "", _setting(ref_cfg), "",
              f"Selection rule: {describe_rule(ref_cfg.selection)}.", "", "Sweeps:", *lines, ""]
    path = out / "seeds.md"
    path.write_text("\n".join(header) + md)
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    progress(f"report over {len(states)} seed(s): {path}")
    return path
