"""Optuna inside Ray Tune: the searcher of every searched (attack, defense) pair.

Each pair gets its own named study (``<sweep_id>:<attack>:<defense>``) in the work directory's
journal file (or an RDB, ``--optuna-storage``), both objectives, and the paper default as its first trial. Ray's ``OptunaSearch``
tells Optuna that a trial a Tune scheduler stopped early COMPLETED, with its partial metrics: an
undertrained model (low ASR, low BA) then looks Pareto-optimal and steers the sampler.
``FullyTrainedOptunaSearch`` tells such trials PRUNED instead; only trials whose last report says
``fully_trained`` reach the study as COMPLETE.
"""
from __future__ import annotations

from pathlib import Path

from ray.tune.search.optuna import OptunaSearch

from sweep.config import SweepConfig, optuna_point, optuna_space
from sweep.execution import _compat as compat
from sweep.planning import PairPlan


class FullyTrainedOptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and not error and not result.get("fully_trained") and compat.tell_optuna_pruned(self, trial_id):
            return
        super().on_trial_complete(trial_id, result, error)


def _sampler(cfg: SweepConfig, index: int, num_samples: int):
    import optuna

    seed = cfg.seed + index
    if cfg.search.sampler == "nsga2":
        # a population of ~1/4 of the budget gives NSGA-II a few generations to evolve
        pop = max(4, min(50, num_samples // 4))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def journal(workdir: Path):
    """The work directory's Optuna journal (``optuna-dashboard optuna.journal`` shows it)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(workdir / "optuna.journal")
    # the open-lock works on network filesystems too (a cluster's shared workdir)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def study_storage(workdir: Path, url: str | None = None):
    """The Optuna storage of a sweep's studies: the RDB at ``url`` (a cluster's: a lost head
    node does not take it), else the work directory's journal file."""
    if url:
        from optuna.storages import RDBStorage

        return RDBStorage(sqlalchemy_url(url))
    return journal(workdir)


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` names psycopg 3 in SQLAlchemy 2; with only psycopg2 installed (this
    package's ``test`` extra), use that driver rather than fail on the missing module."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def check_study_storage(url: str | None) -> None:
    """An RDB URL given for the studies answers (connects, tables created), or one SweepError."""
    if not url:
        return
    from sweep.errors import SweepError

    try:
        study_storage(Path("."), url)
    except Exception as e:
        raise SweepError(f"--optuna-storage {redact(url)}: cannot open it "
                         f"({' '.join(str(e).split())[:300]})") from None


def redact(url: str) -> str:
    """``url`` with its password hidden (what sweep.json and the log may show)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<an unparsable URL>"


def make_searcher(cfg: SweepConfig, pair: PairPlan, study_name: str, workdir: Path, index: int,
                  storage_url: str | None = None):
    """OptunaSearch on the pair's space: both objectives, the paper default first (then the
    preset's ``also_try`` points), a named study
    in the workdir's journal (or the RDB at ``storage_url``); trials stopped early are told
    PRUNED."""
    metrics = [m for m, _ in cfg.search.objectives]
    modes = [d for _, d in cfg.search.objectives]
    dists = {d.name: d for d in pair.space}
    return FullyTrainedOptunaSearch(
        space=optuna_space(dists), metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=[optuna_point(dists, pair.first_trial()), *(optuna_point(dists, c) for c in pair.also_try)],
        sampler=_sampler(cfg, index, pair.num_samples), study_name=study_name,
        storage=study_storage(workdir, storage_url))


def fail_orphaned_trials(study_name: str, workdir: Path, storage_url: str | None = None) -> int:
    """Mark FAIL the trials of a study still RUNNING once its Tuner has ended: a driver killed
    between asking Optuna for a trial and Tune saving its searcher's state leaves one that the
    restored searcher never learns of, so nothing would ever close it. Returns how many."""
    import optuna
    from optuna.trial import TrialState

    storage = study_storage(workdir, storage_url)
    study = optuna.load_study(study_name=study_name, storage=storage)
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in orphans:
        storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    return len(orphans)
