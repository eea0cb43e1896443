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

from typing import TYPE_CHECKING, Any

from sweep.config import ConfigError, SweepConfig, format_config, list_presets, load_preset

__all__ = ["ConfigError", "SweepConfig", "load_preset", "format_config", "list_presets", "dry_run",
           "run_sweep", "make_report", "SweepError"]


from sweep.config import dry_run  # noqa: E402


def run_sweep(cfg: SweepConfig, **kwargs):
    from sweep.runner import run_sweep as _run

    return _run(cfg, **kwargs)


def make_report(sweep_id_or_preset: str, **kwargs):
    from sweep.report import make_report as _report

    return _report(sweep_id_or_preset, **kwargs)


def __getattr__(name: str):
    if name == "SweepError":
        from sweep.runner import SweepError

        return SweepError
    raise AttributeError(name)


if TYPE_CHECKING:
    from sweep.runner import SweepError  # noqa: F401
