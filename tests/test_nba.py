"""NBA (papers/000, SPEC.md "NBA"): it removes a BadNets backdoor, keeps a clean model's BA, and
every ablation switch of Tables 3-5 / Figs. 8-9 changes what is optimised.

The backdoored model is the suite's clean WRN-16-1 (``trained_clean``) with a BadNets backdoor
implanted by a short fine-tune on the poisoned synthetic training set; the defender gets a 5%
clean subset that excludes the poisoned indices. Budgets are tiny (a few epochs, PGD steps cut).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import yaml

import search_spaces
from sweep.spaces import load_space
from trainables.attacks.base import poison_training_set, triggered_test_set
from trainables.data import clean_subset
from trainables.data.base import ImageSet
from trainables.data.loader import to_float
from trainables.defenses import nba
from trainables.defenses.base import DefenseContext
from trainables.engine import SGDConfig, pick_runtime, prepare, train
from trainables.metrics import backdoor_metrics
from trainables.params import ParamError, make_params
from trainables.registry import get_attack, get_defense

RT = pick_runtime("cpu")
TARGET = 0
# the tiny budget of the switch tests: one 64-image batch per epoch, PGD cut to 2 steps
TINY = dict(teacher_epochs=1, epochs=2, pgd_steps=2)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def backdoor(synthetic, trained_clean):
    """A BadNets-backdoored WRN-16-1, its attack, the defender's 5% clean subset and the
    test-side sets (clean test, triggered non-target test images)."""
    Attack = get_attack("badnets")
    attack = Attack(make_params(Attack.Params, {"target": TARGET}), synthetic)
    index = attack.select(synthetic.train.y)
    poisoned, _ = poison_training_set(attack, synthetic.train, index)
    model = copy.deepcopy(trained_clean[0])
    # implant: a short fine-tune of the clean model on the poisoned set (ASR ~1 after it)
    train(model, poisoned, SGDConfig(epochs=2, lr=0.02, batch_size=128, schedule="constant"), RT, seed=1)
    clean = synthetic.train.subset(clean_subset(synthetic.train.y, 0.05, seed=0, exclude=index))
    triggered = triggered_test_set(attack, synthetic.test)
    return {"model": model.eval(), "attack": attack, "clean": clean, "triggered": triggered}


def metrics(model, synthetic, backdoor) -> dict:
    return backdoor_metrics(model, synthetic.test, backdoor["triggered"], TARGET, RT)


def context(model, clean, **kw) -> DefenseContext:
    """A post-training context holding a COPY of ``model`` (the defense's own)."""
    return DefenseContext(rt=RT, seed=0, num_classes=10, model=copy.deepcopy(model), clean=clean,
                          progress=lambda line: None, **kw)


def run_nba(model, clean, ctx_kw=None, **overrides):
    params = make_params(nba.Params, overrides)
    ctx = context(model, clean, **(ctx_kw or {}))
    out = get_defense("nba")(params).run(ctx)
    return out, ctx


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def stage(ctx, name) -> list[dict]:
    return [e for e in ctx.history if e["stage"] == name]


@pytest.fixture
def small_clean(backdoor) -> ImageSet:
    return backdoor["clean"].subset(torch.arange(64))


@pytest.fixture
def pgd_calls(monkeypatch) -> list:
    """Count the PGD calls NBA makes (the real PGD still runs)."""
    calls = []
    real = nba.pgd_untargeted

    def spy(*args, **kwargs):
        calls.append(kwargs.get("steps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(nba, "pgd_untargeted", spy)
    return calls


# ----------------------------------------------------------------------------- the defense works

def test_backdoor_fixture_is_a_real_backdoor(synthetic, backdoor):
    before = metrics(backdoor["model"], synthetic, backdoor)
    assert before["asr"] >= 0.9, before
    assert before["ba"] >= 0.6, before
    assert len(backdoor["clean"]) == 150           # 5% of 3,000, none of them poisoned


def test_nba_removes_the_backdoor_and_keeps_ba(synthetic, backdoor):
    before = metrics(backdoor["model"], synthetic, backdoor)
    out, ctx = run_nba(backdoor["model"], backdoor["clean"], teacher_epochs=5, epochs=4, pgd_steps=5)
    after = metrics(out, synthetic, backdoor)
    print(f"before {before} after {after}")
    assert after["asr"] <= before["asr"] - 0.5 and after["asr"] <= 0.3, (before, after)
    assert after["ba"] >= before["ba"] - 0.05, (before, after)
    # every phase is logged: 5 teacher epochs, then 4 NBA epochs with all loss terms
    assert [e["epoch"] for e in stage(ctx, "teacher")] == [1, 2, 3, 4, 5]
    epochs = stage(ctx, "nba")
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    for e in epochs:
        for key in ("ce", "total", "ldl_rnb", "ldl_lnb", "ldl_pnb", "udl_rnb", "udl_lnb", "udl_pnb"):
            assert key in e and e[key] >= 0, key
        assert 0.0 <= e["pseudo_poisoned_fraction"] <= 1.0
        assert 0 <= e["pseudo_target"] < 10


@pytest.mark.slow
def test_nba_keeps_a_clean_models_ba(synthetic, trained_clean, backdoor):
    clean_model = trained_clean[0]
    before = metrics(clean_model, synthetic, backdoor)
    out, _ = run_nba(clean_model, backdoor["clean"], teacher_epochs=5, epochs=4, pgd_steps=5)
    after = metrics(out, synthetic, backdoor)
    print(f"clean model before {before} after {after}")
    assert after["ba"] >= before["ba"] - 0.05, (before, after)


# ----------------------------------------------------------------------------- the loss

def one_batch(backdoor, n=32):
    x = to_float(backdoor["clean"].x[:n])
    return x, backdoor["clean"].y[:n]


def batch_loss(student, teacher, backdoor, **overrides):
    """NBA's loss (Eq. 12) on one batch with a fresh copy of ``student``; returns (loss, logs,
    gradient of the student's parameters)."""
    student = copy.deepcopy(student).train()
    p = make_params(nba.Params, overrides)
    ctx = context(student, backdoor["clean"], oracle_trigger=backdoor["attack"].apply)
    x, y = one_batch(backdoor)
    loss, logs = nba.Distillation(teacher, p, ctx)(student, x, y, torch.arange(len(y)))
    loss.backward()
    grad = torch.cat([q.grad.flatten() for q in student.parameters() if q.grad is not None])
    return loss.detach(), {k: float(v) for k, v in logs.items()}, grad


@pytest.fixture(scope="module")
def teacher(backdoor):
    """A stand-in teacher for the one-batch tests: the backdoored model briefly fine-tuned."""
    t = copy.deepcopy(backdoor["model"])
    train(t, backdoor["clean"], SGDConfig(epochs=1, lr=0.01, batch_size=64), RT, seed=0)
    return t.eval().requires_grad_(False)


def test_loss_is_eq_12_with_eqs_8_and_11(backdoor, teacher):
    p = nba.Params()
    loss, logs, _ = batch_loss(backdoor["model"], teacher, backdoor, pgd_steps=2)
    for d in ("ldl", "udl"):
        weighted = p.lambda1 * logs[f"{d}_rnb"] + p.lambda2 * logs[f"{d}_lnb"] + p.lambda3 * logs[f"{d}_pnb"]
        assert logs[d] == pytest.approx(weighted, rel=1e-5)
    assert float(loss) == pytest.approx(p.alpha * (logs["ldl"] + p.beta * logs["udl"]) + logs["ce"], rel=1e-5)
    # the pseudo samples really are adversarial: the student does worse on them than on x
    assert logs["udl_pnb"] > logs["ldl_pnb"]


@pytest.mark.parametrize("subset", [("rnb",), ("lnb",), ("pnb",), ("rnb", "pnb")])
def test_behaviours_switch_selects_the_terms(backdoor, teacher, subset):
    loss_all, logs_all, grad_all = batch_loss(backdoor["model"], teacher, backdoor, pgd_steps=2)
    loss, logs, grad = batch_loss(backdoor["model"], teacher, backdoor, pgd_steps=2, behaviours=subset)
    for b in nba.BEHAVIOURS:
        for d in ("ldl", "udl"):
            assert (f"{d}_{b}" in logs) == (b in subset)
            if b in subset:   # the same term, computed the same way (same PGD start)
                assert logs[f"{d}_{b}"] == pytest.approx(logs_all[f"{d}_{b}"], rel=1e-5)
    assert logs["ce"] == pytest.approx(logs_all["ce"], rel=1e-6)
    assert float(loss) < float(loss_all)
    assert not torch.allclose(grad, grad_all)


def test_behaviours_switch_in_a_run(backdoor, small_clean):
    _, ctx = run_nba(backdoor["model"], small_clean, behaviours=("rnb",), **TINY)
    for e in stage(ctx, "nba"):
        assert "ldl_rnb" in e and "udl_rnb" in e
        assert not any(k.endswith(("_lnb", "_pnb")) for k in e), e


def test_behaviours_must_be_a_nonempty_subset():
    for bad in ((), ("rnb", "rnb"), ("attention",)):
        with pytest.raises(ParamError, match="behaviours"):
            make_params(nba.Params, {"behaviours": list(bad)})
    assert make_params(nba.Params, {"behaviours": ["pnb", "lnb"]}).behaviours == ("pnb", "lnb")


def test_representation_raw_is_the_feature_map_mse(backdoor, teacher):
    x, _ = one_batch(backdoor)
    with torch.no_grad():
        fs, _ = backdoor["model"].features(x)
        ft, _ = teacher.features(x)
    gram = nba.rnb_loss(fs, ft, "gram")
    raw = nba.rnb_loss(fs, ft, "raw")
    # Eq. 3 over the C×C entries, unnormalised Grams, batch mean; raw = Σ_l mean((F^T - F^S)^2)
    eq3 = 0.0
    for s, t in zip(fs, ft):
        b, c, h, w = s.shape
        gs, gt = s.flatten(2) @ s.flatten(2).transpose(1, 2), t.flatten(2) @ t.flatten(2).transpose(1, 2)
        eq3 += float(((gt - gs) ** 2).sum((1, 2)).mean()) / (4 * c * c * (h * w) ** 2)
    assert float(gram) == pytest.approx(eq3, rel=1e-4)
    assert float(raw) == pytest.approx(sum(float(((t - s) ** 2).mean()) for s, t in zip(fs, ft)), rel=1e-5)
    assert float(gram) != pytest.approx(float(raw), rel=0.01)
    # in the loss only the RNB terms change
    _, logs_gram, _ = batch_loss(backdoor["model"], teacher, backdoor, pgd_steps=2)
    _, logs_raw, _ = batch_loss(backdoor["model"], teacher, backdoor, pgd_steps=2, representation="raw")
    for key in ("ldl_rnb", "udl_rnb"):
        assert logs_raw[key] != pytest.approx(logs_gram[key], rel=0.01)
    for key in ("ce", "ldl_lnb", "ldl_pnb", "udl_lnb", "udl_pnb"):
        assert logs_raw[key] == pytest.approx(logs_gram[key], rel=1e-5)


# ----------------------------------------------------------------------------- runs: switches and logs

@pytest.fixture(scope="module")
def default_run(backdoor):
    """A tiny default NBA run that also captures the teacher and its weights after step 1."""
    captured = {}
    real = nba.make_teacher

    def capture(*args, **kwargs):
        t = real(*args, **kwargs)
        captured["teacher"], captured["state"] = t, copy.deepcopy(t.state_dict())
        return t

    small = backdoor["clean"].subset(torch.arange(64))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nba, "make_teacher", capture)
        out, ctx = run_nba(backdoor["model"], small, **TINY)
    return {"out": out, "ctx": ctx, **captured}


def test_pseudo_poisoned_fraction_is_logged_every_epoch(default_run):
    epochs = stage(default_run["ctx"], "nba")
    assert len(epochs) == TINY["epochs"]
    for e in epochs:
        assert 0.0 <= e["pseudo_poisoned_fraction"] <= 1.0
        assert float(e["pseudo_target"]).is_integer()
    assert len(stage(default_run["ctx"], "teacher")) == TINY["teacher_epochs"]


def test_gradients_reach_only_the_student(backdoor, default_run):
    t = default_run["teacher"]
    assert all(q.grad is None and not q.requires_grad for q in t.parameters())
    for k, v in t.state_dict().items():   # weights AND BatchNorm statistics untouched by step 2
        assert torch.equal(v, default_run["state"][k]), k
    assert not torch.equal(flat(default_run["out"]), flat(backdoor["model"]))
    assert not torch.equal(flat(default_run["out"]), flat(t))


def test_losses_ldl_runs_no_pgd_and_changes_the_student(backdoor, small_clean, default_run, pgd_calls):
    out, ctx = run_nba(backdoor["model"], small_clean, losses="ldl", **TINY)
    assert pgd_calls == []
    for e in stage(ctx, "nba"):
        assert "pseudo_poisoned_fraction" not in e and "udl" not in e and "ldl" in e
    assert not torch.allclose(flat(out), flat(default_run["out"]))


def test_losses_udl_drops_the_learning_distillation(backdoor, small_clean, pgd_calls):
    _, ctx = run_nba(backdoor["model"], small_clean, losses="udl", **TINY)
    assert pgd_calls == [TINY["pgd_steps"]] * TINY["epochs"]        # one batch per epoch
    for e in stage(ctx, "nba"):
        assert "udl" in e and "pseudo_poisoned_fraction" in e
        assert not any(k.startswith("ldl") for k in e), e


def test_oracle_udl_samples_use_the_trigger(backdoor, small_clean, pgd_calls):
    seen = []

    def trigger(x):
        seen.append(len(x))
        return backdoor["attack"].apply(x)

    out, ctx = run_nba(backdoor["model"], small_clean, ctx_kw={"oracle_trigger": trigger},
                       udl_samples="oracle", **TINY)
    assert seen == [64] * TINY["epochs"]
    assert pgd_calls == []
    for e in stage(ctx, "nba"):
        assert "udl_rnb" in e and "pseudo_poisoned_fraction" not in e


def test_oracle_without_a_trigger_fails_before_any_work(backdoor, small_clean):
    params = make_params(nba.Params, {"udl_samples": "oracle"})
    ctx = context(backdoor["model"], small_clean)
    with pytest.raises(ValueError, match="oracle_trigger"):
        get_defense("nba")(params).run(ctx)
    assert ctx.history == []


def test_pseudo_split_infers_the_target_from_the_flips():
    p = nba.Params()
    ctx = DefenseContext(rt=RT, seed=0, num_classes=3)
    d = nba.Distillation(teacher=None, p=p, ctx=ctx)
    assert d.pseudo_split() == {}
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([2, 2, 2, 1, 2, 2, 0, 2])   # flips: 0->2, 0->2, 1->2, 2->0
    d.count_predictions(y, pred)
    split = d.pseudo_split()
    assert split["pseudo_target"] == 2.0
    assert split["pseudo_poisoned_fraction"] == pytest.approx(3 / 4)   # of the 4 non-class-2 samples
    assert d.pseudo_split() == {}                                        # reset every epoch


# ----------------------------------------------------------------------------- registration

def test_registered_with_a_search_space_of_paper_defaults():
    D = get_defense("nba")
    assert D.kind == "post-training" and D.Params is nba.Params
    space = yaml.safe_load(search_spaces.path("nba").read_text())
    assert set(load_space("nba")) == set(space["params"])       # the sweep parses it
    assert space["method"] == "nba" and space["kind"] == "defense"
    defaults = {f.name: f.default for f in dataclasses.fields(nba.Params)}
    for name in ("lambda1", "lambda2", "lambda3", "alpha", "beta", "temperature", "eps", "epochs", "lr"):
        spec = space["params"][name]
        assert spec["default"] == defaults[name], name
        assert spec["low"] <= spec["default"] <= spec["high"], name
    for name in ("lambda1", "lambda2", "lambda3"):
        assert space["params"][name]["log"] is True
    assert (defaults["lambda1"], defaults["lambda2"], defaults["lambda3"]) == (2.0, 2.0, 0.1)
    assert (defaults["alpha"], defaults["beta"], defaults["temperature"]) == (1.0, 0.5, 5.0)
    assert defaults["eps"] == 8 / 255 and defaults["epochs"] == 20 and defaults["batch_size"] == 64
