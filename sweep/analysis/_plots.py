"""The report's plots: Pareto fronts per (defense, attack) and per-epoch learning curves."""
from __future__ import annotations

from pathlib import Path

from sweep.analysis._selection import finite_rows, number, pareto_front
from sweep.analysis._tables import no_defense_metrics


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
            cand = finite_rows(rows, [mx, my])
            if not cand.empty:
                ax.scatter(100 * cand[mx], 100 * cand[my], s=18, c="0.6", label="trials")
                front = pareto_front(rows, ((mx, mx_mode), (my, my_mode)))
                ax.plot(100 * front[mx], 100 * front[my], "-o", c="C0", ms=4, label="Pareto front")
            if name is not None:
                result = best.pair(name, a)
                _mark(ax, result.paper_default, mx, my, "*", "C2", "paper default", 140)
                _mark(ax, result.best, mx, my, "o", "C3", "selected", 70, hollow=True)
                nd = no_defense_metrics(runs, a)
                if number(nd.get("asr")) is not None and mx == "asr" and my == "ba":
                    ax.scatter([100 * nd["asr"]], [100 * nd["ba"]], marker="x", c="k", label="no defense")
            else:
                _mark(ax, best.attacks[a].best, mx, my, "o", "C3", "selected", 70, hollow=True)
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
    m = entry.metrics
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
            result = best.pair(d.name, a)
            seen = set()
            for kind, color in (("paper_default", "C2"), ("best", "C3")):
                e = result.chosen(kind)
                if not e or e.run_id in seen:
                    continue
                seen.add(e.run_id)
                for metric, style in (("asr", "-"), ("ba", "--")):
                    hist = tracker.client.get_metric_history(e.run_id, metric)
                    pts = sorted({h.step: h.value for h in sorted(hist, key=lambda h: h.timestamp)}.items())
                    before = e.metrics.get(f"{metric}_before")
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
