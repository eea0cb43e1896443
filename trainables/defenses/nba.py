"""NBA: defensive distillation for backdoor removal via neural behaviour alignment.

Paper: Zonghao Ying and Bin Wu, "NBA: defensive distillation for backdoor removal via neural
behavior alignment", Cybersecurity, 2023. No public code exists: this is the reference
implementation. Equation, figure and table numbers below are the paper's; its sections are not
numbered (the method is in Sec. "Methodology").

What it does
------------
Two steps (paper Fig. 2):

1. **Teacher**: the suspicious model fine-tuned with cross-entropy on the clean subset.
2. **Defensive distillation**: a student, initialised from the suspicious model, is trained on the
   clean subset with ``L = α·(L_LDL + β·L_UDL) + CE(S(x), y)`` (Eq. 12), where

   * ``L_LDL`` (learning distillation, Eq. 8) aligns three "neural behaviours" of the student on
     ``x`` with the teacher's on ``x``: λ1·RNB + λ2·LNB + λ3·PNB;
   * ``L_UDL`` (unlearning distillation, Eq. 11) is the same three terms between the teacher on
     ``x`` and the student on a pseudo sample ``x + δ``, δ an untargeted PGD perturbation of the
     student (Eq. 10), recomputed every batch;
   * response behaviour RNB (Eqs. 1–3): per layer group, the style loss of Gatys et al. between
     the teacher's and the student's Gram ("response") matrices, summed over the groups;
   * learning behaviour LNB (Eqs. 4–5): the relation between adjacent layer groups;
   * prediction behaviour PNB (Eqs. 6–7): Hinton's temperature KD, T = 5.

What the paper leaves open, and what this implementation chose
--------------------------------------------------------------
* **Eq. 3 index typo.** Eq. 3 sums over ``i, j ≤ H_l×W_l``, but the response matrix is
  ``C_l×C_l`` (Eq. 1; "G ∈ R^{c×c}"). The sum runs over the ``C_l×C_l`` entries, as in Gatys et
  al., whom the paper cites: ``Σ_ij (G^T_ij − G^S_ij)² / (4 C_l² (H_l W_l)²)`` with unnormalised
  Grams, averaged over the batch (``losses.gram_style_loss``). On a CIFAR-10 BadNets WRN-16-1
  this puts RNB at the scale of LNB and of λ3·PNB, which is what λ = (2, 2, 0.1) balances; a
  Gram difference normalised by C·H·W instead would make RNB vanish next to them.
* **Eq. 4 cannot be computed as printed**: ``M^l = ||G^l − G^{l+1}||²`` subtracts Gram matrices
  of different sizes (C_l vs C_{l+1}), and a squared norm is a scalar, not the "learning matrix"
  the text describes. We use the flow-of-solution-procedure form of Yim et al. 2017, which the
  paper cites for relation knowledge: ``F^l`` pooled to the size of ``F^{l+1}``,
  ``M^l = F^l (F^{l+1})ᵀ / (H W)`` (C_l × C_{l+1}) (``losses.fsp_loss``).
* **Eq. 5 reduction** (``lnb_reduction``). Eq. 5 is a squared norm, a sum over the C_l×C_{l+1}
  entries; we take their mean (Yim et al.'s form). The sum is 512× and 2,048× the mean on
  WRN-16-1's two pairs: measured on the CIFAR-10 BadNets model (below), L_LNB ≈ 0.026 (LDL) and
  0.08 (UDL) with the mean, next to L_RNB ≈ 0.018 and 0.045, while with the sum λ2·L_LNB is
  three orders above the other terms and the first epoch at lr 0.1 ends in NaN.
* **Eq. 7** (``pnb_t_squared``) prints PNB as the cross-entropy of the softened predictions, with
  no T², while the text says KL divergence and "we follow the procedure of Hinton et al. (2015)",
  whose procedure multiplies the soft term by T². We use ``KL(p(u,T) || p(z,T))`` (it differs
  from Eq. 7's cross-entropy by the teacher's entropy, a constant for the student) times T²
  (``losses.kd_loss``), the text's reading. Measured on CIFAR-10 BadNets: at lr 0.1 the two
  readings end alike (BA/ASR 74.02/2.41 with T², 74.23/3.97 without); at lower lrs the
  prediction term on the pseudo samples is what unlearns, and only with T² is it strong enough
  (lr 0.01, the same teacher: after 12 of 20 epochs the per-epoch ASR was 8% with T² and 45%
  without; the run with T² ended at 78.53/13.20).
* **Gradient clip** (``max_grad_norm`` 5, not in the paper). The Gram term is quartic and the FSP
  term quadratic in the feature scale. Models with larger activations than a CIFAR-10 WRN-16-1
  (e.g. the suite's synthetic-set WRN-16-1s, or an 8-epoch model of 5,000 CIFAR-10 images) start
  with RNB and LNB terms orders of magnitude larger, and at the paper's λ the first epoch ends
  in NaN, at lr 0.01 too. The global gradient-norm clip bounds every step; on the CIFAR-10
  BadNets model the epoch-mean gradient norm is 1.4-2.8, so the clip rarely acts there.
* **Student's pass on x + δ** (``pseudo_bn``): the paper does not say. ``frozen`` (default)
  normalises with the batch's statistics but leaves the running statistics to the clean
  batches; ``train`` lets the adversarial batches move them too. Measured at lr 0.1: 74.80/2.70
  frozen against 74.23/3.97 train (a small difference).
* **Pseudo-poisoned vs pseudo-clean.** The paper splits the pseudo samples by their prediction:
  those predicted as the target label are "pseudo-poisoned" (they fall into the backdoor's
  shortcut and expose backdoor behaviour), the others "pseudo-clean" (a regulariser). Eq. 11 has
  no split and the text says "both can contribute": EVERY pseudo sample enters ``L_UDL`` with
  the same weight, and the split is only measured. The defender does not know the target, so
  it is inferred from the clean subset alone: the class that the epoch's successful adversarial
  flips go to most often (the shortcut attracts untargeted PGD, the paper's argument around
  Eq. 9). Logged per epoch: ``pseudo_target`` (the inferred class) and
  ``pseudo_poisoned_fraction`` (the fraction of pseudo samples whose true label is not that
  class that are predicted as it, the ASR convention). The split changes nothing in the loss.
* **PGD** (Madry et al., as the paper says; Eq. 10 writes ``||δ||_p < ε`` and gives no p, ε or
  step count, so these defaults are this implementation's): L∞, ε = 8/255, step 2/255, 10 steps,
  random start, on the student in eval mode, so that the ten attack passes do not move its
  BatchNorm running statistics; the pseudo-poisoned split is read from the eval-mode prediction
  on ``x + δ``. The student's loss terms on ``x + δ`` come from a train-mode pass, like those on
  ``x``.
* **Schedule** (the paper, Sec. "Defense setups": SGD, "initial learning rate 0.1", momentum
  0.9, batch 64, 5% clean data; no decay named): NAD's schedule, the setting NBA compares under:
  the initial lr for 2 epochs, then ×0.1; weight decay 1e-4 and crop + flip augmentation of the
  clean subset as in NAD; 20 epochs. The initial lr is 0.03, not 0.1: on the CIFAR-10 BadNets
  model the first epoch at 0.1 takes BA from 80.8 to 36-40%, and 2,500 images bring it back only
  to 74 (the lr-0.1 epoch removes the backdoor and the features with it; a 1-epoch warm-up ends
  at 72.15, a drop after one epoch at 75.08 with ASR 11.50; docs/measurements.md). With T² and
  the teacher at 0.001, lr 0.01 / 0.02 / 0.03 end at 78.53/13.20, 77.97/5.29 and 77.43/5.01 (seed
  0); over defense seeds 0, 1, 2 on a retrained 12-epoch BadNets model (BA 81.58), lr 0.02 ends
  at 78.58/13.31, 79.66/9.36, 78.94/15.04 (the backdoor stays above 10% on two seeds) and lr 0.03
  at 77.70/6.98, 79.23/6.57, 78.47/7.82; lr 0.05 at 77.09/2.77 (seed 0); with the 0.01 teacher
  (the default, below) lr 0.03 ends at 77.28/4.87, 78.09/3.86, 77.18/5.72. On the 4-epoch Blend
  stage (71.57 / 99.98) the paper's schedule ends at 68.64 / 1.74 and lr 0.03 at 70.01 / 1.58; on
  SIG (70.49 / 88.98) at 69.25 / 1.23 and 71.53 / 7.32. Plain fine-tuning at lr 0.02 ends at
  77.49/6.38 on BadNets seed 0, so at this scale NBA's terms add little over the lr itself
  (docs/measurements.md). ``warmup_epochs`` (linear, default 0) is there to measure.
* **Teacher** (the paper, Sec. "Overview": "fine-tunes the given network using a local clean
  dataset"): 10 epochs at a constant lr 0.01 (NAD's teacher), batch 64, momentum 0.9 (nesterov, as
  NAD), weight decay 1e-4, crop + flip (``_common.make_teacher``, the fine-tune shared with FT /
  NAD). At 0.001 the teacher of the CIFAR-10 BadNets model keeps its BA (82.3 against 76.2 on the
  per-epoch subset) but also the whole backdoor, and a student aligned to it keeps what the
  teacher keeps: on SIG, whose sinusoid the 0.01 teacher halves (teacher ASR 47% against 92%), NBA
  at lr 0.03 ends at 72.73 / 24.37 with the 0.001 teacher and at 71.56 / 7.64 with the 0.01 one;
  on BadNets at 77.70 / 6.98 and 77.28 / 4.87 (seed 0), on Blend at 71.00 / 1.57 and 69.88 /
  1.87: the 0.01 teacher costs about a BA point where the 0.001 one already removes the backdoor,
  and removes SIG, where it does not. At lr 0.05 the 0.001 teacher still
  leaves SIG at 15.64; only the lr-0.1 epoch removes it with that teacher (69.84 / 2.04).

Ablations (all Params fields)
-----------------------------
* ``behaviours``: any non-empty subset of ``rnb``, ``lnb``, ``pnb`` (Table 3); the other terms
  are neither computed nor logged.
* ``losses``: ``ldl`` | ``udl`` | ``both`` (Table 4). Eq. 12 with the missing term dropped and the
  weights left as they are: ``ldl`` → ``α·L_LDL + CE`` (no PGD at all), ``udl`` →
  ``α·β·L_UDL + CE``.
* ``udl_samples``: ``pseudo`` (PGD) | ``oracle`` (Table 5): the student sees the attack's TRUE
  trigger on ``x`` (``ctx.oracle_trigger``, which only the ablation stage provides) instead of
  ``x + δ``. This uses knowledge no defender has; it exists to reproduce Table 5.
* ``representation``: ``gram`` | ``raw`` (Figs. 8–9): ``raw`` replaces each layer group's RNB
  term by the mean squared error between the raw feature maps, ``mean((F^T − F^S)²)`` over all
  B·C·H·W elements, summed over the groups. LNB and PNB are unchanged (their forms do not use
  Gram matrices in this implementation).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainables.defenses._common import distillation_cost, epoch_logger, make_teacher, teacher_sgd
from trainables.defenses.base import Cost, Defense, DefenseContext
from trainables.engine import SGDConfig, generator, prepare, train
from trainables.losses import fsp_loss, frozen_bn_stats, gram_style_loss, kd_loss, pgd_untargeted
from trainables.params import param
from trainables.registry import register_defense

BEHAVIOURS = ("rnb", "lnb", "pnb")


@dataclass(frozen=True)
class Params:
    # -- step 1: the teacher ----------------------------------------------------------------
    teacher_epochs: int = param(10, "teacher fine-tuning epochs on the clean subset (NAD's teacher: 10)", low=0)
    teacher_lr: float = param(0.01, "teacher fine-tuning lr (paper: not given; NAD's teacher: 0.01; "
                              "see the module docstring)", low=0.0)
    teacher_lr_drop: int = param(0, "epoch from which the teacher's lr is a tenth of teacher_lr (0: constant; "
                                    "NAD's README teacher: teacher_lr 0.1, drop at 2)", low=0)
    # -- step 2: the loss (Eqs. 8, 11, 12) ---------------------------------------------------
    lambda1: float = param(2.0, "λ1, weight of the response behaviour L_RNB (paper: 2.0)", low=0.0)
    lambda2: float = param(2.0, "λ2, weight of the learning behaviour L_LNB (paper: 2.0)", low=0.0)
    lambda3: float = param(0.1, "λ3, weight of the prediction behaviour L_PNB (paper: 0.1)", low=0.0)
    alpha: float = param(1.0, "α, weight of the distillation loss in Eq. 12 (paper: 1.0)", low=0.0)
    beta: float = param(0.5, "β, weight of L_UDL inside the distillation loss (paper: 0.5)", low=0.0)
    temperature: float = param(5.0, "T, softmax temperature of the prediction behaviour (paper: 5)", low=1e-3)
    pnb_t_squared: bool = param(True, "multiply L_PNB by T² (Hinton's procedure, which the text follows; "
                                "Eq. 7 as printed has none); see the module docstring")
    lnb_reduction: str = param("mean", "L_LNB over the learning matrix's entries: mean (Yim et al.) or sum "
                               "(Eq. 5's squared norm); see the module docstring", choices=("mean", "sum"))
    # -- pseudo samples (Eq. 10) ------------------------------------------------------------
    eps: float = param(8 / 255, "L∞ radius of the PGD pseudo samples, pixel scale (paper: not given; 8/255)",
                       low=0.0, high=1.0)
    pgd_step: float = param(2 / 255, "PGD step size (paper: not given; 2/255)", low=0.0, high=1.0)
    pgd_steps: int = param(10, "PGD steps, recomputed every batch (paper: not given; 10)", low=0)
    pgd_random_start: bool = param(True, "PGD starts from a uniform point of the ε-ball (Madry et al.: yes)")
    pseudo_bn: str = param("frozen", "BatchNorm in the student's train-mode pass on x + δ: update the running "
                           "statistics (train) or leave them alone (frozen); paper: not given",
                           choices=("train", "frozen"))
    # -- optimisation -----------------------------------------------------------------------
    epochs: int = param(20, "distillation epochs (paper: not given; 20, like NAD)", low=0)
    lr: float = param(0.03, "initial SGD lr of the student (paper: 0.1, which costs 7 BA points at 5% "
                      "CIFAR-10 data; see the module docstring)", low=0.0)
    lr_drop_epoch: int = param(2, "epochs at the initial lr before it is multiplied by lr_gamma (NAD's schedule: 2)",
                               low=0)
    lr_gamma: float = param(0.1, "lr factor at lr_drop_epoch (NAD: 0.1 -> 0.01)", low=0.0, high=1.0)
    warmup_epochs: int = param(0, "linear lr warm-up epochs before the initial lr (paper: none)", low=0)
    batch_size: int = param(64, "batch size of teacher and student (paper: 64)", low=1)
    max_grad_norm: float | None = param(5.0, "clip the student's global gradient norm at this value (not in "
                                             "the paper, which has no clip: None = off); see the module docstring",
                                        low=1e-6)
    momentum: float = param(0.9, "SGD momentum (paper: 0.9)", low=0.0, high=1.0)
    weight_decay: float = param(1e-4, "SGD weight decay (NAD's setting: 1e-4)", low=0.0)
    # -- ablations (Tables 3-5, Figs. 8-9) --------------------------------------------------
    behaviours: tuple[str, ...] = param(BEHAVIOURS, "neural behaviours in L_LDL and L_UDL, any non-empty "
                                        "subset of rnb, lnb, pnb (Table 3; paper: all three)")
    losses: str = param("both", "distillation losses: ldl, udl or both (Table 4; paper: both)",
                        choices=("ldl", "udl", "both"))
    udl_samples: str = param("pseudo", "student input of L_UDL: PGD pseudo samples, or the attack's true "
                             "trigger (oracle, Table 5 ablation only; paper: pseudo)", choices=("pseudo", "oracle"))
    representation: str = param("gram", "RNB on Gram matrices, or MSE of the raw feature maps "
                                "(Figs. 8-9; paper: gram)", choices=("gram", "raw"))

    def __post_init__(self):
        unknown = [b for b in self.behaviours if b not in BEHAVIOURS]
        if unknown or not self.behaviours or len(set(self.behaviours)) != len(self.behaviours):
            raise ValueError(f"behaviours={list(self.behaviours)}: give a non-empty subset of "
                             f"{list(BEHAVIOURS)} without repeats (with none, NBA is plain fine-tuning: use ft)")

    @property
    def uses_ldl(self) -> bool:
        return self.losses in ("ldl", "both")

    @property
    def uses_udl(self) -> bool:
        return self.losses in ("udl", "both")


# ----------------------------------------------------------------------------- neural behaviours

def rnb_loss(feats_s: list[torch.Tensor], feats_t: list[torch.Tensor], representation: str) -> torch.Tensor:
    """L_RNB = Σ_l L^l_RNB (Eq. 2); L^l_RNB is Gatys' style loss on the response matrices
    (Eqs. 1, 3), or with ``raw`` the MSE of the feature maps themselves (Figs. 8-9)."""
    if representation == "gram":
        terms = [gram_style_loss(s, t) for s, t in zip(feats_s, feats_t)]
    else:
        terms = [F.mse_loss(s.float(), t.detach().float()) for s, t in zip(feats_s, feats_t)]
    return torch.stack(terms).sum()


def behaviour_losses(feats_s, logits_s, feats_t, logits_t, p: Params) -> dict[str, torch.Tensor]:
    """The selected neural-behaviour losses between student and (detached) teacher outputs."""
    terms = {}
    if "rnb" in p.behaviours:
        terms["rnb"] = rnb_loss(feats_s, feats_t, p.representation)      # Eqs. 1-3
    if "lnb" in p.behaviours:
        terms["lnb"] = fsp_loss(feats_s, feats_t, p.lnb_reduction)      # Eqs. 4-5, FSP form
    if "pnb" in p.behaviours:
        terms["pnb"] = kd_loss(logits_s, logits_t, p.temperature, p.pnb_t_squared)  # Eqs. 6-7
    return terms


def distillation_loss(terms: dict[str, torch.Tensor], p: Params) -> torch.Tensor:
    """λ1·L_RNB + λ2·L_LNB + λ3·L_PNB over the selected behaviours (Eqs. 8 and 11)."""
    weights = {"rnb": p.lambda1, "lnb": p.lambda2, "pnb": p.lambda3}
    return sum(weights[k] * v for k, v in terms.items())


# ----------------------------------------------------------------------------- step 2: distillation

class Distillation:
    """The student's per-batch loss (Eq. 12) for the engine's loop, plus the per-epoch count of
    pseudo-poisoned samples."""

    def __init__(self, teacher: nn.Module, p: Params, ctx: DefenseContext):
        self.teacher, self.p, self.ctx = teacher, p, ctx
        self.gen = generator(ctx.rt, ctx.seed + 2)    # PGD random starts
        self.confusion = None                          # true label × prediction on x + δ, this epoch

    def udl_input(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x + δ`` (Eq. 10), or the truly poisoned ``x`` in the oracle ablation (Table 5)."""
        p = self.p
        if p.udl_samples == "oracle":
            return self.ctx.oracle_trigger(x).detach()
        student.eval()                                 # attack passes leave BN statistics alone
        x_adv = pgd_untargeted(student, x, y, eps=p.eps, step=p.pgd_step, steps=p.pgd_steps,
                               random_start=p.pgd_random_start, generator=self.gen)
        with torch.no_grad():
            self.count_predictions(y, student(x_adv).argmax(1))
        student.train()
        return x_adv

    def count_predictions(self, y: torch.Tensor, pred: torch.Tensor) -> None:
        c = self.ctx.num_classes
        counts = torch.bincount(y * c + pred, minlength=c * c).view(c, c)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def __call__(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        p = self.p
        with torch.no_grad():
            feats_t, logits_t = self.teacher.features(x)
        feats_s, logits_s = student.features(x)
        ce = F.cross_entropy(logits_s.float(), y)
        logs = {"ce": ce}
        distil = ce.new_zeros(())
        if p.uses_ldl:
            terms = behaviour_losses(feats_s, logits_s, feats_t, logits_t, p)
            ldl = distillation_loss(terms, p)                                # Eq. 8
            distil = distil + ldl
            logs.update({f"ldl_{k}": v for k, v in terms.items()}, ldl=ldl)
        if p.uses_udl:
            x_adv = self.udl_input(student, x, y)
            with frozen_bn_stats(student) if p.pseudo_bn == "frozen" else contextlib.nullcontext():
                feats_a, logits_a = student.features(x_adv)
            terms = behaviour_losses(feats_a, logits_a, feats_t, logits_t, p)
            udl = distillation_loss(terms, p)                                # Eq. 11
            distil = distil + p.beta * udl
            logs.update({f"udl_{k}": v for k, v in terms.items()}, udl=udl)
        total = p.alpha * distil + ce                                        # Eq. 12
        logs["total"] = total
        return total, logs

    def pseudo_split(self) -> dict[str, float]:
        """The epoch's inferred target and pseudo-poisoned fraction (module docstring); resets."""
        if self.confusion is None:
            return {}
        conf, self.confusion = self.confusion.float(), None
        flips = conf - torch.diag(torch.diag(conf))        # only predictions PGD changed
        target = int(flips.sum(0).argmax())
        others = torch.arange(len(conf), device=conf.device) != target
        fraction = conf[others, target].sum() / conf[others].sum().clamp_min(1)
        return {"pseudo_target": float(target), "pseudo_poisoned_fraction": float(fraction)}


def distil(student: nn.Module, teacher: nn.Module, ctx: DefenseContext, p: Params) -> list[dict]:
    """Train ``student`` in place on the clean subset with Eq. 12; log every epoch as "nba"."""
    loss = Distillation(teacher, p, ctx)
    log = epoch_logger(ctx, "nba", student)

    def on_epoch(epoch: int, logs: dict) -> dict:
        split = loss.pseudo_split()
        return {**split, **log(epoch, {**logs, **split})}

    cfg = SGDConfig(epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, momentum=p.momentum,
                    weight_decay=p.weight_decay, schedule="multistep", milestones=(p.lr_drop_epoch,),
                    gamma=p.lr_gamma, max_grad_norm=p.max_grad_norm, warmup_epochs=p.warmup_epochs or None)
    return train(student, ctx.clean, cfg, ctx.rt, seed=ctx.seed + 1, loss_fn=loss, augment=True,
                 params=student.parameters(), on_epoch=on_epoch, generators=(loss.gen,))


@register_defense
class NBA(Defense):
    name = "nba"
    kind = "post-training"
    Params = Params
    summary = ("defensive distillation aligning response, learning and prediction behaviours of a student "
               "with a fine-tuned teacher, on clean and PGD pseudo samples")
    paper = "Ying & Wu, NBA: defensive distillation for backdoor removal via neural behavior alignment, Cybersecurity 2023"

    @classmethod
    def cost(cls, p, n_images: int) -> Cost:
        # the teacher; then per student step: the clean pass, each PGD step (a forward and a
        # backward through the student) and the pass on x + delta; the teacher's forwards at 1/3
        return distillation_cost(p, n_images, student_passes=2 + p.pgd_steps + 2 / 3)

    def run(self, ctx: DefenseContext) -> nn.Module:
        p = self.params
        if ctx.model is None or ctx.clean is None:
            raise ValueError("nba is a post-training defense: it needs ctx.model and ctx.clean")
        if p.uses_udl and p.udl_samples == "oracle" and ctx.oracle_trigger is None:
            raise ValueError("nba: udl_samples='oracle' needs the attack's trigger (ctx.oracle_trigger), "
                             "which this stage did not provide; use udl_samples='pseudo'")
        student = prepare(ctx.model, ctx.rt)
        # step 1: NAD's teacher fine-tuning (module docstring), with this defense's momentum
        teacher = make_teacher(student, ctx.clean, teacher_sgd(p, momentum=p.momentum), ctx, stage="teacher")
        teacher.zero_grad(set_to_none=True)          # its fine-tuning's; none reach it from here on
        distil(student, teacher, ctx, p)                                                    # step 2
        student.eval()
        return student
