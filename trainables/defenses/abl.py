"""ABL: anti-backdoor learning — training-time.

Paper: Yige Li, Xixiang Lyu, Nodens Koren, Lingjuan Lyu, Bo Li and Xingjun Ma, "Anti-Backdoor
Learning: Training Clean Models on Poisoned Data", NeurIPS 2021. Official code: bboylyg/ABL.

What it does
------------
Backdoor examples are learnt faster than clean ones, so their training loss falls first.

1. **Isolation**: train a fresh model on the whole poisoned training set for ``isolation_epochs``
   with local gradient ascent (LGA), ``L = sign(CE − γ)·CE`` on the batch-mean CE (γ = 0.5): once
   the loss of a batch falls below γ the gradient pushes it back up, so clean examples are held
   near γ while the quickly learnt backdoor examples fall far below it. ``isolation_loss:
   flooding`` uses the flooding loss ``|CE − b| + b`` instead (same threshold role, b = 0.5).
2. **Isolate** the ``isolation_ratio`` (1%) training examples with the lowest per-sample CE under
   that model (eval mode, no augmentation). How well they match the true poison is logged with
   ``ctx.score_filter`` (the defense never sees the truth).
3. **Fine-tune** the same model on the remaining 99% with plain cross-entropy
   (``finetune_epochs``, paper 60), then **unlearn**: gradient ascent, i.e. minimise ``−CE``, on the
   isolated examples (lr 5e-4, ``unlearn_epochs``).

Settings, and what the paper leaves open
----------------------------------------
* Budget: T_te = 20 isolation epochs (the paper; the official code bboylyg/ABL uses 10), 60
  fine-tuning epochs and 5 unlearning epochs at lr 5e-4 (the official code; 5–20 are in use).
  Unlearning is gradient ascent, which has no minimum: past the point where the isolated
  examples are unlearnt it goes on raising their loss by damaging the model, so the short budget
  is kept as default.
* Optimiser: the official code's SGD, momentum 0.9 (Nesterov), weight decay 1e-4, batch 64, lr
  0.1 for isolation and fine-tuning, 5e-4 for unlearning. Its step decay of the fine-tuning lr
  (0.1 → 0.01 at epoch 40) is replaced by a cosine decay (the project's default schedule,
  independent of ``finetune_epochs``); isolation and unlearning keep a constant lr, as there.
* Augmentation, as in the official code: random crop (pad 4) + horizontal flip while isolating
  and fine-tuning (it adds a 3-pixel Cutout when fine-tuning; not used here), none while
  unlearning (the isolated images as they are).
* Isolation keeps the LOWEST-loss examples, as the paper says (the official code's
  ``argsort(-loss)`` takes the highest).
* The isolation model is the one fine-tuned and unlearnt (the official ``finetuning_ascent_model``
  option, on by default there); BatchNorm stays in training mode while unlearning, as there
  (``unlearn_bn``: ``train``; ``eval`` and ``recalibrate`` as DLP's ``au_bn``). Measured on
  CIFAR-10 SIG (docs/measurements.md; 5 isolation, 5 fine-tuning, 5 unlearning epochs): train
  ends at BA 36.06 / ASR 0.06, eval at 79.87 / 91.58, recalibrate at 73.49 / 92.67.
  Recomputing the statistics after train-mode unlearning brings the backdoor back, so what it
  removes is mostly the running statistics of the isolated (target-class) batches, and BA goes
  with them. No mode removes SIG and keeps BA; the official behaviour stays.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainables.defenses._common import UNLEARN_BN, complement, epoch_logger, unlearn
from trainables.defenses.base import Cost, Defense, DefenseContext
from trainables.engine import SGDConfig, predict_logits, prepare, train
from trainables.params import param
from trainables.registry import register_defense


@dataclass(frozen=True)
class Params:
    # -- 1. isolation ------------------------------------------------------------------------
    isolation_loss: str = param("lga", "isolation loss: local gradient ascent sign(CE−γ)·CE or flooding "
                                "|CE−b|+b, on the batch mean (paper: lga)", choices=("lga", "flooding"))
    gamma: float = param(0.5, "γ, the LGA loss threshold (paper: 0.5)", low=0.0)
    flooding: float = param(0.5, "b, the flooding level (official code: 0.5)", low=0.0)
    isolation_epochs: int = param(20, "T_te, isolation epochs (paper: 20; official code 10)", low=1)
    isolation_lr: float = param(0.1, "isolation lr, constant (official code: 0.1)", low=0.0)
    isolation_ratio: float = param(0.01, "p, fraction of the training set isolated as poison (paper: 1%)",
                                   low=0.0, high=0.5)
    # -- 3. fine-tuning and unlearning -------------------------------------------------------
    finetune_epochs: int = param(60, "epochs of CE training on the non-isolated examples (paper: 60)", low=0)
    finetune_lr: float = param(0.1, "initial fine-tuning lr, cosine decay (official code: 0.1, step decay)", low=0.0)
    unlearn_epochs: int = param(5, "gradient-ascent epochs on the isolated examples (official code: 5; "
                                "5-20 in use)", low=0)
    unlearn_lr: float = param(5e-4, "unlearning lr, constant (paper: 5e-4)", low=0.0)
    unlearn_bn: str = param("train", "BatchNorm while unlearning: train (official code), eval or recalibrate "
                            "(on the non-isolated examples afterwards)", choices=UNLEARN_BN)
    # -- optimiser ---------------------------------------------------------------------------
    batch_size: int = param(64, "batch size of every phase (official code: 64)", low=1)
    momentum: float = param(0.9, "SGD momentum (official code: 0.9)", low=0.0, high=1.0)
    weight_decay: float = param(1e-4, "SGD weight decay (official code: 1e-4)", low=0.0)

    def sgd(self, epochs: int, lr: float, schedule: str) -> SGDConfig:
        return SGDConfig(epochs=epochs, lr=lr, batch_size=self.batch_size, momentum=self.momentum,
                         weight_decay=self.weight_decay, nesterov=True, schedule=schedule)


# ----------------------------------------------------------------------------- the losses

def lga_loss(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """Local gradient ascent: ``sign(CE − γ)·CE`` on the batch-mean CE."""
    return torch.sign(ce - gamma) * ce


def flooding_loss(ce: torch.Tensor, b: float) -> torch.Tensor:
    """Flooding (Ishida et al. 2020): ``|CE − b| + b`` on the batch-mean CE."""
    return (ce - b).abs() + b


def isolation_loss_fn(p: Params):
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        ce = F.cross_entropy(model(x).float(), y)
        loss = lga_loss(ce, p.gamma) if p.isolation_loss == "lga" else flooding_loss(ce, p.flooding)
        return loss, {"ce": ce}
    return loss_fn


# ----------------------------------------------------------------------------- isolation

def lowest_loss(model: nn.Module, data, ratio: float, rt) -> torch.Tensor:
    """Sorted indices of the ``ratio``·N examples with the lowest per-sample CE (eval mode, no
    augmentation); at least one."""
    logits = predict_logits(model, data.x, rt)
    losses = F.cross_entropy(logits, data.y.to(logits.device), reduction="none")
    k = min(len(losses), max(1, round(ratio * len(losses))))
    return losses.argsort()[:k].sort().values.cpu()


@register_defense
class ABL(Defense):
    name = "abl"
    kind = "training-time"
    Params = Params
    summary = "isolate the fastest-learnt examples with LGA, train on the rest, unlearn the isolated ones"
    paper = "Li et al., Anti-Backdoor Learning, NeurIPS 2021"

    @classmethod
    def cost(cls, p, n_images: int) -> Cost:
        # isolation and fine-tuning on the whole set, unlearning on the isolated fraction
        passes = (p.isolation_epochs + p.finetune_epochs) * n_images + p.unlearn_epochs * p.isolation_ratio * n_images
        return Cost(passes=passes, logged_epochs=p.isolation_epochs + p.finetune_epochs + p.unlearn_epochs)

    def run(self, ctx: DefenseContext) -> nn.Module:
        p, rt, data = self.params, ctx.rt, ctx.train
        model = prepare(ctx.build_model(), rt)

        # 1. isolation with LGA / flooding
        train(model, data, p.sgd(p.isolation_epochs, p.isolation_lr, "constant"), rt, seed=ctx.seed,
              loss_fn=isolation_loss_fn(p), on_epoch=epoch_logger(ctx, "isolation", model))

        # 2. isolate the lowest-loss examples
        isolated = lowest_loss(model, data, p.isolation_ratio, rt)
        scores = ctx.score_filter(isolated)
        ctx.log_epoch("isolate", {"isolated": float(len(isolated)),
                                  **{f"isolation_{k}": float(v) for k, v in scores.items()}})

        # 3. fine-tune on the rest, then unlearn the isolated examples
        train(model, data.subset(complement(len(data), isolated)),
              p.sgd(p.finetune_epochs, p.finetune_lr, "cosine"), rt, seed=ctx.seed + 1,
              on_epoch=epoch_logger(ctx, "finetune", model))
        unlearn(model, data.subset(isolated), data.x[complement(len(data), isolated)],
                p.sgd(p.unlearn_epochs, p.unlearn_lr, "constant"), ctx, bn=p.unlearn_bn, seed=ctx.seed + 2,
                augment=False, on_epoch=epoch_logger(ctx, "unlearn", model))
        return model.eval()
