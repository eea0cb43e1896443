"""``python -m sweep bench sweep``: a reduced sweep on a local multi-node Ray (loopback), run with
the sweep's schedule (every Tuner as soon as its inputs exist) and, in the same run and on the
same cluster, with one Tuner at a time (``search.max_tuners=1``).

What it prints for each schedule, over the Tuners (the attack stages are trained first, by
a warm-up sweep, and cached, so both schedules start from the same point):

* trials per hour;
* utilisation: busy slot-seconds / available slot-seconds. A trial holds its slot from its start
  to its end (its MLflow run's start and end times, which the driver's callback sets), and the
  cluster's ``slots`` (trials of ``resources.cpus`` each it holds at once) are available from the
  first trial's start to the last one's end;
* the trials' own share of their slot time (``train_seconds``; the rest is start-up and the
  final evaluation);
* the driver's overhead per trial: the driver process's CPU time over the sweep (Tune's
  controllers, the trial loggers, MLflow, Optuna), divided by the trials.

``python -m sweep bench early-stopping`` runs one reduced sweep twice on a local Ray, with early
stopping off and on, the searched ``epochs`` pinned to the same maximum in both (what early
stopping does itself), and prints the epochs trained, the wall time and each pair's selected
configuration: the compute early stopping saves, and whether it changes the choice.

Benchmarks, not tests: they assert nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

# the sweep's trials on two 1-CPU nodes: 2 attacks x 2 searched defenses x 3 trials, and the
# cross-checks (each pair's best config on the other attack): 16 trials of ~30-40 s on a 2-core machine
BENCH_SETS = ("dataset=synthetic:3000:1000", "attacks=[badnets, blend]", "clean_fraction=0.2",
              "budget.attack={epochs: 12, lr: 0.1, batch_size: 128, schedule: cosine}",
              "budget.defense_epochs=10", "budget.epoch_eval_size=200",
              "defenses={ft: {space: {lr: [0.01, 0.1]}}, nad: {params: {teacher_epochs: 2}, space: {lr: [0.01, 0.1]}}}",
              "search.num_samples=3", "search.max_concurrent=0", "search.cross_check=true",
              "resources={cpus: 1, gpus: 0, attack_cpus: 1}")


def start_cluster(nodes: int, cpus_per_node: int):
    """A Ray cluster of ``nodes`` nodes on this machine, every one bound to 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster

    from sweep.execution import keep_local_ray_on_loopback

    keep_local_ray_on_loopback()
    args = {"num_cpus": cpus_per_node, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(**args)
    cluster.wait_for_nodes()
    return cluster


def schedule_figures(result, slots: int, driver_cpu_seconds: float, cpus: float) -> dict:
    """The benchmark's figures for one finished sweep, from its MLflow trial runs."""
    from sweep.tracking import Tracker

    tracker = Tracker(result.tracking_uri, result.experiment, result.workdir)
    runs = [r for r in tracker.runs(result.sweep_id) if r.data.tags.get("role") == "defense"]
    spans = [(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs if r.info.end_time]
    window = max(e for _, e in spans) - min(s for s, _ in spans)
    busy = sum(e - s for s, e in spans) * cpus
    train = sum(r.data.metrics.get("train_seconds", 0.0) for r in runs) * cpus
    return {"trials": len(spans), "window_seconds": window, "slots": slots,
            "trials_per_hour": len(spans) / window * 3600, "utilisation": busy / (slots * window),
            "training_share_of_busy": train / busy, "driver_cpu_seconds_per_trial": driver_cpu_seconds / len(spans),
            "status": result.status, "failed": {**result.failed_stages, **result.failed_pairs}}


def bench_sweep(nodes: int = 2, cpus_per_node: int = 1, preset: str = "quickstart", sets: tuple = BENCH_SETS,
                progress=print) -> dict:
    from sweep.config import load_preset
    from sweep.execution import run_sweep
    from sweep.planning import trial_slots

    cluster = start_cluster(nodes, cpus_per_node)
    workdir = tempfile.mkdtemp(prefix="bench-sweep-")
    quiet = lambda m: None      # noqa: E731
    out = {"nodes": nodes, "cpus_per_node": cpus_per_node, "preset": preset, "sets": list(sets),
           "cpu_count": os.cpu_count()}
    try:
        progress(f"warm-up: the attack stages on a {nodes}-node loopback Ray ({cpus_per_node} CPU each)")
        t = time.time()
        warm = load_preset(preset, [*sets, "search.num_samples=1", "search.cross_check=false"])
        run_sweep(warm, workdir=workdir, address=cluster.address, progress=quiet)
        out["warm_up_seconds"] = time.time() - t
        for name, max_tuners in (("concurrent", "null"), ("serial", "1")):
            cfg = load_preset(preset, [*sets, f"search.max_tuners={max_tuners}"])
            slots = trial_slots({"CPU": nodes * cpus_per_node}, cfg.resources.cpus, cfg.resources.gpus)
            progress(f"{name}: {preset} with search.max_tuners={max_tuners}")
            cpu = time.process_time()
            result = run_sweep(cfg, workdir=workdir, address=cluster.address,
                               progress=lambda m: progress(f"  {m}"))
            out[name] = schedule_figures(result, slots, time.process_time() - cpu, cfg.resources.cpus)
    finally:
        cluster.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def print_figures(r: dict) -> None:
    print(f"{r['nodes']} loopback Ray nodes x {r['cpus_per_node']} CPU ({r['cpu_count']} cores), preset "
          f"{r['preset']} reduced; attack stages trained beforehand in {r['warm_up_seconds']:.0f} s")
    print(f"{'schedule':<12}{'trials':>7}{'wall s':>9}{'trials/h':>10}{'utilisation':>13}"
          f"{'training share':>16}{'driver CPU s/trial':>20}")
    for name in ("concurrent", "serial"):
        f = r[name]
        print(f"{name:<12}{f['trials']:>7}{f['window_seconds']:>9.0f}{f['trials_per_hour']:>10.0f}"
              f"{f['utilisation']:>13.1%}{f['training_share_of_busy']:>16.1%}{f['driver_cpu_seconds_per_trial']:>20.2f}")


def main(args) -> int:
    if args.what == "early-stopping":
        r = bench_early_stopping(progress=lambda m: print(m, flush=True))
        print(json.dumps(r)) if args.json else print_early_stopping(r)
        return 0
    r = bench_sweep(args.nodes, args.cpus_per_node, progress=lambda m: print(m, flush=True))
    print(json.dumps(r) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_figures(r)
    return 0


# early stopping's measurement: BadNets x (FT, NAD), 8 trials each, epochs pinned to 10, two at a time
ES_SETS = ("dataset=synthetic:3000:1000", "attacks={badnets: {params: {pattern: white, patch_size: 5}}}",
           "clean_fraction=0.2",
           "budget.attack={epochs: 12, lr: 0.1, batch_size: 128, schedule: cosine}",
           "budget.defense_epochs=null", "budget.epoch_eval_size=200",
           "defenses={ft: {space: {epochs: {low: 5, high: 10, default: 10}}}, "
           "nad: {params: {teacher_epochs: 2}, space: {epochs: {low: 5, high: 10, default: 10}}}}",
           "search.num_samples=8", "search.max_concurrent=2", "search.cross_check=false",
           "resources={cpus: 1, gpus: 0, attack_cpus: 2}", "ray.num_cpus=2")
ES_ON = "search.early_stopping={enabled: true, metric: score, mode: max, grace_period: 2, reduction_factor: 2}"


def _selected(result) -> dict:
    """Each pair's selected configuration (the preset's rule) and its trials' epochs."""
    from sweep.analysis import select_best
    from sweep.tracking import SweepState, Tracker, load_runs

    cfg = SweepState.named(result.sweep_id, result.workdir).config()
    runs = load_runs(Tracker(result.tracking_uri, result.experiment, result.workdir), result.sweep_id)
    runs = runs[runs["role"] == "defense"]
    out = {}
    for pair, rows in runs.groupby("pair"):
        best = select_best(rows, cfg.selection)
        out[pair] = {"trials": len(rows), "stopped_early": int((rows["fully_trained"] != "true").sum()),
                     "config": json.loads(best["config_json"]) if best is not None else None,
                     "ba": float(best["ba"]) if best is not None else None,
                     "asr": float(best["asr"]) if best is not None else None}
    return out


def _epochs_trained(result) -> int:
    from sweep.tracking import Tracker

    tracker = Tracker(result.tracking_uri, result.experiment, result.workdir)
    total = 0
    for r in tracker.runs(result.sweep_id, role="defense"):
        history = tracker.client.get_metric_history(r.info.run_id, "score")
        total += max((m.step for m in history), default=0)
    return total


def bench_early_stopping(sets: tuple = ES_SETS, progress=print) -> dict:
    from sweep.config import load_preset
    from sweep.execution import run_sweep

    workdir = tempfile.mkdtemp(prefix="bench-es-")
    quiet = lambda m: None      # noqa: E731
    out = {"sets": list(sets), "early_stopping": ES_ON, "cpu_count": os.cpu_count()}
    try:
        progress("warm-up: the attack stage")
        run_sweep(load_preset("quickstart", [*sets, "search.num_samples=1"]), workdir=workdir, progress=quiet)
        # off: the same schedule as early stopping pins (epochs 10), so that only the scheduler differs
        pinned = ["defenses.ft.space.epochs=10", "defenses.nad.space.epochs=10"]
        for name, extra in (("off", pinned), ("on", [ES_ON])):
            progress(f"early stopping {name}")
            start = time.time()
            result = run_sweep(load_preset("quickstart", [*sets, *extra]), workdir=workdir, progress=quiet)
            out[name] = {"wall_seconds": time.time() - start, "epochs_trained": _epochs_trained(result),
                         "pairs": _selected(result), "status": result.status}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def print_early_stopping(r: dict) -> None:
    off, on = r["off"], r["on"]
    print(f"epochs trained: {off['epochs_trained']} without early stopping, {on['epochs_trained']} with it "
          f"({1 - on['epochs_trained'] / off['epochs_trained']:.0%} saved); wall {off['wall_seconds']:.0f} s -> "
          f"{on['wall_seconds']:.0f} s")
    for pair in sorted(off["pairs"]):
        a, b = off["pairs"][pair], on["pairs"].get(pair, {})
        same = a.get("config") == b.get("config")
        print(f"{pair}: off picks BA {a['ba']:.3f} ASR {a['asr']:.3f}; on ({b.get('stopped_early')} of "
              f"{b.get('trials')} stopped) picks BA {b.get('ba', float('nan')):.3f} ASR {b.get('asr', float('nan')):.3f}"
              f" -> {'the same configuration' if same else 'another configuration'}")
