"""The sweep end to end with real Ray (local, loopback) and real MLflow (SQLite in tmp):

* a reduced quickstart sweep in-process: one attack stage, NBA trials (one made to fail by a
  test plugin's trial hook) and FT's paper-default trial; every run, tag, metric, artifact and
  report file;
* a pair that fails (PARTIAL, exit 3) and its resume, which redoes only that pair; a sweep
  whose every attack stage fails (exit 3 too);
* a driver SIGKILLed mid-sweep (10 trials over one attack; a test plugin pauses the 4th trial so
  the kill lands with two trials done and two running) and resumed: no RUNNING and no duplicate
  runs, 10 trials, and the attack stage trained exactly once across both drivers, with a stale
  ``ray_current_cluster`` file in Ray's temp dir that must not be joined.
"""
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only, before ray loads

import psutil
import pytest
import yaml

from sweep.config import load_preset
from sweep.tracking import TAG_KEYS

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"
# the quickstart preset cut to seconds: a small synthetic set, one attack, 1-epoch defenses
TINY = ["dataset=synthetic:400:200", "attacks=[badnets]", "budget.attack={epochs: 2, batch_size: 64}",
        "budget.defense_epochs=1", "budget.epoch_eval_size=100", "clean_fraction=0.1",
        "defenses.nba.params={teacher_epochs: 1, pgd_steps: 1}", "ray.num_cpus=2", "ray.object_store_mb=100"]


def _use_plugin(monkeypatch, module):
    """Configure a test plugin for this process and the local Ray it starts."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SWEEP_PLUGINS", module)


def _client(workdir=None, tracking_uri=None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or f"sqlite:///{workdir}/mlflow.db")


def _all_runs(workdir=None, tracking_uri=None):
    c = _client(workdir, tracking_uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c, c.search_runs(exps, max_results=5000)


def _png(path):
    return Path(path).is_file() and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ============================================================================ a reduced quickstart

def test_reduced_quickstart_sweep_tracks_everything_and_a_failing_trial_fails_alone(tmp_path, monkeypatch):
    from sweep.analysis import make_report
    from sweep.execution import run_sweep

    # NBA searches lr in [0.05, 0.1], the paper's 0.1 first (NBA's default is 0.03); a test
    # plugin's trial hook makes the first trial with lr < 0.1 raise
    _use_plugin(monkeypatch, "sweep_fail_low_lr_once")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_preset("quickstart", TINY + ["search.num_samples=3",
                                            "defenses.nba.space.lr={low: 0.05, high: 0.1, default: 0.1}",
                                            "defenses.ft.num_samples=1", "search.max_concurrent=2"])
    res = run_sweep(cfg, workdir=tmp_path, progress=lambda m: None)
    assert res.status == "FINISHED"
    report = make_report(res.sweep_id, workdir=tmp_path, progress=lambda m: None)
    assert res.trials == {"FINISHED": 3, "FAILED": 1}         # 3 NBA (one failed) + FT's default trial
    assert len(res.trained_stages) == 1

    c, runs = _all_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_role = {role: [r for r in runs if r.data.tags["role"] == role] for role in ("sweep", "attack", "defense")}
    (parent,) = by_role["sweep"]
    (attack_run,) = by_role["attack"]
    trials = by_role["defense"]
    assert parent.info.status == "FINISHED" and parent.info.run_id == res.parent_run_id
    experiment = c.get_experiment(parent.info.experiment_id)
    assert experiment.name == "quickstart"                                          # one experiment per preset
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"   # the UI's model training
    # the MLflow UI's shared view (?viewStateShareKey=backdoor-sweep): the metrics and searched params
    view = json.loads(experiment.tags["mlflow.sharedViewState.backdoor-sweep"])
    assert view["selectedColumns"][:4] == ["metrics.`ba`", "metrics.`asr`", "metrics.`ra`", "metrics.`der`"]
    assert {"params.`lambda1`", "params.`lr`", "tags.`attack`", "tags.`defense`", "tags.`purpose`"} \
        <= set(view["selectedColumns"])
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
        assert r.data.tags["purpose"] == "search"
        assert all(round(r.data.metrics[m], 4) == r.data.metrics[m] for m in ("ba", "asr", "ra"))   # as reported
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
    rep = report.dir
    best = yaml.safe_load((rep / "best_configs.yaml").read_text())
    nba_best = best["defenses"]["nba"]["per_attack"]["badnets"]
    assert nba_best["best"]["run_id"] in {r.info.run_id for r in nba_ok}
    assert nba_best["paper_default"]["params"]["lr"] == 0.1 and nba_best["paper_default"]["params"]["lambda1"] == 2.0
    assert nba_best["n_candidates"] == 2
    assert best["defenses"]["ft"]["per_attack"]["badnets"]["paper_default"]["params"]["epochs"] == 1
    md = (rep / "report.md").read_text()
    assert "NBA Table 2" in md and "(1.16 / 81.59; " in md and "(6.46 / 79.91; " in md   # the paper's beside ours
    assert _png(rep / "pareto_nba.png") and _png(rep / "curves_nba.png")
    assert (rep / "results_long.csv").is_file()
    logged = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert {"report/best_configs.yaml", "report/report.md", "report/pareto_nba.png"} <= logged

    # the selected models are in the Model Registry; the @best alias loads and measures the same BA
    from trainables import load_model
    from trainables.data import load_dataset
    from trainables.engine import pick_runtime
    from trainables.stages import Evaluator

    assert set(best["registered_models"]) == {"quickstart-nba", "quickstart-ft"}
    assert set(best["registered_models"]["quickstart-nba"]) == {"best", "best-badnets"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    version = c.get_model_version_by_alias("quickstart-nba", "best")
    assert version.run_id == nba_best["best"]["run_id"]
    assert version.tags["sweep_id"] == res.sweep_id and version.tags["attack"] == "badnets"
    assert json.loads(version.tags["config"]) == nba_best["best"]["params"]
    assert {"ba", "asr", "ra", "der", "why"} <= set(version.tags)
    model = load_model("models:/quickstart-nba@best", tracking_uri=uri)
    data = load_dataset("synthetic:400:200")
    ba = Evaluator(data, None, None, pick_runtime("cpu"))(model)["ba"]
    assert ba == pytest.approx(nba_best["best"]["metrics"]["ba"], abs=0.5 / 200)      # within half an image

    # the on-demand report finds the sweep by its preset name and writes the same selection
    again = make_report("quickstart", workdir=tmp_path, progress=lambda m: None)
    assert again.best_configs.to_dict() == best
    assert "MLFLOW_TRACKING_URI" not in os.environ      # reading runs leaves no global state behind


# ============================================================================ partial sweeps

def test_a_trial_that_crashed_mid_way_is_retried_from_its_checkpoint(tmp_path, monkeypatch):
    """A test plugin kills the first FT trial at its third epoch (of 4); Tune retries it
    (max_failures=1) and the retry goes on from the checkpoint after epoch 2: one run per trial,
    all FINISHED, the retried one marked ``resumed`` with each epoch logged once, and no
    checkpoint left behind."""
    from sweep.execution import run_sweep

    _use_plugin(monkeypatch, "sweep_crash_mid_trial_once")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_preset("quickstart", [*TINY, "budget.defense_epochs=4", "defenses={ft: {}}", "search.num_samples=2",
                                     "search.cross_check=false", "max_failures=1", "search.max_concurrent=1"])
    res = run_sweep(cfg, workdir=tmp_path, progress=lambda m: None)
    assert res.status == "FINISHED" and res.trials == {"FINISHED": 2}
    c, runs = _all_runs(tmp_path)
    trials = [r for r in runs if r.data.tags["role"] == "defense"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    resumed = [r for r in trials if r.data.metrics.get("resumed") == 1]
    assert len(resumed) == 1, [r.data.metrics.get("resumed") for r in trials]
    for r in trials:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "loss")]
        assert sorted(steps) == [1, 2, 3, 4], (r.data.tags["mlflow.runName"], steps)
    assert not any((res.sweep_dir / ".checkpoints").glob("*/*")), "a finished trial's checkpoints remain"


def test_early_stopping_stops_trials_at_the_same_epoch_and_tells_optuna_pruned(tmp_path, monkeypatch):
    """FT searched on lr with early stopping on (ASHA on BA - ASR, rungs at epochs 1, 2 and 4,
    reduction factor 2), one trial at a time so that each later trial meets the earlier ones'
    rungs. The searched epochs are pinned to the range's maximum (6) for every trial; a trial
    behind the rung's median stops there, its run says so, and its Optuna trial is PRUNED, never
    COMPLETE; a trial that ran its schedule is COMPLETE."""
    import optuna

    from sweep.execution import run_sweep
    from sweep.execution._searchers import journal

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_preset("quickstart", TINY + [
        "defenses.nba=null", "budget.defense_epochs=null", "defenses.ft.num_samples=6",
        "defenses.ft.space={epochs: {low: 5, high: 6, default: 6}, lr: [0.001, 0.2]}", "search.max_concurrent=1",
        "search.early_stopping={enabled: true, metric: score, mode: max, grace_period: 1, reduction_factor: 2}"])
    res = run_sweep(cfg, workdir=tmp_path, progress=lambda m: None)
    assert res.status == "FINISHED"
    c, runs = _all_runs(tmp_path)
    trials = [r for r in runs if r.data.tags["role"] == "defense"]
    assert len(trials) == 6 and all(r.info.status == "FINISHED" for r in trials)
    last_epoch = {r.info.run_id: max(m.step for m in c.get_metric_history(r.info.run_id, "score")) for r in trials}
    assert {r.data.params["epochs"] for r in trials} == {"6"}
    stopped = [r for r in trials if r.data.tags.get("stopped_early") == "true"]
    full = [r for r in trials if r.data.tags["fully_trained"] == "true"]
    assert stopped and full and len(stopped) + len(full) == 6, [r.data.tags for r in trials]
    assert all(last_epoch[r.info.run_id] < 6 for r in stopped) and all(last_epoch[r.info.run_id] == 6 for r in full)
    study = optuna.load_study(study_name=f"{res.sweep_id}:badnets:ft", storage=journal(tmp_path))
    states = sorted(t.state.name for t in study.trials)
    assert states == sorted(["PRUNED"] * len(stopped) + ["COMPLETE"] * len(full)), states


def test_tuners_starting_at_once_register_their_trainables_without_a_race():
    """Tune keeps its trainables in one process-wide registry that registering iterates over; 16
    Tuners of a sweep starting in the same instant (threads of the driver) once failed one of
    them with "dictionary changed size during iteration". Each registers under its own name, one
    at a time, and every name resolves to its trainable."""
    import threading
    from types import SimpleNamespace

    import ray
    from ray.tune.registry import get_trainable_cls

    from sweep.execution import _tuners as tuners

    ctx = SimpleNamespace(cfg=SimpleNamespace(resources=SimpleNamespace(cpus=1, gpus=0)))
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=100 * 2 ** 20)
    try:
        barrier, names, errors = threading.Barrier(16), [], []

        def start(i):
            barrier.wait()
            try:
                names.append(tuners._trainable(ctx, f"pair{i}", SimpleNamespace(role="defense", i=i)))
            except Exception as e:       # the race raised inside Tune's registry
                errors.append(e)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert sorted(names) == sorted(f"defense_trial-pair{i}" for i in range(16))
        assert all(get_trainable_cls(n).__name__ for n in names)
    finally:
        ray.shutdown()


def _args(workdir, sets):
    return ["quickstart", "--workdir", str(workdir)] + [x for item in sets for x in ("--set", item)]


def _state(workdir):
    return json.loads(next((workdir / "sweeps").glob("*/sweep.json")).read_text())


def test_a_failed_pair_makes_the_sweep_partial_and_resume_redoes_only_it(tmp_path, monkeypatch, capsys):
    """NBA's one trial (lr 0.05, in the paper-default Tuner beside nothing else) fails through
    the test plugin; FT's searched pair finishes. The sweep ends PARTIAL (exit 3, after its
    report); --resume runs NBA's pair again (the plugin fails only once) and not FT's Tuner."""
    from sweep.cli import main

    _use_plugin(monkeypatch, "sweep_fail_low_lr_once")
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    args = _args(tmp_path, TINY + ["defenses.nba.num_samples=1", "defenses.nba.params.lr=0.05",
                                   "defenses.ft.num_samples=2", "defenses.ft.space.lr=[0.1, 0.2]"])
    assert main(args) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]        # after Ray's and MLflow's logs
    assert last.startswith("error: sweep") and "ended partial" in last and "badnets__nba" in last, last
    state = _state(tmp_path)
    sweep_dir = tmp_path / "sweeps" / state["sweep_id"]
    assert state["status"] == "partial"
    assert state["tuners"] == {"defaults__badnets": "failed", "badnets__ft": "done"}
    assert list(state["failures"]["defaults__badnets"]) == ["badnets__nba"]
    assert (sweep_dir / "report" / "report.md").is_file()          # the report of what finished
    c, runs = _all_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags["role"] == "sweep"]
    assert parent.info.status == "FAILED" and parent.data.tags["status"] == "partial"
    assert parent.data.tags["failed_pairs"] == "badnets__nba"
    ft_runs = sorted(r.info.run_id for r in runs if r.data.tags["defense"] == "ft" and r.data.tags["role"] == "defense")
    assert len(ft_runs) == 2

    assert main(args + ["--resume"]) == 0, capsys.readouterr().err
    state = _state(tmp_path)
    assert state["status"] == "finished" and state["failures"] == {}
    assert state["tuners"] == {"defaults__badnets": "done", "badnets__ft": "done"}
    assert list((sweep_dir / "ray").glob("defaults__badnets.failed-*"))      # the failed Tuner's files, kept aside
    c, runs = _all_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trials = [r for r in runs if r.data.tags["role"] == "defense"]
    assert sorted(r.info.run_id for r in trials if r.data.tags["defense"] == "ft") == ft_runs   # not run again
    assert sorted(r.info.status for r in trials if r.data.tags["defense"] == "nba") == ["FAILED", "FINISHED"]
    (parent,) = [r for r in runs if r.data.tags["role"] == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "finished"
    assert "failed_pairs" not in parent.data.tags


def test_replicate_remeasures_the_selected_config_at_another_seed_and_the_report_compares(
        tmp_path, monkeypatch, capsys):
    """A tiny search at seed 0 (FT: its paper default and one sampled lr), then ``replicate
    quickstart --seed 1``: FT at seed 1 tries the paper default and seed 0's selected config and
    nothing else. ``report --seeds`` takes each seed's cells from its sweep's MLflow runs, seed 1's
    selected cell from the trial of seed 0's choice, and compares on seed 1 alone."""
    import pandas as pd

    from sweep.cli import main

    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    sets = TINY + ["defenses.nba=null", "defenses.ft.num_samples=2", "defenses.ft.space.lr=[0.1, 0.2]",
                   "search.cross_check=false"]
    assert main(_args(tmp_path, sets)) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["replicate", "quickstart", "--seed", "0", "--workdir", str(tmp_path)]) == 2
    assert "ran at seed 0: replicate it at another seed" in capsys.readouterr().err
    assert main(["replicate", "quickstart", "--seed", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "replicating quickstart at seed 1: ft: the paper default and " in out and "--set seed=1" in out
    assert main(["report", "quickstart", "--seeds", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seed 0: quickstart-" in out and "seed 1: quickstart-" in out and "report over 2 seed(s)" in out
    assert "## Results in the layout of NBA Table 2" in out and "| badnets | " in out     # the tables, printed
    (md_path,) = tmp_path.glob("sweeps/*/report/seeds.md")
    md = md_path.read_text()
    assert "over seeds 0, 1" in md and "(the search)" in md and "(re-measures the search's selection)" in md
    assert "The search ran at seed 0" in md
    per_seed = pd.read_csv(md_path.parent / "seeds_long.csv")
    ids = {seed: per_seed.loc[per_seed["seed"] == seed, "sweep_id"].iloc[0] for seed in (0, 1)}
    best0 = yaml.safe_load((tmp_path / "sweeps" / ids[0] / "report" / "best_configs.yaml").read_text())
    chosen = best0["defenses"]["ft"]["per_attack"]["badnets"]
    c, runs = _all_runs(tmp_path)
    ft1 = [r for r in runs if r.data.tags.get("sweep_id") == ids[1] and r.data.tags.get("defense") == "ft"
           and r.data.tags.get("ray_trial_id")]
    # seed 1 ran exactly the paper default and seed 0's choice (the same config when that was the default)
    assert sorted(r.data.tags["config_key"] for r in ft1) == sorted(
        {chosen["paper_default"]["config_key"], chosen["best"]["config_key"]})
    rows = per_seed[(per_seed["defense"] == "ft") & (per_seed["config"] == "best")].set_index("seed")
    assert rows.loc[0, "run_id"] == chosen["best"]["run_id"]          # seed 0: its own selection
    (remeasured,) = [r for r in ft1 if r.data.tags["config_key"] == chosen["best"]["config_key"]]
    assert rows.loc[1, "run_id"] == remeasured.info.run_id            # seed 1: the same config's trial there
    assert rows.loc[1, "ba"] == pytest.approx(remeasured.data.metrics["ba"])
    summary = pd.read_csv(md_path.parent / "seeds_summary.csv").set_index(["attack", "defense", "config"])
    assert summary.loc[("badnets", "ft", "best"), "n"] == 2
    assert summary.loc[("badnets", "ft", "best"), "ba_mean"] == pytest.approx(rows["ba"].mean())
    compared = pd.read_csv(md_path.parent / "best_vs_default.csv")
    assert compared["n_best"].tolist() == [1] and compared["n_default"].tolist() == [1]    # seed 1 alone
    # the replication registered its models, but @best stays with seed 0's search
    assert c.get_model_version_by_alias("quickstart-ft", "best").run_id == chosen["best"]["run_id"]
    assert {v.tags["sweep_id"] for v in c.search_model_versions("name='quickstart-ft'")} == {ids[0], ids[1]}
    best1 = yaml.safe_load((tmp_path / "sweeps" / ids[1] / "report" / "best_configs.yaml").read_text())
    assert "quickstart-ft" not in best1["registered_models"]


def test_a_sweep_whose_every_stage_fails_exits_nonzero(tmp_path, monkeypatch, capsys):
    """The image folder exists (so the sweep starts) but holds no class folders: the attack stage
    fails in its worker, nothing else can run, and the command says so."""
    from sweep.cli import main

    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "SWEEP_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    images = tmp_path / "images"
    (images / "train").mkdir(parents=True)
    (images / "test").mkdir()
    sets = [x for x in TINY if not x.startswith("dataset=")] + [f"dataset=imagefolder:{images}"]
    assert main(_args(tmp_path / "w", sets)) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ended partial (1 failed: attack stage badnets)" in last, last
    state = _state(tmp_path / "w")
    assert state["status"] == "partial" and state["tuners"] == {}
    c, runs = _all_runs(tmp_path / "w")
    (attack_run,) = [r for r in runs if r.data.tags["role"] == "attack"]
    assert attack_run.info.status == "FAILED" and "no class folders" in attack_run.data.tags["error"]


# ============================================================================ kill and resume

DRIVER = """
import json, os, sys
from sweep.config import load_preset
from sweep.execution import run_sweep
cfg = load_preset("quickstart", json.loads(sys.argv[2]))
res = run_sweep(cfg, workdir=sys.argv[1], resume=sys.argv[3] == "resume", progress=print,
                optuna_storage=os.environ.get("SWEEP_OPTUNA_STORAGE"))
print("RESULT " + json.dumps({"status": res.status, "trained": res.trained_stages, "trials": res.trials}))
"""


def _wait_for_pause(fifo: Path, driver) -> bool:
    """True once the plugin writes to the FIFO; False if the driver ends first."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        while driver.poll() is None:
            ready, _, _ = select.select([fd], [], [], 1.0)   # wake up now and then to see the driver alive
            if ready and os.read(fd, 64):
                return True
        return False
    finally:
        os.close(fd)


def _kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _driver(workdir, overrides, mode, env, log):
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(workdir), json.dumps(overrides), mode],
                            cwd=ROOT, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.parametrize("where", ["workdir", "storage"])
def test_killed_driver_resumes_without_duplicates_and_trains_the_attack_once(where, tmp_path, monkeypatch):
    """``workdir``: the driver is killed and started again on the same work directory.
    ``storage``: the sweep keeps what it shares in a storage (a folder standing in for S3 or a
    mount), its runs in a tracking store and its studies in an RDB outside the work directory; the
    new driver starts from an EMPTY work directory, as one on another node would after the head
    was lost, and continues from those alone."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from sweep.execution import run_sweep

    workdir = tmp_path / "w"
    workdir.mkdir()
    fifo = tmp_path / "trial-paused.fifo"
    os.mkfifo(fifo)
    shared = tmp_path / "shared"
    store = shared / "store"
    # a short Ray temp dir (socket paths) holding a stale ray_current_cluster of a dead cluster:
    # both drivers must start their own local Ray instead of trying to join it
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    state_root = store if where == "storage" else workdir
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               SWEEP_PLUGINS="sweep_pause_fourth_trial", PAUSE_FIFO=str(fifo), PAUSE_COUNTERS=str(tmp_path / "starts"),
               PAUSE_STATE_GLOB=str(state_root / "sweeps" / "*" / "ray" / "*" / "experiment_state-*.json"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SWEEP_OPTUNA_STORAGE", "SWEEP_STORAGE"):
        env.pop(var, None)
    overrides = TINY + ["defenses.ft=null", "search.num_samples=10", "search.max_concurrent=2"]
    tracking, optuna_url = f"sqlite:///{workdir}/mlflow.db", None
    if where == "storage":
        shared.mkdir()
        overrides.append(f"storage.uri={store}")
        tracking, optuna_url = f"sqlite:///{shared}/mlflow.db", f"sqlite:///{shared}/optuna.db"
        # the tracking store stands in for a server: its artifacts too live off the driver's disk
        _client(tracking_uri=tracking).create_experiment("quickstart", artifact_location=(shared / "art").as_uri())
        env.update(MLFLOW_TRACKING_URI=tracking, SWEEP_OPTUNA_STORAGE=optuna_url,
                   SWEEP_LOCAL_CACHE=str(tmp_path / "node-cache"))
    cache_dir = (store if where == "storage" else workdir) / "cache"
    log = tmp_path / "driver.log"

    # the plugin pauses the 4th trial (two done, two running) and says so through the FIFO
    first = _driver(workdir, overrides, "new", env, log)
    family = []
    try:
        assert _wait_for_pause(fifo, first), "the driver ended before a trial paused:\n" + log.read_text()[-3000:]
        family = psutil.Process(first.pid).children(recursive=True)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        # the killed driver's Ray processes must not outlive the test
        _kill_all(family)
    cache_entries = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert len(cache_entries) == 1, cache_entries
    manifest_time = (cache_entries[0] / "manifest.json").stat().st_mtime_ns
    c, runs = _all_runs(tracking_uri=tracking)
    left_open = [r.data.tags["role"] for r in runs if r.info.status == "RUNNING"]
    assert "sweep" in left_open and "defense" in left_open, left_open     # the crash left runs open

    # resume (here, in-process) with the same stale cluster file in Ray's temp dir
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    for var in ("RAY_ADDRESS", "SWEEP_PLUGINS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    if where == "storage":
        shutil.rmtree(workdir)            # the new driver's node has never seen the old one's disk
        shutil.rmtree(tmp_path / "node-cache")
        monkeypatch.setenv("SWEEP_LOCAL_CACHE", str(tmp_path / "node-cache-2"))
        workdir = tmp_path / "w2"
    said = []
    res = run_sweep(load_preset("quickstart", overrides), workdir=workdir, resume=True, progress=said.append,
                    tracking_uri=tracking, optuna_storage=optuna_url)
    assert res.status == "FINISHED", said
    assert any("resuming the interrupted Tuner" in m for m in said), said
    assert res.trained_stages == []                       # the resumed driver trained no attack stage

    c, runs = _all_runs(tracking_uri=tracking)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trials = [r for r in runs if r.data.tags["role"] == "defense"]
    attack_runs = [r for r in runs if r.data.tags["role"] == "attack"]
    ids = [r.data.tags["ray_trial_id"] for r in trials]
    assert len(trials) == 10 and len(set(ids)) == 10, ids      # no duplicate run for a restored trial
    assert all(r.info.status == "FINISHED" and r.data.tags["fully_trained"] == "true" for r in trials)
    for r in trials:                                           # every trial's model reached MLflow
        assert "model/model.pt" in {a.path for a in c.list_artifacts(r.info.run_id, "model")}, r.data.tags["ray_trial_id"]
    # one attack stage, trained once: one cache entry, untouched by the resume, one attack run
    assert [p for p in cache_dir.iterdir() if not p.name.startswith(".")] == cache_entries
    assert (cache_entries[0] / "manifest.json").stat().st_mtime_ns == manifest_time
    assert len(attack_runs) == 1 and attack_runs[0].info.status == "FINISHED"
    assert attack_runs[0].data.tags["cached"] == "false"
    assert {r.data.tags["attack_hash"] for r in trials} == {cache_entries[0].name}
    (parent,) = [r for r in runs if r.data.tags["role"] == "sweep"]
    assert parent.info.status == "FINISHED" and parent.info.run_id == res.parent_run_id
    state = json.loads(next((workdir / "sweeps").glob("*/sweep.json")).read_text())
    assert state["status"] == "finished" and state["tuners"]["badnets__nba"] == "done"
    if where == "storage":                # the stored copy of the state is the finished one
        assert json.loads(next((store / "sweeps").glob("*/sweep.json")).read_text())["status"] == "finished"
        assert not any((store / "sweeps").glob("*/.checkpoints/*/*")), "a finished trial's checkpoints remain"
    # the study holds the 10 trials COMPLETE (restored trials told once) and nothing RUNNING: a
    # trial the killed driver asked Optuna for before Tune saved its searcher is marked FAIL
    studies = optuna_url or JournalStorage(JournalFileBackend(str(workdir / "optuna.journal")))
    study = optuna.load_study(study_name=f"{res.sweep_id}:badnets:nba", storage=studies)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 10 and set(states) <= {"COMPLETE", "FAIL"}, states

