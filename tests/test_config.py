"""Presets -> validated sweep config: every preset loads, every bad input is ONE clear message
naming the key, narrowing stays inside the search space and the Params bounds, the printed
config loads back to the same config, the dry run counts stages and trials and prices them."""
import dataclasses

import pytest
import yaml

from sweep import ConfigError, dry_run, format_config, list_presets, load_preset
from sweep.planning import make_plan
from sweep.config import optuna_point, optuna_space

PRESETS = ("quickstart", "nba_cifar", "dlp_cifar", "cheatkd_cifar100", "nba_table2", "dlp_table3", "cheatkd_table2")


def test_every_preset_loads_and_says_what_it_is():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        cfg = load_preset(name)
        assert cfg.name == name and cfg.description
        assert cfg.attacks and cfg.search.num_samples >= 1


def test_presets_carry_the_papers_settings():
    q = load_preset("quickstart")
    assert q.dataset == "synthetic" and q.model == "wrn-16-1"
    assert [a.name for a in q.attacks] == ["badnets", "blend"] and [d.name for d in q.defenses] == ["nba", "ft"]
    assert q.search.sampler == "tpe" and q.search.objectives == (("asr", "min"), ("ba", "max"))

    nba = load_preset("nba_cifar")
    assert nba.dataset == "cifar10" and [a.name for a in nba.attacks] == ["badnets", "trojannn", "blend", "cla", "sig", "refool"]
    searched = {d.name for d in nba.defense("nba").space}
    assert {"lambda1", "lambda2", "lambda3", "alpha", "beta", "temperature", "eps", "epochs", "lr",
            "teacher_lr", "teacher_epochs", "pnb_t_squared"} <= searched
    assert nba.search.num_samples >= 50 and 0 < nba.resources.gpus < 1    # fractional GPU per trial

    t2 = load_preset("nba_table2")
    assert [d.name for d in t2.defenses] == ["ft", "fp", "mcr", "nad", "argd", "anp", "nba"]
    assert t2.search.num_samples == 1 and t2.attack("refool").dataset == "gtsrb"
    assert all(p.num_samples == 1 and not p.searched for p in make_plan(t2).pairs)   # paper defaults only

    t3 = load_preset("dlp_table3")
    assert [d.name for d in t3.defenses] == ["nad", "abl", "anp", "dlp"] and t3.search.num_samples == 1

    ck = load_preset("cheatkd_cifar100")
    assert ck.kind == "attack" and ck.dataset == "cifar100"
    assert {"delta_rule", "num_neurons"} <= {d.name for d in ck.attack("cheatkd").space}
    assert dict(ck.search.objectives) == {"student_asr": "max", "student_ba": "max"}
    assert ck.selection.metric == "student_asr" and ck.selection.ba_metric == "student_ba"


@pytest.mark.parametrize("name, overrides, message", [
    ("nope", [], "unknown preset 'nope'; known: "),
    ("quickstart", ["search.num_sample=3"], "unknown key 'search.num_sample'"),
    ("quickstart", ["foo=1"], "unknown key 'foo'"),
    ("quickstart", ["defenses.nba.space.lambda1.lo=1"], "unknown key 'defenses.nba.space.lambda1.lo'"),
    ("quickstart", ["search.num_samples"], "expected key=value"),
    ("quickstart", ["search.num_samples=0"], "search.num_samples=0 is below its minimum 1"),
    ("quickstart", ["search.sampler=cmaes"], "search.sampler='cmaes' is not one of"),
    ("quickstart", ["defenses.nba.space.lambda1.high=100"], "defenses.nba.space.lambda1.high=100 is outside the search space range"),
    ("quickstart", ["defenses.nba.space.lambda1=30"], "defenses.nba.space.lambda1=30 is outside the search space range"),
    ("quickstart", ["defenses.nba.space.lambda1=[3, 5]"], "lambda1.default=<a value inside>"),
    ("quickstart", ["defenses.nba.space.bogus=3"], "defenses.nba.space: unknown parameter 'bogus'"),
    ("quickstart", ["defenses.nba.params.bogus=3"], "defenses.nba.params: unknown parameter 'bogus'"),
    ("quickstart", ["defenses.nba.params.lr=-1"], "defenses.nba.params: lr=-1.0 is below its minimum"),
    ("quickstart", ["defenses.nba.params.teacher_epochs=x"], "teacher_epochs: expected int, got 'x'"),
    ("quickstart", ["attacks.badnets.params.poison_rate=1.5"], "poison_rate=1.5 is above its maximum 1.0"),
    ("quickstart", ["attacks.badnets.space.poison_rate=0.1"], "searched in attack sweeps only"),
    ("quickstart", ["defenses.foo={}"], "unknown defense 'foo'"),
    ("quickstart", ["attacks=[nope]"], "unknown attack 'nope'"),
    ("quickstart", ["dataset=mnist"], "unknown dataset 'mnist'"),
    ("quickstart", ["attacks.badnets.dataset=cifar11"], "attacks.badnets.dataset: unknown dataset 'cifar11'"),
    ("quickstart", ["model=vgg99"], "unknown model 'vgg99'"),
    ("quickstart", ["budget.attack.epochz=3"], "budget.attack: unknown parameter 'epochz'"),
    ("quickstart", ["search.objectives={acc: max}"], "unknown metric 'acc'"),
    ("quickstart", ["resources.gpus=1.5"], "resources.gpus=1.5"),
    ("quickstart", ["seed=-1"], "seed=-1 is below its minimum 0"),
    ("quickstart", ["defenses=[]"], "a defense sweep needs at least one defense"),
    ("quickstart", ["search.early_stopping.metric=loss"], "search.early_stopping.metric='loss' is not one of"),
    ("quickstart", ["search.early_stopping.mode=up"], "search.early_stopping.mode='up' is not one of"),
    ("quickstart", ["search.max_tuners=0"], "search.max_tuners=0 is below its minimum 1"),
    ("quickstart", ["defenses.nba.also_try={lambda1: 1}"], "defenses.nba.also_try: expected a list of mappings"),
    ("quickstart", ["defenses.nba.also_try=[{bogus: 1}]"], "defenses.nba.also_try[0]: 'bogus' is not a searched parameter here"),
    ("quickstart", ["defenses.nba.also_try=[{beta: 1}, {lambda1: 30}]"],
     "defenses.nba.also_try[1].lambda1: 30 is outside the searched range [0.5, 8.0]"),
    ("quickstart", ["defenses.nba.also_try=[{beta: 1}, {beta: 1.5}, {beta: 2}]"],
     "defenses.nba.num_samples: 3 trial(s) cannot hold the paper default and 3 also_try point(s)"),
    ("quickstart", ["defenses.ft.space.lr=0.02", "defenses.ft.also_try=[{lr: 0.01}]"],
     "defenses.ft.also_try[0]: 'lr' is not a searched parameter here (searched: "),
])
def test_bad_input_is_one_clear_message_naming_it(name, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_preset(name, overrides)
    text = str(e.value)
    assert message in text, text
    assert "\n" not in text and "Traceback" not in text


def test_early_stopping_pins_every_searched_schedule_length_to_its_maximum():
    """With early stopping on, trials of a pair run one schedule (the longest the space allows)
    and the scheduler, not the sampler, cuts them short; off, the epochs stay searched."""
    sets = ["defenses.ft={space: {epochs: [5, 30], lr: [0.01, 0.1]}}", "budget.defense_epochs=null"]
    off = load_preset("quickstart", sets)
    assert "epochs" in {d.name for d in off.defense("ft").space}
    on = load_preset("quickstart", sets + ["search.early_stopping={enabled: true, metric: ba, mode: max}"])
    ft = on.defense("ft")
    assert ft.params_dict["epochs"] == 30 and "epochs" not in {d.name for d in ft.space}
    assert {d.name for d in ft.space} >= {"lr"}
    es = on.search.early_stopping
    assert (es.metric, es.mode, es.grace_period) == ("ba", "max", 2)
    nba = load_preset("nba_cifar", ["search.early_stopping.enabled=true"]).defense("nba")
    assert nba.params_dict["epochs"] == 40 and "epochs" not in {d.name for d in nba.space}


def test_bad_key_in_a_preset_file_names_file_and_key(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("dataset: synthetic\nattacks: [badnets]\ndefenses: [ft]\nsearch: {num_smaples: 3}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown key 'search.num_smaples'"):
        load_preset(p)
    with pytest.raises(ConfigError, match="preset file not found"):
        load_preset(tmp_path / "missing.yaml")


def test_overrides_narrow_pin_add_and_drop():
    cfg = load_preset("quickstart", [
        "defenses.nba.space.lambda1=[1.0, 4.0]",               # narrow (default 2.0 inside)
        "defenses.nba.space.beta={low: 0.2, high: 1.0}",
        "defenses.nba.space.alpha=1.5",                        # pin: leaves the search
        "defenses.nba.space.lambda3={low: 0.2, high: 0.5, default: 0.3}",   # moved first trial
        "defenses.ft=null",                                    # drop a defense
        "attacks.blend.params.alpha=0.3",
        "search.num_samples=7", "search.sampler=nsga2"])
    nba = cfg.defense("nba")
    space = {d.name: d for d in nba.space}
    assert (space["lambda1"].low, space["lambda1"].high, space["lambda1"].default) == (1.0, 4.0, 2.0)
    assert (space["beta"].low, space["beta"].high) == (0.2, 1.0)
    assert "alpha" not in space and nba.params_dict["alpha"] == 1.5
    assert space["lambda3"].default == 0.3
    assert [d.name for d in cfg.defenses] == ["nba"]
    assert cfg.attack("blend").params_dict == {"alpha": 0.3}
    assert cfg.search.num_samples == 7 and cfg.search.sampler == "nsga2"
    # the budget pins epochs (a fixed parameter, checked against the Params bounds only)
    assert nba.params_dict["epochs"] == 4 and "epochs" not in space
    # the first trial names every searched parameter by its flat name, at the default
    point = optuna_point(space, nba.first_trial())
    assert set(point) == set(optuna_space(space)) == set(space)
    assert point["lambda1"] == 2.0 and point["lambda3"] == 0.3
    assert nba.first_trial() == {**nba.params_dict, **{n: d.default for n, d in space.items()}}
    # categoricals narrow by choices
    ck = load_preset("cheatkd_cifar100", ["attacks.cheatkd.space.delta_rule=[mean, max]"])
    assert next(d for d in ck.attack("cheatkd").space if d.name == "delta_rule").choices == ("mean", "max")
    with pytest.raises(ConfigError, match="is not one of the search space's choices"):
        load_preset("cheatkd_cifar100", ["attacks.cheatkd.space.delta_rule=[mean, median]"])


def test_printed_config_loads_back_to_the_same_config(tmp_path):
    cfg = load_preset("quickstart", ["search.num_samples=5", "defenses.nba.space.lambda1=[1.0, 4.0]"])
    text = format_config(cfg)
    assert "lambda1: float [1, 4, log] (first trial 2)" in text    # the resolved search space
    p = tmp_path / "printed.yaml"
    p.write_text(text)
    again = load_preset(p)
    assert again.to_dict() == cfg.to_dict()
    assert again.defenses == cfg.defenses and again.search == cfg.search
    assert yaml.safe_load(text)["search"]["num_samples"] == 5


PROFILED = """\
description: a preset with a reduced profile
dataset: synthetic
budget: {attack: {epochs: 6, lr: 0.05}}
attacks: [badnets, blend, sig]
defenses: {ft: {}, nad: {params: {epochs: 8}}}
search: {num_samples: 1}
profiles:
  small:
    budget: {attack: {epochs: 2}}
    attacks: {badnets: {budget: {epochs: 3}}, sig: null}
    defenses: {nad: {params: {teacher_epochs: 2}}}
    resources: {cpus: 1}
"""


def test_a_profile_lays_its_budgets_over_the_preset(tmp_path):
    p = tmp_path / "profiled.yaml"
    p.write_text(PROFILED)
    plain_cfg = load_preset(p)
    assert plain_cfg.profile is None and [a.name for a in plain_cfg.attacks] == ["badnets", "blend", "sig"]
    assert {a.name: a.train_dict["epochs"] for a in plain_cfg.attacks} == {"badnets": 6, "blend": 6, "sig": 6}
    cfg = load_preset(p, ["profile=small"])
    assert cfg.profile == "small"
    # mappings merge key by key: budget.attack keeps its lr, one attack gets its own epochs,
    # null drops sig, NAD's params gain teacher_epochs and keep epochs
    assert [a.name for a in cfg.attacks] == ["badnets", "blend"]
    assert {a.name: (a.train_dict["epochs"], a.train_dict["lr"]) for a in cfg.attacks} == \
        {"badnets": (3, 0.05), "blend": (2, 0.05)}
    assert cfg.defense("nad").params_dict == {"epochs": 8, "teacher_epochs": 2}
    assert cfg.resources.cpus == 1
    # the budget reaches the attack stage: its own epochs, its own hash
    stages = {s.attack: s for s in make_plan(cfg).stages}
    assert stages["badnets"].spec.train["epochs"] == 3 and stages["blend"].spec.train["epochs"] == 2
    assert make_plan(plain_cfg).stage_for("badnets").hash != stages["badnets"].hash
    # --set overrides win over the profile, whichever comes first on the command line
    for order in (["attacks.badnets.budget.epochs=5", "profile=small"], ["profile=small", "attacks.badnets.budget.epochs=5"]):
        assert load_preset(p, order).attack("badnets").train_dict["epochs"] == 5
    # the printed config is resolved (no profiles left) and loads back to the same config
    printed = tmp_path / "printed.yaml"
    printed.write_text(format_config(cfg))
    assert "profiles" not in yaml.safe_load(printed.read_text())
    again = load_preset(printed)
    assert again.to_dict() == cfg.to_dict() and again.attacks == cfg.attacks and again.profile == "small"


@pytest.mark.parametrize("text, overrides, message", [
    (PROFILED, ["profile=big"], r"profile='big': preset profiled.yaml has no such profile \(its profiles: small\)"),
    ("dataset: synthetic\nattacks: [badnets]\ndefenses: [ft]\n", ["profile=cpu"],
     r"profile='cpu': preset profiled.yaml has no such profile \(its profiles: none\)"),
    (PROFILED.replace("resources: {cpus: 1}", "resources: {cpu: 1}"), [],
     r"profiled.yaml, profiles.small: unknown key 'resources.cpu'"),
    (PROFILED.replace("budget: {epochs: 3}", "budget: {epoch: 3}"), ["profile=small"],
     r"attacks.badnets.budget: .*epoch"),
    (PROFILED, ["attacks.blend.budget.epochs=-1"], r"attacks.blend.budget: .*epochs"),
    (PROFILED, ["attacks.blend.budget=3"], r"attacks.blend.budget: expected a mapping"),
    (PROFILED.replace("  small:\n", "  small:\n    profile: other\n"), [], r"profiles.small: a profile cannot"),
])
def test_bad_profiles_and_budgets_are_one_clear_message(tmp_path, text, overrides, message):
    p = tmp_path / "profiled.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_preset(p, overrides)


def test_the_reproduction_presets_have_a_cpu_profile():
    """The reduced profiles of the paper-table presets: the stage budgets the CPU measurements use."""
    t2 = load_preset("nba_table2", ["profile=cpu"])
    assert {a.name: a.train_dict["epochs"] for a in t2.attacks} == \
        {"badnets": 12, "trojannn": 4, "blend": 4, "cla": 4, "sig": 4}
    assert [d.name for d in t2.defenses] == ["ft", "fp", "mcr", "nad", "argd", "anp", "nba"]
    assert all(not d.params for d in t2.defenses)          # the defenses at their paper defaults
    assert t2.resources.cpus == 1 and t2.resources.gpus == 0
    t3 = load_preset("dlp_table3", ["profile=cpu"])
    assert {a.name: a.train_dict["epochs"] for a in t3.attacks} == {"badnets": 12, "sig": 4}
    assert t3.defense("dlp").params_dict == {"assft_epochs": 3}
    assert t3.defense("abl").params_dict == {"isolation_epochs": 10, "finetune_epochs": 10, "unlearn_epochs": 5}
    assert load_preset("nba_table2").attack("badnets").train_dict["epochs"] == 100    # the paper scale
    # the search against the paper defaults at the CPU's scale: NBA's whole space, epochs up to 20
    nc = load_preset("nba_cifar", ["profile=cpu"])
    assert {a.name: a.train_dict["epochs"] for a in nc.attacks} == {"badnets": 12, "sig": 4}
    epochs = next(d for d in nc.defense("nba").space if d.name == "epochs")
    assert (epochs.low, epochs.high, epochs.default) == (5, 20, 20) and nc.search.num_samples == 6
    assert {d.name for d in nc.defense("nba").space} == {d.name for d in load_preset("nba_cifar").defense("nba").space}
    # CheatKD against the BadNets-teacher control: one victim distillation (the kd defense) for both
    ck = load_preset("cheatkd_table2")
    assert ck.kind == "defense" and ck.clean_fraction == 1.0 and ck.paper_table == "cheatkd_students"
    assert ck.attack("cheatkd").params_dict["kd_epochs"] == 0          # no student inside the stage
    assert ck.defense("kd").params_dict == {"student_model": "wrn-16-4", "epochs": 200}
    ck_cpu = load_preset("cheatkd_table2", ["profile=cpu"])
    assert ck_cpu.model == "wrn-16-1" and ck_cpu.defense("kd").params_dict == {"student_model": None, "epochs": 20}
    assert {a.name: a.train_dict["epochs"] for a in ck_cpu.attacks} == {"cheatkd": 4, "badnets": 12}
    assert ck_cpu.attack("cheatkd").params_dict == {"kd_epochs": 0, "trigger_epochs": 50}


def test_config_is_frozen_and_hash_tracks_content():
    cfg = load_preset("quickstart")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3
    assert load_preset("quickstart").config_hash() == cfg.config_hash()
    assert load_preset("quickstart", ["seed=1"]).config_hash() != cfg.config_hash()


def test_also_try_points_follow_the_paper_default_and_leave_other_hashes_alone(tmp_path):
    """``also_try`` (what ``replicate`` sets): points the search evaluates right after the paper
    default, each completed with the paper defaults; a config without them hashes as before."""
    from sweep.planning import make_plan
    from sweep.execution._searchers import make_searcher

    cfg = load_preset("quickstart")
    tried = load_preset("quickstart", ["defenses.nba.also_try=[{lambda1: 2.5, beta: 1.0}]"])
    (point,) = tried.defense("nba").also_try
    first = {d.name: d.default for d in cfg.defense("nba").space}
    assert dict(point) == {**first, "lambda1": 2.5, "beta": 1.0}
    assert tried.config_hash() != cfg.config_hash()
    assert load_preset("quickstart", ["defenses.nba.also_try=[]"]).config_hash() == cfg.config_hash()
    pair = next(p for p in make_plan(tried).pairs if p.key == "badnets__nba")
    searcher = make_searcher(tried, pair, "study", tmp_path, 0)
    assert [p["lambda1"] for p in searcher._points_to_evaluate] == [first["lambda1"], 2.5]
    # a report over seeds groups what measures the same cells: seed and search aside, any attacks
    same = load_preset("quickstart", ["seed=3", "search.num_samples=5", "defenses.nba.also_try=[{beta: 1.0}]",
                                      "search.cross_check=false"])
    assert same.seed_free_hash() == cfg.seed_free_hash()
    assert load_preset("quickstart", ["clean_fraction=0.2"]).seed_free_hash() != cfg.seed_free_hash()
    one_row = load_preset("quickstart", ["attacks.blend=null", "seed=1"])
    assert one_row.seed_free_hash() == cfg.seed_free_hash(("badnets",)) != cfg.seed_free_hash()
    assert tried.searches and not load_preset(
        "quickstart", ["defenses.nba.also_try=[{beta: 1.0}]", "defenses.nba.num_samples=2", "defenses.ft.num_samples=1"]
    ).searches


def test_dry_run_counts_stages_and_trials_and_prices_them(tmp_path):
    out = dry_run(load_preset("quickstart"), workdir=tmp_path)
    assert "attack stages: 2 distinct" in out and out.count("[to train]") == 2
    # 2 attacks x (NBA: 3 trials + FT: 3 trials) + cross-checks of each defense's best configs
    assert "Tuners: 8 (4 searched pair(s); 4 cross-check(s))" in out
    assert "trials: 12 + at most 4 cross-check trials" in out
    # FT at its paper default only: each attack's FT trial in that attack's paper-default Tuner
    out = dry_run(load_preset("quickstart", ["defenses.ft.num_samples=1"]))
    assert "Tuners: 6 (the 2 paper-default trial(s) in 2, one per attack; 2 searched pair(s); 2 cross-check(s))" in out
    assert "trials: 8 + at most 2 cross-check trials" in out
    assert "images processed:" in out and "CPU-core-hours" in out and "MFLOP per image" in out
    table = dry_run(load_preset("nba_table2"))
    # the clean model TrojanNN/CLA fit on is one more (shared) stage; Refool trains on GTSRB
    assert "attack stages: 7 distinct" in table and "refool on gtsrb" in table
    assert "Tuners: 6 (the 42 paper-default trial(s) in 6, one per attack)" in table and "trials: 42" in table


def test_every_method_states_its_own_cost():
    """The dry run's estimate asks each method for its cost: every defense states one, and it
    follows the parameters that drive it, whatever they are called."""
    from trainables import registry
    from trainables.params import make_params

    for name, cls in registry.defenses().items():
        cost = cls.cost(make_params(cls.Params), 1000)
        assert cost.passes > 0 and cost.logged_epochs >= 1, name

    def passes(method, n=1000, **params):
        cls = registry.get_defense(method)
        return cls.cost(make_params(cls.Params, params), n).passes

    assert passes("nba", pgd_steps=10) > passes("nba", pgd_steps=1)
    assert passes("dlp", assft_epochs=50) > passes("dlp", assft_epochs=5)
    assert passes("abl", finetune_epochs=60) > passes("abl", finetune_epochs=6)
    assert passes("anp", iterations=2000) > passes("anp", iterations=200)
    ck = registry.get_attack("cheatkd")
    assert ck.extra_passes(make_params(ck.Params, {"kd_epochs": 20}), 1000) > \
        ck.extra_passes(make_params(ck.Params, {"kd_epochs": 2}), 1000)
    assert registry.get_attack("badnets").extra_passes(None, 1000) == 0


# ============================================================================ folders for workers

def test_relative_folders_become_absolute_against_the_driver_cwd():
    from sweep.config import absolute_paths

    d = {"dataset": "imagefolder:data/cifar", "data_root": "../datasets",
         "attacks": {"badnets": {"dataset": "imagefolder:./other"}, "blend": {"dataset": None}, "sig": {}}}
    out = absolute_paths(d, "/home/me/exp")
    assert out["dataset"] == "imagefolder:/home/me/exp/data/cifar"
    assert out["data_root"] == "/home/me/datasets"
    assert out["attacks"]["badnets"]["dataset"] == "imagefolder:/home/me/exp/other"
    assert out["attacks"]["blend"]["dataset"] is None and out["attacks"]["sig"] == {}
    assert d["dataset"] == "imagefolder:data/cifar"                  # the input is left alone
    # absolute folders, other datasets and the unset root stay as they are
    same = {"dataset": "imagefolder:/data/x", "data_root": None, "attacks": {"a": {"dataset": "synthetic:400"}}}
    assert absolute_paths(same, "/elsewhere") == same
    assert absolute_paths({"dataset": "cifar10", "data_root": "", "attacks": {}}, "/x")["dataset"] == "cifar10"


def test_absolute_dataset_names():
    import os

    from trainables.data import absolute_dataset_name

    assert absolute_dataset_name("imagefolder:~/pics", "/x") == f"imagefolder:{os.path.expanduser('~/pics')}"
    assert absolute_dataset_name("ImageFolder:a/../b", "/x") == "ImageFolder:/x/b"
    for name in ("imagefolder", "imagefolder:", "synthetic:400:200", "gtsrb", None):
        assert absolute_dataset_name(name, "/x") == name


def test_a_loaded_preset_holds_absolute_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_preset("quickstart", ["dataset=imagefolder:data/cifar", "data_root=roots",
                                     "attacks.blend.dataset=imagefolder:blend"])
    assert cfg.dataset == f"imagefolder:{tmp_path}/data/cifar" and cfg.data_root == f"{tmp_path}/roots"
    assert cfg.attack("blend").dataset == f"imagefolder:{tmp_path}/blend"
    assert cfg.attack("badnets").dataset == cfg.dataset
    assert make_plan(cfg).stage_for("blend").spec.dataset == f"imagefolder:{tmp_path}/blend"
