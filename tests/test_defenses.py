"""The six post-training baselines (FT, FP, MCR, NAD, ARGD, ANP) against one BadNets-backdoored
WRN-16-1 on the synthetic set, plus their small mechanics on hand-made tensors.

The backdoored model: conftest's clean WRN-16-1 (8 epochs) further trained 3 epochs on a BadNets
training set (white 3×3 corner patch, 20 % poisoned: a strong backdoor within a CPU budget).
Each defense gets a 10 % clean subset of the training set (300 images, none poisoned) and a
scaled-down budget. NAD's and ARGD's tests keep the paper's lr schedule and scale the attention
weights by 0.5 and 0.1 (``beta_scale`` / ``vertex_scale``), the weights these short runs were
tuned at.

Figures beside each assertion were measured on a 2-core CPU in fp32 (``SWEEP_AMP=0``) and in bf16
autocast (``SWEEP_AMP=1``); the two precisions train different backdoored models (BA 0.914 /
0.895), and each bound covers both with a margin. NAD's, ARGD's (and NBA's, test_nba.py) short
runs spend 2 epochs at lr 0.1 on 300 images, which either removes the backdoor or costs BA,
depending on the float order: with defense seeds 0, 1, 2 under both precisions ARGD's BA drop
spans 0.00-0.08 and its ASR 0.02-0.26. NAD's test runs its attention term at half the paper's
weight (at a tenth, one thread left ASR 0.47): over seeds 0-2 at one and two threads its ASR ends
at 0.01-0.16 and its BA drop spans 0.00-0.22. The bounds cover those runs with a margin.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainables.attacks.base import poison_training_set, triggered_test_set
from trainables.data import clean_subset
from trainables.defenses import anp as anp_mod
from trainables.defenses import fp as fp_mod
from trainables.defenses import mcr as mcr_mod
from trainables.defenses._common import per_group
from trainables.defenses.base import DefenseContext
from trainables.engine import SGDConfig, pick_runtime, train
from trainables.metrics import backdoor_metrics
from trainables.models import build_model
from trainables.params import make_params
from trainables.registry import get_attack, get_defense

RT = pick_runtime("cpu")
NAMES = ("ft", "fp", "mcr", "nad", "argd", "anp")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def attack(synthetic):
    """(BadNets attack, its poisoned training set and indices, the triggered test set): cheap."""
    cls = get_attack("badnets")
    attack = cls(make_params(cls.Params, {"pattern": "white", "poison_rate": 0.2}), synthetic)
    index = attack.select(synthetic.train.y)
    poisoned, _ = poison_training_set(attack, synthetic.train, index)
    return attack, poisoned, index, triggered_test_set(attack, synthetic.test)


def continue_training(model: nn.Module, data) -> nn.Module:
    """conftest's clean model + 3 epochs on ``data``; no augmentation, so the corner patch stays
    put and 3 epochs implant it reliably (the same recipe makes the clean control)."""
    model = copy.deepcopy(model)
    train(model, data, SGDConfig(epochs=3, lr=0.05, batch_size=64), RT, seed=1, augment=False)
    return model.eval()


@pytest.fixture(scope="session")
def backdoor(trained_clean, attack):
    """(backdoored model, BadNets attack, poisoned indices, triggered test set)."""
    att, poisoned, index, trig = attack
    return continue_training(trained_clean[0], poisoned), att, index, trig


@pytest.fixture(scope="session")
def clean_control(synthetic, trained_clean):
    """The same recipe on the clean training set: the model a defense must leave intact."""
    return continue_training(trained_clean[0], synthetic.train)


@pytest.fixture(scope="session")
def clean_part(synthetic, attack):
    index = attack[2]
    return synthetic.train.subset(clean_subset(synthetic.train.y, 0.1, seed=0, exclude=index))


@pytest.fixture(scope="session")
def measure(synthetic, attack):
    """Full test-set BA / ASR / RA of a model."""
    trig = attack[3]
    return lambda model: backdoor_metrics(model, synthetic.test, trig, 0, RT)


@pytest.fixture(scope="session")
def before(backdoor, measure):
    return measure(backdoor[0])


def run_defense(name: str, model: nn.Module, clean, synthetic, trig, **overrides):
    """Run a registered defense on a copy of ``model``; return (repaired model, context)."""
    cls = get_defense(name)
    small_test = synthetic.test.subset(torch.arange(100))       # the per-epoch LOG only
    small_trig = trig.subset(torch.arange(min(100, len(trig))))
    ctx = DefenseContext(rt=RT, seed=0, num_classes=synthetic.num_classes, model=copy.deepcopy(model),
                         clean=clean, progress=lambda line: None,
                         evaluate=lambda m: backdoor_metrics(m, small_test, small_trig, 0, RT))
    repaired = cls(make_params(cls.Params, overrides)).run(ctx)
    return repaired, ctx


def show(name: str, before: dict, after: dict) -> None:
    """The measured figures (visible with ``pytest -s``)."""
    print(f"\n{name}: " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in after if k in before))


def check_log(ctx: DefenseContext, stages: dict[str, int]) -> None:
    """Every epoch of every phase was logged once, with the test metrics for the log."""
    seen = {}
    for entry in ctx.history:
        seen[entry["stage"]] = seen.get(entry["stage"], 0) + 1
        assert {"ba", "asr"} <= set(entry), entry
    assert seen == stages


# ----------------------------------------------------------------------------- the attack fixture

@pytest.mark.slow
def test_backdoored_fixture_has_a_strong_backdoor(before):
    show("backdoored", before, before)
    # measured: fp32 BA 0.914, ASR 0.998; bf16 BA 0.895, ASR 0.993
    assert before["asr"] >= 0.85 and before["ba"] >= 0.5, before


# ----------------------------------------------------------------------------- the defenses (slow)

@pytest.mark.slow
def test_ft_removes_the_backdoor_and_keeps_ba(synthetic, backdoor, clean_part, measure, before):
    model, _, _, trig = backdoor
    # 10 epochs: with 5 the cosine schedule spends too few steps at a low lr, and where the run
    # ends depends on the float order (measured on one fixture with one thread: BA 0.888 -> 0.649
    # after 5 epochs, -> 0.876 after 10)
    repaired, ctx = run_defense("ft", model, clean_part, synthetic, trig, epochs=10)
    after = measure(repaired)
    show('ft', before, after)
    # measured: fp32 ASR 0.998 -> 0.019, BA 0.914 -> 0.893; bf16 ASR 0.993 -> 0.034, BA 0.895 -> 0.899
    assert after["asr"] <= 0.3 and before["asr"] - after["asr"] >= 0.6, after
    assert after["ba"] >= before["ba"] - 0.07, (before, after)
    assert not repaired.training
    check_log(ctx, {"ft": 10})


@pytest.mark.slow
def test_nad_removes_the_backdoor_and_keeps_ba(synthetic, backdoor, clean_part, measure, before):
    model, _, _, trig = backdoor
    # β × 0.5: at × 0.1 the backdoor's survival depended on the float order (bf16, one thread:
    # ASR 0.996 -> 0.469; two threads 0.153; fp32 0.057)
    repaired, ctx = run_defense("nad", model, clean_part, synthetic, trig,
                                epochs=6, teacher_epochs=5, beta_scale=0.5)
    after = measure(repaired)
    show('nad', before, after)
    # measured (bf16, AVX-512 BF16 Xeon), defense seeds 0 / 1 / 2: one thread (its own fixture,
    # BA 0.848) ASR -> 0.158 / 0.076 / 0.054, BA -> 0.797 / 0.822 / 0.852; two threads (BA 0.924)
    # ASR -> 0.008 / 0.054 / 0.053, BA -> 0.828 / 0.706 / 0.775
    assert after["asr"] <= 0.25 and before["asr"] - after["asr"] >= 0.7, after
    assert after["ba"] >= before["ba"] - 0.25, (before, after)
    assert not repaired.training
    check_log(ctx, {"nad-teacher": 5, "nad": 6})
    assert all(e["at"] > 0 for e in ctx.history if e["stage"] == "nad")


@pytest.mark.slow
def test_argd_removes_the_backdoor_and_keeps_ba(synthetic, backdoor, clean_part, measure, before):
    model, _, _, trig = backdoor
    repaired, ctx = run_defense("argd", model, clean_part, synthetic, trig,
                                epochs=6, teacher_epochs=5, vertex_scale=0.1)
    after = measure(repaired)
    show('argd', before, after)
    # measured: fp32 ASR 0.998 -> 0.107, BA 0.914 -> 0.862; bf16 ASR 0.993 -> 0.262, BA 0.895 ->
    # 0.898 (seeds 1, 2: BA drop up to 0.078, ASR up to 0.068; see the module docstring)
    assert after["asr"] <= 0.4 and before["asr"] - after["asr"] >= 0.55, after
    assert after["ba"] >= before["ba"] - 0.12, (before, after)
    check_log(ctx, {"argd-teacher": 5, "argd": 6})
    assert all(e["edge"] > 0 and e["vertex"] > 0 for e in ctx.history if e["stage"] == "argd")


@pytest.mark.slow
def test_fp_prunes_and_returns_a_working_plain_model(synthetic, backdoor, clean_part, measure, before):
    model, _, _, trig = backdoor
    repaired, ctx = run_defense("fp", model, clean_part, synthetic, trig, epochs=5)
    after = measure(repaired)
    show('fp', before, after)
    prune = ctx.history[0]
    # measured: fp32 ASR 0.998 -> 0.967, BA 0.914 -> 0.918; bf16 ASR 0.993 -> 0.729, BA 0.895 ->
    # 0.903 (FP is the weakest here, as in Ying & Wu 2023, NBA, Table 2)
    assert prune["stage"] == "fp-prune" and prune["pruned"] >= 1
    assert prune["clean_acc_pruned"] >= 0.9 * prune["clean_acc_before"] - 1e-9   # the 10 % rule held
    assert after["ba"] >= before["ba"] - 0.1, (before, after)
    assert after["asr"] < before["asr"], after
    # the pruned channels are zero columns of a plain fc weight: an ordinary state_dict
    state = repaired.state_dict()
    assert "fc.weight" in state and not any("parametriz" in k for k in state)
    assert int((state["fc.weight"].abs().sum(0) == 0).sum()) == int(prune["pruned"])
    check_log(ctx, {"fp-prune": 1, "fp-finetune": 5})


@pytest.mark.slow
def test_mcr_returns_a_working_curve_point(synthetic, backdoor, clean_part, measure, before):
    model, _, _, trig = backdoor
    repaired, ctx = run_defense("mcr", model, clean_part, synthetic, trig, epochs=6, endpoint_epochs=5)
    after = measure(repaired)
    show('mcr', before, after)
    # measured: fp32 ASR 0.998 -> 1.000, BA 0.914 -> 0.905; bf16 ASR 0.993 -> 1.000, BA 0.895 ->
    # 0.886: at this budget the fine-tuned endpoint
    # still carries the backdoor, so t = 0.3 does too; the test checks a working repaired model
    assert after["ba"] >= before["ba"] - 0.1, (before, after)
    assert not repaired.training
    check_log(ctx, {"mcr-endpoint": 5, "mcr-curve": 6})


@pytest.mark.slow
def test_anp_prunes_neurons_and_returns_a_working_model(synthetic, backdoor, clean_part, measure, before):
    model, _, _, trig = backdoor
    repaired, ctx = run_defense("anp", model, clean_part, synthetic, trig, iterations=30)
    after = measure(repaired)
    show('anp', before, after)
    last = ctx.history[-1]
    # measured (30 iterations): fp32 ASR 0.998 -> 0.793, BA 0.914 -> 0.900; bf16 ASR 0.993 ->
    # 0.949, BA 0.895 -> 0.894
    assert last["stage"] == "anp-prune"
    zero = sum(int((m.weight == 0).sum()) for m in repaired.modules() if isinstance(m, nn.BatchNorm2d))
    assert zero == int(last["pruned"])
    assert after["ba"] >= before["ba"] - 0.15, (before, after)
    assert not repaired.training


# ----------------------------------------------------------------------------- clean models

@pytest.mark.slow
@pytest.mark.parametrize("name, overrides", [
    # FT at its default lr 0.1 costs a clean model ~10 points on 300 images (measured on one
    # clean control: BA 0.938 -> 0.842); lr 0.01 is the other references' setting (see ft.py)
    ("ft", {"epochs": 5, "lr": 0.01}),
    ("nad", {"epochs": 6, "teacher_epochs": 5, "beta_scale": 0.1}),
    ("argd", {"epochs": 6, "teacher_epochs": 5, "vertex_scale": 0.1}),
    ("fp", {"epochs": 5}),
    ("mcr", {"epochs": 6, "endpoint_epochs": 5}),
    ("anp", {"iterations": 30}),
])
def test_a_clean_model_keeps_its_ba(name, overrides, synthetic, clean_control, attack):
    trig = attack[3]
    sub = synthetic.train.subset(clean_subset(synthetic.train.y, 0.1, seed=1))
    ba0 = backdoor_metrics(clean_control, synthetic.test, None, None, RT)["ba"]
    repaired, _ = run_defense(name, clean_control, sub, synthetic, trig, **overrides)
    ba1 = backdoor_metrics(repaired, synthetic.test, None, None, RT)["ba"]
    show(f"clean {name}", {"ba": ba0}, {"ba": ba1})
    # measured, fp32 (BA 0.956 before): ft 0.971, nad 0.940, argd 0.950, fp 0.959, mcr 0.973, anp 0.952;
    # bf16 (BA 0.920 before): ft 0.947, nad 0.915, argd 0.904, fp 0.949, mcr 0.962, anp 0.913
    assert ba1 >= ba0 - 0.07, (name, ba0, ba1)


# ----------------------------------------------------------------------------- mechanics (unit tier)

def test_registered_as_post_training():
    for name in NAMES:
        assert get_defense(name).kind == "post-training", name


def test_per_group_weights_repeat_the_last_value():
    assert per_group((500, 1000, 1000), 3) == (500, 1000, 1000)
    assert per_group((500, 1000, 1000), 4) == (500, 1000, 1000, 1000)
    assert per_group((500, 1000, 1000), 2) == (500, 1000)
    assert per_group((7.0,), 3) == (7.0, 7.0, 7.0)


def test_fp_amount_stops_before_the_accuracy_drop():
    # 4 channels, class = which of channels 0/1 is larger; channels 2, 3 carry nothing useful.
    # Distinct channel means (0.75 < 1.0) fix the pruning order without relying on argsort's tie
    # order, and the bias makes a class-0 image with channel 0 pruned come out as class 1.
    feats = torch.tensor([[1.0, 0.0, 0.1, 0.2], [0.0, 1.5, 0.1, 0.2], [2.0, 0.0, 0.1, 0.2], [0.0, 2.5, 0.1, 0.2]])
    labels = torch.tensor([0, 1, 0, 1])
    fc = nn.Linear(4, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0]]))
        fc.bias.copy_(torch.tensor([-0.1, 0.1]))
    order = feats.mean(0).argsort()               # increasing activation: 2, 3, 0, 1
    assert order.tolist() == [2, 3, 0, 1]
    params = fp_mod.Params(step=0.25, max_ratio=1.0)
    k, trace = fp_mod.choose_amount(feats, labels, fc, order, params)
    assert k == 2                                 # pruning a third channel costs half the accuracy
    assert trace[:3] == [(0, 1.0), (1, 1.0), (2, 1.0)] and trace[3][1] == 0.5
    k_fixed, _ = fp_mod.choose_amount(feats, labels, fc, order, fp_mod.Params(prune_ratio=0.5))
    assert k_fixed == 2


def _tiny_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def _tiny_clean_set():
    from trainables.data.base import ImageSet
    return ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))


def test_anp_masks_and_noise_scale_the_batchnorm_affine_parameters():
    model = _tiny_bn_model()
    pert = anp_mod.NeuronPerturbation(anp_mod.batchnorms(model))
    x = torch.rand(5, 3, 8, 8)
    assert torch.allclose(pert.forward(model, x, noisy=False), model(x))            # m = 1, no noise
    with torch.no_grad():
        pert.mask["1"][2] = 0.0
        pert.delta["1"].fill_(0.1)
        pert.xi["1"].fill_(-0.2)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[1].weight[2] = 0.0
    assert torch.allclose(pert.forward(model, x, noisy=False), ref(x), atol=1e-6)
    with torch.no_grad():
        ref[1].weight.copy_(model[1].weight * (pert.mask["1"] + 0.1))
        ref[1].bias.mul_(0.8)
    assert torch.allclose(pert.forward(model, x, noisy=True), ref(x), atol=1e-6)
    # the adversarial step keeps δ, ξ within ±ε and raises the loss
    y = model(x).argmax(1)
    with torch.no_grad():
        pert.mask["1"].fill_(1.0)
    base = nn.functional.cross_entropy(model(x), y)
    pert.perturb(model, x, y, eps=0.4, gen=torch.Generator().manual_seed(0))
    assert pert.delta["1"].abs().max() <= 0.4 + 1e-6 and pert.xi["1"].abs().max() <= 0.4 + 1e-6
    assert nn.functional.cross_entropy(pert.forward(model, x, noisy=True), y) > base


def test_anp_pruning_by_threshold_and_by_number():
    masks = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.2, 0.05])}
    by_t = anp_mod.pruned_neurons(masks, anp_mod.Params(threshold=0.2))
    assert by_t["a"].tolist() == [1] and sorted(by_t["b"].tolist()) == [0, 1]
    by_n = anp_mod.pruned_neurons(masks, anp_mod.Params(prune_by="number", prune_number=2))
    assert by_n["a"].tolist() == [1] and by_n["b"].tolist() == [1]


def test_mcr_curve_ends_at_its_endpoints_and_trains_only_theta():
    model = _tiny_bn_model()
    w1 = {k: v.detach().clone() for k, v in model.named_parameters()}
    w2 = {k: v + 1.0 for k, v in w1.items()}
    theta = {k: nn.Parameter((w1[k] + w2[k]) / 2 + 0.3) for k in w1}
    for k in w1:
        assert torch.equal(mcr_mod.bezier(0.0, w1, theta, w2)[k], w1[k])
        assert torch.equal(mcr_mod.bezier(1.0, w1, theta, w2)[k], w2[k])
        mid = mcr_mod.bezier(0.5, w1, theta, w2)[k]       # ¼ w1 + ½ θ + ¼ w2
        assert torch.allclose(mid, 0.25 * w1[k] + 0.5 * theta[k] + 0.25 * w2[k])
    loss_fn = mcr_mod.curve_loss(w1, theta, w2, l2=5e-4, gen=torch.Generator().manual_seed(0))
    model.train()
    loss, logs = loss_fn(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), torch.arange(4))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(t.grad is not None for t in theta.values())
    assert logs["l2"] > 0


def test_defense_output_loads_into_a_fresh_model(synthetic):
    # a tiny untrained run of FP (which parametrizes fc while it runs) and ANP: plain state_dicts
    torch.manual_seed(0)
    model = build_model("wrn-16-1", synthetic.num_classes, synthetic.mean, synthetic.std).eval()
    sub = synthetic.train.subset(torch.arange(64))
    for name, overrides in (("fp", {"epochs": 1}), ("anp", {"iterations": 1, "batch_size": 64})):
        repaired, _ = run_defense(name, model, sub, synthetic, sub, **overrides)
        fresh = build_model("wrn-16-1", synthetic.num_classes, synthetic.mean, synthetic.std)
        fresh.load_state_dict(repaired.state_dict())
        x = sub.x[:8].float() / 255
        assert torch.allclose(fresh.eval()(x), repaired(x), atol=1e-5)


@pytest.mark.parametrize("name", ["nad", "argd", "nba"])
def test_the_teacher_schedule_is_constant_or_drops_to_a_tenth(name):
    """``teacher_lr_drop`` 0 keeps the teacher's lr; NAD's README teacher (lr 0.1, drop at 2: NAD's
    own loop at β = 0) runs 0.1 for two epochs, then 0.01."""
    from trainables.defenses._common import teacher_sgd

    cls = get_defense(name)
    constant = teacher_sgd(make_params(cls.Params, {}))
    assert [constant.lr_at(e) for e in range(constant.epochs)] == [0.01] * 10
    nad_readme = teacher_sgd(make_params(cls.Params, {"teacher_lr": 0.1, "teacher_lr_drop": 2}))
    assert [nad_readme.lr_at(e) for e in range(nad_readme.epochs)] == pytest.approx([0.1] * 2 + [0.01] * 8)
    assert nad_readme.nesterov and nad_readme.augment


@pytest.mark.parametrize("acc, chosen", [
    # endpoints 0.90: the floor is 0.88; 0.4 and 0.5 fall below it, 0.6 is the nearest the middle above
    ({0.0: 0.9, 0.1: 0.9, 0.2: 0.89, 0.3: 0.885, 0.4: 0.87, 0.5: 0.80, 0.6: 0.88, 0.7: 0.89, 0.8: 0.9,
      0.9: 0.9, 1.0: 0.9}, 0.6),
    # 0.4 and 0.6 both keep it: the tie goes to the smaller t
    ({**{t / 10: 0.9 for t in range(11)}, 0.5: 0.5}, 0.4),
    # 0.3 and 0.7 keep it, 0.4-0.6 do not: the smaller t again (a measured curve of a BadNets twin)
    ({0.0: 0.853, 0.1: 0.905, 0.2: 0.900, 0.3: 0.862, 0.4: 0.811, 0.5: 0.762, 0.6: 0.846, 0.7: 0.876,
      0.8: 0.899, 0.9: 0.905, 1.0: 0.874}, 0.3),
    # no point keeps it: the most accurate one
    ({**{t / 10: 0.5 for t in range(11)}, 0.0: 0.95, 1.0: 0.9, 0.2: 0.6}, 0.2),
])
def test_mcr_chooses_t_on_the_clean_subset(monkeypatch, acc, chosen):
    # each curve point stands for itself; its "accuracy" is the table's
    monkeypatch.setattr(mcr_mod, "curve_model", lambda shell, w1, theta, w2, t, x, cl: t)
    monkeypatch.setattr(mcr_mod, "accuracy", lambda t, data, rt: acc[round(t, 1)])
    ctx = DefenseContext(rt=RT, seed=0, num_classes=2, clean=_tiny_clean_set(), progress=lambda m: None)
    mcr = mcr_mod.MCR(make_params(mcr_mod.Params, {"choose_t": "clean", "t_tolerance": 0.02}))
    assert mcr.clean_t(ctx, None, {}, {}, {}) == chosen
