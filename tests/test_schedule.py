"""When the sweep's Tuners run (``sweep.execution``'s schedule): every Tuner as soon as its inputs exist, at most
``search.max_tuners`` at once, in the plan's order when one at a time; an interrupt stops them all.
Ray-free: the units and the attack stages are stand-ins here; the Ray and cluster tiers run real
Tuners (``test_cluster_sweep``: two pairs' trials overlap on a 2-node cluster)."""
import threading
import time
from types import SimpleNamespace

import pytest

from sweep.execution import _schedule as schedule
from sweep.execution._schedule import READY, SKIP, WAIT, Unit
from sweep.planning import make_plan
from sweep.config import load_preset
from sweep import dry_run
from sweep.tracking import SweepState

TWO_ATTACKS = ["dataset=synthetic:400:200", "budget.attack={epochs: 2}", "budget.defense_epochs=1",
               "defenses.ft.num_samples=1"]


class Log:
    def __init__(self):
        self.events, self.lock = [], threading.Lock()

    def add(self, *what):
        with self.lock:
            self.events.append((time.monotonic(), *what))

    def spans(self) -> dict[str, tuple[float, float]]:
        start = {e[2]: e[0] for e in self.events if e[1] == "start"}
        return {k: (t, next(e[0] for e in self.events if e[1] == "end" and e[2] == k)) for k, t in start.items()}


def _ctx(max_tuners=None):
    said = []
    cfg = SimpleNamespace(search=SimpleNamespace(max_tuners=max_tuners))
    return SimpleNamespace(cfg=cfg, progress=said.append, stage_dirs={}, failed_stages={}), said


def _unit(log, key, seconds=0.3, needs=lambda settled: (READY, "")):
    def run():
        log.add("start", key)
        time.sleep(seconds)
        log.add("end", key)
    return Unit(key, needs, run)


def _stages(log, seconds=0.3, fill=None):
    def run_attack_stages(ctx, stop):
        log.add("start", "stages")
        time.sleep(seconds)
        ctx.stage_dirs.update(fill or {"h": "/stage"})
        log.add("end", "stages")
    return run_attack_stages


def test_every_ready_tuner_runs_at_once(monkeypatch):
    log = Log()
    ctx, _ = _ctx()
    monkeypatch.setattr(schedule, "run_attack_stages", _stages(log, 0.0))
    monkeypatch.setattr(schedule, "tuner_units", lambda ctx: [_unit(log, k) for k in "abc"])
    schedule.run_schedule(ctx, threading.Event())
    spans = log.spans()
    assert set(spans) == {"stages", "a", "b", "c"}
    # all three were running at one moment
    assert max(s for s, _ in (spans[k] for k in "abc")) < min(e for _, e in (spans[k] for k in "abc"))


def test_max_tuners_one_runs_them_in_order_one_after_another(monkeypatch):
    log = Log()
    ctx, _ = _ctx(max_tuners=1)
    monkeypatch.setattr(schedule, "run_attack_stages", _stages(log, 0.0))
    monkeypatch.setattr(schedule, "tuner_units", lambda ctx: [_unit(log, k, 0.1) for k in "abc"])
    schedule.run_schedule(ctx, threading.Event())
    spans = log.spans()
    assert spans["a"][1] <= spans["b"][0] and spans["b"][1] <= spans["c"][0]


def test_a_tuner_waits_for_its_stage_and_others_need_not(monkeypatch):
    """``late`` needs the stage (0.5 s); ``early`` needs nothing and runs while the stage trains;
    ``never`` is skipped with its reason once the stages are settled without its input."""
    log = Log()
    ctx, said = _ctx()
    monkeypatch.setattr(schedule, "run_attack_stages", _stages(log, 0.5))

    def needs_stage(settled):
        return (READY, "") if "h" in ctx.stage_dirs else (WAIT, "")

    def needs_missing(settled):
        return (SKIP, "skipped: its stage failed") if settled else (WAIT, "")

    monkeypatch.setattr(schedule, "tuner_units", lambda c: [_unit(log, "late", 0.1, needs_stage),
                                                          _unit(log, "early", 0.2),
                                                          _unit(log, "never", 0.1, needs_missing)])
    schedule.run_schedule(ctx, threading.Event())
    spans = log.spans()
    assert spans["late"][0] >= spans["stages"][1]
    assert spans["early"][0] < spans["stages"][1]
    assert "never" not in spans and "[never] skipped: its stage failed" in said


def test_an_interrupt_stops_every_running_tuner_and_is_raised(monkeypatch):
    """A Tuner that ends interrupted raises KeyboardInterrupt; the stop event reaches the others
    (as Tune's Ctrl-C would), which return, and the interrupt reaches the caller."""
    stop = threading.Event()
    ctx, _ = _ctx()
    returned = []

    def interrupted():
        time.sleep(0.2)
        raise KeyboardInterrupt("[a] interrupted")

    def long_tuner():
        assert stop.wait(30), "the stop event never came"
        returned.append("b")

    monkeypatch.setattr(schedule, "run_attack_stages", lambda ctx, stop: None)
    monkeypatch.setattr(schedule, "tuner_units", lambda c: [Unit("a", lambda s: (READY, ""), interrupted),
                                                          Unit("b", lambda s: (READY, ""), long_tuner)])
    with pytest.raises(KeyboardInterrupt):
        schedule.run_schedule(ctx, stop)
    assert stop.is_set() and returned == ["b"]


# ================================================================== the sweep's units and inputs

@pytest.fixture
def sweep(tmp_path):
    cfg = load_preset("quickstart", TWO_ATTACKS)
    state = SweepState.create(cfg, tmp_path)
    plan = make_plan(cfg)
    ctx = SimpleNamespace(cfg=cfg, plan=plan, state=state, stage_dirs={}, failed_stages={}, progress=print)
    return ctx


def _checks(ctx, settled):
    return {u.key: u.check(settled)[0] for u in schedule.tuner_units(ctx)}


def test_the_units_of_a_two_attack_sweep_and_what_they_wait_for(sweep):
    ctx = sweep
    keys = [u.key for u in schedule.tuner_units(ctx)]
    assert keys == ["defaults__badnets", "defaults__blend", "badnets__nba", "blend__nba",
                    "crosscheck__nba__badnets", "crosscheck__nba__blend"]
    assert set(_checks(ctx, settled=False).values()) == {WAIT}
    # BadNets' stage exists: its Tuners may start, Blend's wait, the cross-checks too
    ctx.stage_dirs[ctx.plan.stage_for("badnets").hash] = "/b"
    assert _checks(ctx, settled=False) == {"defaults__badnets": READY, "defaults__blend": WAIT,
                                           "badnets__nba": READY, "blend__nba": WAIT,
                                           "crosscheck__nba__badnets": WAIT, "crosscheck__nba__blend": WAIT}
    # every stage exists and BadNets' search is done: its cross-check may start, Blend's waits
    ctx.stage_dirs[ctx.plan.stage_for("blend").hash] = "/l"
    ctx.state.set_tuner_status("badnets__nba", "done")
    checks = _checks(ctx, settled=True)
    assert checks["crosscheck__nba__badnets"] == READY and checks["crosscheck__nba__blend"] == WAIT
    assert checks["badnets__nba"] == SKIP                       # already done


def test_a_failed_stage_skips_its_tuners_and_every_cross_check(sweep):
    ctx = sweep
    ctx.failed_stages["blend"] = "boom"
    ctx.stage_dirs[ctx.plan.stage_for("badnets").hash] = "/b"
    ctx.state.set_tuner_status("badnets__nba", "done")
    checks = {u.key: u.check(True) for u in schedule.tuner_units(ctx)}
    assert checks["blend__nba"] == (SKIP, "skipped: its attack stage failed (boom)")
    assert checks["defaults__badnets"][0] == READY
    assert checks["crosscheck__nba__badnets"] == (SKIP, "left for --resume: an attack stage failed")


def test_a_failed_pair_leaves_its_cross_check_for_resume(sweep):
    ctx = sweep
    for a in ("badnets", "blend"):
        ctx.stage_dirs[ctx.plan.stage_for(a).hash] = f"/{a}"
    ctx.state.set_failed("blend__nba", {"blend__nba": "boom"})
    checks = {u.key: u.check(True) for u in schedule.tuner_units(ctx)}
    assert checks["crosscheck__nba__blend"] == (SKIP, "left for --resume: blend__nba failed")


# ================================================================== the packing the dry run shows

def test_the_schedule_model_fills_slots_that_one_tuner_at_a_time_leaves_idle():
    """Two Tuners of 3 one-second trials on 2 slots: together they take 3 s at 100%; one after
    another, each Tuner's third trial runs alone (4 s, 75%). A cross-check starts after its pair."""
    from sweep.planning import TunerLoad, simulate

    loads = [TunerLoad("a", 3, 1.0), TunerLoad("b", 3, 1.0)]
    both = simulate(loads, slots=2, per_tuner=2)
    serial = simulate(loads, slots=2, per_tuner=2, max_tuners=1)
    assert (both.wall_seconds, both.utilisation) == (3.0, 1.0)
    assert (serial.wall_seconds, serial.utilisation) == (4.0, 0.75)
    chained = simulate([TunerLoad("a", 2, 1.0), TunerLoad("x", 2, 1.0, after="a")], slots=4, per_tuner=4)
    assert chained.wall_seconds == 2.0 and chained.utilisation == 0.5


def test_the_dry_run_shows_the_packing_on_the_machine():
    out = dry_run(load_preset("nba_cifar", ["resources.gpus=0.25", "ray.num_gpus=8", "ray.num_cpus=64"]))
    assert "trial slots: 32 (a trial takes 2 CPU and 0.25 GPU, 4 per GPU)" in out
    assert "Tuners: 12, up to 12 at once" in out and "expected utilisation of the trial slots" in out
    none = dry_run(load_preset("nba_cifar", ["ray.num_gpus=0"]))
    assert "no trial fits: it asks for 2 CPU and 0.25 GPU" in none
