"""What a sweep will run and what it should cost, before anything runs: the distinct attack stages,
the (attack, defense) pairs and their Tuners, the ``--dry-run`` cost estimate and how the trials
pack onto a cluster. Reads the config; no Ray, no MLflow."""
from __future__ import annotations

from sweep.planning._estimate import dataset_sizes, dry_run
from sweep.planning._packing import TunerLoad, packing_section, simulate, trial_slots
from sweep.planning._plan import PairPlan, Plan, StagePlan, TunerPlan, make_plan, tuner_plans

__all__ = ["PairPlan", "Plan", "StagePlan", "TunerLoad", "TunerPlan", "dataset_sizes", "dry_run", "make_plan",
           "packing_section", "simulate", "trial_slots", "tuner_plans"]
