"""Sweep orchestration: presets -> validated config -> cached attack stages (Ray tasks) -> defense
trials (Ray Tune + Optuna) -> MLflow runs -> best configurations and a report.

The CLI (``python -m sweep``) calls:

* ``load_preset(name_or_path, overrides) -> SweepConfig`` (raises ``ConfigError``),
  ``format_config(cfg)`` (``--print-config``), ``dry_run(cfg, workdir=None)`` (``--dry-run``);
* ``run_sweep(cfg, workdir=, tracking_uri=, address=, resume=, experiment=) -> SweepResult``;
* ``make_report(sweep_id_or_preset, workdir=, tracking_uri=, experiment=) -> Report``.

Importing this package does not import Ray, MLflow or torch; they load when a sweep starts.
"""
from __future__ import annotations

from sweep.config import ConfigError, SweepConfig, dry_run, format_config, list_presets, load_preset
from sweep.report import make_report
from sweep.runner import SweepError, SweepResult, run_sweep

__all__ = ["ConfigError", "SweepConfig", "SweepError", "SweepResult", "load_preset", "format_config",
           "list_presets", "dry_run", "run_sweep", "make_report"]
