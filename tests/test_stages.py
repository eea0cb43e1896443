"""Several attack stages per attack (``search.stages``), without Ray: the preset field, the plan
and the stages' seeds, the aggregates (from the per-stage metrics MLflow holds), selection on them
and its rule against the paper default, the report's estimate beside held-out seeds, and
``--dry-run``'s price. The real-Ray search is in ``test_stages_ray.py``."""
import json
import math

import pandas as pd
import pytest

from sweep.analysis import build_best_configs, select_best, tables_markdown
from sweep.analysis import layout_section
from sweep.analysis._tables import aggregate_seeds, estimate_against_held_out, seeds_markdown
from sweep.config import STAGE_SEED_STRIDE, config_json, config_key, full_defense_params, load_preset, stage_seed
from sweep.errors import ConfigError
from sweep.planning import make_plan
from sweep.tracking import Tracker, load_runs
from trainables.metrics import stage_aggregates

ONE_ATTACK = ["dataset=synthetic:400:200", "attacks=[badnets]", "paper_table=null", "defenses={ft: {num_samples: 5}}"]


# ============================================================================ the preset field

def test_one_stage_is_todays_sweep_and_more_stages_are_another_experiment():
    today = load_preset("quickstart")
    assert today.search.stages == 1 and today.stage_seeds == (0,)
    assert load_preset("quickstart", ["search.stages=1"]).config_hash() == today.config_hash()
    three = load_preset("quickstart", ["search.stages=3"])
    assert three.config_hash() != today.config_hash()
    assert three.seed_free_hash() == today.seed_free_hash()      # its replicates at one stage compare with it
    assert three.stage_seeds == (0, STAGE_SEED_STRIDE, 2 * STAGE_SEED_STRIDE)
    assert load_preset("quickstart", ["search.stages=2", "seed=7"]).stage_seeds == (7, 7 + STAGE_SEED_STRIDE)


@pytest.mark.parametrize("sets, message", [
    (["search.stages=0"], "search.stages=0 is below its minimum 1"),
    (["search.stages=two"], "search.stages: expected int"),
    (["search.objectives={asr_worst: min, ba: max}"], "'asr_worst' is an aggregate over attack stages: it needs "
                                                      "search.stages > 1 (with one stage use 'asr')"),
    (["search.stages=2", "search.objectives={asr_best: min}"], "unknown metric 'asr_best'"),
    (["search.stages=2", "selection.metric=ba_median"], "selection: unknown metric 'ba_median'"),
    (["search.stages=2", f"seed={STAGE_SEED_STRIDE}"], "the seed must be below 1000000"),
])
def test_bad_stage_settings_are_refused_with_the_key(sets, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_preset("quickstart", sets)
    assert message in str(e.value)


def test_an_attack_sweep_takes_no_stages():
    with pytest.raises(ConfigError, match="search.stages=2: an attack sweep"):
        load_preset("cheatkd_cifar100", ["search.stages=2"])


def test_the_plan_has_each_attacks_stages_at_their_seeds_the_first_as_today():
    one = make_plan(load_preset("quickstart", ["attacks=[badnets, trojannn]"]))
    two = make_plan(load_preset("quickstart", ["attacks=[badnets, trojannn]", "search.stages=2"]))
    for attack in ("badnets", "trojannn"):
        stages = two.stages_for(attack)
        assert [s.index for s in stages] == [0, 1]
        assert [s.spec.seed for s in stages] == [0, STAGE_SEED_STRIDE]
        assert stages[0].hash == one.stage_for(attack).hash          # stage 0: the one-stage sweep's
        assert stages[1].hash != stages[0].hash
    clean = [s for s in two.stages if s.level == 0]                  # TrojanNN fits on a clean model per stage
    assert sorted(s.spec.seed for s in clean) == [0, STAGE_SEED_STRIDE]
    assert len(two.stages) == 2 * len(one.stages)


# ============================================================================ aggregates

def test_stage_aggregates_mean_worst_and_sample_std():
    agg = stage_aggregates([{"asr": 0.1, "ba": 0.8}, {"asr": 0.4, "ba": 0.7}, {"asr": 0.1, "ba": float("nan")}])
    assert agg["asr_stage1"] == 0.4 and "ba_stage2" not in agg
    assert agg["asr_mean"] == pytest.approx(0.2) and agg["asr_worst"] == 0.4
    assert agg["asr_std"] == pytest.approx(math.sqrt(((0.1 - 0.2) ** 2 * 2 + 0.2 ** 2) / 2))
    assert agg["ba_worst"] == 0.7 and agg["ba_mean"] == pytest.approx(0.75)
    assert math.isnan(stage_aggregates([{"ba": 0.8}])["ba_std"])     # one stage: no spread


def test_the_aggregates_are_computed_from_the_per_stage_metrics_mlflow_holds(tmp_path):
    """A run whose aggregates were logged wrong (or not at all): what selection reads comes from
    its per-stage metrics."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", tmp_path)
    run = tracker.create_run("r", {"sweep_id": "s", "role": "defense", "ray_trial_id": "t", "fully_trained": "true"})
    tracker.log_metrics(run, {"asr_stage0": 0.02, "asr_stage1": 0.30, "asr_stage2": 0.04,
                              "ba_stage0": 0.80, "ba_stage1": 0.70, "ba_stage2": 0.75,
                              "ba": 0.5, "asr_worst": 0.02})
    tracker.end(run)
    row = load_runs(tracker, "s").iloc[0]
    assert row["asr_worst"] == 0.30 and row["ba_worst"] == 0.70
    assert row["ba"] == pytest.approx(0.75) and row["ba_mean"] == pytest.approx(0.75)
    assert row["asr"] == pytest.approx(0.12) and row["asr_std"] == pytest.approx(0.1562, abs=1e-4)


# ============================================================================ selection

def _stage_runs(cfg, trials: dict[str, dict]):
    """Hand-made finished trial runs of FT as ``load_runs`` reads them: name -> {"lr": ...,
    "asr": [per stage], "ba": [per stage], "attack": (BadNets)}; the one at the paper default is
    keyed as the paper default."""
    from sweep.tracking._runs import with_stage_aggregates

    rows = []
    for i, (name, t) in enumerate(trials.items()):
        params = full_defense_params("ft", {**cfg.defense("ft").first_trial(), "lr": t["lr"]})
        attack = t.get("attack", "badnets")
        row = {"run_id": name, "ray_trial_id": name, "start_time": i, "status": "FINISHED", "fully_trained": "true",
               "candidate": True, "role": "defense", "attack": attack, "defense": "ft", "pair": f"{attack}__ft",
               "config_key": config_key(params), "config_json": config_json(params)}
        for m in ("asr", "ba"):
            row.update({f"{m}_stage{k}": v for k, v in enumerate(t[m])})
        rows.append(row)
    return with_stage_aggregates(pd.DataFrame(rows))


def test_a_configuration_that_wins_one_stage_by_luck_loses_to_one_that_wins_on_average():
    cfg = load_preset("quickstart", ONE_ATTACK + ["search.stages=3"])
    runs = _stage_runs(cfg, {
        "default": {"lr": 0.1, "asr": [0.30, 0.35, 0.25], "ba": [0.80, 0.80, 0.80]},
        "lucky": {"lr": 0.05, "asr": [0.01, 0.45, 0.40], "ba": [0.82, 0.82, 0.82]},
        "steady": {"lr": 0.2, "asr": [0.05, 0.06, 0.07], "ba": [0.80, 0.79, 0.81]}})
    # on its first stage alone (a one-stage search) the lucky one wins the rule
    first_stage = runs.assign(asr=runs["asr_stage0"], ba=runs["ba_stage0"])
    assert select_best(first_stage, cfg.selection)["run_id"] == "lucky"
    # on the three stages' means it fails the bound (28.67% ASR) and the steady one wins
    best = build_best_configs(cfg, "s", runs).pair("ft", "badnets")
    assert best.best.run_id == "steady" and best.paper_default.run_id == "default"
    assert best.against_default["verdict"] == "better"
    assert best.against_default["delta_asr"] == pytest.approx(-24.0) and best.against_default["delta_ba"] == 0.0
    assert "better than the paper default beyond the spread over 3 stages" in best.best.why
    assert best.best.metrics["asr_worst"] == 0.07 and best.best.metrics["asr_std"] == pytest.approx(0.01)
    # worst-case ASR as the first objective (and so the selection metric): the same choice
    worst = load_preset("quickstart", ONE_ATTACK + ["search.stages=3", "search.objectives={asr_worst: min, ba: max}"])
    assert build_best_configs(worst, "s", runs).pair("ft", "badnets").best.run_id == "steady"


def test_the_default_is_kept_when_no_candidate_beats_it_beyond_the_spread():
    cfg = load_preset("quickstart", ONE_ATTACK + ["search.stages=3"])
    runs = _stage_runs(cfg, {
        "default": {"lr": 0.1, "asr": [0.08, 0.30, 0.05], "ba": [0.80, 0.80, 0.80]},
        "pick": {"lr": 0.2, "asr": [0.02, 0.09, 0.07], "ba": [0.81, 0.80, 0.79]}})
    # the rule alone picks the candidate (mean ASR 6% meets the bound, the default's 14.33% does not) ...
    assert select_best(runs, cfg.selection)["run_id"] == "pick"
    # ... but its paired gain (8.33 ASR points) is within the spread of the per-stage differences (11.68)
    best = build_best_configs(cfg, "s", runs)
    pair = best.pair("ft", "badnets")
    assert pair.best.run_id == "default" and pair.paper_default.run_id == "default"
    assert pair.against_default == {"config_key": runs.iloc[1]["config_key"], "run_id": "pick", "stages": 3,
                                    "delta_asr": -8.33, "spread_asr": 11.68, "delta_ba": 0.0, "spread_ba": 1.0,
                                    "verdict": "within the spread"}
    assert pair.best.why.startswith("the paper default, kept: the rule's pick")
    assert best.to_dict()["defenses"]["ft"]["per_attack"]["badnets"]["against_default"]["verdict"] == "within the spread"
    md, tables = tables_markdown(cfg, runs.assign(attack_hash=""), best)
    (line,) = [x for x in md.splitlines() if "the paper default, kept" in x]       # the report says so, once
    assert line.startswith("- **ft / badnets**: ")
    assert "mean ± sample std over the 3 attack stages" in md
    assert tables["results_long"].set_index("config").loc["best", "asr_std"] == pytest.approx(0.1365, abs=1e-4)


@pytest.mark.parametrize("pick_asr, cross_checked", [([0.02, 0.09, 0.07], False), ([0.02, 0.22, 0.0], True)])
def test_the_cross_check_measures_the_selection_on_the_other_attacks(monkeypatch, pick_asr, cross_checked):
    """A kept paper default was measured on every attack already: nothing to cross-check; a pick
    that beat it beyond the spread is measured on the other attack."""
    from types import SimpleNamespace

    from sweep.execution import _schedule as schedule

    cfg = load_preset("quickstart", ONE_ATTACK + ["attacks=[badnets, blend]", "search.stages=3"])
    runs = _stage_runs(cfg, {
        "default": {"lr": 0.1, "asr": [0.08, 0.30, 0.05], "ba": [0.80, 0.80, 0.80]},
        "pick": {"lr": 0.2, "asr": pick_asr, "ba": [0.81, 0.80, 0.79]},
        "blend-default": {"lr": 0.1, "asr": [0.5, 0.5, 0.5], "ba": [0.8, 0.8, 0.8], "attack": "blend"}})
    monkeypatch.setattr(schedule, "load_runs", lambda tracker, sweep_id: runs)
    plan = make_plan(cfg)
    ctx = SimpleNamespace(cfg=cfg, plan=plan, state=SimpleNamespace(sweep_id="s"), tracker=None,
                          stage_dirs={s.hash: f"/{s.hash}" for s in plan.stages})
    cases = schedule._crosscheck_cases(ctx, next(p for p in plan.pairs if p.key == "badnets__ft"))
    assert cases == ([{"attack": "blend", "params": json.loads(runs.iloc[1]["config_json"])}] if cross_checked else [])


def test_the_search_estimate_stands_beside_the_held_out_seeds():
    cfg = load_preset("quickstart", ONE_ATTACK + ["search.stages=3"])
    runs = _stage_runs(cfg, {
        "default": {"lr": 0.1, "asr": [0.30, 0.35, 0.25], "ba": [0.80, 0.80, 0.80]},
        "steady": {"lr": 0.2, "asr": [0.05, 0.06, 0.07], "ba": [0.80, 0.79, 0.81]}})
    estimate = build_best_configs(cfg, "s", runs)
    held_out = pd.DataFrame([{"attack": "badnets", "defense": "ft", "config": kind, "seed": seed, "asr": asr,
                              "ba": 0.8, "ra": 0.5, "paper_asr": None, "paper_ba": None}
                             for kind, values in (("best", (0.10, 0.20)), ("paper_default", (0.3, 0.5)))
                             for seed, asr in zip((1, 2), values)])
    rows = {r["config"]: r for r in estimate_against_held_out(estimate, aggregate_seeds(held_out))}
    assert rows["best"]["search_asr"] == 6.0 and rows["best"]["search_asr_std"] == 1.0 and rows["best"]["stages"] == 3
    assert rows["best"]["held_out_asr"] == 15.0 and rows["best"]["held_out_asr_std"] == pytest.approx(7.07)
    assert rows["paper_default"]["search_asr"] == 30.0 and rows["paper_default"]["n_held_out"] == 2
    # report --seeds: the section, printed by the command too
    undefended = pd.DataFrame([{"attack": "badnets", "defense": "none", "config": "-", "seed": seed, "asr": 1.0,
                                "ba": 0.8, "ra": 0.0, "paper_asr": None, "paper_ba": None} for seed in (0, 1, 2)])
    searched = held_out.assign(seed=0, asr=[0.06, 0.06, 0.3, 0.3]).iloc[[0, 2]]
    md, tables = seeds_markdown(cfg, pd.concat([undefended, searched, held_out], ignore_index=True), 0, estimate)
    assert "| badnets | ft | selected | 6.00 ± 1.00 (3 stage(s)) | 15.00 ± 7.07 (2 seed(s)) |" in layout_section(md)
    assert len(tables["estimate_vs_held_out"]) == 2


# ============================================================================ what it costs

def test_the_dry_run_prices_k_stages_and_what_early_stopping_saves():
    from sweep import dry_run
    from sweep.planning._estimate import count_images, expected_stages

    one = load_preset("quickstart", ONE_ATTACK)
    three = load_preset("quickstart", ONE_ATTACK + ["search.stages=3",
                                                    "search.early_stopping={enabled: true, metric: score}"])
    i1, i3 = count_images(one, make_plan(one)), count_images(three, make_plan(three))
    assert i3.stages == pytest.approx(3 * i1.stages) and i3.trials == pytest.approx(3 * i1.trials)
    assert expected_stages(1) == 1 and expected_stages(2) == 1.5 and expected_stages(3) == 1.75
    assert expected_stages(4) == 2.0
    text = dry_run(three)
    assert f"stages per attack: 3 (seeds 0, {stage_seed(0, 1)}, {stage_seed(0, 2)})" in text
    # 4 of the 5 trials may stop: 4 x (3 - 1.75) of the 15 trial-stages
    assert "defends ~1.75 of 3 stages; expected saving: up to 33% of the trials' 15 trial-stages" in text
    assert "stages per attack" not in dry_run(one)


def test_a_stage_report_logs_its_stage_metrics_and_no_placeholders():
    from sweep.execution._callbacks import loggable

    epoch = {"ba": 0.8, "asr": 0.1, "asr_worst": float("nan"), "ba_mean": float("nan"), "measured": 1, "step": 3}
    assert loggable(epoch) == {"ba": 0.8, "asr": 0.1}
    stage = {"ba": 0.8, "score": 0.7, "ba_stage0": 0.8, "ba_mean": 0.8, "ba_std": float("nan"), "stages_done": 1,
             "stage_rung": 1, "measured": 0}
    assert loggable(stage) == {"ba_stage0": 0.8, "ba_mean": 0.8, "stages_done": 1}


def test_the_trials_summary_over_its_stages():
    from trainables.tune_trainable import stages_summary

    out = stages_summary([{"ba": 0.8, "asr": 0.1, "ra": 0.7, "der": 0.9, "ba_before": 0.9, "train_seconds": 2.0},
                          {"ba": 0.6, "asr": 0.3, "ra": 0.5, "der": 0.8, "ba_before": 0.9, "train_seconds": 3.0}])
    assert out["stages_done"] == 2 and out["train_seconds"] == 5.0
    assert out["ba"] == pytest.approx(0.7) and out["asr_worst"] == 0.3 and out["score"] == pytest.approx(0.5)
    assert json.loads(json.dumps(out))["ba_stage1"] == 0.6
