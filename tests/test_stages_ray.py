"""A search over several attack stages (``search.stages: 2``) with real Ray and MLflow, on the
synthetic set: FT's paper default and two more configurations (``also_try``), one trial at a
time, early stopping on stages. A test plugin (``sweep_stage_faults``) crashes the second
configuration once at its second stage and makes the third one useless, so that ASHA stops it
after its first stage."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only, before ray loads

import pytest
import yaml

from sweep.config import load_preset, stage_seed
from test_sweep_ray import TINY, _all_runs, _use_plugin

pytestmark = pytest.mark.ray


def test_a_two_stage_search_trains_each_stage_once_prunes_after_a_stage_and_resumes_at_the_next(
        tmp_path, monkeypatch):
    import optuna

    from sweep.analysis import make_report
    from sweep.execution import run_sweep
    from sweep.execution._searchers import journal

    _use_plugin(monkeypatch, "sweep_stage_faults")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_preset("quickstart", TINY + [
        "defenses.nba=null", "defenses.ft.num_samples=3", "defenses.ft.space.lr=[0.05, 0.2]",
        "defenses.ft.also_try=[{lr: 0.15}, {lr: 0.2}]", "search.max_concurrent=1", "max_failures=1",
        "search.stages=2", "search.objectives={asr_worst: min, ba_mean: max}",
        "search.early_stopping={enabled: true, metric: ba, mode: max}"])
    res = run_sweep(cfg, workdir=tmp_path, progress=lambda m: None)
    assert res.status == "FINISHED"
    seeds = [stage_seed(0, 0), stage_seed(0, 1)]

    # each of the attack's two stages trained once, at its own seed, with its own MLflow run
    assert len(res.trained_stages) == 2
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert cached == sorted(res.trained_stages)
    c, runs = _all_runs(tmp_path)
    stage_runs = [r for r in runs if r.data.tags["role"] == "attack"]
    assert sorted(r.data.tags["attack_hash"] for r in stage_runs) == cached
    assert all(r.data.tags["cached"] == "false" for r in stage_runs)

    trials = {float(r.data.params["lr"]): r for r in runs if r.data.tags["role"] == "defense"}
    assert sorted(trials) == [0.1, 0.15, 0.2] and all(r.info.status == "FINISHED" for r in trials.values())
    log = (res.sweep_dir / "trials" / "defended.log").read_text().split("\n")
    defended = sorted(tuple(float(x) for x in line.split()) for line in log if line)
    # the paper default defends both stages; lr 0.15 died in its second stage, and its retry
    # went on at that stage: its first stage was defended once; lr 0.2 was stopped after one
    assert defended == sorted([(0.1, seeds[0]), (0.1, seeds[1]), (0.15, seeds[0]), (0.15, seeds[1]),
                               (0.2, seeds[0])]), defended
    retried = trials[0.15].data
    assert retried.metrics["resumed_stages"] == 1 and "injected crash" in retried.tags["last_error"]
    for lr in (0.1, 0.15):      # both stages' metrics and their aggregates, in MLflow
        m = trials[lr].data.metrics
        assert trials[lr].data.tags["fully_trained"] == "true" and m["stages_done"] == 2
        assert m["asr_worst"] == pytest.approx(max(m["asr_stage0"], m["asr_stage1"]), abs=1e-4)
        assert m["ba"] == pytest.approx((m["ba_stage0"] + m["ba_stage1"]) / 2, abs=1e-4)
    stopped = trials[0.2].data
    assert stopped.tags["stopped_early"] == "true" and stopped.tags["fully_trained"] == "false"
    assert stopped.metrics["stages_done"] == 1 and "ba_stage1" not in stopped.metrics

    # Optuna: the two that defended every stage COMPLETE on the aggregates, the stopped one PRUNED
    study = optuna.load_study(study_name=f"{res.sweep_id}:badnets:ft", storage=journal(tmp_path))
    by_lr = {t.params["lr"]: t for t in study.trials}
    assert {lr: t.state.name for lr, t in by_lr.items()} == {0.1: "COMPLETE", 0.15: "COMPLETE", 0.2: "PRUNED"}
    assert by_lr[0.1].values[0] == pytest.approx(trials[0.1].data.metrics["asr_worst"], abs=1e-4)

    # selection on the aggregates: the stopped trial is never chosen; the pick is the default or
    # beat it beyond the spread
    report = make_report(res.sweep_id, workdir=tmp_path, progress=lambda m: None)
    pair = yaml.safe_load(report.best_configs_file.read_text())["defenses"]["ft"]["per_attack"]["badnets"]
    assert pair["best"]["run_id"] in {trials[0.1].info.run_id, trials[0.15].info.run_id}
    assert pair["n_candidates"] == 2 and {"asr_std", "ba_std", "asr_worst"} <= set(pair["best"]["metrics"])
    verdict = pair["against_default"]["verdict"] if "against_default" in pair else None
    assert (pair["best"]["run_id"] == trials[0.15].info.run_id) == (verdict == "better"), pair
    if verdict not in (None, "better"):
        assert pair["best"]["why"].startswith("the paper default, kept")
        assert "the paper default, kept" in (report.dir / "report.md").read_text()

    # the sweep set @best; a report reads the Registry and never writes it
    assert c.get_model_version_by_alias("quickstart-ft", "best").run_id == pair["best"]["run_id"]
    versions = {v.version for v in c.search_model_versions("name='quickstart-ft'")}
    c.delete_registered_model_alias("quickstart-ft", "best")
    make_report(res.sweep_id, workdir=tmp_path, progress=lambda m: None)
    assert "best" not in c.get_registered_model("quickstart-ft").aliases
    assert {v.version for v in c.search_model_versions("name='quickstart-ft'")} == versions


def test_a_driver_killed_between_stages_resumes_each_trial_at_its_next_stage(tmp_path, monkeypatch):
    """The driver is SIGKILLed while a trial defends its second stage (a plugin pauses it there);
    the resumed sweep restores the trial, which keeps its finished first stage and defends the
    second: every (configuration, stage) is defended once, one run per trial, none RUNNING."""
    import signal
    import tempfile
    from pathlib import Path

    import psutil

    from sweep.execution import run_sweep
    from test_sweep_ray import PLUGINS, ROOT, _driver, _kill_all, _wait_for_pause

    workdir, fifo = tmp_path / "w", tmp_path / "paused.fifo"
    workdir.mkdir()
    os.mkfifo(fifo)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               SWEEP_PLUGINS="sweep_pause_second_stage", PAUSE_FIFO=str(fifo),
               PAUSE_STATE_GLOB=str(workdir / "sweeps" / "*" / "ray" / "*" / "experiment_state-*.json"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SWEEP_OPTUNA_STORAGE", "SWEEP_STORAGE"):
        env.pop(var, None)
    overrides = TINY + ["defenses.nba=null", "defenses.ft.num_samples=2", "defenses.ft.space.lr=[0.05, 0.2]",
                        "defenses.ft.also_try=[{lr: 0.15}]", "search.max_concurrent=1", "search.stages=2"]
    first = _driver(workdir, overrides, "new", env, tmp_path / "driver.log")
    family = []
    try:
        assert _wait_for_pause(fifo, first), "the driver ended first:\n" + (tmp_path / "driver.log").read_text()[-3000:]
        family = psutil.Process(first.pid).children(recursive=True)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        _kill_all(family)
    trials_dir = next((workdir / "sweeps").glob("*/trials"))
    seeds = [stage_seed(0, 0), stage_seed(0, 1)]
    assert (trials_dir / "defended.log").read_text().split("\n")[:-1] == [f"0.1 {seeds[0]}"]

    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    _use_plugin(monkeypatch, "sweep_pause_second_stage")      # its pause is spent: it only logs now
    monkeypatch.setenv("PAUSE_FIFO", str(fifo))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    said = []
    res = run_sweep(load_preset("quickstart", overrides), workdir=workdir, resume=True, progress=said.append)
    assert res.status == "FINISHED", said
    log = (trials_dir / "defended.log").read_text().split("\n")[:-1]
    assert sorted(log) == sorted(f"{lr} {s}" for lr in ("0.1", "0.15") for s in seeds), log
    _, runs = _all_runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trials = [r for r in runs if r.data.tags["role"] == "defense"]
    assert sorted(float(r.data.params["lr"]) for r in trials) == [0.1, 0.15]        # no duplicate run
    resumed = {float(r.data.params["lr"]): r.data.metrics.get("resumed_stages") for r in trials}
    assert resumed[0.1] == 1, resumed
    assert all(r.data.metrics["stages_done"] == 2 and r.info.status == "FINISHED" for r in trials)
