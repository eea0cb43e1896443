"""Running a sweep on Ray: its state and MLflow parent run, the attack stages as Ray tasks, the
Tuners (Ray Tune + Optuna) each started once its inputs exist, the driver's trial loggers, and
``--resume``. The one layer that imports Ray (its private APIs only in ``_compat``)."""
from __future__ import annotations

from sweep.execution._compat import keep_local_ray_on_loopback
from sweep.execution._ray_session import cluster_resources
from sweep.execution._runner import SweepResult, preflight, register_selection, run_sweep

__all__ = ["SweepResult", "cluster_resources", "keep_local_ray_on_loopback", "preflight", "register_selection",
           "run_sweep"]
