"""What every Tuner of a running sweep shares: its config and plan, its state on disk, the MLflow
tracker, the tags every run carries, the storage its nodes share, and the attack stages as they
become available."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sweep.config import SweepConfig
from sweep.planning import Plan
from sweep.tracking import SweepState, Tracker
from trainables import plugins
from trainables.artifacts import ArtifactCache
from trainables.storage import Storage
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
    storage: Storage | None = None          # what the nodes share; None: the work directory
    optuna_storage: str | None = None       # an RDB URL for the Optuna studies; None: the journal
    trial_slots: int = 1                    # trials the cluster holds at once (set once Ray is up)

    @property
    def parent_run_id(self) -> str:
        return self.state.data["parent_run_id"]

    @property
    def cache_dir(self) -> Path:
        """The driver's attack-stage cache (with a storage: its local copy of the stored one)."""
        return self.workdir / "cache"

    def cache(self) -> ArtifactCache:
        return ArtifactCache(self.cache_dir, remote=self.storage)

    @property
    def checkpoint_dir(self) -> str:
        """Where trials keep their training checkpoints: a folder of the storage, or of the sweep."""
        if self.storage is not None:
            return f"sweeps/{self.state.sweep_id}/.checkpoints"
        return str(self.state.dir / ".checkpoints")

    def drop_checkpoints(self) -> None:
        """Trials that failed for good leave their checkpoints: gone once the sweep has ended
        (a Tuner run again after a failure starts new trials)."""
        import shutil

        if self.storage is not None:
            self.storage.delete(self.checkpoint_dir)
        else:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def tune_storage(self) -> tuple[str, object]:
        """(storage_path, storage_filesystem) of Tuner ``key``'s Ray Tune experiment: the sweep's
        folder, or its place in the storage (where a new driver on another node finds it)."""
        if self.storage is None:
            return str(self.state.dir / "ray"), None
        return self.storage.tune_storage(f"sweeps/{self.state.sweep_id}/ray")

    def tune_experiment(self, key: str) -> tuple[str, object]:
        """(path, filesystem) of Tuner ``key``'s experiment folder, for ``Tuner.can_restore``."""
        path, fs = self.tune_storage()
        return f"{path}/{key}", fs

    def job(self, **what) -> TrialJob:
        """A trial job with this sweep's settings; ``what`` says what its Tuner runs."""
        cfg = self.cfg
        return TrialJob(role="defense" if cfg.kind == "defense" else "attack",
                        trials_dir=str(self.state.dir / "trials"), cache_dir=str(self.cache_dir),
                        storage_uri=self.storage.uri if self.storage else None,
                        storage_endpoint=self.storage.endpoint if self.storage else None,
                        checkpoint_dir=self.checkpoint_dir, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
                        clean_fraction=cfg.clean_fraction, data_root=cfg.data_root,
                        epoch_eval_size=cfg.epoch_eval_size, cpus=cfg.resources.cpus,
                        objectives=tuple(m for m, _ in cfg.search.objectives),
                        plugins=plugins.configured(), **what)

    def trial_logger(self, job: TrialJob, pair: str, **tags):
        """The Tune callback that writes this Tuner's trial runs (the driver is the one writer)."""
        from sweep.execution._callbacks import TrialLogger

        return TrialLogger(tracking_uri=self.tracker.uri, experiment=self.tracker.experiment_name,
                           workdir=str(self.workdir), parent_run_id=self.parent_run_id,
                           sweep_id=self.state.sweep_id, base_tags={**self.base_tags, **tags}, job=job,
                           pair=pair)
