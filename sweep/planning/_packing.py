"""How a sweep's trials pack onto a cluster, and what that should give (``--dry-run``, with
``--address`` on a running cluster's resources, else on this machine's).

The packing is the sweep's own: trial slots = how many trials of ``resources.cpus``/``gpus`` the
cluster holds at once (``trial_slots``); every Tuner whose inputs exist runs
(at most ``search.max_tuners``), each with up to ``search.max_concurrent`` trials (0: the slots).

The expected utilisation and wall time come from a small simulation of that schedule: each
Tuner's trials last what the cost model (``_estimate``) gives one trial of its pair at the
trial's share of the hardware, a cross-check Tuner starts when its pair's ends, and free slots go
to the running Tuners in turn. It counts no start-up, no attack stages (they run first, in
parallel, on their own resources) and no driver overhead: a model to compare schedules and
clusters, not a measurement (``python -m sweep bench sweep`` measures).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from sweep.config import SweepConfig
from sweep.planning._estimate import CPU_FLOPS_PER_CORE, GPU_FLOPS, dataset_sizes, forward_flops, trial_images
from sweep.planning._plan import make_plan, tuner_plans


@dataclass(frozen=True)
class TunerLoad:
    key: str
    trials: int
    seconds: float                 # one trial's estimated time
    after: str | None = None       # the Tuner that must end first (a cross-check's pair)


@dataclass(frozen=True)
class Schedule:
    wall_seconds: float
    busy_slot_seconds: float
    slots: int

    @property
    def utilisation(self) -> float:
        return self.busy_slot_seconds / (self.slots * self.wall_seconds) if self.wall_seconds else 0.0


def simulate(loads: list[TunerLoad], slots: int, per_tuner: int, max_tuners: int | None = None) -> Schedule:
    """Greedy list scheduling of ``loads`` on ``slots`` slots, ``per_tuner`` trials per Tuner at
    once, at most ``max_tuners`` Tuners at once (None: all whose ``after`` has ended)."""
    left = {ld.key: ld.trials for ld in loads}
    inflight = {ld.key: 0 for ld in loads}
    started, ended, events = [], set(), []
    now, busy, turn = 0.0, 0.0, 0
    while True:
        active = [k for k in started if k not in ended]
        for ld in loads:
            if ld.key in started or (ld.after and ld.after not in ended):
                continue
            if max_tuners is not None and len(active) >= max_tuners:
                break
            started.append(ld.key)
            active.append(ld.key)
            if ld.trials == 0:
                ended.add(ld.key)
        free = slots - len(events)
        runnable = [k for k in active if left[k] and inflight[k] < per_tuner]
        while free and runnable:
            k = runnable[turn % len(runnable)]
            turn += 1
            seconds = next(ld.seconds for ld in loads if ld.key == k)
            heapq.heappush(events, (now + seconds, k))
            left[k] -= 1
            inflight[k] += 1
            busy += seconds
            free -= 1
            runnable = [k for k in active if left[k] and inflight[k] < per_tuner]
        if not events:
            return Schedule(now, busy, slots)
        now, k = heapq.heappop(events)
        inflight[k] -= 1
        if not left[k] and not inflight[k]:
            ended.add(k)


def tuner_loads(cfg: SweepConfig) -> list[TunerLoad]:
    """The sweep's Tuners (``tuner_plans``) with their trials' estimated times."""
    plan = make_plan(cfg)
    flops = 3 * forward_flops(cfg.model)
    rate = GPU_FLOPS * cfg.resources.gpus if cfg.resources.gpus > 0 else CPU_FLOPS_PER_CORE * max(cfg.resources.cpus, 1)
    seconds = {}
    for p in plan.pairs:
        sizes = dataset_sizes(cfg.attack(p.attack).dataset)
        seconds[p.key] = trial_images(cfg, p, sizes) * flops / rate if sizes else 0.0
    loads = []
    for t in tuner_plans(cfg, plan):
        trials = len(cfg.attacks) - 1 if t.kind == "crosscheck" else sum(p.num_samples for p in t.pairs)
        loads.append(TunerLoad(t.key, trials, max(seconds[p.key] for p in t.pairs), t.after))
    return loads


def local_resources(cfg: SweepConfig) -> dict:
    """What a local Ray of this preset would have (``ray.num_cpus``/``num_gpus``, else the machine's)."""
    import os

    gpus = cfg.ray.num_gpus
    if gpus is None:
        try:
            import torch

            gpus = torch.cuda.device_count()
        except Exception:
            gpus = 0
    return {"CPU": float(cfg.ray.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def packing_lines(cfg: SweepConfig, have: dict, where: str, nodes: list[dict] | None = None) -> list[str]:
    """The dry run's packing section for a cluster with resources ``have``."""
    r = cfg.resources
    slots = trial_slots(have, r.cpus, r.gpus)
    per_tuner = cfg.search.max_concurrent or slots
    loads = tuner_loads(cfg)
    lines = [f"cluster ({where}): {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs"
             + (f" on {len(nodes)} node(s)" if nodes is not None else "")]
    per_gpu = f", {int(1 / r.gpus + 1e-9)} per GPU" if 0 < r.gpus <= 1 else ""
    lines.append(f"trial slots: {slots} (a trial takes {r.cpus:g} CPU and {r.gpus:g} GPU{per_gpu}); "
                 f"each Tuner runs up to {per_tuner} trial(s) at once"
                 + ("" if cfg.search.max_concurrent else " (search.max_concurrent 0: the slots)"))
    at_once = cfg.search.max_tuners or len(loads)
    lines.append(f"Tuners: {len(loads)}, up to {at_once} at once"
                 + (" (search.max_tuners null: each as soon as its inputs exist)" if not cfg.search.max_tuners else ""))
    if r.cpus > have.get("CPU", 0) or r.gpus > have.get("GPU", 0):
        lines.append(f"no trial fits: it asks for {r.cpus:g} CPU and {r.gpus:g} GPU (nothing runs until an "
                     "autoscaler adds such a node; --set resources.gpus=0 runs on CPUs)")
        return lines
    if not any(ld.seconds for ld in loads):
        lines.append("expected utilisation: unknown (no dataset of known size)")
        return lines
    mine = simulate(loads, slots, per_tuner, cfg.search.max_tuners)
    serial = simulate(loads, slots, per_tuner, 1)
    lines.append(f"expected utilisation of the trial slots (a model, see sweep/planning/_packing.py): {mine.utilisation:.0%}, "
                 f"trials' wall time ~{_hours(mine.wall_seconds)}; one Tuner at a time (max_tuners 1) would give "
                 f"{serial.utilisation:.0%}, ~{_hours(serial.wall_seconds)}")
    return lines


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds / 60:.3g} min"


def trial_slots(have: dict, cpus: float, gpus: float) -> int:
    """How many trials asking for ``cpus`` CPUs and ``gpus`` GPUs each the resources ``have``
    (``ray.cluster_resources()``) hold at once; at least 1."""
    fits = [int(have.get(kind, 0) / need + 1e-9) for kind, need in (("CPU", cpus), ("GPU", gpus)) if need > 0]
    return max(1, min(fits)) if fits else max(1, int(have.get("CPU", 1)))


def packing_section(cfg: SweepConfig, address: str | None = None, cluster: tuple[dict, list[dict]] | None = None) -> str:
    """The dry run's packing section: on the cluster at ``address`` (``cluster``: its total
    resources and each live node's), else on a local Ray."""
    if address:
        have, nodes = cluster
        lines = packing_lines(cfg, have, f"the Ray cluster at {address}", nodes)
    else:
        lines = packing_lines(cfg, local_resources(cfg), "a local Ray on this machine; --address <cluster> to plan for one")
    return "\n".join(["", "# ---- packing (see sweep/planning/_packing.py) " + "-" * 24, *lines]) + "\n"
