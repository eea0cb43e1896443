"""Sweep orchestration: presets -> validated config -> cached attack stages (Ray tasks) -> defense
trials (Ray Tune + Optuna) -> MLflow runs -> best configurations and a report.

The CLI (``python -m sweep``) calls:

* ``load_preset(name_or_path, overrides) -> SweepConfig`` (raises ``ConfigError``),
  ``format_config(cfg)`` (``--print-config``), ``dry_run(cfg, workdir=None)`` (``--dry-run``);
* ``run_sweep(cfg, workdir=, tracking_uri=, address=, resume=, experiment=) -> SweepResult``;
* ``make_report(sweep_id_or_preset, workdir=, tracking_uri=, experiment=) -> Report``.

The layers, each a sub-package with a public ``__init__``: ``config`` <- ``planning`` <- ``execution``
(the one that imports Ray); ``config`` <- ``tracking`` <- ``analysis``; ``bench`` beside them, for
the CLI alone. ``docs/architecture.md`` follows one trial from the CLI to its MLflow run.
Importing this package does not import Ray, MLflow or torch; they load when a sweep starts.
"""
from __future__ import annotations

from sweep.config import SweepConfig, format_config, list_presets, load_preset
from sweep.errors import ConfigError, SweepError


def dry_run(cfg: SweepConfig, workdir=None, address=None) -> str:
    """The plan, its cost and how it packs onto this machine or the cluster at ``address``."""
    from sweep.planning import dry_run as _dry_run
    from sweep.planning import packing_section

    cluster = None
    if address:                     # the cluster's resources: Ray, joined and left
        from sweep.execution import cluster_resources

        cluster = cluster_resources(address)
    return _dry_run(cfg, workdir) + packing_section(cfg, address, cluster)


def run_sweep(cfg: SweepConfig, **kwargs):
    from sweep.execution import run_sweep as _run_sweep

    return _run_sweep(cfg, **kwargs)


def make_report(sweep_id_or_preset: str, **kwargs):
    from sweep.analysis import make_report as _make_report

    return _make_report(sweep_id_or_preset, **kwargs)


__all__ = ["ConfigError", "SweepConfig", "SweepError", "load_preset", "format_config", "list_presets",
           "dry_run", "run_sweep", "make_report"]
