"""The Ray side of a sweep: joining or starting Ray, checking that trials fit the cluster, and
making Ctrl-C / SIGTERM stop the whole sweep.

``address`` (``--address``) or ``RAY_ADDRESS`` joins an existing cluster; otherwise a LOCAL Ray is
started explicitly (``address="local"``: a stale ``ray_current_cluster`` file left by a crashed
run can never make it join a dead cluster), without the dashboard, bound to 127.0.0.1
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` unless the environment sets it).

Either way the workers get the driver's settings that the trainables read (``WORKER_ENV``, those
set in the driver) through the job's ``runtime_env``: a worker on another node does not inherit
the driver's environment.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable

from sweep.execution import _compat as compat
from sweep.config import SweepConfig
from sweep.errors import SweepError, SweepInterrupted

LOCAL_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# the environment variables ``trainables`` reads (grep os.environ there), and which hold folders
WORKER_ENV = ("SWEEP_DATA_ROOT", "SWEEP_CACHE_DIR", "SWEEP_DEVICE", "SWEEP_AMP", "SWEEP_CHANNELS_LAST",
              "SWEEP_PLUGINS")
PATH_ENV = ("SWEEP_DATA_ROOT", "SWEEP_CACHE_DIR")
# read by the trainables too, but each node's own (a folder on its local disk): never forwarded
NODE_ENV = ("SWEEP_LOCAL_CACHE",)


def worker_env(environ: dict, cwd: str) -> dict[str, str]:
    """The ``WORKER_ENV`` variables set in ``environ``, folders made absolute against ``cwd``
    (a worker's working directory is not the driver's)."""
    from trainables.data import absolute_path

    out = {k: environ[k] for k in WORKER_ENV if environ.get(k)}
    for k in PATH_ENV:
        if k in out:
            out[k] = absolute_path(out[k], cwd)
    return out


def _runtime_env() -> dict:
    env = worker_env(dict(os.environ), os.getcwd())
    return {"runtime_env": {"env_vars": env}} if env else {}


@contextlib.contextmanager
def interruptible():
    """Ctrl-C (and SIGTERM) stop the sweep at once. Ray Tune would otherwise catch the first
    Ctrl-C, end the current Tuner quietly and let the sweep go on with the next one."""
    old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    old_term = None
    main = threading.current_thread() is threading.main_thread()
    if main:
        def on_term(sig, frame):
            raise SweepInterrupted("SIGTERM")
        old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env
        if main:
            signal.signal(signal.SIGTERM, old_term)


@contextlib.contextmanager
def ray_session(cfg: SweepConfig, address: str | None = None, progress: Callable[[str], None] = print):
    """Join ``address``/``RAY_ADDRESS``, or start (and later stop) a local loopback Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        os.environ.setdefault(LOCAL_RAY_ENV, "0")
    import ray

    if not address and os.environ[LOCAL_RAY_ENV] == "0":
        compat.keep_local_ray_on_loopback()
    if ray.is_initialized():
        yield ray
        return
    if address:
        progress(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True, **_runtime_env())
    else:
        kwargs = dict(address="local", include_dashboard=False, configure_logging=True,
                      object_store_memory=cfg.ray.object_store_mb * 2 ** 20, log_to_driver=True,
                      **_runtime_env())
        if cfg.ray.num_cpus is not None:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.num_gpus is not None:
            kwargs["num_gpus"] = cfg.ray.num_gpus
        progress("starting a local Ray (loopback only, no dashboard)")
        ray.init(**kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def check_resources(cfg: SweepConfig, local: bool, progress: Callable[[str], None]) -> None:
    """A trial that asks for more than the cluster has would wait forever: on a local Ray that
    is an error; on a cluster (which an autoscaler may grow) a warning."""
    import ray

    have = ray.cluster_resources()
    for what, cpus, gpus in (("resources.cpus/gpus", cfg.resources.cpus, cfg.resources.gpus),
                             ("resources.attack_cpus/attack_gpus", cfg.resources.attack_cpus, cfg.resources.attack_gpus)):
        problem = None
        if gpus > have.get("GPU", 0):
            problem = (f"{what}: a trial asks for {gpus:g} GPU but the Ray cluster has {have.get('GPU', 0):g}; "
                       f"--set resources.gpus=0 --set resources.attack_gpus=0 runs on CPUs")
        elif cpus > have.get("CPU", 0):
            problem = f"{what}: a trial asks for {cpus:g} CPUs but the Ray cluster has {have.get('CPU', 0):g}"
        if problem and local:
            raise SweepError(problem)
        if problem:
            progress(f"warning: {problem} (now; trials wait until the cluster grows)")


def shared_disk_warning(nodes: int, storage, workdir) -> str | None:
    """What to tell a user whose sweep runs on several nodes with no storage configured: their
    work directory must then be a mount every node shares, or outputs stay where they were made."""
    if nodes <= 1 or storage is not None:
        return None
    return (f"warning: {nodes} Ray nodes and no --storage: the work directory {workdir} must be a folder "
            "every node mounts at the same path, or attack stages and trial outputs stay on the node that "
            "made them (README, 'Cluster')")


def cluster_resources(address: str) -> tuple[dict, list[dict]]:
    """(total resources, each live node's) of the Ray cluster at ``address``; joins and leaves."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return dict(ray.cluster_resources()), nodes
    finally:
        ray.shutdown()
