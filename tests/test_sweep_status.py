"""How a sweep ends, without Ray: FINISHED or PARTIAL from what failed, the state that
``--resume`` reads (which Tuners and pairs to run again), the parent run's status and tag, and
the command's exit code. The real-Ray partial sweep and its resume are in ``test_sweep_ray.py``."""
from types import SimpleNamespace

import pytest

from sweep.execution import _schedule as schedule
from sweep.cli import EXIT_PARTIAL, main
from sweep.config import load_preset
from sweep.execution._runner import SweepResult, _finish, outcome
from sweep.tracking import SweepState
from sweep.execution._tuners import finished_cases

TINY = ["dataset=synthetic:400:200", "attacks=[badnets]", "budget.attack={epochs: 2, batch_size: 64}"]


@pytest.fixture
def state(tmp_path):
    return SweepState.create(load_preset("quickstart", TINY), tmp_path)


# ============================================================================ the outcome

def test_a_failed_stage_or_pair_makes_the_sweep_partial():
    assert outcome({}, {}) == "FINISHED"
    assert outcome({"blend": "boom"}, {}) == "PARTIAL"
    assert outcome({}, {"defaults": {"badnets__ft": "no trial finished"}}) == "PARTIAL"


def test_failures_are_kept_until_the_tuner_is_done(state):
    state.set_tuner_status("badnets__nba", "started")
    state.set_failed("badnets__nba", {"badnets__nba": "boom"})
    again = SweepState.load(state.path)
    assert again.tuner_status("badnets__nba") == "failed" and again.failures == {"badnets__nba": {"badnets__nba": "boom"}}
    again.set_tuner_status("badnets__nba", "done")
    assert SweepState.load(state.path).failures == {}


def test_resume_finds_a_partial_sweep(state, tmp_path):
    cfg = load_preset("quickstart", TINY)
    state.data["status"] = "partial"
    state.save()
    assert SweepState.to_resume(tmp_path, cfg, True).sweep_id == state.sweep_id


# ============================================================================ which pairs failed

class _Grid:
    """What ``sweep.execution._compat.tune_trial_configs`` reads of a ResultGrid: its trials."""

    def __init__(self, *trials):
        self._experiment_analysis = SimpleNamespace(
            trials=[SimpleNamespace(status=s, config=c) for s, c in trials])


def test_finished_cases_are_the_terminated_trials():
    grid = _Grid(("TERMINATED", {"case": 1}), ("ERROR", {"case": 0}), ("TERMINATED", {"lr": 0.1}))
    assert finished_cases(grid) == [1, None]


def _ctx(state):
    said = []
    return SimpleNamespace(state=state, progress=said.append), said


def test_a_pair_with_no_finished_trial_fails_and_the_others_stand(state, monkeypatch):
    ctx, said = _ctx(state)
    monkeypatch.setattr(schedule, "run_tuner", lambda *a: _Grid(("ERROR", {"case": 0}), ("TERMINATED", {"case": 1})))
    schedule._fit(ctx, "defaults", None, {"badnets__nba": (0,), "badnets__ft": (1,)})
    assert state.tuner_status("defaults") == "failed"
    assert list(state.failures["defaults"]) == ["badnets__nba"]
    assert any("[badnets__nba] FAILED" in m for m in said)


def test_one_failed_trial_among_finished_ones_is_no_pair_failure(state, monkeypatch):
    ctx, _ = _ctx(state)
    state.set_tuner_status("badnets__nba", "done")
    monkeypatch.setattr(schedule, "run_tuner", lambda *a: _Grid(("ERROR", {"lr": 0.05}), ("TERMINATED", {"lr": 0.1})))
    schedule._fit(ctx, "badnets__nba", None, {"badnets__nba": None})
    assert state.tuner_status("badnets__nba") == "done" and state.failures == {}


def test_a_tuner_that_raises_fails_its_pairs_and_the_sweep_goes_on(state, monkeypatch):
    ctx, said = _ctx(state)

    def boom(*a):
        raise RuntimeError("the searcher broke\nOptunaError: journal locked")

    monkeypatch.setattr(schedule, "run_tuner", boom)
    schedule._fit(ctx, "badnets__nba", None, {"badnets__nba": None})
    assert state.failures == {"badnets__nba": {"badnets__nba": "OptunaError: journal locked"}}


def test_ctrl_c_in_a_tuner_still_stops_the_sweep(state, monkeypatch):
    ctx, _ = _ctx(state)

    def interrupted(*a):
        raise KeyboardInterrupt("[badnets__nba] interrupted")

    monkeypatch.setattr(schedule, "run_tuner", interrupted)
    with pytest.raises(KeyboardInterrupt):
        schedule._fit(ctx, "badnets__nba", None, {"badnets__nba": None})
    assert state.failures == {}


# ============================================================================ the parent run

class _Tracker:
    """Records what ``_finish`` writes to the parent run (a real MLflow store is the Ray tier's)."""

    def __init__(self, tags=None):
        self.tags, self.ended = dict(tags or {}), None

    def log_metrics(self, run_id, metrics, step=0):
        pass

    def set_tags(self, run_id, tags):
        self.tags.update(tags)

    def delete_tags(self, run_id, keys):
        for k in keys:
            self.tags.pop(k, None)

    def end(self, run_id, status):
        self.ended = status


def _result(state, **kw):
    return SweepResult(state.sweep_id, state.dir, state.dir, "uri", "exp", "0", "parent", "RUNNING", **kw)


def test_a_partial_sweep_ends_its_parent_run_failed_with_the_status_tag(state):
    tracker, dropped = _Tracker(), []
    ctx = SimpleNamespace(tracker=tracker, state=state, parent_run_id="parent",
                          drop_checkpoints=lambda: dropped.append(True))
    result = _result(state, failed_stages={"blend": "boom"}, failed_pairs={"badnets__ft": "x"})
    _finish(ctx, "PARTIAL", result)
    assert dropped == [True]          # a failed pair is run afresh: its trials' checkpoints are no use
    assert tracker.ended == "FAILED"                    # MLflow has no PARTIAL run status
    assert tracker.tags == {"status": "partial", "failed_stages": "blend", "failed_pairs": "badnets__ft"}
    assert SweepState.load(state.path).data["status"] == "partial" and result.status == "PARTIAL"


def test_a_resumed_sweep_that_finished_drops_the_failure_tags(state):
    tracker, dropped = _Tracker({"status": "partial", "failed_pairs": "badnets__ft"}), []
    ctx = SimpleNamespace(tracker=tracker, state=state, parent_run_id="parent",
                          drop_checkpoints=lambda: dropped.append(True))
    _finish(ctx, "FINISHED", _result(state))
    assert dropped == [True]
    assert tracker.ended == "FINISHED" and tracker.tags == {"status": "finished"}
    assert SweepState.load(state.path).data["status"] == "finished"


def test_a_killed_sweep_keeps_its_trial_checkpoints(state):
    """--resume restarts the interrupted trials under their ids, from their checkpoints."""
    ctx = SimpleNamespace(tracker=_Tracker(), state=state, parent_run_id="parent",
                          drop_checkpoints=lambda: pytest.fail("a killed sweep's checkpoints were dropped"))
    _finish(ctx, "KILLED", _result(state))
    assert SweepState.load(state.path).data["status"] == "killed"


# ============================================================================ the exit code

@pytest.mark.parametrize("status, code", [("FINISHED", 0), ("PARTIAL", EXIT_PARTIAL)])
def test_a_partial_sweep_exits_3_after_its_report(status, code, tmp_path, monkeypatch, capsys):
    import sweep.analysis
    import sweep.execution

    reported = []
    result = SweepResult("s1", tmp_path, tmp_path, "uri", "exp", "0", "parent", status,
                         failed_stages={"blend": "boom"} if status == "PARTIAL" else {})
    monkeypatch.setattr(sweep.execution, "run_sweep", lambda cfg, **kw: result)
    monkeypatch.setattr(sweep.analysis, "make_report", lambda sweep_id, **kw: reported.append(sweep_id))
    assert main(["quickstart", "--workdir", str(tmp_path)]) == code
    assert reported == ["s1"]                          # the report of what finished comes first
    err = capsys.readouterr().err.strip().splitlines()
    if status == "PARTIAL":
        assert len(err) == 1 and "attack stage blend" in err[0] and "--resume" in err[0]
    else:
        assert err == []


# ============================================================================ outputs on another node

def test_a_finished_trial_whose_outputs_are_elsewhere_says_so(tmp_path, capsys):
    """No storage and no shared disk: the trial's folder is on its node. Its run still ends
    FINISHED, tagged ``outputs_missing`` with a warning, never silently without its model."""
    from mlflow import MlflowClient

    from sweep.execution._callbacks import finish_trial_run
    from sweep.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "exp", tmp_path)
    last = {"final": True, "fully_trained": True, "out_dir": "/on/another/node/t1", "node_id": "n2"}
    missing, here = tracker.create_run("t1", {"role": "defense"}), tracker.create_run("t2", {"role": "defense"})
    finish_trial_run(tracker, missing, last, None)
    assert "are not on this node" in capsys.readouterr().out
    out = tmp_path / "t2"
    out.mkdir()
    for name in ("model.pt", "spec.json", "metrics.json"):
        (out / name).write_text("{}")
    finish_trial_run(tracker, here, last, out)
    c = MlflowClient(uri)
    gone, found = c.get_run(missing), c.get_run(here)
    assert gone.info.status == found.info.status == "FINISHED"
    assert gone.data.tags["outputs_missing"] == "true" and "outputs_missing" not in found.data.tags
    assert gone.data.tags["ray_node_id"] == "n2"
    assert "model/model.pt" in {a.path for a in c.list_artifacts(here, "model")}


def test_several_nodes_without_storage_get_a_warning():
    from sweep.execution._ray_session import shared_disk_warning
    from trainables.storage import open_storage

    assert shared_disk_warning(1, None, "/w") is None
    assert shared_disk_warning(3, open_storage("/shared/store"), "/w") is None
    warning = shared_disk_warning(2, None, "/w")
    assert "2 Ray nodes and no --storage" in warning and "/w" in warning
