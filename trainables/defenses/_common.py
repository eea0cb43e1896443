"""Pieces several defenses share (post-training ones, and ABL / DLP), written once.

* ``epoch_logger(ctx, stage, model)``: the ``on_epoch`` hook that sends every epoch of every
  phase to ``ctx.log_epoch`` (which adds test metrics for the LOG only);
* ``finetune(model, clean, cfg, ctx, stage)``: plain cross-entropy fine-tuning on the clean
  subset with the engine's loop — FT itself, FP's recovery phase, MCR's second endpoint and the
  teacher of NAD / ARGD / NBA;
* ``make_teacher(model, clean, cfg, ctx)``: a fine-tuned, frozen, eval-mode copy (the teacher);
* ``per_group(weights, n)``: per-layer-group loss weights for a model with ``n`` groups;
* ``check_lr_steps(p)``, ``student_sgd(p)``, ``teacher_sgd(p)``: the SGD settings NAD and ARGD
  share (NBA's teacher too), read from the method's own ``Params``; ``distillation_cost(p, n,
  student_passes)``: the cost of a teacher's fine-tuning followed by a student's distillation;
* ``complement(n, index)``: the indices of ``range(n)`` not in ``index`` (ABL's and DLP's split);
* ``unlearning_loss``: gradient ascent, the engine ``loss_fn`` of ABL's unlearning and DLP's AU;
  ``unlearn(...)``: that ascent with the BatchNorm handling both methods offer (``UNLEARN_BN``).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainables.data.base import ImageSet
from trainables.defenses.base import Cost, DefenseContext
from trainables.engine import SGDConfig, prepare, train
from trainables.losses import recalibrate_bn


def epoch_logger(ctx: DefenseContext, stage: str, model: nn.Module) -> Callable[[int, dict], dict]:
    """An engine ``on_epoch`` hook: log the epoch's training terms (and test metrics) under
    ``stage``; what ``ctx.log_epoch`` measured is merged into the engine's history entry."""
    def on_epoch(epoch: int, logs: dict) -> dict:
        entry = ctx.log_epoch(stage, dict(logs), model)
        return {k: v for k, v in entry.items() if k not in logs and k not in ("stage", "step")}
    return on_epoch


def finetune(model: nn.Module, clean: ImageSet, cfg: SGDConfig, ctx: DefenseContext, stage: str,
             *, seed: int | None = None, augment: bool = True) -> list[dict]:
    """Fine-tune ``model`` IN PLACE with cross-entropy on ``clean`` (crop + flip by default),
    logging each epoch to ``ctx`` under ``stage``; the model ends in eval mode.

    ``seed`` defaults to ``ctx.seed`` (batches and augmentation). Returns the engine's history.
    """
    prepare(model, ctx.rt)
    history = train(model, clean, cfg, ctx.rt, seed=ctx.seed if seed is None else seed,
                    augment=augment, on_epoch=epoch_logger(ctx, stage, model))
    model.eval()
    return history


def make_teacher(model: nn.Module, clean: ImageSet, cfg: SGDConfig, ctx: DefenseContext,
                 stage: str = "teacher") -> nn.Module:
    """A fine-tuned COPY of ``model`` (NAD / ARGD / NBA step 1), frozen and in eval mode;
    ``model`` itself is left untouched."""
    teacher = copy.deepcopy(model)
    finetune(teacher, clean, cfg, ctx, stage)
    teacher.requires_grad_(False)
    return teacher.eval()


def per_group(weights: tuple[float, ...], groups: int) -> tuple[float, ...]:
    """Map per-layer-group weights given for the paper's three groups onto ``groups`` groups:
    the first ``groups`` values are used and the last value is repeated for any extra group
    (e.g. NAD's β = (500, 1000, 1000) on a 4-group ResNet-18 is (500, 1000, 1000, 1000))."""
    if not weights:
        raise ValueError("need at least one per-group weight")
    return tuple(weights[min(i, len(weights) - 1)] for i in range(groups))


# ----------------------------------------------------------------------------- distillation SGD

def check_lr_steps(p) -> None:
    """Fail when ``Params`` is built, not when training starts: one lr value per milestone."""
    if len(p.milestones) != len(p.lr_values):
        raise ValueError("milestones and lr_values need the same length")


def student_sgd(p) -> SGDConfig:
    """NAD's / ARGD's distillation: momentum 0.9, nesterov, lr ``p.lr`` then ``p.lr_values[i]``
    from epoch ``p.milestones[i]`` on."""
    return SGDConfig(epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, momentum=0.9,
                     weight_decay=p.weight_decay, nesterov=True, schedule="piecewise",
                     milestones=p.milestones, lr_values=p.lr_values)


def teacher_sgd(p, momentum: float = 0.9) -> SGDConfig:
    """The teacher's fine-tuning (NAD, ARGD, NBA): lr ``p.teacher_lr``, nesterov; constant, or a
    tenth of it from epoch ``p.teacher_lr_drop`` on (> 0). NAD's README makes its teacher with
    NAD's own loop at β = 0 for 5-10 epochs: lr 0.1, 0.01 from epoch 2 (NAD ``config.py`` lr
    0.1, ``utils/util.py`` ``adjust_learning_rate``), i.e. ``teacher_lr=0.1, teacher_lr_drop=2``."""
    drop = p.teacher_lr_drop
    return SGDConfig(epochs=p.teacher_epochs, lr=p.teacher_lr, batch_size=p.batch_size, momentum=momentum,
                     weight_decay=p.weight_decay, nesterov=True,
                     schedule="piecewise" if drop else "constant",
                     milestones=(drop,) if drop else (), lr_values=(p.teacher_lr / 10,) if drop else ())


def distillation_cost(p, n_images: int, student_passes: float = 4 / 3) -> Cost:
    """The teacher's ``p.teacher_epochs`` of fine-tuning, then ``p.epochs`` of the student, each
    student epoch ``student_passes`` passes over the data (by default its forward + backward and
    the frozen teacher's forward, counted as 1/3 of a pass)."""
    return Cost(passes=(p.teacher_epochs + p.epochs * student_passes) * n_images,
                logged_epochs=p.teacher_epochs + p.epochs)


# ----------------------------------------------------------------------------- unlearning

def complement(n: int, index: torch.Tensor) -> torch.Tensor:
    """Sorted indices of ``range(n)`` that are not in ``index`` (on the CPU)."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[index.cpu()] = False
    return keep.nonzero(as_tuple=True)[0]


def unlearning_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
    """Gradient ascent on the given examples (ABL's unlearning; DLP Eq. 6): the engine minimises
    ``−CE`` (the CE is logged)."""
    ce = F.cross_entropy(model(x).float(), y)
    return -ce, {"ce": ce}


# BatchNorm while unlearning: ``train`` updates the running statistics from the unlearnt batches
# (ABL's official code), ``eval`` normalises with the statistics the model came with and leaves
# them alone, ``recalibrate`` trains as ``train`` and then recomputes the statistics on the rest
# of the training set (the unlearnt images left out)
UNLEARN_BN = ("train", "eval", "recalibrate")


def unlearn(model: nn.Module, target: ImageSet, rest_x: torch.Tensor, cfg: SGDConfig, ctx: DefenseContext, *,
            bn: str, seed: int, augment: bool, on_epoch) -> None:
    """Gradient ascent on ``target`` (``unlearning_loss``), IN PLACE, BatchNorm as ``bn`` says
    (``UNLEARN_BN``); ``rest_x`` (uint8 images) is what ``recalibrate`` recomputes the statistics
    on. The model ends in eval mode.

    Why it matters: the unlearnt batches hold only suspected poison, and for a clean-label attack
    such as SIG only target-class images, so after a few epochs in train mode the running
    statistics are theirs, not the data's."""
    if bn not in UNLEARN_BN:
        raise ValueError(f"unlearning BatchNorm mode {bn!r}: use one of {list(UNLEARN_BN)}")
    train(model, target, cfg, ctx.rt, seed=seed, loss_fn=unlearning_loss, augment=augment,
          on_epoch=on_epoch, train_mode=bn != "eval")
    if bn == "recalibrate":
        recalibrate_bn(model, rest_x.to(ctx.rt.device), channels_last=ctx.rt.channels_last)
    model.eval()
