"""Training-time defenses (ABL, DLP) and the FixMatch views they train on.

Setting: the session's synthetic set (3,000 training / 1,000 test images), the registered BadNets
attack (3×3 grid patch in the bottom-right corner, 10% of the training set = 300 images relabelled
to class 0), WRN-16-1 on the CPU. A DefenseContext is built here with the two logging closures
the sweep provides: ``evaluate`` (test BA/ASR) and ``score_filter`` (precision/recall of a
suspected-poison index set against the true poisoned indices).

Budgets, cut to the synthetic scale (and said where they differ from the papers):

* ``ctx.build_model`` returns a copy of the session's clean WRN-16-1 (conftest ``trained_clean``,
  6 epochs) instead of a random initialisation. From scratch, WRN-16-1 learns neither the
  synthetic task nor the trigger in the first few thousand images (measured: filter precision
  at chance after 5 epochs of 1,000 images), so a from-scratch SL stage would cost minutes;
  from the clean initialisation, one or two SL epochs on the poisoned set implant the backdoor
  (ASR ~1) the way the paper's first 10 CIFAR-10 epochs do, and the filter, unlearning and
  semi-supervised stages are exercised on a model in the state the paper describes.
* γ (DLP) and the isolation ratio (ABL) are raised from 1% to 5% (150 of the 300 poisoned
  images): 1% of 3,000 is 30 samples, 3 per class in D'_c.
* Smaller batches and fewer epochs; the figures each test requires are in its docstring.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from trainables.attacks.base import poison_training_set, triggered_test_set
from trainables.augment import OPS, apply_ops, strong, weak
from trainables.data.base import ImageSet
from trainables.data.loader import to_float
from trainables.defenses.abl import ABL
from trainables.defenses.abl import Params as ABLParams
from trainables.defenses.base import DefenseContext
from trainables.defenses.dlp import DLP, STAGE_ORDERS, entropy_bits, fixmatch_loss, split_by_entropy
from trainables.defenses.dlp import Params as DLPParams
from trainables.engine import SGDConfig, pick_runtime, prepare, train
from trainables.metrics import backdoor_metrics
from trainables.models import build_model
from trainables.params import make_params
from trainables.registry import get_attack, get_defense

RT = pick_runtime("cpu")
TARGET = 0


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def badnets(synthetic):
    """(poisoned training set, true poisoned indices, triggered non-target test set)."""
    cls = get_attack("badnets")
    attack = cls(make_params(cls.Params, {"poison_rate": 0.1, "target": TARGET}), synthetic)
    index = attack.select(synthetic.train.y)
    poisoned, _ = poison_training_set(attack, synthetic.train, index)
    return poisoned, index, triggered_test_set(attack, synthetic.test)


def context(data, train_set: ImageSet, truth: torch.Tensor, triggered: ImageSet | None, *,
            init: torch.nn.Module | None = None, evaluate: bool = True, seed: int = 0) -> DefenseContext:
    """A training-time context; ``build_model`` copies ``init`` (else a random WRN-16-1)."""
    truth_set = set(truth.tolist())

    def score_filter(index: torch.Tensor) -> dict:
        hits = len(set(index.tolist()) & truth_set)
        return {"precision": hits / max(1, len(index)), "recall": hits / max(1, len(truth_set))}

    def build():
        if init is not None:
            return copy.deepcopy(init)
        torch.manual_seed(seed)
        return build_model("wrn-16-1", data.num_classes, data.mean, data.std)

    def metrics(model):
        return backdoor_metrics(model, data.test, triggered, TARGET, RT) if evaluate else {}

    return DefenseContext(rt=RT, seed=seed, num_classes=data.num_classes, train=train_set, build_model=build,
                          evaluate=metrics, score_filter=score_filter, progress=lambda line: None)


def stage_end(history: list[dict], stage: str) -> dict:
    """The last log entry of ``stage``."""
    return [e for e in history if e["stage"] == stage][-1]


def dlp(**overrides) -> DLP:
    return DLP(make_params(DLPParams, overrides))


def abl(**overrides) -> ABL:
    return ABL(make_params(ABLParams, overrides))


# ----------------------------------------------------------------------------- FixMatch loss

def test_fixmatch_loss_pinned_on_hand_made_logits():
    logits_x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    # weak views: confident on class 0 (p = e^5/(e^5+2) = 0.987), unsure (0.576), confident on 1 (0.965)
    weak_logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 4.0, 0.0]], requires_grad=True)
    # strong views: their own argmax (1, 0, 0/1) must NOT be the pseudo-label
    strong_logits = torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [1.0, 1.0, 0.0]], requires_grad=True)

    loss, logs = fixmatch_loss(logits_x, y, weak_logits, strong_logits, tau=0.95, lambda_u=2.0)

    e = math.e
    lx = ((math.log(e ** 2 + 2) - 2) + math.log(2 + e)) / 2              # CE([2,0,0],0), CE([0,1,0],2)
    lu = (math.log(2 + e) + 0.0 + (math.log(2 * e + 1) - 1)) / 3         # pseudo 0, masked, pseudo 1; mean over 3
    assert loss.item() == pytest.approx(lx + 2.0 * lu, abs=1e-6)
    assert logs["lx"].item() == pytest.approx(lx, abs=1e-6)
    assert logs["lu"].item() == pytest.approx(lu, abs=1e-6)
    assert logs["mask"].item() == pytest.approx(2 / 3)

    loss.backward()                                                   # pseudo-labels are targets: no grad
    assert weak_logits.grad is None or torch.count_nonzero(weak_logits.grad) == 0
    assert torch.count_nonzero(strong_logits.grad[1]) == 0              # the masked sample adds nothing
    assert torch.count_nonzero(strong_logits.grad[0]) == 3

    # a higher threshold masks the 0.965 sample too; tau = 0 keeps all three
    high, logs_high = fixmatch_loss(logits_x, y, weak_logits, strong_logits, tau=0.98, lambda_u=2.0)
    assert logs_high["mask"].item() == pytest.approx(1 / 3)
    assert high.item() == pytest.approx(lx + 2.0 * math.log(2 + e) / 3, abs=1e-6)
    _, logs_all = fixmatch_loss(logits_x, y, weak_logits, strong_logits, tau=0.0, lambda_u=1.0)
    assert logs_all["mask"].item() == 1.0


# ----------------------------------------------------------------------------- augmentation

def test_strong_augmentation_is_batched_changes_images_and_keeps_range(synthetic):
    x = to_float(synthetic.test.x[:64])
    out = strong(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    per_image = (out - x).abs().flatten(1).mean(1)
    assert (per_image > 0.02).all()                                   # Cutout alone moves every image
    assert torch.equal(out, strong(x, torch.Generator().manual_seed(0)))     # seeded
    assert not torch.equal(out, strong(x, torch.Generator().manual_seed(1)))
    # one call draws per-sample ops and magnitudes: 64 copies of one image come out all different
    same = strong(x[:1].expand(64, -1, -1, -1).clone(), torch.Generator().manual_seed(2))
    assert len(torch.unique(same.flatten(1), dim=0)) == 64
    # the weak view is a crop + flip: same shape, same pixel range, float
    w = weak(synthetic.test.x[:64], torch.Generator().manual_seed(0))
    assert w.shape == x.shape and w.dtype == torch.float32 and w.min() >= 0 and w.max() <= 1


def test_every_randaugment_op_keeps_range_and_acts(synthetic):
    x = to_float(synthetic.test.x[:16])
    mag = torch.rand(16, generator=torch.Generator().manual_seed(0))
    for k, name in enumerate(OPS):
        out = apply_ops(x, torch.full((16,), k), mag)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1, name
        changed = (out - x).abs().flatten(1).amax(1) > 1e-6
        if name == "identity":
            assert torch.equal(out, x)
        else:
            assert changed.float().mean() >= 0.5, f"{name} left most images unchanged"
    # ops are per sample: brightness at magnitude 0 darkens to 5%, at 1 keeps 95%
    bright = apply_ops(x[:2], torch.full((2,), OPS.index("brightness")), torch.tensor([0.0, 1.0]))
    assert torch.allclose(bright[0], x[0] * 0.05, atol=1e-6) and torch.allclose(bright[1], x[1] * 0.95, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_strong_augmentation_on_cuda_matches_contract(synthetic):
    x = to_float(synthetic.test.x[:64]).cuda()
    out = strong(x, torch.Generator(device="cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert ((out - x).abs().flatten(1).mean(1) > 0.02).all()


# ----------------------------------------------------------------------------- DLP filter

def test_entropy_in_bits_and_split_sizes():
    assert entropy_bits(torch.zeros(1, 4)).item() == pytest.approx(2.0)          # uniform over 4: 2 bits
    assert entropy_bits(torch.tensor([[50.0, 0.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    # n = 20, C = 2, gamma = 0.1 -> |D'_p| = 2 lowest overall, |D'_c| = 1 highest per class
    entropy = torch.arange(20, dtype=torch.float32)
    labels = torch.tensor([0, 1] * 10)
    poisoned, clean = split_by_entropy(entropy, labels, 0.1, 2)
    assert poisoned.tolist() == [0, 1]
    assert clean.tolist() == [18, 19]
    # a class whose samples all sit in D'_p gets none in D'_c (the sets never overlap)
    labels = torch.tensor([0, 0] + [1] * 18)
    poisoned, clean = split_by_entropy(entropy, labels, 0.1, 2)
    assert poisoned.tolist() == [0, 1] and clean.tolist() == [19]


def test_dlp_filter_finds_poisoned_samples(synthetic, badnets):
    """SL (3 epochs) + filter, through DLP.run with AU of 0 epochs: the 5% lowest-entropy samples
    are BadNets' poisoned images with precision >= 0.9 (measured: TODO), and D'_c is clean."""
    poisoned, index, triggered = badnets
    ctx = context(synthetic, poisoned, index, triggered, evaluate=False)
    dlp(stages="sl-au", gamma=0.05, sl_epochs=3, sl_lr=0.05, batch_size=32, au_epochs=0).run(ctx)
    entry = stage_end(ctx.history, "filter")
    assert entry["filtered_poisoned"] == 50 and entry["filtered_clean"] == 50
    assert entry["filter_precision"] >= 0.9, entry
    assert entry["clean_set_poison_fraction"] <= 0.05, entry


# ----------------------------------------------------------------------------- DLP stages

@pytest.mark.parametrize("stages", STAGE_ORDERS)
def test_dlp_runs_the_stages_in_the_chosen_order(synthetic, badnets, stages):
    """Tiny budget (200 images, one epoch per stage, no test evaluation): every stage logs every
    epoch under its name, in the order ``stages`` names; EMA on for one order."""
    poisoned, index, triggered = badnets
    small = torch.arange(200)
    ctx = context(synthetic, poisoned.subset(small), index[index < 200], None, evaluate=False)
    ema = 0.9 if stages == "sl-assft-au" else None
    model = dlp(stages=stages, gamma=0.05, sl_epochs=1, au_epochs=1, assft_epochs=2, batch_size=16, mu=2,
                ema=ema).run(ctx)
    seen = []
    for e in ctx.history:
        if not seen or seen[-1] != e["stage"]:
            seen.append(e["stage"])
    expected = ["sl", "filter"] + stages.split("-")[1:]
    assert seen == expected
    assert len([e for e in ctx.history if e["stage"] == "assft"]) == (2 if "assft" in stages else 0)
    if "assft" in stages:
        entry = stage_end(ctx.history, "assft")
        assert 0.0 <= entry["mask"] <= 1.0 and math.isfinite(entry["loss"])
        # one epoch = one pass over the 190 unlabelled images in batches of mu * B = 32: 6 steps
        assert entry["images_per_second"] > 0
    assert not model.training
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()


# ----------------------------------------------------------------------------- ABL isolation

def test_abl_isolation_finds_poisoned_samples(synthetic, badnets):
    """LGA isolation (3 epochs) then isolation of the 5% lowest-loss samples, through ABL.run with
    no fine-tuning or unlearning: precision >= 0.9 against BadNets' poisoned images."""
    poisoned, index, triggered = badnets
    ctx = context(synthetic, poisoned, index, triggered, evaluate=False)
    abl(isolation_epochs=3, isolation_lr=0.05, batch_size=32, isolation_ratio=0.05,
        finetune_epochs=0, unlearn_epochs=0).run(ctx)
    entry = stage_end(ctx.history, "isolate")
    assert entry["isolated"] == 50
    assert entry["isolation_precision"] >= 0.9, entry


# ----------------------------------------------------------------------------- search spaces

@pytest.mark.parametrize("method, params", [("dlp", DLPParams), ("abl", ABLParams)])
def test_search_space_names_params_with_their_defaults(method, params):
    from dataclasses import fields

    from sweep.spaces import load_space

    space = load_space(method)
    defaults = {f.name: f.default for f in fields(params)}
    assert space, f"search_spaces/{method}.yaml is missing"
    for name, dist in space.items():
        assert name in defaults, f"{name} is not a field of {method}'s Params"
        assert dist.default == defaults[name], name
    assert get_defense(method).Params is params
