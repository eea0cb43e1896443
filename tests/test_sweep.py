"""The sweep layer without Ray: selection and tables on hand-made runs, the trial job, plugins
and their trial hooks, and the Ctrl-C / SIGTERM handling. The real-Ray sweeps are in
``test_sweep_ray.py``."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sweep.config import Selection
from sweep.config import load_table
from sweep.config import load_preset
from sweep.analysis import best_across_attacks, pareto_front, select_best
from trainables.job import TrialCase, TrialJob, decode
from trainables.params import freeze

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"


# ============================================================================ selection

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


SEL = Selection(rule="ba_within", bound=10.0, ba_tolerance=2.0, metric="asr", mode="min", ba_metric="ba")
BOUND = Selection(rule="bound", bound=10.0, ba_tolerance=2.0, metric="asr", mode="min", ba_metric="ba")


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
    assert select_best(df, Selection("best_metric", 10.0, 2.0, "asr", "min", "ba"))["run_id"] == "r2"
    assert select_best(df.iloc[4:], SEL) is None          # no candidate at all


def test_the_old_rule_picks_the_no_op_and_the_bound_rule_picks_the_defense():
    """As measured in a quickstart sweep: the config that leaves the model alone keeps the best BA
    and its backdoor; ``ba_within`` selects it, the default ``bound`` rule does not."""
    from sweep.analysis import choose

    df = _runs([
        {"key": "no-op", "asr": 0.9644, "ba": 0.830},     # barely changed: the backdoored model's BA
        {"key": "weak", "asr": 0.8511, "ba": 0.800},
        {"key": "works", "asr": 0.015, "ba": 0.797},      # backdoor removed, 3.3 BA points lost
        {"key": "harsh", "asr": 0.004, "ba": 0.702},      # removed too, at a heavy BA cost
    ])
    assert select_best(df, SEL)["config_key"] == "no-op"
    row, why = choose(df, BOUND)
    assert row["config_key"] == "works"
    assert why == "asr 1.50% meets the bound (≤ 10%) and its ba 79.70% is the highest of the 2 of 4 candidates that do"
    # nothing removes the backdoor: the lowest ASR, and the reason says so
    row, why = choose(df.iloc[:2], BOUND)
    assert row["config_key"] == "weak" and why.startswith("no candidate of 2 reaches asr ≤ 10%")
    # an attack sweep's bound is a floor: CheatKD wants student ASR >= 90%, then the best student BA
    attack = Selection("bound", 90.0, 2.0, "student_asr", "max", "student_ba")
    df = _runs([{"key": "a", "student_asr": 0.97, "student_ba": 0.70}, {"key": "b", "student_asr": 0.93,
                "student_ba": 0.78}, {"key": "c", "student_asr": 0.40, "student_ba": 0.80}])
    assert select_best(df, attack)["config_key"] == "b"


def test_across_attacks_the_bound_rule_takes_the_best_mean_ba_among_configs_that_remove_every_backdoor():
    rows = []
    for attack, asr_a, asr_b in (("badnets", 0.02, 0.05), ("blend", 0.08, 0.30)):
        rows += [{"attack": attack, "key": "A", "asr": asr_a, "ba": 0.76},
                 {"key": "B", "attack": attack, "asr": asr_b, "ba": 0.81}]
    best = best_across_attacks(_runs(rows), ["badnets", "blend"], BOUND)
    assert best.config_key == "A" and best.note is None          # B leaves blend's backdoor in
    rows = [r for r in rows if r["key"] == "B"]
    best = best_across_attacks(_runs(rows), ["badnets", "blend"], BOUND)
    assert best.config_key == "B" and "no configuration reaches asr ≤ 10% on every attack" in best.note


def test_best_across_attacks_uses_worst_case_asr_of_configs_measured_everywhere():
    rows = []
    for attack, asr_a, asr_b, asr_c in (("badnets", 0.01, 0.02, 0.00), ("blend", 0.09, 0.03, 0.00)):
        rows += [{"attack": attack, "key": "A", "asr": asr_a, "ba": 0.80},
                 {"attack": attack, "key": "B", "asr": asr_b, "ba": 0.80}]
    rows.append({"attack": "badnets", "key": "C", "asr": 0.0, "ba": 0.81})     # not measured on blend
    best = best_across_attacks(_runs(rows), ["badnets", "blend"], SEL)
    assert best.config_key == "B" and (best.metric, best.worst_case) == ("asr", 0.03)
    assert best.to_dict()["worst_case_asr"] == 0.03
    assert best.n_configs_on_all_attacks == 2
    assert set(best.per_attack) == {"badnets", "blend"}


def test_dlp_table3_layout_puts_the_papers_numbers_beside_ours():
    """DLP Table 3's layout (rows defenses, columns attacks, CA / ASR) from hand-made runs."""
    from sweep.analysis import build_best_configs
    from sweep.analysis import tables_markdown
    from sweep.config import config_key, full_defense_params

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
    best = build_best_configs(cfg, "s", runs)
    assert best.pair("dlp", "sig").paper_default.metrics["asr"] == 0.05
    assert best.to_dict()["defenses"]["dlp"]["per_attack"]["sig"]["paper_default"]["metrics"]["asr"] == 0.05
    md, tables = tables_markdown(cfg, runs, best)
    assert "DLP Table 3" in md and "CA / ASR" in md
    assert "| defense | badnets | trojannn | blend | cla | sig |" in md
    assert "| DLP | 88.00 / 1.00 (93.08 / 0.24; -5.08 / +0.76) |" in md     # ours (paper; ours - paper)
    assert "| no defense | 90.00 / 99.00 (91.31 / 100.00; -1.31 / -1.00) |" in md
    long = tables["results_long"]
    assert len(long) == 5 * (1 + 4) and long[long["defense"] == "anp"]["paper_ba"].tolist()[0] == 90.16
    dlp_sig = long[(long["defense"] == "dlp") & (long["attack"] == "sig")].iloc[0]
    assert (dlp_sig["diff_ba"], dlp_sig["diff_asr"]) == (round(88.0 - load_table("dlp_table3").value("sig", "dlp")["ba"], 2),
                                                         round(5.0 - load_table("dlp_table3").value("sig", "dlp")["asr"], 2))


def _long(seed, cells):
    """A ``results_long`` frame of one seed: cells = {(attack, defense, config): (asr, ba)}."""
    rows = [{"attack": a, "defense": d, "config": k, "run_id": f"{seed}{a}{d}{k}", "asr": asr, "ba": ba, "ra": 0.5,
             "paper_asr": 1.0, "paper_ba": 80.0, "seed": seed} for (a, d, k), (asr, ba) in cells.items()]
    return pd.DataFrame(rows)


def test_a_report_over_seeds_gives_mean_and_std_and_says_whether_the_search_beat_the_default():
    from sweep.analysis import aggregate_seeds, best_against_default

    per_seed = pd.concat([_long(s, {
        ("badnets", "none", "-"): (1.0, 0.80 + d),
        ("badnets", "nba", "best"): (0.02, 0.79 + d),            # BA +4 points, spread 2: better
        ("badnets", "nba", "paper_default"): (0.03, 0.75 + d),
        ("blend", "nba", "best"): (0.02 + 2 * d, 0.75 + 2 * d),   # BA +1 point, spread 4: within
        ("blend", "nba", "paper_default"): (0.02, 0.74 + 2 * d),
        ("sig", "nba", "best"): (0.30 + d, 0.70 + d),             # ASR +20 points, BA -5: worse
        ("sig", "nba", "paper_default"): (0.10, 0.75 + d),
    }) for s, d in ((0, -0.01), (1, 0.0), (2, 0.01))], ignore_index=True)
    per_seed.loc[(per_seed["seed"] == 2) & (per_seed["config"] == "-"), "ba"] = None   # seed 2's stage lost
    agg = aggregate_seeds(per_seed).set_index(["attack", "defense", "config"])
    none = agg.loc[("badnets", "none", "-")]
    assert none["n"] == 2 and none["seeds"] == "0,1"
    assert none["ba_mean"] == pytest.approx(0.795) and none["ba_std"] == pytest.approx(0.00707, abs=1e-5)
    best = agg.loc[("badnets", "nba", "best")]
    assert best["n"] == 3 and best["ba_mean"] == pytest.approx(0.79) and best["ba_std"] == pytest.approx(0.01)
    assert best["diff_ba"] == pytest.approx(79.0 - 80.0) and best["diff_asr"] == pytest.approx(2.0 - 1.0)
    verdicts = {c["attack"]: c for c in best_against_default(aggregate_seeds(per_seed))}
    assert verdicts["badnets"]["verdict"] == "better"
    assert verdicts["badnets"]["delta_ba"] == pytest.approx(4.0) and verdicts["badnets"]["spread_ba"] == pytest.approx(2.0)
    assert verdicts["blend"]["verdict"] == "within the spread"
    assert verdicts["sig"]["verdict"] == "worse"
    one = best_against_default(aggregate_seeds(per_seed[per_seed["seed"] == 0]))
    assert {c["verdict"] for c in one} == {"one seed: no spread to compare against"}


def test_the_repeats_of_a_sweep_at_other_seeds_are_found(tmp_path):
    """``report --seeds`` groups the sweeps of one preset that measure the same cells at other
    seeds: the config but the seed and the search settings, over all or some of the attacks (one
    sweep per seed: the named one for its own seed; else finished, more attacks, newer first)."""
    from sweep.tracking import SweepState

    def made(overrides, status, created):
        st = SweepState.create(load_preset("quickstart", overrides), tmp_path)
        st.data.update(status=status, created=created)
        st.save()
        return st.sweep_id

    s0 = made(["seed=0"], "finished", 1)
    s1_old = made(["seed=1"], "finished", 2)
    made(["seed=1"], "partial", 3)                               # newer, unfinished: not chosen
    s1_row = made(["seed=1", "attacks.blend=null"], "finished", 4)    # fewer rows than s1_old: not chosen
    s2 = made(["seed=2", "attacks.blend=null"], "finished", 5)   # the BadNets row alone
    made(["seed=1", "clean_fraction=0.2"], "finished", 6)       # another experiment
    other = made(["seed=4", "attacks.badnets.params.patch_size=4"], "finished", 7)    # another BadNets stage
    s3 = made(["seed=3", "search.num_samples=2", "search.cross_check=false",  # re-measures chosen configs
               "defenses.nba.also_try=[{beta: 1.0}]", "defenses.ft.num_samples=1"], "finished", 8)
    ref, got = SweepState.seed_siblings(s0, tmp_path)
    assert ref.sweep_id == s0 and [s.sweep_id for s in got] == [s0, s1_old, s2, s3]
    # named by its id, a sweep of fewer rows is the reference: only sweeps within its rows join it
    ref, got = SweepState.seed_siblings(s2, tmp_path)
    assert ref.sweep_id == s2 and [s.sweep_id for s in got] == [s1_row, s2]
    # named by the preset: the newest finished sweep that searched (s3 did not), of the most attacks
    ref, got = SweepState.seed_siblings("quickstart", tmp_path)
    assert ref.sweep_id == other and [s.sweep_id for s in got] == [other]


def test_every_paper_table_loads_and_the_presets_choose_theirs():
    from sweep.config import known_tables

    assert known_tables() == ["cheatkd_students", "cheatkd_table2", "dlp_table3", "nba_table2"]
    assert load_table("nba_table2").value("sig", "nba") == {"asr": 1.95, "ba": 81.71}
    assert load_table("dlp_table3").value("cla", "abl") == {"ba": 89.12, "asr": 0.0}
    assert load_table("cheatkd_table2").value("cheatkd", "none") == {"student_asr": 96.1, "student_ba": 79.4}
    assert load_table("cheatkd_students").value("badnets", "kd") == {"ba": 80.1, "asr": 0.4}   # the control
    assert load_table("dlp_table3").unit == "CA / ASR"
    chosen = {p: load_preset(p).paper_table
              for p in ("quickstart", "nba_table2", "dlp_table3", "cheatkd_cifar100", "cheatkd_table2")}
    assert chosen == {"quickstart": "nba_table2", "nba_table2": "nba_table2", "dlp_table3": "dlp_table3",
                      "cheatkd_cifar100": "cheatkd_table2", "cheatkd_table2": "cheatkd_students"}


def test_a_paper_table_of_the_wrong_kind_or_name_is_refused():
    from sweep.errors import ConfigError

    with pytest.raises(ConfigError, match="paper_table='cheatkd_table2' is a table of attack results"):
        load_preset("quickstart", ["paper_table=cheatkd_table2"])
    with pytest.raises(ConfigError, match="paper_table='nba_table9' is not one of"):
        load_preset("quickstart", ["paper_table=nba_table9"])


# ============================================================================ the trial job

def _job(**what):
    return TrialJob(role="defense", trials_dir="/t", cache_dir="/c", seed=0, clean_fraction=0.05, data_root=None,
                    epoch_eval_size=100, cpus=1, objectives=("asr", "ba"), **what)


def test_a_searched_job_decodes_proposals_and_a_case_job_picks_its_case():
    pair = TrialCase("badnets", "nba", freeze({"epochs": 1}), "search", "h", "/a")
    job = _job(searched=pair, decoders=(("behaviours", freeze({"rnb,lnb": ["rnb", "lnb"]})),))
    case = job.case({"lr": 0.05, "behaviours": "rnb,lnb"})
    assert case.params_dict == {"epochs": 1, "lr": 0.05, "behaviours": ["rnb", "lnb"]}
    assert (case.attack, case.defense, case.purpose, case.artifact_dir) == ("badnets", "nba", "search", "/a")
    cases = (TrialCase("blend", "nba", freeze({"lr": 0.1}), "crosscheck", "g", "/b"),)
    cross = _job(cases=cases).case({"case": 0})
    assert cross.attack == "blend" and cross.purpose == "crosscheck" and cross.params_dict == {"lr": 0.1}
    with pytest.raises(ValueError, match="runs fixed cases"):
        _job(cases=cases).case({"lr": 0.1})
    assert decode({"a": 1}, None) == {"a": 1}
    hash(job)                                    # frozen all the way down: Tune pickles it


# ============================================================================ plugins

def test_a_trial_hook_plugin_fails_the_chosen_trial_once(tmp_path, monkeypatch):
    from trainables import plugins

    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setattr(plugins, "_TRIAL_HOOKS", [])
    plugins.load(("sweep_fail_low_lr_once",))
    plugins._LOADED.discard("sweep_fail_low_lr_once")
    sys.modules.pop("sweep_fail_low_lr_once", None)
    trials = tmp_path / "trials"
    low = TrialCase("badnets", "nba", freeze({"lr": 0.05}), "search")
    plugins.run_trial_hooks(TrialCase("badnets", "nba", freeze({"lr": 0.1}), "search"), trials / "t1")
    with pytest.raises(RuntimeError, match="injected failure for lr=0.05"):
        plugins.run_trial_hooks(low, trials / "t2")
    plugins.run_trial_hooks(low, trials / "t3")          # the failure was claimed already


def test_a_plugin_registers_an_out_of_tree_defense_with_its_own_space():
    env = dict(os.environ, SWEEP_PLUGINS="sweep_extra_defense",
               PYTHONPATH=os.pathsep.join([str(PLUGINS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    listed = subprocess.run([sys.executable, "-m", "sweep", "list"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "ft_plugin (post-training): fine-tuning, registered by a plugin" in listed.stdout
    dry = subprocess.run([sys.executable, "-m", "sweep", "quickstart", "--set", "defenses=[ft_plugin]",
                          "--print-config"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "#   ft_plugin: 3 trials" in dry.stdout and "#     lr: float [0.001, 0.5, log] (first trial 0.1)" in dry.stdout
    missing = subprocess.run([sys.executable, "-m", "sweep", "list"], capture_output=True, text=True, cwd=ROOT,
                             env=dict(env, SWEEP_PLUGINS="no_such_plugin_module"), timeout=300)
    assert missing.returncode == 2 and "plugin 'no_such_plugin_module'" in missing.stderr
    assert "Traceback" not in missing.stderr


# ============================================================================ signals

def test_ctrl_c_and_sigterm_stop_the_sweep_instead_of_one_tuner():
    """Ray Tune swallows the first Ctrl-C and ends only the running Tuner; during a sweep its
    handler is off (KeyboardInterrupt reaches the runner, which closes the open runs) and
    SIGTERM raises too. Both settings are put back afterwards."""
    from sweep.errors import SweepInterrupted
    from sweep.execution._ray_session import interruptible

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SweepInterrupted):
        with interruptible():
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
            signal.raise_signal(signal.SIGTERM)    # the handler runs before this call returns
    assert signal.getsignal(signal.SIGTERM) is before
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


# ============================================================================ the workers' environment

def test_workers_get_the_driver_settings_the_trainables_read():
    from sweep.execution._ray_session import worker_env

    environ = {"SWEEP_DATA_ROOT": "data", "SWEEP_CACHE_DIR": "/abs/cache", "SWEEP_AMP": "0",
               "SWEEP_DEVICE": "cpu", "SWEEP_PLUGINS": "my_plugin", "SWEEP_CHANNELS_LAST": "",
               "HOME": "/home/me", "MLFLOW_TRACKING_URI": "http://x", "PATH": "/bin"}
    assert worker_env(environ, "/home/me/exp") == {
        "SWEEP_DATA_ROOT": "/home/me/exp/data",        # a folder: absolute, the worker's cwd differs
        "SWEEP_CACHE_DIR": "/abs/cache", "SWEEP_AMP": "0", "SWEEP_DEVICE": "cpu", "SWEEP_PLUGINS": "my_plugin"}
    assert worker_env({}, "/x") == {}


def test_every_variable_the_trainables_read_reaches_the_workers():
    """A new ``os.environ`` read in trainables/ must join ``WORKER_ENV`` (or a worker on another
    node silently runs without it), or be one of a node's own settings (``NODE_ENV``)."""
    import re

    from sweep.execution._ray_session import NODE_ENV, WORKER_ENV

    read = set()
    for f in (ROOT / "trainables").rglob("*.py"):
        text = f.read_text()
        read |= set(re.findall(r"environ(?:\.get)?\(?\[?\s*[\"'](SWEEP_[A-Z_]+)", text))
        read |= set(re.findall(r"getenv\(\s*[\"'](SWEEP_[A-Z_]+)", text))
        read |= set(re.findall(r"^ENV = [\"'](SWEEP_[A-Z_]+)", text, re.M))
    assert read and read <= set(WORKER_ENV) | set(NODE_ENV), read - set(WORKER_ENV) - set(NODE_ENV)
    assert not set(WORKER_ENV) & set(NODE_ENV)


def test_the_report_states_how_many_images_each_stage_poisoned():
    import pandas as pd

    from sweep.analysis._report import poisoned_counts

    runs = pd.DataFrame([
        {"role": "attack", "ray_trial_id": "", "attack": "badnets", "attack_hash": "aaaa1111", "n_poisoned": 5000.0},
        {"role": "attack", "ray_trial_id": "", "attack": "sig", "attack_hash": "bbbb2222", "n_poisoned": 412.0},
        {"role": "attack", "ray_trial_id": "", "attack": "none", "attack_hash": "cccc3333", "n_poisoned": 0.0},
        {"role": "defense", "ray_trial_id": "t1", "attack": "sig", "attack_hash": "bbbb2222", "n_poisoned": None},
    ])
    assert poisoned_counts(runs) == "badnets 5000; sig 412"
    assert poisoned_counts(runs.drop(columns="n_poisoned")) == ""
