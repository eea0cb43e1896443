"""Optuna inside Ray Tune: the searcher every searched (attack, defense) pair uses.

``OptunaSearch`` tells Optuna that a trial a Tune scheduler stopped early COMPLETED, with its
partial metrics: an undertrained model (low ASR, low BA) then looks Pareto-optimal and steers
the sampler. ``FullyTrainedOptunaSearch`` tells such trials PRUNED instead; only trials whose last
report says ``fully_trained`` reach the study as COMPLETE.
"""
from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch


class FullyTrainedOptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if (result and not error and not result.get("fully_trained")
                and trial_id in self._ot_trials and trial_id not in self._completed_trials):
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)
