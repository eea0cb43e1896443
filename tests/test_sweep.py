"""The sweep system end to end, with real Ray (local, loopback) and real MLflow (SQLite in tmp):

* selection and report logic on hand-made runs (fast, no Ray);
* a reduced quickstart sweep in-process: one attack stage, NBA trials (one made to fail by the
  test-only hook) and FT's paper-default trial; every run, tag, metric, artifact and report file;
* a driver SIGKILLed mid-sweep (10 trials over one attack) and resumed: no RUNNING and no
  duplicate runs, 10 trials, and the attack stage trained exactly once across both drivers, with
  a stale ``ray_current_cluster`` file in Ray's temp dir that must not be joined.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only, before ray loads

import pandas as pd
import pytest
import yaml

from sweep.config import Selection, load_preset
from sweep.report import best_across_attacks, pareto_front, select_best
from sweep.tracking import TAG_KEYS
from trainables.tune_trainable import InjectedFailure, check_test_failure, decode, trial_case

ROOT = Path(__file__).resolve().parents[1]
# the quickstart preset cut to seconds: a small synthetic set, one attack, 1-epoch defenses
TINY = ["dataset=synthetic:400:200", "attacks=[badnets]", "budget.attack={epochs: 2, batch_size: 64}",
        "budget.defense_epochs=1", "budget.epoch_eval_size=100", "clean_fraction=0.1",
        "defenses.nba.params={teacher_epochs: 1, pgd_steps: 1}", "ray.num_cpus=2", "ray.object_store_mb=100"]


# ============================================================================ selection (no Ray)

def _runs(rows):
    base = {"status": "FINISHED", "fully_trained": "true", "ray_trial_id": "t", "role": "defense",
            "candidate": True, "defense": "nba"}
    out = []
    for i, r in enumerate(rows):
        row = {**base, "run_id": f"r{i}", "start_time": i, "config_key": r.get("key", f"k{i}"),
               "config_json": json.dumps({"i": r.get("key", i)}), **r}
        row["candidate"] = row["status"] == "FINISHED" and row["fully_trained"] == "true"
        out.append(row)
    return pd.DataFrame(out)


SEL = Selection(rule="ba_within", ba_tolerance=2.0, metric="asr", mode="min", ba_metric="ba")


def test_pareto_front_and_the_ba_within_rule():
    df = _runs([
        {"asr": 0.02, "ba": 0.80},
        {"asr": 0.01, "ba": 0.79},       # within 2 points of the best BA, lower ASR: selected
        {"asr": 0.005, "ba": 0.70},      # lowest ASR, but BA 10 points down: on the front, not selected
        {"asr": 0.03, "ba": 0.78},       # dominated
        {"asr": 0.0, "ba": 0.60, "fully_trained": "false"},   # stopped early: never a candidate
        {"asr": 0.0, "ba": 0.81, "status": "FAILED"},
    ])
    front = pareto_front(df, (("asr", "min"), ("ba", "max")))
    assert list(front["run_id"]) == ["r2", "r1", "r0"]
    assert select_best(df, SEL)["run_id"] == "r1"
    assert select_best(df, Selection("best_metric", 2.0, "asr", "min", "ba"))["run_id"] == "r2"
    assert select_best(df.iloc[4:], SEL) is None          # no candidate at all


def test_best_across_attacks_uses_worst_case_asr_of_configs_measured_everywhere():
    rows = []
    for attack, asr_a, asr_b, asr_c in (("badnets", 0.01, 0.02, 0.00), ("blend", 0.09, 0.03, 0.00)):
        rows += [{"attack": attack, "key": "A", "asr": asr_a, "ba": 0.80},
                 {"attack": attack, "key": "B", "asr": asr_b, "ba": 0.80}]
    rows.append({"attack": "badnets", "key": "C", "asr": 0.0, "ba": 0.81})     # not measured on blend
    best = best_across_attacks(_runs(rows), ["badnets", "blend"], SEL)
    assert best["config_key"] == "B" and best["worst_case_asr"] == 0.03
    assert best["n_configs_on_all_attacks"] == 2
    assert set(best["per_attack"]) == {"badnets", "blend"}


def test_trial_case_decodes_and_the_failure_hook_fires_once(tmp_path):
    job = {"attack": "badnets", "attack_hash": "h", "artifact_dir": "/a", "defense": "nba",
           "fixed": {"epochs": 1}, "decoders": {"behaviours": {"rnb,lnb": ["rnb", "lnb"]}},
           "cases": [{"attack": "blend", "attack_hash": "g", "artifact_dir": "/b", "params": {"lr": 0.1}}]}
    case = trial_case({"lr": 0.05, "behaviours": "rnb,lnb"}, job)
    assert case["params"] == {"epochs": 1, "lr": 0.05, "behaviours": ["rnb", "lnb"]} and case["phase"] == "search"
    cross = trial_case({"xcheck": 0}, job)
    assert cross["attack"] == "blend" and cross["defense"] == "nba" and cross["phase"] == "crosscheck"
    assert decode({"a": 1}, None) == {"a": 1}
    check_test_failure({"lr": 0.1}, "lr<0.1")            # not matched: no failure
    with pytest.raises(InjectedFailure):
        check_test_failure({"lr": 0.05}, "lr<0.1")
    with pytest.raises(InjectedFailure):
        check_test_failure({"lr": 0.05}, "once:lr<0.1", tmp_path)
    check_test_failure({"lr": 0.05}, "once:lr<0.1", tmp_path)   # the failure was claimed already


# ============================================================================ helpers

def _client(workdir):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")


def _all_runs(workdir):
    c = _client(workdir)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c, c.search_runs(exps, max_results=5000)


def _png(path):
    return Path(path).is_file() and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ============================================================================ a reduced quickstart

def test_reduced_quickstart_sweep_tracks_everything_and_a_failing_trial_fails_alone(tmp_path, monkeypatch):
    from sweep.runner import run_sweep

    # NBA searches lr in [0.05, 0.1] (paper default 0.1 first); the first trial with lr < 0.1 raises
    monkeypatch.setenv("SWEEP_TEST_FAIL_TRIAL", "once:lr<0.1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_preset("quickstart", TINY + ["search.num_samples=3", "defenses.nba.space.lr=[0.05, 0.1]",
                                            "defenses.ft.num_samples=1", "search.max_concurrent=2"])
    res = run_sweep(cfg, workdir=tmp_path, progress=lambda m: None)
    assert res.status == "FINISHED"
    assert res.trials == {"FINISHED": 3, "FAILED": 1}         # 3 NBA (one failed) + FT's default trial
    assert len(res.trained_stages) == 1

    c, runs = _all_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_role = {role: [r for r in runs if r.data.tags["role"] == role] for role in ("sweep", "attack", "defense")}
    (parent,) = by_role["sweep"]
    (attack_run,) = by_role["attack"]
    trials = by_role["defense"]
    assert parent.info.status == "FINISHED" and parent.info.run_id == res.parent_run_id
    assert c.get_experiment(parent.info.experiment_id).name == "quickstart"       # one experiment per preset
    for r in runs:                                  # DESIGN's tags on every run
        tags = r.data.tags
        assert set(TAG_KEYS) <= set(tags)
        assert tags["sweep_id"] == res.sweep_id and tags["preset"] == "quickstart"
        assert tags["dataset"] == "synthetic:400:200" and tags["model"] == "wrn-16-1" and tags["seed"] == "0"
        assert tags["code_version"]
        if r is not parent:
            assert tags["mlflow.parentRunId"] == parent.info.run_id
    # the attack stage: its own child run with metrics and sample images
    assert attack_run.info.status == "FINISHED" and attack_run.data.tags["cached"] == "false"
    assert {"ba", "asr", "ra", "train_seconds", "images_per_second"} <= set(attack_run.data.metrics)
    assert any(a.path == "samples.png" for a in c.list_artifacts(attack_run.info.run_id))
    # the trials: tags, flattened params, per-epoch and final metrics, the model artifact
    assert sorted(r.data.tags["defense"] for r in trials) == ["ft", "nba", "nba", "nba"]
    failed = [r for r in trials if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["defense"] == "nba"
    assert float(failed[0].data.params["lr"]) < 0.1 and "injected failure" in failed[0].data.tags["error"]
    assert failed[0].data.tags["fully_trained"] == "false"
    for r in trials:
        assert r.data.tags["attack"] == "badnets" and r.data.tags["attack_hash"] == attack_run.data.tags["attack_hash"]
        assert r.data.tags["ray_trial_id"]
        if r.info.status != "FINISHED":
            continue
        assert r.data.tags["fully_trained"] == "true"
        assert {"ba", "asr", "ra", "der", "train_seconds", "images_per_second"} <= set(r.data.metrics)
        assert "epochs" in r.data.params and "lr" in r.data.params
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "ba")]
        assert len(steps) >= 2 and min(steps) >= 1          # per epoch (step = epoch), then final
        assert {a.path for a in c.list_artifacts(r.info.run_id, "model")} >= {"model/model.pt", "model/spec.json"}
    nba_ok = [r for r in trials if r.data.tags["defense"] == "nba" and r.info.status == "FINISHED"]
    assert sorted(float(r.data.params["lr"]) for r in nba_ok)[-1] == 0.1          # the paper default ran
    assert all(r.data.params["lambda1"] for r in nba_ok)

    # Optuna: a study named by the sweep, in the workdir's journal, the default trial first
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.load_study(study_name=f"{res.sweep_id}:badnets:nba", storage=storage)
    assert [t.state.name for t in study.trials].count("COMPLETE") == 2
    assert [t.state.name for t in study.trials].count("FAIL") == 1
    assert study.trials[0].params["lr"] == 0.1 and study.trials[0].params["lambda1"] == 2.0

    # selection and report
    rep = res.report.dir
    best = yaml.safe_load((rep / "best_configs.yaml").read_text())
    nba_best = best["defenses"]["nba"]["per_attack"]["badnets"]
    assert nba_best["best"]["run_id"] in {r.info.run_id for r in nba_ok}
    assert nba_best["paper_default"]["params"]["lr"] == 0.1 and nba_best["paper_default"]["params"]["lambda1"] == 2.0
    assert nba_best["n_candidates"] == 2
    assert best["defenses"]["ft"]["per_attack"]["badnets"]["paper_default"]["params"]["epochs"] == 1
    md = (rep / "report.md").read_text()
    assert "NBA Table 2" in md and "(1.16 / 81.59)" in md and "(6.46 / 79.91)" in md   # paper numbers beside ours
    assert _png(rep / "pareto_nba.png") and _png(rep / "curves_nba.png")
    assert (rep / "results_long.csv").is_file()
    logged = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert {"report/best_configs.yaml", "report/report.md", "report/pareto_nba.png"} <= logged

    # the on-demand report finds the sweep by its preset name and writes the same selection
    from sweep.report import make_report

    again = make_report("quickstart", workdir=tmp_path, progress=lambda m: None)
    assert again.best_configs == best
    assert "MLFLOW_TRACKING_URI" not in os.environ      # reading runs leaves no global state behind


# ============================================================================ kill and resume

DRIVER = """
import json, sys
from sweep.config import load_preset
from sweep.runner import run_sweep
cfg = load_preset("quickstart", json.loads(sys.argv[2]))
res = run_sweep(cfg, workdir=sys.argv[1], resume=sys.argv[3] == "resume", progress=print)
print("RESULT " + json.dumps({"status": res.status, "trained": res.trained_stages, "trials": res.trials}))
"""


def _descendants(pid):
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _defense_metrics_logged(db) -> bool:
    """Whether a trial's per-epoch metrics are in the tracking store (read-only peek)."""
    import sqlite3

    if not Path(db).is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            (n,) = con.execute("select count(*) from metrics m join tags t on m.run_uuid = t.run_uuid "
                               "where t.key = 'role' and t.value = 'defense'").fetchone()
        finally:
            con.close()
        return n > 0
    except sqlite3.Error:       # not created yet, or busy: look again
        return False


def _driver(workdir, overrides, mode, env, log):
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(workdir), json.dumps(overrides), mode],
                            cwd=ROOT, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_killed_driver_resumes_without_duplicates_and_trains_the_attack_once(tmp_path, monkeypatch):
    from sweep.runner import run_sweep

    workdir = tmp_path / "w"
    # a short Ray temp dir (socket paths) holding a stale ray_current_cluster of a dead cluster:
    # both drivers must start their own local Ray instead of trying to join it
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for var in ("RAY_ADDRESS", "SWEEP_TEST_FAIL_TRIAL", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    overrides = TINY + ["defenses.ft=null", "search.num_samples=10", "search.max_concurrent=2"]
    log = tmp_path / "driver.log"

    first = _driver(workdir, overrides, "new", env, log)
    start, family = time.time(), []
    try:
        while True:       # kill once a trial's report reached MLflow and Tune saved its state
            saved = glob.glob(f"{workdir}/sweeps/*/ray/badnets__nba/experiment_state-*.json")
            if saved and _defense_metrics_logged(workdir / "mlflow.db"):
                break
            assert first.poll() is None, "the driver ended before it was killed:\n" + log.read_text()[-3000:]
            assert time.time() - start < 400, "no trial reported in time:\n" + log.read_text()[-3000:]
            time.sleep(0.3)
        family = _descendants(first.pid)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        # the killed driver's Ray processes (its children, by pid) must not outlive the test
        time.sleep(3)
        for pid in set(_descendants(first.pid) + family):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    cache_entries = [p for p in (workdir / "cache").iterdir() if not p.name.startswith(".")]
    assert len(cache_entries) == 1, cache_entries
    manifest_time = (cache_entries[0] / "manifest.json").stat().st_mtime_ns
    c, runs = _all_runs(workdir)
    left_open = [r.data.tags["role"] for r in runs if r.info.status == "RUNNING"]
    assert "sweep" in left_open and "defense" in left_open, left_open     # the crash left runs open

    # resume (here, in-process) with the same stale cluster file in Ray's temp dir
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("SWEEP_TEST_FAIL_TRIAL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    said = []
    res = run_sweep(load_preset("quickstart", overrides), workdir=workdir, resume=True, progress=said.append)
    assert res.status == "FINISHED", said
    assert any("resuming the interrupted Tuner" in m for m in said), said
    assert res.trained_stages == []                       # the resumed driver trained no attack stage

    c, runs = _all_runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trials = [r for r in runs if r.data.tags["role"] == "defense"]
    attack_runs = [r for r in runs if r.data.tags["role"] == "attack"]
    ids = [r.data.tags["ray_trial_id"] for r in trials]
    assert len(trials) == 10 and len(set(ids)) == 10, ids      # no duplicate run for a restored trial
    assert all(r.info.status == "FINISHED" and r.data.tags["fully_trained"] == "true" for r in trials)
    # one attack stage, trained once: one cache entry, untouched by the resume, one attack run
    assert [p for p in (workdir / "cache").iterdir() if not p.name.startswith(".")] == cache_entries
    assert (cache_entries[0] / "manifest.json").stat().st_mtime_ns == manifest_time
    assert len(attack_runs) == 1 and attack_runs[0].info.status == "FINISHED"
    assert attack_runs[0].data.tags["cached"] == "false"
    assert {r.data.tags["attack_hash"] for r in trials} == {cache_entries[0].name}
    (parent,) = [r for r in runs if r.data.tags["role"] == "sweep"]
    assert parent.info.status == "FINISHED" and parent.info.run_id == res.parent_run_id
    state = json.loads(next((workdir / "sweeps").glob("*/sweep.json")).read_text())
    assert state["status"] == "finished" and state["phases"]["badnets__nba"] == "done"
    # the study holds the 10 trials, every one COMPLETE (restored trials told once)
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=f"{res.sweep_id}:badnets:nba",
                              storage=JournalStorage(JournalFileBackend(str(workdir / "optuna.journal"))))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 10


def test_dlp_table3_layout_puts_the_papers_numbers_beside_ours():
    """DLP Table 3's layout (rows defenses, columns attacks, CA / ASR) from hand-made runs."""
    from types import SimpleNamespace

    from sweep.callbacks import config_key, full_defense_params
    from sweep.report import build_best_configs, tables_markdown

    cfg = load_preset("dlp_table3")
    rows = []
    for i, a in enumerate(a.name for a in cfg.attacks):
        rows.append({"attack": a, "role": "attack", "ray_trial_id": "", "defense": "none", "asr": 0.99, "ba": 0.9,
                     "status": "FINISHED", "fully_trained": "true"})
        for d in cfg.defenses:
            params = full_defense_params(d.name, d.params_dict)
            rows.append({"attack": a, "role": "defense", "ray_trial_id": f"{a}-{d.name}", "defense": d.name,
                         "asr": 0.01 * (i + 1), "ba": 0.88, "der": 0.9, "status": "FINISHED", "fully_trained": "true",
                         "key": config_key(params), "config_json": json.dumps(params)})
    runs = _runs(rows)
    runs["candidate"] = runs["candidate"] & (runs["ray_trial_id"] != "")
    best = build_best_configs(cfg, SimpleNamespace(sweep_id="s"), runs)
    assert best["defenses"]["dlp"]["per_attack"]["sig"]["paper_default"]["metrics"]["asr"] == 0.05
    md, tables = tables_markdown(cfg, runs, best)
    assert "DLP Table 3" in md and "CA / ASR" in md
    assert "| defense | badnets | trojannn | blend | cla | sig |" in md
    assert "| DLP | 88.00 / 1.00 (93.08 / 0.24) |" in md          # ours (paper)
    assert "| no defense | 90.00 / 99.00 (91.31 / 100.00) |" in md
    long = tables["results_long"]
    assert len(long) == 5 * (1 + 4) and long[long["defense"] == "anp"]["paper_ba"].tolist()[0] == 90.16


def test_ctrl_c_and_sigterm_stop_the_sweep_instead_of_one_tuner():
    """Ray Tune swallows the first Ctrl-C and ends only the running Tuner; during a sweep its
    handler is off (KeyboardInterrupt reaches the runner, which closes the open runs) and
    SIGTERM raises too. Both settings are put back afterwards."""
    import signal

    from sweep.runner import SweepInterrupted, _interruptible

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SweepInterrupted):
        with _interruptible():
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ
