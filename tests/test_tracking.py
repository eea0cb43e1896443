"""The tracking layer on a real MLflow store (SQLite in ``tmp_path``), without Ray: how metrics are
logged, how the experiment presents itself to the MLflow UI, and who writes the Model Registry
(the sweep that selected, never the report)."""
import json

import numpy as np
import pytest
import yaml

from sweep.analysis import build_best_configs, make_report
from sweep.config import config_json, config_key, full_defense_params, load_preset
from sweep.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, SweepState, Tracker, load_runs, logged_value,
                            register_best)


def _tracker(tmp_path, name="exp"):
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", name, tmp_path)


def test_metrics_are_logged_as_the_report_reads_them(tmp_path):
    tracker = _tracker(tmp_path)
    run = tracker.create_run("r", {"sweep_id": "s", "role": "defense", "ray_trial_id": "t", "fully_trained": "true"})
    noisy = float(np.float32(0.73))                      # what a float32 accuracy becomes: 0.7300000190734863
    assert noisy != 0.73
    tracker.log_metrics(run, {"ba": noisy, "asr": 0.123456789, "student_asr": 0.98765, "ba_before": 0.91,
                              "score": float(np.float32(0.6)), "der": 0.912345678, "images_per_second": 612.3456789,
                              "train_seconds": 12.0, "trials_finished": 3})
    got = tracker.client.get_run(run).data.metrics
    # accuracies and rates at the report's precision (2 decimals in %), the rest at 6 digits
    assert got["ba"] == 0.73 and got["asr"] == 0.1235 and got["student_asr"] == 0.9877 and got["score"] == 0.6
    assert got["ba_before"] == 0.91 and got["der"] == 0.912346 and got["images_per_second"] == 612.346
    assert got["train_seconds"] == 12.0 and got["trials_finished"] == 3
    assert f"{100 * got['ba']:.2f}" == "73.00"
    # what selection reads back is the logged value
    assert load_runs(tracker, "s").iloc[0]["asr"] == 0.1235
    assert logged_value("ra", 1 / 3) == 0.3333 and logged_value("loss", 1 / 3) == 0.333333
    assert logged_value("images", 1234567.0) == 1234567.0


def test_the_experiment_is_marked_as_model_training(tmp_path):
    tracker = _tracker(tmp_path, "new")
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert EXPERIMENT_KIND == "custom_model_development"          # not the UI's GenAI mode
    # an experiment made without the tag gets it when a sweep opens it
    old = tracker.client.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in tracker.client.get_experiment(old).tags
    again = _tracker(tmp_path, "made-elsewhere")
    assert again.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def _sweep_with_one_trial(tmp_path, seed: int, searches: bool):
    """A defense sweep's state and MLflow runs as a finished sweep leaves them: its attack stage
    and one finished FT trial with its model files (no training: the files are placeholders)."""
    sets = ["dataset=synthetic:400:200", "attacks=[badnets]", f"seed={seed}", "paper_table=null",
            "defenses={ft: {num_samples: %d}}" % (3 if searches else 1)]
    cfg = load_preset("quickstart", sets)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    state = SweepState.create(cfg, tmp_path)
    tracker = Tracker(uri, cfg.name, tmp_path)
    base = {"sweep_id": state.sweep_id, "preset": cfg.name, "seed": seed}
    parent = tracker.create_run(state.sweep_id, {**base, "role": "sweep"})
    state.data.update(parent_run_id=parent, tracking_uri=uri, experiment=cfg.name, status="finished")
    state.save()
    stage = tracker.create_run("attack", {**base, "role": "attack", "attack": "badnets", "defense": "none"}, parent)
    tracker.log_metrics(stage, {"ba": 0.8, "asr": 1.0, "ra": 0.0})
    params = full_defense_params("ft", cfg.defense("ft").first_trial())
    trial = tracker.create_run("ft/badnets/t1", {**base, "role": "defense", "attack": "badnets", "defense": "ft",
                                                 "ray_trial_id": f"t{seed}", "fully_trained": "true",
                                                 "config_key": config_key(params), "config_json": config_json(params),
                                                 "pair": "badnets__ft"}, parent, params)
    tracker.log_metrics(trial, {"ba": 0.78, "asr": 0.05, "ra": 0.7, "der": 0.95})
    files = tmp_path / f"model-{seed}"
    files.mkdir()
    (files / "model.pt").write_bytes(b"state_dict")
    (files / "spec.json").write_text(json.dumps({"model": "wrn-16-1"}))
    tracker.log_artifacts(trial, [files / "model.pt", files / "spec.json"], "model")
    for run in (stage, trial, parent):
        tracker.end(run)
    return cfg, state, tracker, trial


def test_the_report_reads_the_model_registry_and_never_writes_it(tmp_path):
    cfg, state, tracker, trial = _sweep_with_one_trial(tmp_path, 0, searches=True)
    report = make_report(state.sweep_id, workdir=tmp_path, progress=lambda m: None)
    assert tracker.client.search_registered_models() == []            # the report registered nothing
    assert report.best_configs.registered_models == {}
    assert report.best_configs.pair("ft", "badnets").best.run_id == trial
    # the sweep registers its selection (the runner does this once its runs are closed) ...
    best = build_best_configs(cfg, state.sweep_id, load_runs(tracker, state.sweep_id))
    set_ = register_best(tracker, cfg, state.sweep_id, best, progress=lambda m: None, move_aliases=cfg.searches)
    assert set_ == {"quickstart-ft": {"best-badnets": 1, "best": 1}}
    # ... and a report made afterwards shows it, moving nothing
    again = make_report(state.sweep_id, workdir=tmp_path, progress=lambda m: None)
    assert again.best_configs.registered_models == {"quickstart-ft": {"best": 1, "best-badnets": 1}}
    on_disk = yaml.safe_load(again.best_configs_file.read_text())
    assert on_disk["registered_models"] == {"quickstart-ft": {"best": 1, "best-badnets": 1}}
    assert len(tracker.client.search_model_versions("name='quickstart-ft'")) == 1


def test_a_sweep_that_searched_nothing_leaves_the_aliases_where_a_search_set_them(tmp_path):
    cfg, state, tracker, _ = _sweep_with_one_trial(tmp_path, 0, searches=True)
    best = build_best_configs(cfg, state.sweep_id, load_runs(tracker, state.sweep_id))
    register_best(tracker, cfg, state.sweep_id, best, progress=lambda m: None, move_aliases=cfg.searches)
    other_cfg, other, _, _ = _sweep_with_one_trial(tmp_path, 1, searches=False)
    assert not other_cfg.searches
    best = build_best_configs(other_cfg, other.sweep_id, load_runs(tracker, other.sweep_id))
    said = []
    assert register_best(tracker, other_cfg, other.sweep_id, best, said.append, move_aliases=other_cfg.searches) == {}
    assert tracker.client.get_registered_model("quickstart-ft").aliases == {"best": 1, "best-badnets": 1}
    assert "left where an earlier sweep set them" in said[0]
    assert make_report(other.sweep_id, workdir=tmp_path, progress=lambda m: None).best_configs.registered_models == {}


def test_best_configs_load_back_from_their_yaml(tmp_path):
    cfg, state, tracker, _ = _sweep_with_one_trial(tmp_path, 0, searches=True)
    report = make_report(state.sweep_id, workdir=tmp_path, progress=lambda m: None)
    from sweep.analysis import BestConfigs

    loaded = BestConfigs.load(report.best_configs_file)
    assert loaded == report.best_configs and loaded.to_dict() == yaml.safe_load(report.best_configs_file.read_text())
    with pytest.raises(KeyError):
        loaded.pair("nba", "badnets")
