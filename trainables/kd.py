"""Knowledge distillation of a student from a frozen teacher, on clean data only.

This is what CheatKD's victim does with the teacher it downloaded (the CheatKD paper, Chen et
al., Computer Science 2024, Sec. 4.1.5, uses Heo et al.'s feature distillation, its ref. [33];
its Table 4 also AT, FSP and AB), and what any other method may call. Three methods, each the
student's cross-entropy plus a distillation term, trained with the engine's loop
(``engine.train`` with a ``loss_fn``):

* ``overhaul`` — Heo, Kim, Yun, Park, Kwak & Choi, "A comprehensive overhaul of feature
  distillation" (ICCV 2019), at the end of every layer group l = 1..G::

      L = CE(S(x), y) + w · (1/B) Σ_l 2^-(G-l) · d_p(σ_m(F^T_l), r_l(F^S_l))

  - F^T_l, F^S_l: the PRE-ReLU features at the end of layer group l (below);
  - σ_m(F) = max(F, m): the teacher transform, with the per-channel margin
    m = E[F | F < 0] of F ~ N(β, γ²) read from the BN statistics (γ, β) of the BN that produces
    the teacher's pre-ReLU feature: m = β − γ·φ(β/γ)/Φ(−β/γ), or −3γ where Φ(−β/γ) ≤ 0.001;
  - r_l: the student transform, a 1x1 conv + BN connector (student width -> teacher width),
    trained with the student;
  - d_p: the partial L2 distance, Σ_i (T_i − S_i)² except where S_i ≤ T_i ≤ 0 (a value the
    teacher's ReLU would zero anyway, and the student is already below it);
  - 2^-(G-l) halves the weight of each earlier group, w = 1/1000 (the official CIFAR code:
    ``loss_distill.sum() / batch_size / 1000``).
* ``at`` — attention transfer (Zagoruyko & Komodakis, ICLR 2017) at every layer group::

      L = CE(S(x), y) + (β/2) Σ_l mean_{b,j} (A(F^S_l) − A(F^T_l))²_{b,j},   β = 1000

  with ``losses.attention_map`` (channel-wise Σ|F_c|², flattened, L2-normalised) through
  ``losses.attention_loss`` — exactly the official code's ``at_loss`` (mean over batch and
  positions), whose β = 1e3 "divided by the number of elements" is this mean.
* ``logit`` — Hinton, Vinyals & Dean 2015::

      L = (1 − α)·CE(S(x), y) + α·T²·KL(softmax(u/T) || softmax(z/T)),   α = 0.9, T = 4

  (``losses.kd_loss``; α and T are the common CIFAR benchmark setting of Tian et al.'s CRD code).

Where our models differ from Heo's code, and what this implementation chose:

* **Pre-ReLU position.** ``TapModel.features`` returns the RAW output of each layer group. For
  the pre-activation nets (WRN, PreAct-ResNet) that raw output is a residual sum that the next
  block's ``bn1`` (or ``final``'s BN after the last group) normalises before its ReLU; Heo's WRN
  code distils exactly ``block{l+1}.layer[0].bn1(feat_l)`` and ``bn1(feat_3)``, i.e. that BN's
  output. Without naming any architecture, we find that BN by probing one forward pass: the
  ``BatchNorm2d`` whose input IS the group's output tensor (``tap_bn``). Its output is the
  pre-ReLU feature, and its (γ, β) give the teacher margin, as in Heo's code. Where no BN reads
  the group output (post-activation ResNets, VGG, MobileNetV2: their groups already end in a
  nonlinearity), the raw group output is used, with the margin computed by the same formula from
  the teacher's per-channel mean and std of that output on the clean data.
  The BN is re-applied functionally (``F.batch_norm``) to the tap: the teacher's with its running
  statistics (eval mode), the student's with the batch statistics and WITHOUT updating its
  running statistics a second time (Heo's code calls the module again, counting each batch twice).
* The teacher is frozen and runs in eval mode (Heo's script leaves it in train mode, so its BNs
  use batch statistics; a downloaded teacher used as a fixed function is the threat model here).
* Teacher and student with a different number of layer groups are paired from the LAST group
  backwards (the deepest features are the ones every method distils); if a pair differs in
  spatial size, both maps are average-pooled to the smaller one.
* AT and logit KD need no extra modules; the overhaul connectors are created here and trained
  with the student (same optimiser, lr and weight decay, as in Heo's code).

Distillation recipe of the papers (``SGDConfig`` is the caller's): Heo (CIFAR-100) SGD lr 0.1,
momentum 0.9, nesterov, wd 5e-4, batch 128, 200 epochs, lr ÷10 at 50% and 75% of the epochs;
``heo_sgd(epochs, lr, batch_size)`` builds it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainables.data.base import ImageSet
from trainables.data.loader import to_float
from trainables.engine import EpochHook, Runtime, SGDConfig, prepare, train
from trainables.losses import attention_loss, kd_loss

METHODS = ("overhaul", "at", "logit")

# weight of the distillation term per method (see the module docstring)
DEFAULT_WEIGHT = {
    "overhaul": 1e-3,   # Heo's CIFAR code: loss_distill.sum() / batch_size / 1000
    "at": 500.0,        # β/2 with β = 1000 (Zagoruyko & Komodakis)
    "logit": 0.9,       # α of Hinton's (1 − α)·CE + α·KD
}
DEFAULT_TEMPERATURE = 4.0


def heo_sgd(epochs: int = 200, lr: float = 0.1, batch_size: int = 128) -> SGDConfig:
    """Heo et al.'s CIFAR-100 distillation schedule: nesterov SGD, wd 5e-4, lr ÷10 at 1/2 and 3/4."""
    milestones = tuple(sorted({m for m in (epochs // 2, epochs * 3 // 4) if m > 0}))
    return SGDConfig(epochs=epochs, lr=lr, batch_size=batch_size, momentum=0.9, weight_decay=5e-4,
                     nesterov=True, schedule="multistep", milestones=milestones, gamma=0.1)


# ============================================================================ pairing

def paired(feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(student group, teacher group) pairs, aligned from the last group backwards."""
    n = min(len(feats_s), len(feats_t))
    return [(len(feats_s) - n + k, len(feats_t) - n + k) for k in range(n)]


def same_size(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two maps to the other's spatial size (a no-op when equal)."""
    if s.shape[-2:] == t.shape[-2:]:
        return s, t
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    return F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)


# ============================================================================ overhaul (Heo et al.)

@torch.no_grad()
def tap_bn(model: nn.Module, x: torch.Tensor) -> list[nn.BatchNorm2d | None]:
    """For every layer group, the BatchNorm2d that reads the group's output tensor directly
    (the next pre-activation block's BN, or ``final``'s BN), else None. One probe forward pass
    in eval mode; the model's mode is restored."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append((mod, inp[0])))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    was_training = model.training
    model.eval()
    try:
        taps, _ = model.features(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [next((mod for mod, inp in seen if inp is tap), None) for tap in taps]


def prerelu(feat: torch.Tensor, bn: nn.BatchNorm2d | None, training: bool) -> torch.Tensor:
    """The pre-ReLU feature: ``bn`` re-applied to the raw group output (batch statistics and no
    running-statistics update when ``training``, running statistics otherwise); raw if no BN."""
    if bn is None:
        return feat
    if training:
        return F.batch_norm(feat, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return F.batch_norm(feat, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def gaussian_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Heo's margin per channel: ``E[F | F < 0]`` for ``F ~ N(mean, std²)``, i.e.
    ``mean − std·φ(mean/std)/Φ(−mean/std)``, or ``−3·std`` where ``Φ(−mean/std) ≤ 0.001``."""
    s = std.detach().float().abs().clamp_min(1e-8)
    m = mean.detach().float()
    cdf = torch.special.ndtr(-m / s)
    pdf = torch.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi)
    return torch.where(cdf > 1e-3, m - s * pdf / cdf.clamp_min(1e-3), -3 * s)


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """``d_p(σ_m(T), S)``: squared distance to ``max(T, m)`` except where ``S ≤ max(T, m) ≤ 0``;
    summed over every element (batch included). ``margin`` is per channel (C,)."""
    target = torch.max(target.detach().float(), margin.view(1, -1, 1, 1))
    source = source.float()
    keep = (source > target) | (target > 0)
    return ((source - target).pow(2) * keep).sum()


def connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """Heo's student transform r: 1x1 conv (no bias) + BN, He-normal init, BN identity."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
    bn = nn.BatchNorm2d(t_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


@torch.no_grad()
def teacher_margins(teacher: nn.Module, bns: list[nn.BatchNorm2d | None], clean_x: torch.Tensor,
                    rt: Runtime, samples: int = 1024, batch_size: int = 256) -> list[torch.Tensor]:
    """Per group: the margin from the pre-ReLU BN's (γ, β), or, for a group without one, from the
    teacher's per-channel mean/std of its raw output on (up to ``samples``) clean images."""
    out: list[torch.Tensor | None] = [gaussian_margin(bn.bias, bn.weight) if bn is not None else None for bn in bns]
    missing = [i for i, m in enumerate(out) if m is None]
    if missing:
        sums: dict[int, list[torch.Tensor]] = {i: [] for i in missing}
        x_all = clean_x[:samples]
        for s in range(0, len(x_all), batch_size):
            taps, _ = teacher.features(to_float(x_all[s:s + batch_size].to(rt.device)))
            for i in missing:
                sums[i].append(taps[i].float().transpose(0, 1).flatten(1))     # C × (B·H·W)
        for i in missing:
            values = torch.cat(sums[i], dim=1)
            out[i] = gaussian_margin(values.mean(1), values.std(1))
    return out


def overhaul_term(distiller: "Distiller", feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]) -> torch.Tensor:
    """``(1/B) Σ_l 2^-(G-l) d_p(σ_m(F^T_l), r_l(F^S_l))`` over the paired groups."""
    pairs = paired(feats_s, feats_t)
    total = feats_s[0].new_zeros((), dtype=torch.float32)
    for k, (i, j) in enumerate(pairs):
        s = distiller.connectors[k](prerelu(feats_s[i], distiller.student_bns[i], distiller.training))
        t = prerelu(feats_t[j], distiller.teacher_bns[j], False)
        s, t = same_size(s, t)
        total = total + partial_l2(s, t, distiller.margin(k)) / 2 ** (len(pairs) - 1 - k)
    return total / feats_s[0].shape[0]


# ============================================================================ AT and logit KD

def at_term(feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_l mean (A(F^S_l) − A(F^T_l))²`` over the paired groups (teacher detached)."""
    total = feats_s[0].new_zeros((), dtype=torch.float32)
    for i, j in paired(feats_s, feats_t):
        s, t = same_size(feats_s[i], feats_t[j])
        total = total + attention_loss(s, t)
    return total


# ============================================================================ the distiller

class Distiller(nn.Module):
    """The trainable side of distillation: the student plus, for ``overhaul``, its connectors and
    the teacher margins. The teacher is deliberately NOT a submodule: it stays frozen, in eval
    mode, out of the optimiser and out of ``train()``/``eval()`` calls."""

    def __init__(self, student: nn.Module, teacher: nn.Module, method: str, probe: torch.Tensor,
                 clean_x: torch.Tensor, rt: Runtime):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown KD method {method!r}; known: {', '.join(METHODS)}")
        self.method = method
        self.student = student
        self.connectors = nn.ModuleList()
        self.student_bns: list[nn.BatchNorm2d | None] = []
        self.teacher_bns: list[nn.BatchNorm2d | None] = []
        if method == "overhaul":
            self.student_bns = tap_bn(student, probe)
            self.teacher_bns = tap_bn(teacher, probe)
            feats_s, _ = _eval_features(student, probe)
            feats_t, _ = _eval_features(teacher, probe)
            margins = teacher_margins(teacher, self.teacher_bns, clean_x, rt)
            for k, (i, j) in enumerate(paired(feats_s, feats_t)):
                self.connectors.append(connector(feats_s[i].shape[1], feats_t[j].shape[1]))
                self.register_buffer(f"margin{k}", margins[j])

    def margin(self, k: int) -> torch.Tensor:
        """The teacher margin (per channel) of the k-th distilled pair."""
        return getattr(self, f"margin{k}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


@torch.no_grad()
def _eval_features(model: nn.Module, x: torch.Tensor):
    was_training = model.training
    model.eval()
    try:
        return model.features(x)
    finally:
        model.train(was_training)


def kd_loss_fn(teacher: nn.Module, method: str, weight: float, temperature: float):
    """The engine ``loss_fn`` of one KD method (equations in the module docstring)."""
    def loss_fn(model: Distiller, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        with torch.no_grad():
            feats_t, logits_t = teacher.features(x)
        feats_s, logits_s = model.student.features(x)
        ce = F.cross_entropy(logits_s.float(), y)
        if method == "overhaul":
            term = overhaul_term(model, feats_s, feats_t)
            return ce + weight * term, {"ce": ce, "overhaul": term}
        if method == "at":
            term = at_term(feats_s, feats_t)
            return ce + weight * term, {"ce": ce, "at": term}
        term = kd_loss(logits_s, logits_t, temperature)
        return (1 - weight) * ce + weight * term, {"ce": ce, "kd": term}
    return loss_fn


def make_distiller(student: nn.Module, teacher: nn.Module, clean: ImageSet, method: str,
                   rt: Runtime) -> Distiller:
    """The ``Distiller`` for ``method`` (connectors and margins built from the clean data)."""
    probe = to_float(clean.x[:2].to(rt.device))
    distiller = Distiller(student, teacher, method, probe, clean.x, rt)
    return prepare(distiller, rt)


def distill(student: nn.Module, teacher: nn.Module, clean: ImageSet, method: str, cfg: SGDConfig,
            rt: Runtime, *, seed: int, weight: float | None = None,
            temperature: float = DEFAULT_TEMPERATURE, on_epoch: EpochHook | None = None,
            progress: Callable[[str], None] | None = None) -> list[dict]:
    """Train ``student`` IN PLACE from the frozen ``teacher`` on ``clean`` (crop + flip) with
    ``method`` (``overhaul`` | ``at`` | ``logit``); returns the engine's per-epoch history.

    ``weight`` is the distillation term's coefficient (``DEFAULT_WEIGHT[method]`` if None; for
    ``logit`` it is α and CE gets 1 − α). The teacher is put in eval mode and never updated.
    """
    if method not in METHODS:
        raise ValueError(f"unknown KD method {method!r}; known: {', '.join(METHODS)}")
    if len(clean) == 0:
        raise ValueError("distillation needs clean data")
    teacher = prepare(teacher, rt).eval()
    student = prepare(student, rt)
    distiller = make_distiller(student, teacher, clean, method, rt)
    w = DEFAULT_WEIGHT[method] if weight is None else float(weight)
    history = train(distiller, clean, cfg, rt, seed=seed, loss_fn=kd_loss_fn(teacher, method, w, temperature),
                    on_epoch=on_epoch, progress=progress)
    student.eval()
    return history
