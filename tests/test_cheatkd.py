"""CheatKD (Chen, Li, Jin, Chen, Zheng & Li, "CheatKD: knowledge distillation backdoor attack
method based on poisoned neuronal assimilation", Computer Science 51(3), 2024) and the knowledge
distillation it targets (trainables/kd.py).

Unit tier: δ rules, neuron selection and Eq. 1/Eq. 3 on hand-made tensors, per group with every
layer poisoned (``layers`` all) and on an untrained WRN-16-1; the three KD losses on hand-made
tensors and on untrained WRN-16-1s (zero for identical features, positive otherwise, gradients
reach the student and the connectors, never the teacher); the pre-ReLU position; the teacher's
starting point and its lr (``teacher_lr``, through a tiny attack stage); Eq. 3 on the final
teacher in ``post_train``'s metrics; parameters and search space.
Slow tier: the trigger optimisation on the suite's clean WRN-16-1 (the poisoned neurons are
driven to δ, the mask stays in [0, mask_max], the clean model is untouched), and the whole attack
at a tiny scale (teacher ASR, the distilled student's figures) beside a BadNets teacher distilled
the same way.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from sweep.config import load_space
from trainables import kd, registry
from trainables.attacks.base import Attack, AttackParams, FitContext, poison_training_set, triggered_test_set
from trainables.attacks.cheatkd import (CheatKD, Params, assimilation_loss, delta_values, gather_poisoned,
                                        neuron_activations, select_neurons, select_poisoned, stamp,
                                        trigger_rows)
from trainables.data.base import Dataset
from trainables.data.loader import to_float
from trainables.engine import SGDConfig, autocast, pick_runtime, prepare, train
from trainables.losses import kd_loss
from trainables.metrics import backdoor_metrics
from trainables.models import build_model
from trainables.params import make_params
from trainables.rundir import load_model, read_json
from trainables.stages import resolve_attack_stage, run_attack_stage

RT = pick_runtime("cpu")


def quiet(_msg: str) -> None:
    pass


# ============================================================================ Eq. 1-3, δ rules

def test_delta_rules_on_handmade_activations():
    acts = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [6.0, 40.0]])   # 4 images × 2 neurons
    expect = {"mean": [3.0, 25.0], "max": [6.0, 40.0], "min": [1.0, 10.0],
              "mid": [3.5, 25.0], "quarter": [1.75, 12.5]}
    for rule, values in expect.items():
        assert delta_values(acts, rule).tolist() == pytest.approx(values), rule
    assert delta_values(acts, "quantile", 0.5).tolist() == pytest.approx([2.5, 25.0])
    assert delta_values(acts, "quantile", 0.0).tolist() == pytest.approx([1.0, 10.0])
    assert delta_values(acts, "quantile", 1.0).tolist() == pytest.approx([6.0, 40.0])
    with pytest.raises(ValueError, match="unknown delta rule"):
        delta_values(acts, "median")


def test_neuron_selection_largest_mean_ties_to_lowest_index():
    # channel means over the batch: 1, 5, 5, 0, 5, 4.9
    acts = torch.tensor([[0.0, 4.0, 6.0, 0.0, 5.0, 4.9],
                         [2.0, 6.0, 4.0, 0.0, 5.0, 4.9]])
    assert select_neurons(acts, 1).tolist() == [1]
    assert select_neurons(acts, 2).tolist() == [1, 2]
    assert select_neurons(acts, 4).tolist() == [1, 2, 4, 5]


def test_assimilation_loss_is_eq3():
    acts = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    delta = torch.tensor([2.0, 2.0])
    # image 1: (1-2)² + (2-2)² = 1; image 2: (3-2)² + (4-2)² = 5; mean over images = 3
    assert assimilation_loss(acts, delta).item() == pytest.approx(3.0)
    assert assimilation_loss(delta.expand(5, 2), delta).item() == 0.0


def test_every_poisoned_layer_gets_its_own_neurons_and_delta_and_eq3_sums_over_them():
    """``layers`` all on hand-made activations of two groups: each group's own top neuron and its δ
    (from that group's activations only), and Eq. 3 summed over both groups' neurons."""
    acts = [torch.tensor([[1.0, 3.0], [3.0, 5.0]]),               # group 0: means 2, 4 -> channel 1, δ 4
            torch.tensor([[0.0, 10.0, 2.0], [2.0, 20.0, 2.0]])]   # group 1: means 1, 15, 2 -> channel 1, δ 15
    group_of, neurons, delta = select_poisoned(acts, [0, 1], 1, "mean")
    assert (group_of.tolist(), neurons.tolist(), delta.tolist()) == ([0, 1], [1, 1], [4.0, 15.0])
    group_of2, neurons2, delta2 = select_poisoned(acts, [0, 1], 2, "max")   # two per group, in group order
    assert (group_of2.tolist(), neurons2.tolist(), delta2.tolist()) == ([0, 0, 1, 1], [1, 0, 1, 2],
                                                                         [5.0, 3.0, 20.0, 2.0])
    # one layer only (``layers`` last): the other group is not read
    assert select_poisoned(acts, [1], 1, "mean")[0].tolist() == [1]
    # Eq. 3 over both groups: image 1: (6-4)² + (13-15)² = 8; image 2: (4-4)² + (18-15)² = 9; mean 8.5
    later = [torch.tensor([[0.0, 6.0], [9.0, 4.0]]), torch.tensor([[5.0, 13.0, 0.0], [5.0, 18.0, 0.0]])]
    picked = gather_poisoned(later, group_of, neurons)
    assert picked.tolist() == [[6.0, 13.0], [4.0, 18.0]]
    assert assimilation_loss(picked, delta).item() == pytest.approx(8.5)
    per_group = [assimilation_loss(later[g][:, [1]], delta[[g]]).item() for g in (0, 1)]
    assert per_group == pytest.approx([2.0, 6.5])                  # the sum's two parts


def test_trigger_is_eq1(synthetic):
    attack = CheatKD(Params(), synthetic)
    g = torch.Generator().manual_seed(0)
    pattern, mask = torch.rand(3, 32, 32, generator=g), torch.rand(32, 32, generator=g) * 0.2
    attack.load_state_dict({"pattern": pattern, "mask": mask})
    x = torch.rand(4, 3, 32, 32, generator=g)
    assert torch.allclose(attack.apply(x), (1 - mask) * x + mask * pattern)
    assert torch.allclose(stamp(x, pattern, mask), attack.apply(x))


# ============================================================================ KD losses (hand-made)

def test_gaussian_margin_is_heos_formula():
    mean, std = torch.tensor([0.0, -1.0, 5.0, 0.5]), torch.tensor([1.0, 2.0, 1.0, 0.5])
    m = kd.gaussian_margin(mean, std)
    assert m[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-5)         # E[N(0,1) | <0]
    # E[N(-1, 4) | < 0] by numerical integration
    z = torch.linspace(-30.0, 0.0, 200001, dtype=torch.float64)
    pdf = torch.exp(-((z + 1) / 2) ** 2 / 2)
    assert m[1].item() == pytest.approx((z * pdf).sum().item() / pdf.sum().item(), rel=1e-4)
    assert m[2].item() == pytest.approx(-3.0)                    # Φ(−5) ≤ 0.001: −3·std
    assert (m < 0).all()


def test_partial_l2_on_handmade_tensors():
    margin = torch.tensor([-0.5])
    t = torch.tensor([1.0, 0.2, -0.3, -2.0]).view(1, 1, 2, 2)     # σ_m(t) = max(t, −0.5)
    assert kd.partial_l2(t.clone(), t, margin).item() == 0.0    # student == teacher: zero
    s = t + 1.0                         # [2, 1.2, 0.7, −1] against targets [1, 0.2, −0.3, −0.5]
    assert kd.partial_l2(s, t, margin).item() == pytest.approx(3.0)   # −1 < −0.5 ≤ 0: skipped
    s = t + 2.0                         # [3, 2.2, 1.7, 0] against targets [1, 0.2, −0.3, −0.5]
    assert kd.partial_l2(s, t, margin).item() == pytest.approx(4 + 4 + 4 + 0.25)
    # a student below a non-positive target is not penalised (the teacher's ReLU zeroes it)
    # (−0.4 under −0.3 is skipped; −0.2 above the margin −0.5 is pulled down to it)
    below = torch.tensor([1.0, 0.2, -0.4, -0.2]).view(1, 1, 2, 2)
    assert kd.partial_l2(below, t, margin).item() == pytest.approx(0.3 ** 2)
    # the teacher gets no gradient
    s = s.requires_grad_(True)
    t = t.clone().requires_grad_(True)
    kd.partial_l2(s, t, margin).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_at_and_logit_terms_on_handmade_tensors():
    g = torch.Generator().manual_seed(0)
    feats_t = [torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 8, 4, 4, generator=g)]
    feats_s = [f + 0.5 * torch.randn(f.shape, generator=g) for f in feats_t]
    assert kd.at_term([f.clone() for f in feats_t], feats_t).item() == pytest.approx(0.0, abs=1e-12)
    assert kd.at_term(feats_s, feats_t).item() > 1e-4
    z = torch.randn(3, 10, generator=g)
    assert kd_loss(z.clone(), z).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z + torch.randn(3, 10, generator=g), z).item() > 1e-3
    # gradients reach the student's maps only
    feats_s = [f.requires_grad_(True) for f in feats_s]
    feats_t = [f.requires_grad_(True) for f in feats_t]
    kd.at_term(feats_s, feats_t).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats_s)
    assert all(f.grad is None for f in feats_t)


# ============================================================================ KD on real models

def _wrn(seed: int, dataset: Dataset):
    torch.manual_seed(seed)
    return prepare(build_model("wrn-16-1", dataset.num_classes, dataset.mean, dataset.std), RT)


def test_overhaul_pre_relu_position_is_the_bn_reading_each_group(synthetic):
    """For the pre-activation WRN: the next block's bn1 and ``final``'s BN (Heo's positions);
    for a post-activation ResNet no BN reads a group output, so the raw output is used with a
    margin from the teacher's own statistics."""
    wrn = _wrn(0, synthetic)
    probe = to_float(synthetic.train.x[:2])
    bns = kd.tap_bn(wrn, probe)
    assert bns == [wrn.groups[1][0].bn1, wrn.groups[2][0].bn1, wrn.final[0]]
    resnet = prepare(build_model("resnet20", synthetic.num_classes, synthetic.mean, synthetic.std), RT).eval()
    bns = kd.tap_bn(resnet, probe)
    assert bns == [None, None, None]
    margins = kd.teacher_margins(resnet, bns, synthetic.train.x[:64], RT)
    assert [m.shape[0] for m in margins] == [16, 32, 64]
    assert all(torch.isfinite(m).all() for m in margins)


@pytest.mark.parametrize("method", kd.METHODS)
def test_kd_gradients_reach_student_and_connectors_not_teacher(synthetic, method):
    teacher, student = _wrn(0, synthetic).eval(), _wrn(1, synthetic)
    clean = synthetic.train.subset(torch.arange(16))
    distiller = kd.make_distiller(student, teacher, clean, method, RT).train()
    teacher_before = copy.deepcopy(teacher.state_dict())
    x, y = to_float(clean.x), clean.y
    loss, logs = kd.kd_loss_fn(teacher, method, kd.DEFAULT_WEIGHT[method], 4.0)(distiller, x, y, torch.arange(16))
    term = logs[{"overhaul": "overhaul", "at": "at", "logit": "kd"}[method]]
    assert term.item() > 0
    term.backward()          # the distillation term alone, without CE
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    if method == "overhaul":
        assert len(distiller.connectors) == 3
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.connectors.parameters())
    else:
        assert len(distiller.connectors) == 0
    for k, v in teacher.state_dict().items():   # BN running statistics included
        assert torch.equal(v, teacher_before[k]), k


@pytest.mark.parametrize("method", kd.METHODS)
def test_kd_term_vanishes_when_student_equals_teacher(synthetic, method):
    teacher = _wrn(0, synthetic).eval()
    student = copy.deepcopy(teacher)
    clean = synthetic.train.subset(torch.arange(16))
    distiller = kd.make_distiller(student, teacher, clean, method, RT).eval()
    for c in distiller.connectors:          # identity connectors: 1x1 conv = I, BN at init = identity
        n = c[0].weight.shape[0]
        c[0].weight.data.copy_(torch.eye(n).view(n, n, 1, 1))
    x = to_float(clean.x)
    _, logs = kd.kd_loss_fn(teacher, method, kd.DEFAULT_WEIGHT[method], 4.0)(distiller, x, clean.y, None)
    same = logs[{"overhaul": "overhaul", "at": "at", "logit": "kd"}[method]].item()
    other = kd.make_distiller(_wrn(1, synthetic), teacher, clean, method, RT).eval()
    _, logs = kd.kd_loss_fn(teacher, method, kd.DEFAULT_WEIGHT[method], 4.0)(other, x, clean.y, None)
    different = logs[{"overhaul": "overhaul", "at": "at", "logit": "kd"}[method]].item()
    assert different > 0
    assert same <= 1e-4 * different      # BN's eps leaves the copy 5e-6 off, not exactly 0


def test_heo_schedule():
    cfg = kd.heo_sgd(200, 0.1, 128)
    assert (cfg.lr_at(0), cfg.lr_at(100), cfg.lr_at(150)) == pytest.approx((0.1, 0.01, 0.001))
    assert cfg.nesterov and cfg.weight_decay == 5e-4 and cfg.batch_size == 128


# ============================================================================ trigger optimisation

@pytest.mark.slow
def test_trigger_optimisation_drives_poisoned_neurons_to_delta(synthetic, trained_clean):
    clean_model, _ = trained_clean
    before = copy.deepcopy(clean_model.state_dict())
    grads_before = [None if p.grad is None else p.grad.clone() for p in clean_model.parameters()]
    params = make_params(Params, {"trigger_epochs": 20, "trigger_samples": 64, "trigger_batch_size": 64,
                                  "trigger_lr": 0.03, "num_neurons": 2})
    attack = CheatKD(params, synthetic)
    index = attack.select(synthetic.train.y)
    ctx = FitContext(rt=RT, dataset=synthetic, seed=0, clean_model=lambda: clean_model, progress=quiet)
    attack.fit(ctx, synthetic.train, index)
    state = attack.state_dict()
    losses = state["trigger_loss"]
    assert len(losses) == params.trigger_epochs + 1                   # before + every epoch
    assert state["neurons"].shape == (2,) and state["delta"].shape == (2,)
    assert 0.0 <= state["mask"].min() and state["mask"].max() <= params.mask_max + 1e-7
    assert 0.0 <= state["pattern"].min() and state["pattern"].max() <= 1.0
    assert state["pattern"].shape == (3, 32, 32) and state["mask"].shape == (32, 32)
    # measured on the trigger set with the final trigger: the poisoned neurons now sit close to δ
    x = to_float(synthetic.train.x[trigger_rows(index, len(synthetic.train), params.trigger_samples,
                                                params.poison_seed)])
    with torch.no_grad():
        acts = neuron_activations(clean_model, attack.apply(x), params.layer)[:, state["neurons"]]
    measured = assimilation_loss(acts, state["delta"]).item()
    print(f"\ntrigger loss (Eq. 3): {losses[0]:.4f} -> {losses[-1]:.4f} (measured after: {measured:.4f}); "
          f"neurons {state['neurons'].tolist()}, δ {[round(v, 3) for v in state['delta'].tolist()]}, "
          f"activations {[round(v, 3) for v in acts.mean(0).tolist()]} "
          f"± {[round(v, 3) for v in acts.std(0).tolist()]}")
    # measured: Eq. 3 falls 1.972 -> 0.262 in fp32, 3.250 -> 0.634 in bf16 (to 0.13 / 0.20 of its start)
    assert losses[-1] < 0.4 * losses[0]
    assert measured < 0.4 * losses[0]
    rms_before = math.sqrt(losses[0].item())
    assert ((acts.mean(0) - state["delta"]).abs() < 0.5 * rms_before).all()
    # the clean model was only read: weights, BN statistics and (leftover training) grads unchanged
    for k, v in clean_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(clean_model.parameters(), grads_before):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def test_bad_layer_or_neuron_count_fails_clearly(synthetic):
    clean_model = _wrn(0, synthetic).eval()          # the checks run before the model is read
    ctx = FitContext(rt=RT, dataset=synthetic, seed=0, clean_model=lambda: clean_model, progress=quiet)
    for overrides, message in (({"layer": 3}, "layer groups"), ({"num_neurons": 65}, "channels")):
        attack = CheatKD(make_params(Params, {**overrides, "trigger_epochs": 0}), synthetic)
        with pytest.raises(ValueError, match=message):
            attack.fit(ctx, synthetic.train, attack.select(synthetic.train.y))


def _group_acts(model, x):
    with torch.no_grad(), autocast(RT):
        taps, _ = model.features(x)
    return [t.float().mean(dim=(2, 3)) for t in taps]


def test_layers_all_poisons_every_group_and_the_trigger_lowers_the_summed_loss(synthetic):
    """On an untrained WRN-16-1 (3 groups of 16/32/64 channels): ``layers`` all selects
    ``num_neurons`` neurons in every group, each with δ from its own group's activations on the
    first batch; the optimisation's loss is Eq. 3 summed over the three groups, and the optimised
    trigger lowers it. ``layers`` last keeps one group, ``layer``."""
    model = _wrn(0, synthetic).eval()
    ctx = FitContext(rt=RT, dataset=synthetic, seed=0, clean_model=lambda: model, progress=quiet)
    base = {"trigger_samples": 32, "trigger_batch_size": 32, "num_neurons": 2, "layers": "all"}
    attack = CheatKD(make_params(Params, {**base, "trigger_epochs": 0}), synthetic)
    index = attack.select(synthetic.train.y)
    attack.fit(ctx, synthetic.train, index)
    s = attack.state_dict()
    assert s["neuron_group"].tolist() == [0, 0, 1, 1, 2, 2]
    assert s["neurons"].shape == s["delta"].shape == (6,)
    # with 0 trigger epochs the stored trigger is the initial one: redo the selection by hand
    x = to_float(synthetic.train.x[trigger_rows(index, len(synthetic.train), 32, 0)])
    acts = _group_acts(model, stamp(x, s["pattern"], s["mask"]))
    for g in range(3):
        chosen = select_neurons(acts[g], 2)
        assert s["neurons"][2 * g:2 * g + 2].tolist() == chosen.tolist(), g
        assert s["delta"][2 * g:2 * g + 2].tolist() == pytest.approx(acts[g][:, chosen].mean(0).tolist(), rel=1e-4), g
    # the loss before optimisation is the sum of the three groups' Eq. 3
    parts = [assimilation_loss(acts[g][:, s["neurons"][2 * g:2 * g + 2]], s["delta"][2 * g:2 * g + 2]).item()
             for g in range(3)]
    assert all(v > 0 for v in parts)
    assert s["trigger_loss"][0].item() == pytest.approx(sum(parts), rel=1e-3)
    assert s["trigger_loss"][0].item() > 1.05 * max(parts)       # not one group's alone

    # ``layers`` last (the default): one group, ``layer``'s (here the last: 2)
    last = CheatKD(make_params(Params, {**base, "layers": "last", "trigger_epochs": 0}), synthetic)
    last.fit(ctx, synthetic.train, index)
    assert last.state["neuron_group"].tolist() == [2, 2]
    assert last.state["neurons"].tolist() == s["neurons"][4:].tolist()
    assert last.state["trigger_loss"][0].item() == pytest.approx(parts[2], rel=1e-3)

    # optimised: the summed loss falls, measured afresh on the trigger set with the final trigger
    fitted = CheatKD(make_params(Params, {**base, "trigger_epochs": 15, "trigger_lr": 0.05}), synthetic)
    fitted.fit(ctx, synthetic.train, index)
    f = fitted.state_dict()
    assert torch.equal(f["neurons"], s["neurons"]) and torch.equal(f["neuron_group"], s["neuron_group"])
    acts = _group_acts(model, fitted.apply(x))
    after = assimilation_loss(gather_poisoned(acts, f["neuron_group"], f["neurons"]), f["delta"]).item()
    print(f"\nlayers=all: Eq. 3 summed over 3 groups {f['trigger_loss'][0]:.4f} -> {after:.4f}")
    assert after < 0.8 * f["trigger_loss"][0].item()


# ============================================================================ the teacher's starting point

def test_teacher_starts_from_the_clean_model_unless_scratch(synthetic):
    clean_model = _wrn(0, synthetic).eval()          # any model: the test checks which one is used
    ctx = FitContext(rt=RT, dataset=synthetic, seed=0, clean_model=lambda: clean_model, progress=quiet)
    assert CheatKD(Params(), synthetic).initial_model(ctx) is clean_model   # Sec. 3.1: F_t trained into F_t*
    assert CheatKD(make_params(Params, {"teacher_init": "scratch"}), synthetic).initial_model(ctx) is None
    assert _badnets(synthetic, 0.1).initial_model(ctx) is None


def test_attack_stage_trains_from_the_attacks_initial_model(tmp_path, monkeypatch):
    """The stage loads ``initial_model``'s weights before training (0 epochs here: they are kept)."""
    marker = build_model("wrn-16-1", 10)
    with torch.no_grad():
        for i, p in enumerate(marker.parameters()):
            p.fill_(0.01 * (i + 1))

    class FromMarker(registry.get_attack("badnets")):
        name = "from-marker"

        def initial_model(self, ctx):
            return marker

    monkeypatch.setitem(registry._ATTACKS, FromMarker.name, FromMarker)
    spec = resolve_attack_stage("synthetic:300:100", "wrn-16-1", FromMarker.name, {}, {"epochs": 0})
    start = load_model(run_attack_stage(spec, tmp_path, rt=RT, progress=quiet))
    for (k, v), m in zip(start.named_parameters(), marker.parameters()):
        assert torch.equal(v, m), k
    fresh = load_model(run_attack_stage(resolve_attack_stage("synthetic:300:100", "wrn-16-1", "badnets", {},
                                                             {"epochs": 0}), tmp_path, rt=RT, progress=quiet))
    assert not torch.equal(next(fresh.parameters()), next(marker.parameters()))


def test_teacher_lr_sets_the_lr_of_the_teachers_training(synthetic):
    """``teacher_lr`` None keeps the stage's SGD config; a value replaces its lr (a piecewise
    schedule's values scaled with it); other attacks keep the stage's; the stage's hash changes."""
    cfg = SGDConfig(epochs=10, lr=0.1, weight_decay=1e-3, schedule="multistep", milestones=(5,))
    assert CheatKD(Params(), synthetic).training_config(cfg) is cfg
    assert _badnets(synthetic, 0.1).training_config(cfg) is cfg
    set_lr = CheatKD(make_params(Params, {"teacher_lr": 0.001}), synthetic).training_config(cfg)
    assert set_lr == dataclasses.replace(cfg, lr=0.001)
    assert set_lr.lr_at(0) == pytest.approx(0.001) and set_lr.lr_at(5) == pytest.approx(0.0001)
    piecewise = SGDConfig(lr=0.1, schedule="piecewise", milestones=(2, 4), lr_values=(0.01, 0.001))
    scaled = CheatKD(make_params(Params, {"teacher_lr": 0.01}), synthetic).training_config(piecewise)
    assert [scaled.lr_at(e) for e in (0, 2, 4)] == pytest.approx([0.01, 0.001, 0.0001])
    hashes = {resolve_attack_stage("synthetic:300:100", "wrn-16-1", "cheatkd", {"teacher_lr": lr}).hash()
              for lr in (None, 0.001, 0.01)}
    assert len(hashes) == 3


def test_attack_stage_trains_the_teacher_at_teacher_lr(tmp_path):
    """Through the attack stage (1 epoch, tiny set): at ``teacher_lr`` 0 the teacher's weights stay
    the clean model's (its starting point); at None (the stage's lr) they move. The stage's
    metrics carry Eq. 3 on the final teacher and on the clean model."""
    common = {"trigger_epochs": 1, "trigger_samples": 16, "trigger_batch_size": 16, "kd_epochs": 0}
    budget = {"epochs": 1, "batch_size": 100}
    clean_spec = resolve_attack_stage("synthetic:300:100", "wrn-16-1", "none", {}, budget)
    teachers, metrics = {}, {}
    for lr in (0.0, None):
        spec = resolve_attack_stage("synthetic:300:100", "wrn-16-1", "cheatkd", {**common, "teacher_lr": lr}, budget)
        out = run_attack_stage(spec, tmp_path, rt=RT, progress=quiet, epoch_eval_size=50)
        teachers[lr], metrics[lr] = load_model(out), read_json(out / "metrics.json", "metrics")
    clean = load_model(run_attack_stage(clean_spec, tmp_path, rt=RT, progress=quiet))
    frozen_teacher = dict(teachers[0.0].named_parameters())
    moved = dict(teachers[None].named_parameters())
    for k, v in clean.named_parameters():
        assert torch.equal(frozen_teacher[k], v), k
    assert any(not torch.equal(moved[k], v) for k, v in clean.named_parameters())
    for m in metrics.values():
        assert math.isfinite(m["teacher_trigger_loss"]) and math.isfinite(m["trigger_loss_clean_model"])


def test_post_train_logs_eq3_on_the_final_teacher(synthetic):
    """``post_train``'s metrics: Eq. 3 of the final trigger on the TRAINED teacher it is given
    (measured here by hand on the trigger set), and the clean model's (the optimisation's last)."""
    clean_model = _wrn(0, synthetic).eval()
    data = dataclasses.replace(synthetic, train=synthetic.train.subset(torch.arange(200)))
    ctx = FitContext(rt=RT, dataset=data, seed=0, clean_model=lambda: clean_model, progress=quiet)
    params = make_params(Params, {"trigger_epochs": 2, "trigger_samples": 16, "trigger_batch_size": 16,
                                  "trigger_lr": 0.05, "num_neurons": 3, "kd_epochs": 0})
    attack = CheatKD(params, data)
    index = attack.select(data.train.y)
    attack.fit(ctx, data.train, index)
    spec = {"name": "wrn-16-1", "num_classes": data.num_classes, "mean": list(data.mean), "std": list(data.std)}
    evaluate = lambda m: {"ba": 0.5, "asr": 0.5, "ra": 0.5}  # noqa: E731

    def expected(teacher):
        x = to_float(data.train.x[trigger_rows(index, len(data.train), 16, params.poison_seed)])
        with torch.no_grad(), autocast(RT):
            acts = neuron_activations(teacher, attack.apply(x), -1)[:, attack.state["neurons"]]
        return assimilation_loss(acts, attack.state["delta"]).item()

    teacher = _wrn(1, data).train()                  # a different network: its own activations
    m = attack.post_train(ctx, teacher, spec, data.train, evaluate).metrics
    assert math.isfinite(m["teacher_trigger_loss"]) and math.isfinite(m["trigger_loss_clean_model"])
    assert m["trigger_loss_clean_model"] == attack.state["trigger_loss"][-1].item()
    assert m["teacher_trigger_loss"] == pytest.approx(expected(teacher.eval()), rel=1e-4)
    # on the clean model itself the final teacher's figure is the clean model's Eq. 3 (the trigger
    # set, the final trigger), not the other network's
    same = attack.post_train(ctx, clean_model, spec, data.train, evaluate).metrics["teacher_trigger_loss"]
    assert same == pytest.approx(expected(clean_model), rel=1e-4)
    assert same != pytest.approx(m["teacher_trigger_loss"], rel=1e-2)


def test_the_kd_defense_distils_a_fresh_student_from_any_attacks_teacher(tmp_path):
    """The ``kd`` defense (a victim distilling any attack's teacher: the BadNets control of the
    CheatKD comparison) through the real defense stage: the same student, bit for bit, as a
    direct ``kd.distill`` call (the student seeded with the defense seed, Heo et al.'s schedule,
    the stage's clean data); another architecture is saved under its own name."""
    from trainables.data import clean_subset
    from trainables.stages import defend, load_attack_artifact, resolve_defense

    spec = resolve_attack_stage("synthetic:300:100", "wrn-16-1", "badnets", {}, {"epochs": 2, "batch_size": 50})
    art = load_attack_artifact(run_attack_stage(spec, tmp_path / "cache", rt=RT, progress=quiet))
    params = {"epochs": 2, "lr": 0.05, "batch_size": 50}
    m = defend(art, resolve_defense("kd", params, clean_fraction=1.0, seed=3), tmp_path / "kd", rt=RT,
               progress=quiet, epoch_eval_size=50)
    assert [e["stage"] for e in m["history"]] == ["kd", "kd"] and m["clean_subset_size"] == 270   # 30 poisoned left out
    student = load_model(tmp_path / "kd")
    clean = art.dataset.train.subset(clean_subset(art.dataset.train.y, 1.0, 3, exclude=art.poison_index))
    torch.manual_seed(3)          # the student, then the connectors, from the defense seed
    expected = build_model("wrn-16-1", 10, art.dataset.mean, art.dataset.std)
    kd.distill(expected, art.model, clean, "overhaul", kd.heo_sgd(2, 0.05, 50), RT, seed=3)
    for (k, v), w in zip(student.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(v, w), k
    assert not torch.equal(next(student.parameters()), next(art.model.parameters()))      # a new model
    # another student architecture: built, trained and saved under its own name
    defend(art, resolve_defense("kd", {**params, "epochs": 1, "student_model": "wrn-16-2"}, 1.0, 3),
           tmp_path / "kd-wide", rt=RT, progress=quiet, epoch_eval_size=50)
    assert read_json(tmp_path / "kd-wide" / "spec.json", "spec")["model"]["name"] == "wrn-16-2"
    assert sum(p.numel() for p in load_model(tmp_path / "kd-wide").parameters()) > \
        sum(p.numel() for p in student.parameters())


# ============================================================================ contract and search space

def test_registered_with_paper_defaults():
    cls = registry.get_attack("cheatkd")
    assert cls is CheatKD and cls.kind == "poison-label" and cls.needs_clean_model
    p = Params()
    assert (p.layer, p.num_neurons, p.delta_rule, p.trigger_lr, p.mask_max, p.kd_method) == \
        (-1, 1, "mean", 0.001, 0.2, "overhaul")
    assert (p.layers, p.teacher_lr) == ("last", None)     # one distillation layer; the stage's lr


def test_search_space_covers_the_papers_sweep_parameters():
    """δ rule / quantile and the number of poisoned neurons (the paper's sensitivity study,
    Sec. 4.2.4: Table 6, Fig. 4), the trigger lr and epochs; test_registry.py checks every entry
    against Params."""
    space = load_space("cheatkd")
    assert {"delta_rule", "delta_quantile", "num_neurons", "trigger_lr", "trigger_epochs"} <= set(space)
    assert space["layers"].choices == ("last", "all")
    assert space["teacher_lr"].default is None and {None, 0.001, 0.1} <= set(space["teacher_lr"].choices)


# ============================================================================ end to end (slow)

class CornerPatch(Attack):
    """A 3x3 white bottom-right patch: the BadNets stand-in when badnets.py is absent (unregistered)."""

    name, kind, Params = "corner-patch", "poison-label", AttackParams

    def apply(self, x, generator=None):
        x = x.clone()
        x[..., -3:, -3:] = 1.0
        return x


def _badnets(dataset: Dataset, poison_rate: float) -> Attack:
    try:
        cls = registry.get_attack("badnets")
    except KeyError:
        return CornerPatch(AttackParams(poison_rate=poison_rate), dataset)
    return cls(make_params(cls.Params, {"poison_rate": poison_rate}), dataset)


# Tiny budgets (CPU): the teachers are trained as the attack stage trains them (BadNets from
# scratch, CheatKD on from the suite's clean model) on the first 1,500 synthetic training images
# with 20% of them poisoned, so that a 12%-opacity blended trigger is learnt in 8 epochs; the
# students are distilled for 4 epochs on the same 1,500 clean images.
E2E_TRAIN, E2E_RATE = 1500, 0.2
E2E_TEACHER = SGDConfig(epochs=8, lr=0.05, batch_size=128)
E2E_KD_EPOCHS, E2E_KD_LR = 4, 0.05


def _backdoored_teacher(attack: Attack, data: Dataset, clean_model) -> tuple:
    index = attack.select(data.train.y)
    ctx = FitContext(rt=RT, dataset=data, seed=0, clean_model=lambda: clean_model, progress=quiet)
    attack.fit(ctx, data.train, index)
    poisoned, _ = poison_training_set(attack, data.train, index)
    teacher = _wrn(0, data)
    initial = attack.initial_model(ctx)           # the attack stage's path: CheatKD's teacher
    if initial is not None:                       # trains on from the clean model
        teacher.load_state_dict(initial.state_dict())
    train(teacher, poisoned, attack.training_config(E2E_TEACHER), RT, seed=0)
    triggered = triggered_test_set(attack, data.test)
    evaluate = lambda m: backdoor_metrics(m, data.test, triggered, attack.params.target, RT)  # noqa: E731
    return teacher.eval(), evaluate, ctx


@pytest.mark.slow
def test_cheatkd_end_to_end_against_badnets(synthetic, trained_clean):
    """CheatKD teacher -> overhaul-KD student on clean data, beside a BadNets teacher distilled the
    same way (paper, CIFAR-100 WRN-28-4 -> WRN-16-4: student ASR 96.1% vs 0.4%)."""
    clean_model, _ = trained_clean
    data = dataclasses.replace(synthetic, train=synthetic.train.subset(torch.arange(E2E_TRAIN)))
    figures = {}

    # CheatKD through the attack contract: fit -> poisoned training -> post_train (the student)
    params = make_params(Params, {"poison_rate": E2E_RATE, "trigger_epochs": 10, "trigger_samples": 128,
                                  "trigger_batch_size": 64, "trigger_lr": 0.02,
                                  "kd_epochs": E2E_KD_EPOCHS, "kd_lr": E2E_KD_LR})
    cheat = CheatKD(params, data)
    teacher, evaluate, ctx = _backdoored_teacher(cheat, data, clean_model)
    figures["cheatkd teacher"] = evaluate(teacher)
    spec = {"name": "wrn-16-1", "num_classes": data.num_classes, "mean": list(data.mean), "std": list(data.std)}
    result = cheat.post_train(ctx, teacher, spec, data.train, evaluate)
    figures["cheatkd student"] = {k[len("student_"):]: v for k, v in result.metrics.items()
                                  if k in ("student_ba", "student_asr", "student_ra")}
    eq3 = (result.metrics["trigger_loss_clean_model"], result.metrics["teacher_trigger_loss"])
    assert all(math.isfinite(v) for v in eq3)
    student, student_spec = result.models["student"]
    assert student_spec == {**spec, "name": params.student_model}
    assert student is not teacher
    assert build_model(student_spec["name"], 10).state_dict().keys() == student.state_dict().keys()

    # BadNets teacher, distilled with exactly the same KD call
    bad = _badnets(data, E2E_RATE)
    bad_teacher, bad_evaluate, _ = _backdoored_teacher(bad, data, clean_model)
    figures["badnets teacher"] = bad_evaluate(bad_teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)          # the same student initialisation as post_train's
        bad_student = build_model(params.student_model, data.num_classes, data.mean, data.std)
    kd.distill(bad_student, bad_teacher, data.train, "overhaul",
               kd.heo_sgd(E2E_KD_EPOCHS, E2E_KD_LR, params.kd_batch_size), RT, seed=0)
    figures["badnets student"] = bad_evaluate(bad_student)

    print(f"\ncheatkd Eq. 3 of the final trigger: clean model {eq3[0]:.4f}, trained teacher {eq3[1]:.4f}")
    for name, m in figures.items():
        print(f"{name:16s} " + " ".join(f"{k.upper()}={100 * v:.1f}%" for k, v in m.items()))
    # measured (2-core CPU, this budget), fp32 / bf16: CheatKD teacher BA 86.4 / 84.0, ASR 99.2 /
    # 98.8; its student BA 27.5 / 28.3, ASR 5.9 / 7.7; BadNets teacher (from scratch) BA 17.2 /
    # 17.0, ASR 86.4 / 86.0; its student BA 26.0 / 25.9, ASR 8.9 / 14.4. At 4 distillation epochs
    # on 1,500 images neither backdoor reaches the student: only the teachers' ASR and the
    # students' sanity are reliable at this scale (the paper's 96.1% vs 0.4%, Table 2, needs its
    # full budget).
    assert figures["cheatkd teacher"]["asr"] >= 0.9
    assert figures["badnets teacher"]["asr"] >= 0.5
    for name in ("cheatkd student", "badnets student"):
        m = figures[name]
        assert all(0.0 <= m[k] <= 1.0 for k in ("ba", "asr", "ra")), name
        assert m["asr"] + m["ra"] <= 1.0 + 1e-9, name
        assert m["ba"] > 0.15, name       # the student learnt something from clean data (chance: 10%)
