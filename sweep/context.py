"""What every phase of a running sweep shares: its config and plan, its state on disk, the MLflow
tracker, the tags every run carries, and the attack stages as they become available."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sweep.config import SweepConfig
from sweep.plan import Plan
from sweep.state import SweepState
from sweep.tracking import Tracker
from trainables import plugins
from trainables.job import TrialJob


@dataclass
class SweepContext:
    cfg: SweepConfig
    plan: Plan
    state: SweepState
    workdir: Path
    tracker: Tracker
    base_tags: dict
    progress: Callable[[str], None]
    stage_dirs: dict[str, str] = field(default_factory=dict)       # stage hash -> artifact dir
    trained_stages: list[str] = field(default_factory=list)        # hashes this driver trained
    failed_stages: dict[str, str] = field(default_factory=dict)    # attack -> error

    @property
    def parent_run_id(self) -> str:
        return self.state.data["parent_run_id"]

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    def job(self, **what) -> TrialJob:
        """A trial job with this sweep's settings; ``what`` says what its Tuner runs."""
        cfg = self.cfg
        return TrialJob(role="defense" if cfg.kind == "defense" else "attack",
                        trials_dir=str(self.state.dir / "trials"), seed=cfg.seed,
                        clean_fraction=cfg.clean_fraction, data_root=cfg.data_root,
                        epoch_eval_size=cfg.epoch_eval_size, cpus=cfg.resources.cpus,
                        objectives=tuple(m for m, _ in cfg.search.objectives),
                        plugins=plugins.configured(), **what)

    def trial_logger(self, job: TrialJob, pair: str, **tags):
        """The Tune callback that writes this Tuner's trial runs (the driver is the one writer)."""
        from sweep.callbacks import TrialLogger

        return TrialLogger(tracking_uri=self.tracker.uri, experiment=self.tracker.experiment_name,
                           workdir=str(self.workdir), parent_run_id=self.parent_run_id,
                           sweep_id=self.state.sweep_id, base_tags={**self.base_tags, **tags}, job=job,
                           pair=pair)
