"""The shared distillation / repair mechanics (trainables/losses.py, plus ARGD's edge term) pinned
on hand-made tensors whose values can be worked out on paper."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.defenses.argd import edge_loss, edges
from trainables.losses import (attention_loss, attention_map, frozen_bn_stats, fsp_loss, fsp_matrix, gram_matrix,
                               gram_style_loss, kd_loss, pgd_untargeted, recalibrate_bn)


def feat(rows) -> torch.Tensor:
    """A B×C×H×W float tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- Gram (NBA RNB)

def test_gram_matrix_of_a_1x2x1x2_feature():
    # channels (1, 2) and (3, 4) over the two positions: G_ij = Σ_k F_ik F_jk
    g = gram_matrix(feat([[[[1, 2]], [[3, 4]]]]))
    assert g.shape == (1, 2, 2)
    assert torch.equal(g, torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]))


def test_gram_style_loss_uses_the_4C2HW2_normaliser_and_batch_mean():
    teacher = feat([[[[1, 2]], [[3, 4]]], [[[0, 0]], [[0, 0]]]])
    student = torch.zeros_like(teacher)
    # sample 1: Σ (G^T − 0)² = 25 + 121 + 121 + 625 = 892, over 4·C²·(HW)² = 4·4·4 = 64; sample 2: 0
    expected = (892 / 64 + 0.0) / 2
    assert gram_style_loss(student, teacher).item() == pytest.approx(expected)
    assert gram_style_loss(teacher, teacher).item() == 0.0


# ----------------------------------------------------------------------------- FSP (NBA LNB)

def test_fsp_matrix_pools_to_the_smaller_map_and_divides_by_hw():
    a = feat([[[[1, 2], [3, 4]]]])                # 1×1×2×2 -> pooled to 1×1: 2.5
    b = feat([[[[2]]]])                           # 1×1×1×1
    assert torch.allclose(fsp_matrix(a, b), torch.tensor([[[5.0]]]))
    # same size: (C_a=2)×(C_b=1), M = F_a F_bᵀ / (H·W) with H·W = 2
    a2 = feat([[[[1, 2]], [[3, 4]]]])
    b2 = feat([[[[1, 1]]]])
    assert torch.allclose(fsp_matrix(a2, b2), torch.tensor([[[1.5], [3.5]]]))


def test_fsp_loss_is_the_mean_squared_difference_summed_over_adjacent_pairs():
    t = [feat([[[[1, 2]], [[3, 4]]]]), feat([[[[1, 1]]]])]
    s = [torch.zeros_like(t[0]), t[1].clone()]
    # M^T = [1.5, 3.5], M^S = 0 -> mean((1.5², 3.5²)) = (2.25 + 12.25) / 2
    assert fsp_loss(s, t).item() == pytest.approx(7.25)
    # Eq. 5's squared norm: the sum over the entries, 2.25 + 12.25
    assert fsp_loss(s, t, reduction="sum").item() == pytest.approx(14.5)
    with pytest.raises(ValueError, match="reduction"):
        fsp_loss(s, t, reduction="max")


# ----------------------------------------------------------------------------- attention (NAD)

def test_attention_map_sums_squares_over_channels_and_normalises():
    f = feat([[[[1, -2]], [[2, 0]]]])            # per position: 1 + 4 = 5, 4 + 0 = 4
    am = attention_map(f)
    assert torch.allclose(am, torch.tensor([[5.0, 4.0]]) / math.sqrt(41))
    assert torch.allclose(am.norm(dim=1), torch.ones(1))


def test_attention_loss_is_the_mse_of_the_maps():
    s, t = feat([[[[1, 0]]]]), feat([[[[0, 1]]]])  # maps (1, 0) and (0, 1)
    assert attention_loss(s, t).item() == pytest.approx(1.0)     # ((1)² + (−1)²) / 2
    assert attention_loss(t, t).item() == 0.0


# ----------------------------------------------------------------------------- KD (Hinton)

def test_kd_loss_zero_when_equal_and_known_two_class_value():
    z = torch.tensor([[0.3, -1.2, 2.0]])
    assert kd_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # teacher (0, 0) -> (1/2, 1/2); student (5·ln 3, 0) at T = 5 -> (3/4, 1/4)
    # KL = ½ ln(½ / ¾) + ½ ln(½ / ¼) = ½ ln(4/3), times T² = 25
    student = torch.tensor([[5 * math.log(3.0), 0.0]])
    teacher = torch.zeros(1, 2)
    assert kd_loss(student, teacher, temperature=5.0).item() == pytest.approx(25 * 0.5 * math.log(4 / 3), rel=1e-5)
    # NBA Eq. 7 has no T²
    assert kd_loss(student, teacher, 5.0, t_squared=False).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)


def test_frozen_bn_stats_normalises_with_the_batch_but_keeps_the_running_statistics():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn).train()
    x = torch.randn(8, 3, 4, 4) * 5 + 2
    before = (bn.running_mean.clone(), bn.running_var.clone())
    with frozen_bn_stats(model):
        out = model(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert bn.momentum == 0.1                                        # restored
    # the output is the train-mode one: normalised with the batch's own statistics
    assert out.mean().abs().item() < 1e-5 and out.std().item() == pytest.approx(1.0, abs=0.05)
    model(x)                                                         # outside: statistics move again
    assert not torch.equal(bn.running_mean, before[0])


# ----------------------------------------------------------------------------- ARGD edges

def test_argd_edge_term_on_a_hand_made_pair():
    # group 1: 2×2 maps, group 2: 1×1 maps (whose normalised attention is always 1)
    s1 = feat([[[[1, 1], [1, 1]]], [[[1, 0], [0, 0]]]])
    t1 = feat([[[[1, 1], [1, 1]]], [[[1, 1], [1, 1]]]])
    g2 = feat([[[[3.0]]], [[[0.5]]]])
    # student: A = (½,½,½,½) -> pooled ½ -> e = (½ − 1)² = ¼;  A = (1,0,0,0) -> ¼ -> e = (¾)² = 9/16
    # divided by the batch max: (4/9, 1); teacher: (¼, ¼) -> (1, 1); MSE = ((4/9 − 1)² + 0) / 2
    (e_s,) = edges([attention_map(s1).view(2, 1, 2, 2), attention_map(g2).view(2, 1, 1, 1)])
    assert torch.allclose(e_s, torch.tensor([4 / 9, 1.0]))
    assert edge_loss([s1, g2], [t1, g2]).item() == pytest.approx(25 / 162, rel=1e-5)
    assert edge_loss([t1, g2], [t1, g2]).item() == 0.0


def test_argd_edge_term_averages_over_every_pair_of_groups():
    torch.manual_seed(0)
    fs = [torch.rand(4, 3, 8, 8), torch.rand(4, 5, 4, 4), torch.rand(4, 2, 2, 2)]
    ft = [torch.rand_like(f) for f in fs]
    maps = lambda fl: [attention_map(f).view(f.shape[0], 1, *f.shape[-2:]) for f in fl]  # noqa: E731
    e_s, e_t = edges(maps(fs)), edges(maps(ft))
    assert len(e_s) == 3                                      # (1,2), (1,3), (2,3)
    expected = sum(F.mse_loss(a, b) for a, b in zip(e_s, e_t)) / 3
    assert edge_loss(fs, ft).item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(float(e.max()) == pytest.approx(1.0) for e in e_s)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", ["attention", "gram", "fsp", "kd", "edge"])
def test_gradients_reach_the_student_only(name):
    torch.manual_seed(1)
    s = [torch.rand(2, 3, 4, 4, requires_grad=True), torch.rand(2, 4, 2, 2, requires_grad=True)]
    t = [torch.rand(2, 3, 4, 4, requires_grad=True), torch.rand(2, 4, 2, 2, requires_grad=True)]
    zs, zt = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    loss = {"attention": lambda: attention_loss(s[0], t[0]) + attention_loss(s[1], t[1]),
            "gram": lambda: gram_style_loss(s[0], t[0]),
            "fsp": lambda: fsp_loss(s, t),
            "kd": lambda: kd_loss(zs, zt),
            "edge": lambda: edge_loss(s, t)}[name]()
    loss.backward()
    students, teachers = ([zs], [zt]) if name == "kd" else (s, t)
    assert all(x.grad is None for x in teachers), "a teacher tensor received a gradient"
    assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in students)


# ----------------------------------------------------------------------------- PGD

def test_pgd_untargeted_stays_in_the_ball_and_in_range_and_raises_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(16, 3, 8, 8)
    x[:, :, 0, 0] = 0.0                                       # pixels at the box edges
    x[:, :, 0, 1] = 1.0
    y = model(x).argmax(1)                                    # correctly classified to start with
    eps = 8 / 255
    adv = pgd_untargeted(model, x, y, eps=eps, step=2 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert not adv.requires_grad
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.05


# ----------------------------------------------------------------------------- BatchNorm

def test_recalibrate_bn_sets_running_stats_to_the_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    model[0].running_mean.fill_(5.0)
    model[0].running_var.fill_(9.0)
    x_u8 = torch.randint(0, 256, (32, 3, 4, 4), dtype=torch.uint8)
    x = x_u8.float() / 255
    recalibrate_bn(model, x_u8, batch_size=32)                # one batch: exactly the data's stats
    assert not model.training
    assert torch.allclose(model[0].running_mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(model[0].running_var, x.transpose(0, 1).flatten(1).var(dim=1), atol=1e-6)
    assert model[0].momentum == 0.1                           # restored
    recalibrate_bn(model, x_u8, batch_size=8)                 # equal batches: the mean is still exact
    assert torch.allclose(model[0].running_mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
