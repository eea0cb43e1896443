"""``python -m sweep replicate``: the sweep that re-measures a searched sweep's selected
configurations and the paper defaults at another seed; ``report --seeds`` then compares them on
the seeds where they were re-measured, not selected."""
from __future__ import annotations

import json
from pathlib import Path

from sweep.analysis._report import open_sweep
from sweep.analysis._selection import build_best_configs
from sweep.config import config_with
from sweep.errors import SweepError
from sweep.tracking import SweepState


def replication_config(sweep_id_or_preset: str, seed: int, workdir: str | Path = "sweep-runs",
                       tracking_uri: str | None = None):
    """The sweep that re-measures a searched sweep's choices at another ``seed``: its config at
    that seed, each searched defense trying the paper default and the configurations the sweep
    selected (per attack) and nothing else, no cross-checks, one attack stage per attack (a
    search over several stages is re-measured on one new stage per held-out seed; the seed
    must not be one the search trained a stage at). Returns (config, the --set overrides
    applied, one line per defense saying what it tries)."""
    workdir = Path(workdir).expanduser().resolve()
    ref, _ = SweepState.seed_siblings(sweep_id_or_preset, workdir)
    _, cfg, runs = open_sweep(ref, workdir, tracking_uri, None)
    if cfg.kind != "defense" or not cfg.searches:
        raise SweepError(f"{ref.sweep_id}: replicate re-measures the configurations a defense search "
                         f"selected, and this sweep searched nothing")
    if seed == cfg.seed:
        raise SweepError(f"{ref.sweep_id} ran at seed {seed}: replicate it at another seed")
    best = build_best_configs(cfg, ref.sweep_id, runs)
    if seed in cfg.stage_seeds:
        raise SweepError(f"{ref.sweep_id} trained an attack stage at seed {seed}: replicate it at a seed it "
                         f"did not see (its stages' seeds: {', '.join(map(str, cfg.stage_seeds))})")
    sets, said = [f"seed={seed}", "search.cross_check=false"], []
    if cfg.search.stages > 1:
        sets.append("search.stages=1")      # each held-out seed: one new attack stage per attack
    for d in cfg.defenses:
        if not d.searched:
            continue
        names = [x.name for x in d.space if not x.pinned]
        default = {n: v for n, v in d.first_trial().items() if n in names}
        points = []
        for a, result in best.defenses[d.name].per_attack.items():
            chosen = result.best
            if chosen is None:
                raise SweepError(f"{ref.sweep_id}: {a} x {d.name} has no selected configuration "
                                 f"(no trial finished); resume that sweep first")
            point = {n: chosen.params[n] for n in names}
            if point != default and point not in points:
                points.append(point)
        sets += [f"defenses.{d.name}.also_try={json.dumps(points)}", f"defenses.{d.name}.num_samples={1 + len(points)}"]
        said.append(f"{d.name}: the paper default and {len(points)} selected configuration(s) on every attack")
    return config_with(cfg, sets), sets, said
