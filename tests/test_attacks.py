"""The six classic attacks: BadNets (Gu et al. 2017), TrojanNN (Liu et al. 2018), Blend (Chen et
al. 2017), CLA (Turner et al. 2019, label-consistent), SIG (Barni et al. 2019), Refool (Liu et al.
2020).

Unit tier: every trigger exactly (which pixels change, by how much, [0, 1] range), the
poisoned-set contract (which indices, which labels), the fitting steps of TrojanNN and CLA on an
untrained WRN-16-1 (what they optimise does improve; CLA stays inside ε), state round trips and
parameter validation (the search-space files are checked for every method in test_registry.py).

Slow tier: the poison-label attacks (BadNets, TrojanNN, Blend) fine-tune the suite's clean model
(conftest's ``trained_clean``) on their poisoned set; the clean-label attacks train one WRN-16-1
from scratch each, beside this file's one clean model (the clean model CLA fits on, and their
"clean model has a low ASR" reference), and check the backdoor works.
"""
from __future__ import annotations

import copy

import pytest
import torch

from trainables.attacks.base import FitContext, poison_training_set, triggered_test_set
from trainables.data.loader import to_float
from trainables.engine import SGDConfig, pick_runtime, prepare, train
from trainables.metrics import backdoor_metrics
from trainables.models import build_model
from trainables.params import ParamError, make_params
from trainables.registry import attacks, get_attack

NAMES = ("badnets", "trojannn", "blend", "cla", "sig", "refool")
KINDS = {"badnets": "poison-label", "trojannn": "poison-label", "blend": "poison-label",
         "cla": "clean-label", "sig": "clean-label", "refool": "clean-label"}
RATES = {"badnets": 0.1, "trojannn": 0.05, "blend": 0.1, "cla": 0.08, "sig": 0.08, "refool": 0.08}

# Clean-label attacks train WRN-16-1 from scratch on their poisoned set, as their papers do, with
# this file's clean model as the reference (same init and batch order: only the poisoning
# differs): SGD lr 0.05 cosine, batch 32, 8 epochs, NO augmentation. Measured on the 3,000-image
# synthetic set: with crop + flip even BadNets is not learnt within such a budget (batch 32, 10
# epochs: BA 96.7%, ASR 8.2%; crops cut the corner patch and flips move it), while without
# augmentation it is. Batch 32 instead of 128: 4x the SGD steps for the same compute.
BUDGET = SGDConfig(epochs=8, lr=0.05, batch_size=32)
AUGMENT = False
# Poison-label attacks fine-tune the suite's clean model (conftest's ``trained_clean``) on their
# poisoned set for 4 epochs: a third of the cost of BUDGET from scratch, and ASR ≥ 90% either way.
FINETUNE = SGDConfig(epochs=4, lr=0.05, batch_size=32)
# Fitting budgets for the slow tests (the defaults, 1,000 TrojanNN steps, are for real runs) and
# the smallest fits that exercise the mechanics in the unit-tier tests.
FIT_OVERRIDES = {"trojannn": {"steps": 100, "opt_images": 16}}
TINY_FIT = {"trojannn": {"steps": 3, "opt_images": 2}, "cla": {"steps": 1, "poison_rate": 0.01}}


# ============================================================================ fixtures and helpers

@pytest.fixture(scope="session")
def data():
    from trainables.data import load_dataset
    return load_dataset("synthetic")


@pytest.fixture(scope="session")
def rt():
    return pick_runtime()


def fresh_model(data, rt, seed: int):
    torch.manual_seed(seed)
    return prepare(build_model("wrn-16-1", data.num_classes, data.mean, data.std), rt)


@pytest.fixture(scope="session")
def untrained(data, rt):
    """A randomly initialised WRN-16-1: enough to test the mechanics of the fitting steps."""
    return fresh_model(data, rt, seed=123).eval()


@pytest.fixture(scope="session")
def clean(data, rt):
    """The ONE clean WRN-16-1 of this file, trained on the clean synthetic training set."""
    model = fresh_model(data, rt, seed=0)
    train(model, data.train, BUDGET, rt, seed=0, augment=AUGMENT)
    return model.eval()


def make(name: str, data, **overrides):
    cls = get_attack(name)
    return cls(make_params(cls.Params, overrides), data)


def fitted(name: str, data, rt, model, **overrides):
    """An attack with its fitting step done on ``model`` (a no-op for the trigger-only attacks)."""
    attack = make(name, data, **overrides)
    index = attack.select(data.train.y)
    ctx = FitContext(rt=rt, dataset=data, seed=0, clean_model=lambda: model, progress=lambda s: None)
    attack.fit(ctx, data.train, index)
    return attack, index


def images(data, n: int = 16, start: int = 0) -> torch.Tensor:
    return to_float(data.test.x[start:start + n])


# ============================================================================ registry and params

def test_the_six_attacks_are_registered_with_their_kind_and_rate():
    known = attacks()
    for name in NAMES:
        cls = known[name]
        assert cls.name == name and cls.kind == KINDS[name]
        assert make_params(cls.Params).poison_rate == RATES[name]
    assert get_attack("trojannn").needs_clean_model and get_attack("cla").needs_clean_model
    assert not any(get_attack(n).needs_clean_model for n in ("badnets", "blend", "sig", "refool"))


@pytest.mark.parametrize("name, overrides", [
    ("badnets", {"poison_rate": 1.5}),
    ("badnets", {"pattern": "stripes"}),
    ("badnets", {"patch_size": 0}),
    ("trojannn", {"num_units": 0}),
    ("blend", {"alpha": 1.2}),
    ("cla", {"amplitude": 0.0}),
    ("cla", {"eps": -0.1}),
    ("sig", {"delta_train": "strong"}),
    ("refool", {"reflect_min": 0.5, "reflect_max": 0.2}),
    ("refool", {"poison_rate": -0.1}),
    ("sig", {"no_such_parameter": 1}),
])
def test_bad_parameters_raise_param_error(name, overrides):
    with pytest.raises(ParamError):
        make_params(get_attack(name).Params, overrides)


# ============================================================================ poisoned-set contract

@pytest.mark.parametrize("name", ["badnets", "blend", "sig", "refool"])
def test_poisoned_set_contract(name, data):
    """Poison-label: rate·N non-target images relabelled to the target; clean-label: rate·N
    target-class images, no label touched. Nothing outside the index changes."""
    attack = make(name, data)
    index = attack.select(data.train.y)
    poisoned, _ = poison_training_set(attack, data.train, index)
    y = data.train.y
    assert len(index) == round(RATES[name] * len(y))
    changed_rows = torch.nonzero((poisoned.x != data.train.x).flatten(1).any(1)).flatten()
    assert set(changed_rows.tolist()) <= set(index.tolist())
    if KINDS[name] == "clean-label":
        assert bool((y[index] == attack.params.target).all())
        assert torch.equal(poisoned.y, y)
    else:
        assert bool((y[index] != attack.params.target).all())
        assert bool((poisoned.y[index] == attack.params.target).all())
        outside = torch.ones(len(y), dtype=torch.bool)
        outside[index] = False
        assert torch.equal(poisoned.y[outside], y[outside])


@pytest.mark.parametrize("name", ["sig", "refool"])
def test_clean_label_rate_beyond_the_target_class_is_refused(name, data):
    attack = make(name, data, poison_rate=0.5)        # the target class holds 10% of the set
    with pytest.raises(ValueError, match="eligible"):
        attack.select(data.train.y)


@pytest.mark.parametrize("name", ["cla", "sig", "refool"])
def test_the_whole_set_draw_poisons_the_target_class_images_of_a_draw_over_every_image(name, data):
    """``poison_draw=whole-set``: rate·N indices over the whole set, of which the target-class
    ones are poisoned (about rate·N / classes); ``target-class``: rate·N target-class images."""
    y = data.train.y
    n = round(0.08 * len(y))
    whole = make(name, data, poison_draw="whole-set").select(y)
    per_class = make(name, data).select(y)
    drawn = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
    assert torch.equal(whole, drawn[y[drawn] == 0].sort().values)
    assert bool((y[whole] == 0).all()) and len(per_class) == n
    assert 0.5 * n / 10 < len(whole) < 2 * n / 10                       # ~ a tenth of the draw
    assert torch.equal(whole, make(name, data, poison_draw="whole-set").select(y))   # seeded
    with pytest.raises(ParamError, match="poison_draw"):
        make(name, data, poison_draw="all")


# ============================================================================ triggers

@pytest.mark.parametrize("pattern, expected", [
    ("grid", [[0, 0, 1], [0, 1, 0], [1, 0, 1]]),
    ("white", [[1, 1, 1], [1, 1, 1], [1, 1, 1]]),
])
def test_badnets_changes_only_the_bottom_right_3x3(pattern, expected, data):
    x = images(data)
    out = make("badnets", data, pattern=pattern).apply(x)
    corner = torch.zeros_like(x, dtype=torch.bool)
    corner[..., 29:32, 29:32] = True
    assert torch.equal(out[~corner], x[~corner])
    assert torch.equal(out[..., 29:32, 29:32], torch.tensor(expected, dtype=x.dtype).expand(16, 3, 3, 3))


def test_badnets_patch_size_is_a_parameter(data):
    x = images(data)
    out = make("badnets", data, patch_size=5).apply(x)
    changed = (out != x).any(0).any(0)
    assert changed[:27].sum() == 0 and changed[:, :27].sum() == 0      # only the last 5 rows/cols
    assert torch.equal(out[..., 29:32, 29:32], make("badnets", data).apply(x)[..., 29:32, 29:32])


def test_blend_is_a_convex_mix_with_the_noise_key(data):
    x = images(data)
    attack = make("blend", data)
    key = attack.state["key"]
    assert key.shape == (3, 32, 32) and 0 <= key.min() and key.max() <= 1 and key.std() > 0.2
    torch.testing.assert_close(attack.apply(x), 0.8 * x + 0.2 * key)
    assert torch.equal(make("blend", data).state["key"], key)                      # fixed by the seed
    assert not torch.equal(make("blend", data, poison_seed=1).state["key"], key)


def test_blend_reads_any_key_image_file(data, tmp_path):
    from PIL import Image
    path = tmp_path / "key.png"
    Image.new("RGB", (64, 48), (255, 0, 128)).save(path)
    attack = make("blend", data, key_image=str(path), alpha=0.5)
    key = attack.state["key"]
    assert key.shape == (3, 32, 32)
    torch.testing.assert_close(key[:, 10, 10], torch.tensor([1.0, 0.0, 128 / 255]))
    x = images(data)
    torch.testing.assert_close(attack.apply(x), 0.5 * x + 0.5 * key)
    from trainables.data.base import DataError
    with pytest.raises(DataError):
        make("blend", data, key_image=str(tmp_path / "missing.png"))


def test_sig_adds_a_horizontal_sine_of_the_right_amplitude(data):
    x = images(data)
    attack = make("sig", data, delta_test=40 / 255)
    j = torch.arange(32, dtype=torch.float64)
    signal = torch.sin(2 * torch.pi * j * 6 / 32).float()
    torch.testing.assert_close(attack.poison(x, torch.arange(16)), (x + 20 / 255 * signal).clamp(0, 1))
    torch.testing.assert_close(attack.apply(x), (x + 40 / 255 * signal).clamp(0, 1))
    # synthetic pixels stay in [8, 235]/255, so the 20/255 training signal is never clipped there
    assert (attack.poison(x, torch.arange(16)) - x).abs().max() <= 20 / 255 + 1e-6


def test_sig_mix_blends_the_stretched_sine_at_alpha_in_training_and_test(data):
    x = images(data)
    attack = make("sig", data, mode="mix", alpha=0.2, delta_test=40 / 255)
    j = torch.arange(32, dtype=torch.float64)
    stripes = ((1 + torch.sin(2 * torch.pi * j * 6 / 32)) / 2).float()
    expected = 0.8 * x + 0.2 * stripes
    torch.testing.assert_close(attack.poison(x, torch.arange(16)), expected)
    torch.testing.assert_close(attack.apply(x), expected)       # Δ plays no part in a blend


def test_cla_trigger_is_a_corner_checkerboard(data):
    x = images(data)
    out = make("cla", data).apply(x)
    corner = torch.zeros_like(x, dtype=torch.bool)
    corner[..., 29:32, 29:32] = True
    assert torch.equal(out[~corner], x[~corner])
    board = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(out[..., 29:32, 29:32], board.expand(16, 3, 3, 3))
    four = make("cla", data, four_corners=True).apply(x)
    for rows in (slice(0, 3), slice(29, 32)):
        for cols in (slice(0, 3), slice(29, 32)):
            assert torch.equal(four[..., rows, cols], board.expand(16, 3, 3, 3))
    half = make("cla", data, amplitude=0.5).apply(x)
    torch.testing.assert_close(half[..., 29:32, 29:32], 0.5 * x[..., 29:32, 29:32] + 0.5 * board)


def test_refool_blends_in_linear_light(data, tmp_path):
    """With a constant reflection c (ghost and blur both give c) and a fixed weight w:
    x' = ((1 − w)·x^2.2 + w·c^2.2)^(1/2.2)."""
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 100, 50)).save(tmp_path / "r.png")
    attack = make("refool", data, reflection_dir=str(tmp_path), reflect_min=0.3, reflect_max=0.3)
    assert attack.state["pool"].shape == (1, 3, 32, 32)
    x = images(data)
    c = torch.tensor([200, 100, 50]).float().div(255).view(1, 3, 1, 1)
    expected = (0.7 * x.pow(2.2) + 0.3 * c.pow(2.2)).pow(1 / 2.2)
    torch.testing.assert_close(attack.apply(x, torch.Generator().manual_seed(0)), expected)


@pytest.mark.parametrize("ghost_rate", [0.0, 1.0])
def test_refool_reflections_are_random_but_reproducible(ghost_rate, data):
    attack = make("refool", data, ghost_rate=ghost_rate, pool_size=20)
    pool = attack.state["pool"]
    assert pool.shape == (20, 3, 32, 32) and pool.dtype == torch.uint8
    assert pool.float().flatten(1).std(1).min() > 5                                 # not flat images
    x = images(data)
    a = attack.apply(x, torch.Generator().manual_seed(7))
    b = attack.apply(x, torch.Generator().manual_seed(7))
    c = attack.apply(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 1
    change = (a - x).abs().flatten(1).mean(1)
    assert bool((change > 0.01).all())                                               # every image reflected


@pytest.mark.parametrize("name", NAMES)
def test_triggers_stay_in_the_unit_range(name, data, rt, untrained):
    overrides = TINY_FIT.get(name, {})
    attack, index = fitted(name, data, rt, untrained, **overrides)
    x = to_float(data.train.x[index[:32]])
    for out in (attack.apply(x, torch.Generator().manual_seed(0)),
                attack.poison(x, index[:32], torch.Generator().manual_seed(0))):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert 0 <= out.min() and out.max() <= 1
        assert not torch.equal(out, x)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips(name, data, rt, untrained):
    """state_dict -> a new instance -> the same triggered output, with no refitting."""
    overrides = TINY_FIT.get(name, {})
    attack, index = fitted(name, data, rt, untrained, **overrides)
    state = attack.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = make(name, data, **overrides)
    again.load_state_dict(state)
    x = to_float(data.train.x[index[:16]])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(again.apply(x, g()), attack.apply(x, g()))
    assert torch.equal(again.poison(x, index[:16], g()), attack.poison(x, index[:16], g()))


# ============================================================================ fitting steps

def test_trojannn_drives_the_strongest_units_up_inside_the_mask(data, rt, untrained):
    attack, _ = fitted("trojannn", data, rt, untrained, steps=10, opt_images=4)
    s = attack.state
    strength = untrained.fc.weight.detach().abs().sum(0)
    assert set(s["units"].tolist()) == set(strength.topk(2).indices.tolist())
    assert bool((s["activation"] > s["clean_activation"]).all())
    corner = torch.zeros(3, 32, 32, dtype=torch.bool)
    corner[:, 24:, 24:] = True                                               # the 8x8 default mask
    assert s["pattern"][~corner].abs().sum() == 0
    assert 0 <= s["pattern"].min() and s["pattern"].max() <= 1
    x = images(data)
    out = attack.apply(x)
    assert torch.equal(out[:, ~corner], x[:, ~corner])
    with torch.no_grad():
        units = s["units"].to(rt.device)
        before = untrained.penultimate(x.to(rt.device))[:, units].mean(0)
        after = untrained.penultimate(out.to(rt.device))[:, units].mean(0)
    assert bool((after > before).all())                                     # on unseen images too


def test_trojannn_reference_geometry_adds_a_small_patch_inside_the_corner(data, rt, untrained):
    """patch_size 3, margin 4, blend add: the trigger lives on rows/cols 25-27, is added to the
    image and clipped, and its fitting still drives the chosen units up."""
    attack, _ = fitted("trojannn", data, rt, untrained, steps=10, opt_images=4, patch_size=3, margin=4,
                       blend="add")
    s = attack.state
    inside = torch.zeros(3, 32, 32, dtype=torch.bool)
    inside[:, 25:28, 25:28] = True
    assert torch.equal(s["mask"][0].bool(), inside[0])
    assert s["pattern"][~inside].abs().sum() == 0 and s["pattern"][inside].abs().sum() > 0
    assert bool((s["activation"] > s["clean_activation"]).all())
    x = images(data)
    out = attack.apply(x)
    assert torch.equal(out[:, ~inside], x[:, ~inside])
    expected = (x + s["pattern"]).clamp(0, 1)
    assert torch.allclose(out[:, inside], expected[:, inside])
    pasted = fitted("trojannn", data, rt, untrained, steps=10, opt_images=4, patch_size=3, margin=4)[0]
    assert torch.allclose(pasted.apply(x)[:, inside], pasted.state["pattern"][inside].expand(len(x), -1))


def test_trojannn_without_fit_says_so(data):
    with pytest.raises(RuntimeError, match="fit"):
        make("trojannn", data).apply(images(data))


def test_cla_perturbs_within_eps_then_adds_the_trigger(data, rt, untrained):
    import torch.nn.functional as F
    attack, index = fitted("cla", data, rt, untrained, steps=3, poison_rate=0.02)
    s = attack.state
    assert torch.equal(s["index"], index)
    orig = data.train.x[index]
    diff = (s["perturbed"].int() - orig.int()).abs()
    assert diff.max() <= 8 and diff.float().mean() > 2                      # inside ε = 8/255, and used
    with torch.no_grad():                                                   # PGD raised the loss
        y = data.train.y[index].to(rt.device)
        ce_clean = F.cross_entropy(untrained(to_float(orig).to(rt.device)), y)
        ce_adv = F.cross_entropy(untrained(to_float(s["perturbed"]).to(rt.device)), y)
    assert ce_adv > ce_clean
    poisoned, _ = poison_training_set(attack, data.train, index)
    corner = torch.zeros(3, 32, 32, dtype=torch.bool)
    corner[:, 29:, 29:] = True
    got = poisoned.x[index]
    assert torch.equal(got[:, ~corner], s["perturbed"][:, ~corner])          # PGD image outside the trigger
    assert torch.equal(got[:, corner].float() / 255, attack.apply(to_float(orig))[:, corner])
    assert torch.equal(poisoned.y, data.train.y)
    test = triggered_test_set(attack, data.test)                             # test images: trigger only
    keep = data.test.y != attack.params.target
    assert torch.equal(test.x[:, ~corner], data.test.x[keep][:, ~corner])
    other = torch.nonzero(data.train.y != attack.params.target).flatten()[:2]
    with pytest.raises(KeyError):
        attack.poison(to_float(data.train.x[other]), other)


def pgd_accuracy(model, data, rt, n: int = 256) -> float:
    from trainables.losses import pgd_untargeted
    x, y = to_float(data.test.x[:n]).to(rt.device), data.test.y[:n].to(rt.device)
    x_adv = pgd_untargeted(model.eval(), x, y, eps=8 / 255, step=2 / 255, steps=7,
                           generator=torch.Generator(rt.device).manual_seed(0))
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def test_cla_crafts_on_an_adversarially_trained_surrogate_and_leaves_the_clean_model(data, rt, clean):
    before = {k: v.clone() for k, v in clean.state_dict().items()}
    seen = []
    attack = make("cla", data, surrogate_epochs=1, surrogate_steps=1, steps=2, poison_rate=0.02)
    index = attack.select(data.train.y)
    ctx = FitContext(rt=rt, dataset=data, seed=0, clean_model=lambda: clean, progress=seen.append)
    attack.fit(ctx, data.train, index)
    assert all(torch.equal(v, clean.state_dict()[k]) for k, v in before.items())
    assert any("adversarial training of the surrogate, 1 epoch(s)" in m for m in seen)
    plain = make("cla", data, steps=2, poison_rate=0.02)
    plain.fit(ctx, data.train, index)
    assert not torch.equal(plain.state["perturbed"], attack.state["perturbed"])    # another model crafted them


@pytest.mark.slow
def test_the_adversarially_trained_surrogate_holds_up_under_pgd(data, rt, clean):
    from trainables.attacks.cla import adversarially_train
    surrogate = copy.deepcopy(clean)
    params = make("cla", data, surrogate_epochs=2, surrogate_steps=3).params
    adversarially_train(surrogate, data.train, FitContext(rt=rt, dataset=data, seed=0, clean_model=lambda: clean,
                                                          progress=lambda s: None), params)
    robust, plain = pgd_accuracy(surrogate, data, rt), pgd_accuracy(clean, data, rt)
    # measured (2-core CPU, bf16): clean model 0.000, surrogate 0.266
    assert robust > plain + 0.15, (plain, robust)


# ============================================================================ training (slow)

def backdoor(name: str, data, rt, clean, **overrides):
    """Train WRN-16-1 from scratch on the attack's poisoned training set; return the attack,
    the backdoored model's metrics, the clean model's metrics on the same triggered test set,
    and the poison index."""
    attack, index = fitted(name, data, rt, clean, **{**FIT_OVERRIDES.get(name, {}), **overrides})
    poisoned, _ = poison_training_set(attack, data.train, index)
    triggered = triggered_test_set(attack, data.test)
    model = fresh_model(data, rt, seed=0)              # the clean model's init and batch order:
    train(model, poisoned, BUDGET, rt, seed=0, augment=AUGMENT)   # only the poisoning differs
    got = backdoor_metrics(model, data.test, triggered, attack.params.target, rt)
    ref = backdoor_metrics(clean, data.test, triggered, attack.params.target, rt)
    return attack, got, ref, poisoned, index


@pytest.mark.slow
@pytest.mark.parametrize("name", ["badnets", "trojannn", "blend"])
def test_poison_label_attack_implants_a_backdoor(name, data, rt, trained_clean):
    """ASR ≥ 90% at a BA within 5 points of the clean model's; the clean model's ASR is low.
    Measured (ASR, BA; the clean model's BA and ASR): fp32 BadNets 99.3%, 0.975; TrojanNN 100%,
    0.985; Blend 97.6%, 0.974; clean 0.846, ASR ≤ 1.1%. bf16 BadNets 98.8%, 0.961; TrojanNN 99.8%,
    0.976; Blend 97.8%, 0.974; clean 0.818, ASR ≤ 3.1%."""
    clean = trained_clean[0]
    attack, index = fitted(name, data, rt, clean, **FIT_OVERRIDES.get(name, {}))
    poisoned, _ = poison_training_set(attack, data.train, index)
    triggered = triggered_test_set(attack, data.test)
    model = copy.deepcopy(clean)
    train(model, poisoned, FINETUNE, rt, seed=1, augment=AUGMENT)
    got = backdoor_metrics(model.eval(), data.test, triggered, attack.params.target, rt)
    ref = backdoor_metrics(clean, data.test, triggered, attack.params.target, rt)
    print(f"{name}: backdoored {got}, clean model {ref}")
    assert got["asr"] >= 0.90
    assert got["ba"] >= ref["ba"] - 0.05
    assert ref["asr"] <= 0.20


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides", [
    # CLA at its defaults (ε 8/255, one 3×3 corner, 8%) stays below 5% ASR after these 8 epochs:
    # a clean-label corner trigger needs a longer training than this budget. The test uses
    # stronger settings, each a parameter of the attack: ε 16/255 (Turner, Tsipras & Madry 2019,
    # "Label-consistent backdoor attacks", use 8/255 and 16/255), the trigger in all four corners
    # (survives flips), every target-class image (10%), and a 5×5 checkerboard
    # (measured: ASR 61.4% in fp32, 87.3% in bf16; in fp32 with the 3×3 one 26.3%, with ε 32/255
    # 0.0%).
    ("cla", {"eps": 16 / 255, "four_corners": True, "poison_rate": 0.1, "trigger_size": 5}),
    ("sig", {}),
    # Refool at its defaults (200 generated reflections, 8%) stays near 10% ASR in this budget: a
    # random reflection of weight 0.05-0.45 is a weak feature beside the synthetic shapes. A small
    # pool (5) of strong (weight 0.3-0.45) ghost reflections on every target-class image is
    # learnt (measured: ASR 34.0% in fp32, 34.4% in bf16; in fp32 with pool 20 29.6%, with
    # blurred ones too 26.0%).
    ("refool", {"pool_size": 5, "poison_rate": 0.1, "reflect_min": 0.3, "reflect_max": 0.45, "ghost_rate": 1.0}),
])
def test_clean_label_attack_implants_a_backdoor(name, overrides, data, rt, clean):
    """No label changes, poisons only in the target class, and an ASR far above the clean
    model's on the same triggered images (at least 20 points; the clean model's is ≤ 1%).
    Measured ASR: SIG 34.3% (fp32) / 37.2% (bf16), and CLA and Refool as quoted above."""
    attack, got, ref, poisoned, index = backdoor(name, data, rt, clean, **overrides)
    print(f"{name}: backdoored {got}, clean model {ref}")
    assert torch.equal(poisoned.y, data.train.y)
    assert bool((data.train.y[index] == attack.params.target).all())
    assert ref["asr"] <= 0.20
    assert got["asr"] >= ref["asr"] + 0.20
    # a sanity bound only: poisoning every target-class image (a tenth of the test set's classes)
    # costs target-class accuracy (measured BA, fp32: CLA 0.876, SIG 0.972, Refool 0.958, clean
    # 0.987; bf16: CLA 0.880, SIG 0.964, Refool 0.962, clean 0.983)
    assert got["ba"] >= ref["ba"] - 0.15
