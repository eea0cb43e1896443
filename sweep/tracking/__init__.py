"""What a sweep records and where: its MLflow runs (one writer, the driver), its state on disk
(``sweep.json``: what ``--resume`` and ``report`` read) and the Model Registry's versions of the
selected models. Reads the config; no Ray."""
from __future__ import annotations

from sweep.tracking._mlflow import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TAG_COLUMNS, TAG_KEYS, Tracker, check_server,
                                    default_tracking_uri, flatten, logged_value, resolve_tracking_uri)
from sweep.tracking._registry import register_best, registered_aliases, registered_name
from sweep.tracking._runs import load_runs
from sweep.tracking._state import SweepState

__all__ = ["EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "SweepState", "TAG_COLUMNS", "TAG_KEYS", "Tracker",
           "check_server", "default_tracking_uri", "flatten", "load_runs", "logged_value", "register_best",
           "registered_aliases", "registered_name", "resolve_tracking_uri"]
